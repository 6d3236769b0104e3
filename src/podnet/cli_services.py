"""`podnet iptables-save`, `podnet iptables -L`, `podnet iptables trace` and `podnet conntrack`:
the Service rules and the conntrack table, printed as the real tools print them.

    podnet iptables-save [-t TABLE] [-c] [-f FILE...]
    podnet iptables [-t TABLE] -L [CHAIN] [-n] [-v] [-x] [--line-numbers] [-f FILE...]
    podnet iptables trace (--rules FILE | --live | -f FILE...) [--local-ip IP]... --src IP [--sport N]
                          --proto P --dst IP [--dport N] [--all-branches] [--json]
    podnet conntrack -L | -S | -C

Without -f, each takes --node NAME: which node of a running cluster answers (default: the first).

Layer: lab (the user's edge). Without -f the rules are the running lab's, asked over the control
socket; with -f they are the ones the lab would program for those manifests (`podnet.offline`),
computed without root and without bringing anything up, with the node options of `podnet up`.
`--rules FILE` traces iptables-restore text: an iptables-save, or a kube-proxy restore payload, to
which kube-proxy's jumps from the built-in chains are added first (said on stderr).

Differences from the real tools: `iptables-save -f` reads manifests (the real -f names an output
file); `iptables` only lists (-L): the rules are kube-proxy's, and podnet's own chain engine holds
them, not the kernel; `conntrack -S` has one line (the datapath is one CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from podnet import inspection
from podnet.control import request
from podnet.errors import ConfigError

NODE_OPTIONS = ("node_cidr", "service_cidr", "cluster_cidr", "node_ip", "mode", "backend")
UNSUPPORTED = (("-A", "--append"), ("-I", "--insert"), ("-D", "--delete"), ("-R", "--replace"),
               ("-F", "--flush"), ("-X", "--delete-chain"), ("-N", "--new-chain"), ("-P", "--policy"),
               ("-Z", "--zero"), ("-E", "--rename-chain"), ("-S", "--list-rules"), ("-C", "--check"))
ONLY_LIST = "podnet iptables: only -L is supported; the rules are kube-proxy's"


# ---- options shared with `podnet up` ----------------------------------------------------------

def add_node_options(parser: argparse.ArgumentParser, *, offline: bool = False) -> None:
    """The node's parameters, as `podnet up` takes them; defaults are LabConfig's."""
    from podnet.lab import LabConfig
    when = " (with -f)" if offline else ""
    parser.add_argument("--node-cidr", help=f"this node's pod CIDR{when} (default {LabConfig.node_cidr})")
    parser.add_argument("--service-cidr", help=f"ClusterIPs come from here{when} (default {LabConfig.service_cidr})")
    parser.add_argument("--cluster-cidr", help=f"all pods' CIDR: kube-proxy's local-traffic detector{when} "
                                               f"(default {LabConfig.cluster_cidr})")
    parser.add_argument("--node-ip", help=f"the node's own address, the masquerade source{when} "
                                          f"(default {LabConfig.node_ip})")
    from podnet.core.services.registry import BACKENDS
    parser.add_argument("--backend", choices=sorted(BACKENDS),
                        help=f"the Service backend{when} (default {LabConfig.backend})")
    parser.add_argument("--mode", choices=["routed", "bridge"],
                        help="routed: Calico-style /32 pods behind a proxy-ARP gateway (default); "
                             "bridge: kubenet cbr0-style /24 pods on a learning bridge" + when)


def add_node_choice(parser: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """--node NAME: which node of a running cluster answers (podnet.control routes it). `nested`:
    a subcommand's, which must not overwrite its parent's --node with a default."""
    parser.add_argument("--node", metavar="NAME", default=argparse.SUPPRESS if nested else None,
                        help="the node of a running cluster to ask (default: the first; a lab is one node)")


def live_fields(args) -> dict:
    """The request fields that pick the node: none unless --node was given."""
    return {"node": args.node} if getattr(args, "node", None) else {}


def node_config(args, **fields):
    """A LabConfig with the node options that were given, LabConfig's defaults for the others."""
    from podnet.core.datapath import NodeMode
    from podnet.lab import LabConfig
    given = {name: getattr(args, name) for name in NODE_OPTIONS if getattr(args, name, None) is not None}
    if "mode" in given:
        given["mode"] = NodeMode(given["mode"])
    return dataclasses.replace(LabConfig(), **given, **fields)


def node_argv(args) -> list[str]:
    """The node options that were given, as command-line words again (for `up -d`'s child)."""
    words: list[str] = []
    for name in NODE_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            words += ["--" + name.replace("_", "-"), str(value)]
    return words


def _state_dir(args) -> str:
    from podnet.linux.resources import state_dir_default
    return args.state_dir or state_dir_default()


def _check_node_options(args, command: str) -> None:
    """Node options describe the node the manifests of -f would make; anywhere else they are a mistake.
    --node picks a running cluster's node: with -f (or --rules) there is none to pick."""
    given = [f"--{name.replace('_', '-')}" for name in NODE_OPTIONS if getattr(args, name, None) is not None]
    if given and not args.file:
        raise ConfigError(f"{command}: {', '.join(given)} only apply with -f (a running lab, or --rules, "
                          "has its own)")
    if getattr(args, "node", None) and (args.file or getattr(args, "rules", None)):
        raise ConfigError(f"{command}: --node picks a node of the running cluster; with -f or --rules "
                          "nothing running is asked")


def _offline_node(args, command: str):
    """The rules for -f FILE..., or None to ask the running lab."""
    _check_node_options(args, command)
    if not args.file:
        return None
    from podnet.offline import build_offline_node
    return build_offline_node(args.file, node_config(args))


def _emit(stdout: str, stderr: str = "", code: int = 0) -> int:
    if stdout:
        sys.stdout.write(stdout)
    if stderr:
        print(stderr, file=sys.stderr)
    return code


# ---- iptables-save and iptables -L --------------------------------------------------------------

def cmd_iptables_save(args) -> int:
    node = _offline_node(args, "iptables-save")
    if node is None:
        reply = request(_state_dir(args), "iptables-save", table=args.table, counters=args.counters,
                        **live_fields(args))
        return _emit(reply["stdout"], reply["stderr"], reply["exit"])
    try:
        return _emit(inspection.save_rules(node.ruleset, args.table, counters=args.counters, header=time.ctime()))
    except inspection.ToolError as exc:
        return _emit("", str(exc), exc.exit_code)


def cmd_iptables(args) -> int:
    if args.iptables_cmd == "trace":
        return cmd_trace(args)
    if args.list_chain is None:
        print("podnet iptables: give -L [CHAIN] to list the rules, or `podnet iptables trace ...` "
              "(see podnet iptables -h)", file=sys.stderr)
        return 2
    chain = args.list_chain or None
    node = _offline_node(args, "iptables")
    if node is None:
        reply = request(_state_dir(args), "iptables-list", table=args.table, chain=chain, numeric=args.numeric,
                        verbose=args.verbose, exact=args.exact, line_numbers=args.line_numbers,
                        **live_fields(args))
        return _emit(reply["stdout"], reply["stderr"], reply["exit"])
    try:
        return _emit(inspection.list_rules(node.ruleset, args.table, chain, numeric=args.numeric,
                                           verbose=args.verbose, exact=args.exact, line_numbers=args.line_numbers))
    except inspection.ToolError as exc:
        return _emit("", str(exc), exc.exit_code)


class _OnlyList(argparse.Action):
    """-A, -I, -D, ...: refused by name, whatever follows them."""

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.setdefault("nargs", argparse.REMAINDER)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, f"{ONLY_LIST} ({option_string} is not)\n")


# ---- trace ----------------------------------------------------------------------------------

def format_trace(outcomes: list[dict], rules: dict[str, str], *, all_branches: bool = False) -> str:
    """One block per outcome: verdict, destination, masquerade, probability (all branches), then
    the path, one rule per line with its text."""
    width = max((len(step) for o in outcomes for step in o["path"]), default=0)
    blocks = []
    for number, outcome in enumerate(outcomes, 1):
        lines = [f"outcome {number} of {len(outcomes)}",
                 f"  verdict      {outcome['verdict']}",
                 f"  destination  {outcome['destination'] or '-'}",
                 f"  masquerade   {'yes' if outcome['masquerade'] else 'no'}"]
        if all_branches:
            lines.append(f"  probability  {outcome['probability']:.6f}")
        lines.append("  path")
        lines += [f"    {step:<{width}}  {rules.get(step, '')}".rstrip() for step in outcome["path"]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _trace_offline(args) -> tuple[list, dict]:
    """(outcomes, rule texts) from --rules FILE or -f FILE..."""
    from podnet.core.services.iptables import outcomes_json
    probe = {"src": args.src, "dst": args.dst, "proto": args.proto, "sport": args.sport,
             "dport": args.dport or 0, "all_branches": args.all_branches}
    if args.rules:
        try:
            with open(args.rules) as f:
                ruleset, added = inspection.load_rules(f.read())
        except OSError as exc:
            raise ConfigError(f"--rules {args.rules}: {exc.strerror}") from None
        except ConfigError as exc:
            raise ConfigError(f"{args.rules}: {exc}") from None
        if added:
            chains: dict[str, list[str]] = {}
            for table, chain, _ in added:
                names = chains.setdefault(table, [])
                if chain not in names:
                    names.append(chain)
            where = " and ".join(f"{table} {', '.join(names)}" for table, names in chains.items())
            print(f"podnet iptables trace: {args.rules} has no jump to KUBE-SERVICES from nat PREROUTING or OUTPUT "
                  f"(a kube-proxy restore payload); added kube-proxy's {len(added)} jump rules at the head of "
                  f"{where}, as kube-proxy inserts them", file=sys.stderr)
        outcomes = inspection.trace_connection(ruleset, local_addresses=args.local_ips or (), **probe)
    else:
        node = _offline_node(args, "iptables trace")
        ruleset = node.ruleset
        outcomes = node.trace(local_ips=args.local_ips, **probe)
    return outcomes_json(outcomes)["outcomes"], inspection.path_rules(ruleset, outcomes)


def cmd_trace(args) -> int:
    _check_node_options(args, "iptables trace")
    proto = inspection.protocol_number(args.proto)
    if proto in inspection.PORTED_PROTOCOLS and args.dport is None:
        raise ConfigError(f"iptables trace: --dport is needed for {inspection.PORTED_PROTOCOLS[proto]}")
    # check the packet before any work (building the offline rules, asking the lab)
    inspection.first_packet(src=args.src, dst=args.dst, proto=proto, sport=args.sport, dport=args.dport or 0)
    if args.live:
        reply = request(_state_dir(args), "trace", src=args.src, sport=args.sport, proto=args.proto, dst=args.dst,
                        dport=args.dport or 0, all_branches=args.all_branches, local_ips=args.local_ips,
                        **live_fields(args))
        outcomes, rules = reply["outcomes"], reply["rules"]
    else:
        outcomes, rules = _trace_offline(args)
    if args.json:
        print(json.dumps({"outcomes": outcomes}, indent=2))
    else:
        sys.stdout.write(format_trace(outcomes, rules, all_branches=args.all_branches))
    return 0


# ---- conntrack ------------------------------------------------------------------------------

def cmd_conntrack(args) -> int:
    reply = request(_state_dir(args), "conntrack", what=args.what, **live_fields(args))
    for line in reply["lines"]:
        print(line)
    if args.what == "L":
        print(f"podnet conntrack: {len(reply['lines'])} flow entries have been shown.", file=sys.stderr)
    return 0


# ---- the parsers --------------------------------------------------------------------------------

def register(sub) -> None:
    """Add iptables-save, iptables (with its trace subcommand) and conntrack to `podnet`."""
    save = sub.add_parser("iptables-save", help="kube-proxy's rules as iptables-save prints them",
                          description="The running lab's rules, or with -f those it would program for "
                                      "the manifests (nothing is brought up; no root needed).")
    save.add_argument("-t", "--table", help="only this table")
    save.add_argument("-c", "--counters", action="store_true", help="rule counters [packets:bytes]")
    save.add_argument("-f", "--file", action="append", help="manifest file (repeatable): offline")
    add_node_options(save, offline=True)
    add_node_choice(save)
    save.set_defaults(func=cmd_iptables_save)

    ipt = sub.add_parser("iptables", help="list the rules (-L) or trace a packet through them (trace)",
                         usage="podnet iptables [-t TABLE] -L [CHAIN] [-n] [-v] [-x] [--line-numbers] "
                               "[-f FILE... | --node NAME]\n"
                               "       podnet iptables trace -h",
                         description="Lists the rules as iptables -L does: the running lab's, or with -f "
                                     "those it would program for the manifests. Only -L: the rules are "
                                     "kube-proxy's.")
    ipt.add_argument("-t", "--table", default="filter")
    ipt.add_argument("-L", "--list", dest="list_chain", nargs="?", const="", metavar="CHAIN",
                     help="list every chain, or CHAIN")
    ipt.add_argument("-n", "--numeric", action="store_true")
    ipt.add_argument("-v", "--verbose", action="store_true")
    ipt.add_argument("-x", "--exact", action="store_true")
    ipt.add_argument("--line-numbers", action="store_true")
    ipt.add_argument("-f", "--file", action="append", help="manifest file (repeatable): offline")
    add_node_options(ipt, offline=True)
    add_node_choice(ipt)
    for short, long in UNSUPPORTED:
        ipt.add_argument(short, long, action=_OnlyList, dest=f"unsupported_{long[2:]}", help=argparse.SUPPRESS)
    ipt.set_defaults(func=cmd_iptables)
    nested = ipt.add_subparsers(dest="iptables_cmd", metavar="trace")

    trace = nested.add_parser("trace", help="the first packet of a connection through the rules",
                              description="Walks the first packet of a connection as the kernel does: "
                                          "nat PREROUTING (nat OUTPUT from a local address), filter INPUT or "
                                          "FORWARD as routing picks after DNAT, nat POSTROUTING.")
    source = trace.add_mutually_exclusive_group(required=True)
    source.add_argument("--rules", metavar="FILE", help="iptables-restore text (iptables-save, or a kube-proxy "
                                                        "payload: kube-proxy's jumps are added)")
    source.add_argument("--live", action="store_true", help="the running lab's rules")
    source.add_argument("-f", "--file", action="append", help="manifest file (repeatable): the offline rules")
    trace.add_argument("--local-ip", dest="local_ips", action="append", metavar="IP",
                       help="the node's own addresses, addrtype LOCAL (repeatable; default: the lab's "
                            "gateway and node IP, none with --rules)")
    trace.add_argument("--src", required=True, metavar="IP")
    trace.add_argument("--sport", type=int, default=inspection.DEFAULT_SPORT, metavar="N")
    trace.add_argument("--proto", required=True, metavar="P", help="tcp, udp, sctp, icmp or a number")
    trace.add_argument("--dst", required=True, metavar="IP")
    trace.add_argument("--dport", type=int, metavar="N")
    trace.add_argument("--all-branches", action="store_true",
                       help="explore both sides of every statistic match; list every outcome")
    trace.add_argument("--json", action="store_true", help='{"outcomes": [{"verdict", "destination", ...}]}')
    add_node_options(trace, offline=True)
    add_node_choice(trace, nested=True)

    ct = sub.add_parser("conntrack", help="the running lab's conntrack table, as conntrack-tools prints it")
    what = ct.add_mutually_exclusive_group(required=True)
    what.add_argument("-L", "--dump", dest="what", action="store_const", const="L", help="list the entries")
    what.add_argument("-S", "--stats", dest="what", action="store_const", const="S", help="statistics")
    what.add_argument("-C", "--count", dest="what", action="store_const", const="C", help="number of entries")
    add_node_choice(ct)
    ct.set_defaults(func=cmd_conntrack)
