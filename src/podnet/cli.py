"""`podnet`: bring pods up from Kubernetes manifests and look at the node.

    podnet up -f pods.yaml [-d]        bring pods up (foreground until Ctrl-C, or -d in the background)
    podnet status [-o json]            pods with IP, node, phase and readiness (kubectl get pods -o wide)
    podnet status --services [-o json] Services with their ClusterIPs (kubectl get services -A)
    podnet exec [-n NS] POD -- CMD...  run a command inside a pod; its output and exit code are yours
    podnet stats [-o json] [--node NAME]   what the datapath counted (a cluster: one node's)
    podnet trace POD DST[:PORT] [-p tcp|udp|icmp]   the first packet from a pod, node by node
    podnet iptables-save [-f FILE]     kube-proxy's rules (live, or offline for manifests): see cli_services
    podnet iptables -L | trace ...     list them as iptables does; trace a packet through them
    podnet conntrack -L | -S | -C      the datapath's conntrack table as conntrack-tools prints it
    podnet down                        stop the running lab and remove everything it made
    podnet clean                       remove what a killed podnet run left behind
    podnet store get --prefix P --store etcd://HOST:PORT   the cluster state store: see cli_store
    podnet up -f cluster.yaml --network vxlan|direct [--store etcd://HOST:PORT]   manifests with Nodes:
                                       a cluster of nodes on one machine (see cli_cluster)
    podnet node join --store etcd://HOST:PORT --node NAME --node-ip IP   run one node of a cluster

Layer: lab (the user's edge). Commands other than `up` and `clean` talk to the running lab over its
control socket (`podnet.control`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from podnet import cli_backends, cli_cluster, cli_services, cli_store
from podnet.control import ControlError, request, socket_path
from podnet.errors import PodnetError


def _state_dir(args) -> str:
    from podnet.linux.resources import state_dir_default
    return args.state_dir or state_dir_default()


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_pods(pods: list[dict]) -> str:
    rows = [["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "IP", "NODE"]]
    rows += [[p["namespace"], p["name"], p["ready"], p["phase"], p["restarts"], p["ip"], p["node"]] for p in pods]
    return _table(rows)


def format_services(services: list[dict]) -> str:
    rows = [["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "PORT(S)"]]
    rows += [[s["namespace"], s["name"], s["type"], s["cluster_ip"] or "None", s["ports"] or "<none>"]
             for s in services]
    return _table(rows)


def format_stats(stats: dict, sync: dict | None = None, node: str | None = None, pid: int | None = None,
                 store: dict | None = None) -> str:
    rows = [["PORT", "KIND", "RX-PKTS", "RX-BYTES", "TX-PKTS", "TX-BYTES"]]
    rows += [[p["name"], p["kind"], p["rx_packets"], p["rx_bytes"], p["tx_packets"], p["tx_bytes"]] for p in stats["ports"]]
    out = [f"node {node} (pid {pid})"] if node else []
    out += [_table(rows), ""]
    out.append(f"fast path packets {stats['fast_path_packets']}, slow path packets {stats['slow_path_packets']}, "
               f"flows {stats['flows']} (installed {stats['flows_installed']}), arp replies {stats['arp_replies']}, "
               f"icmp sent {stats['icmp_sent']}")
    drops = stats["drops"]
    out.append("drops: " + (", ".join(f"{k} {v}" for k, v in sorted(drops.items())) if drops else "none"))
    if stats.get("decisions"):
        out.append(f"service decisions {stats['decisions']} (cost {stats['decision_cost'] / stats['decisions']:.1f} "
                   f"per decision), conntrack entries {stats['conntrack_entries']}")
    if sync:
        out.append(f"{sync['backend']} syncs: {sync['full_syncs']} full, {sync['partial_syncs']} partial; "
                   f"{sync['objects_total']} rules; last took {sync['last_sync_ms']} ms, the datapath waited "
                   f"{sync['last_wait_ms']} ms (at most {sync['max_wait_ms']} ms)")
        for failure in sync.get("failed") or ():
            out.append(f"{sync['backend']} sync error: {failure}")
    if store:   # a cluster node: what it could not read from the store
        out.append(f"store: {store['objects_skipped']} unreadable object values and {store['leases_skipped']} "
                   "unreadable subnet leases skipped")
        for key, why in sorted({**store["bad_objects"], **store["bad_leases"]}.items()):
            out.append(f"store: {key} unreadable now: {why}")
    return "\n".join(out)


# ---- up ---------------------------------------------------------------------------------------

def _lab_config(args):
    return cli_services.node_config(args, prefix=args.prefix, offloads=args.offloads, state_dir=_state_dir(args))


def _lab_running(state_dir: str) -> dict | None:
    try:
        return request(state_dir, "ping", timeout_s=2)
    except (ControlError, ValueError):
        return None


async def _serve_lab(args, on_ready) -> None:
    from podnet.control import serve_until_stopped
    from podnet.lab import open_lab

    config = _lab_config(args)
    async with open_lab(args.file, config, wait_ready_s=args.timeout) as lab:
        await serve_until_stopped(lab, socket_path(config.state_dir), on_ready)


def cmd_up(args) -> int:
    import trio

    from podnet.cluster.manifest import load_manifests
    state_dir = _state_dir(args)
    running = _lab_running(state_dir)
    if running:
        print(f"podnet: a lab is already running (pid {running['pid']}); `podnet down` first", file=sys.stderr)
        return 1
    manifests = load_manifests(args.file)  # a bad manifest fails here, before anything is created
    if not manifests.nodes:
        cli_cluster.check_single_node(args)
    if args.detach:
        return _up_detached(args, state_dir)

    def ready(lab) -> None:
        print(format_pods(lab.status()), flush=True)
        if not args.daemon_child:
            print("\npodnet: lab is up; Ctrl-C stops it", flush=True)

    if manifests.nodes:   # a cluster: every Node its own node (podnet.cli_cluster)
        trio.run(cli_cluster.serve_cluster, args, state_dir, ready)
        return 0
    trio.run(_serve_lab, args, ready)
    return 0


def _up_detached(args, state_dir: str) -> int:
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(state_dir) / "lab.log"
    argv = [sys.executable, "-m", "podnet.cli", "--state-dir", state_dir, "up", "--daemon-child",
            "--prefix", args.prefix, "--timeout", str(args.timeout), *cli_services.node_argv(args)]
    argv += [] if args.offloads else ["--no-offloads"]
    argv += ["--network", args.network] if args.network else []
    argv += ["--store", args.store] if args.store else []
    for f in args.file:
        argv += ["-f", str(Path(f).resolve())]
    with open(log_path, "wb") as log:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline = time.monotonic() + args.timeout + 30
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            print(f"podnet: the lab exited with {code} while starting:\n{log_path.read_text()[-4000:]}", file=sys.stderr)
            return 1
        reply = _lab_running(state_dir)
        if reply and reply.get("ready") and reply.get("pid") == child.pid:
            print(format_pods(request(state_dir, "status")["pods"]))
            print(f"\npodnet: lab running in the background (pid {child.pid}, log {log_path}); `podnet down` stops it")
            return 0
        time.sleep(0.1)
    print(f"podnet: the lab did not come up in time; see {log_path}", file=sys.stderr)
    child.send_signal(signal.SIGTERM)
    return 1


# ---- the other commands -----------------------------------------------------------------------

def cmd_status(args) -> int:
    if args.services:
        services = request(_state_dir(args), "services")["services"]
        print(json.dumps(services, indent=2) if args.output == "json" else format_services(services))
        return 0
    pods = request(_state_dir(args), "status")["pods"]
    print(json.dumps(pods, indent=2) if args.output == "json" else format_pods(pods))
    return 0


def cmd_stats(args) -> int:
    reply = request(_state_dir(args), "stats", **cli_services.live_fields(args))
    stats, sync, node, pid = reply["stats"], reply.get("sync"), reply.get("node"), reply.get("pid")
    store = reply.get("store")
    if args.output == "json":
        print(json.dumps({**stats, "sync": sync, "node": node, "pid": pid, "store": store}, indent=2))
    else:
        print(format_stats(stats, sync, node, pid, store))
    return 0


def cmd_trace(args) -> int:
    dst, _, port = args.dst.partition(":")
    if port and not port.isdigit():
        print(f"podnet trace: bad port in {args.dst!r}", file=sys.stderr)
        return 2
    reply = request(_state_dir(args), "packet-trace", pod=args.pod, namespace=args.namespace, dst=dst,
                    dport=int(port) if port else 80, proto=args.proto, sport=args.sport,
                    **cli_services.live_fields(args))
    print(json.dumps(reply["hops"], indent=2) if args.output == "json" else reply["text"])
    return 0


def cmd_exec(args) -> int:
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv and not (args.external and args.pod):
        print("podnet exec: no command given (podnet exec POD -- CMD...)", file=sys.stderr)
        return 2
    reply = request(_state_dir(args), "status")
    if args.external:
        argv = ([args.pod] if args.pod not in (None, "--") else []) + argv
        if not reply.get("external"):
            print("podnet exec: this lab has no uplink (external client)", file=sys.stderr)
            return 1
        return _run_in(reply["external"]["netns"], argv)
    pods = reply["pods"]
    matches = [p for p in pods if p["name"] == args.pod and (args.namespace is None or p["namespace"] == args.namespace)]
    if not matches:
        where = f" in namespace {args.namespace!r}" if args.namespace else ""
        print(f'Error from server (NotFound): pods "{args.pod}" not found{where}', file=sys.stderr)
        return 1
    if len(matches) > 1:
        print(f"podnet exec: pod {args.pod!r} is in namespaces {', '.join(p['namespace'] for p in matches)}; use -n",
              file=sys.stderr)
        return 1
    return _run_in(matches[0]["netns"], argv)


def _run_in(netns: str, argv: list[str]) -> int:
    from podnet.linux.netns import run_in_netns
    try:
        done = run_in_netns(netns, subprocess.run, argv)
    except FileNotFoundError:
        print(f"podnet exec: {argv[0]}: executable file not found", file=sys.stderr)
        return 127
    return done.returncode


def cmd_backend(args) -> int:
    node = cli_services.live_fields(args)
    if args.action == "set":
        reply = request(_state_dir(args), "backend", set=args.name, timeout_s=300, **node)
        sync = reply["sync"]
        where = f" on {args.node}" if args.node else ""
        print(f"podnet: Service backend is now {reply['backend']}{where} ({sync['objects_total']} entries programmed "
              f"in {1000 * (sync['build_s'] + sync['apply_s']):.1f} ms)")
    else:
        print(request(_state_dir(args), "backend", **node)["backend"])
    return 0


def cmd_down(args) -> int:
    state_dir = _state_dir(args)
    running = _lab_running(state_dir)
    if not running:
        print("podnet: no lab is running")
        return 0
    request(state_dir, "down")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(running["pid"], 0)
        except ProcessLookupError:
            print(f"podnet: lab (pid {running['pid']}) stopped and cleaned up")
            return 0
        time.sleep(0.1)
    print(f"podnet: lab (pid {running['pid']}) did not stop within 60 s", file=sys.stderr)
    return 1


def cmd_clean(args) -> int:
    from podnet.linux.resources import clean
    report = clean(prefix=args.prefix, state_dir=_state_dir(args))
    removed = [f"{e.kind.value} {e.name}" for e in report.removed]
    print("podnet clean: removed " + (", ".join(removed) if removed else "nothing"))
    for error in report.errors:
        print(f"podnet clean: {error}", file=sys.stderr)
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    from podnet.linux.names import DEFAULT_PREFIX
    parser = argparse.ArgumentParser(prog="podnet", description="Kubernetes pod networking in a Python datapath")
    parser.add_argument("--state-dir", help="journals, logs, IPAM and the control socket (default /run/podnet)")
    sub = parser.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="bring pods up from manifests")
    up.add_argument("-f", "--file", action="append", required=True, help="manifest file (repeatable)")
    up.add_argument("-d", "--detach", action="store_true", help="run the lab in the background")
    up.add_argument("--prefix", default=DEFAULT_PREFIX, help="name prefix of namespaces and devices")
    cli_services.add_node_options(up)
    cli_cluster.add_cluster_options(up)
    up.add_argument("--no-offloads", dest="offloads", action="store_false", help="TAPs without TSO/checksum offload")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for pods to become ready")
    up.add_argument("--daemon-child", action="store_true", help=argparse.SUPPRESS)
    up.set_defaults(func=cmd_up)

    for name, func, text in (("status", cmd_status, "list pods"), ("stats", cmd_stats, "datapath counters")):
        p = sub.add_parser(name, help=text)
        p.add_argument("-o", "--output", choices=["wide", "json"], default="wide")
        p.set_defaults(func=func)
        if name == "status":
            p.add_argument("--services", action="store_true", help="list Services and their ClusterIPs instead")
        else:
            cli_services.add_node_choice(p)

    tr = sub.add_parser("trace", help="the first packet from a pod through the datapath, across nodes")
    tr.add_argument("pod", help="the pod the packet leaves from")
    tr.add_argument("dst", help="destination IP[:PORT] (a pod, a ClusterIP, anything)")
    tr.add_argument("-n", "--namespace")
    tr.add_argument("-p", "--proto", choices=["tcp", "udp", "icmp"], default="tcp")
    tr.add_argument("--sport", type=int, default=40000, help="source port (for icmp: the echo id)")
    tr.add_argument("-o", "--output", choices=["text", "json"], default="text")
    tr.add_argument("--node", metavar="NAME", help="the pod's node (default: found; a node process of a "
                                                   "cluster traces its own datapath only)")
    tr.set_defaults(func=cmd_trace)

    ex = sub.add_parser("exec", help="run a command inside a pod (or, with --external, on the external client)")
    ex.add_argument("-n", "--namespace")
    ex.add_argument("--external", action="store_true",
                    help="on the external client (a lab's: on the node's uplink; a cluster's: on the underlay)")
    ex.add_argument("pod", nargs="?")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ex.set_defaults(func=cmd_exec)

    sub.add_parser("down", help="stop the running lab").set_defaults(func=cmd_down)
    be = sub.add_parser("backend", help="show or switch the running lab's Service backend")
    cli_services.add_node_choice(be)
    be_sub = be.add_subparsers(dest="action")
    be_set = be_sub.add_parser("set", help="switch: established connections keep their NAT (a cluster: "
                                           "every node, or --node's)")
    be_set.add_argument("name")
    cli_services.add_node_choice(be_set, nested=True)
    be.set_defaults(func=cmd_backend)
    cl = sub.add_parser("clean", help="remove what a killed run left behind")
    cl.add_argument("--prefix", default=DEFAULT_PREFIX)
    cl.set_defaults(func=cmd_clean)
    cli_services.register(sub)
    cli_backends.register(sub)
    cli_store.register(sub)
    cli_cluster.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PodnetError, ControlError) as exc:
        print(f"podnet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
