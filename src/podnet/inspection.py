"""What the Service inspection commands show of a ruleset: iptables-save, `iptables -L`, and the
first packet of a connection traced through the hooks.

Layer: lab (above core; no I/O, no clock: callers pass `now` and the random generator). The same
functions serve a running lab (through `podnet.control`) and rules computed offline
(`podnet.offline`) or read from a file, so `podnet iptables ...` prints the same thing either way.

Rules kept, as the real tools keep them:
- A table iptables knows (filter, nat, mangle, raw) always exists: one no restore has created is
  listed and saved with its empty built-in chains, as the kernel creates it on first use. Any other
  name is an error with the tool's wording and exit status (`ToolError`).
- `iptables -L CHAIN` of a chain that does not exist fails with iptables' own message, exit 1.
- A trace changes nothing in the ruleset (no counters, no `recent` lists, no draws from a generator
  the caller did not hand over).
- A kube-proxy restore payload has no jumps from the built-in chains (kube-proxy adds those with
  `iptables -I`); `add_kube_proxy_jumps` puts them where kube-proxy would, so such a payload traces.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable

from podnet.core.services.iptables import EvalContext, Outcome, Ruleset, trace_first_packet
from podnet.core.services.iptables import listing
from podnet.core.services.iptables.rules import BUILTIN_CHAINS, ParseError, Table, parse_protocol
from podnet.core.services.iptables.save import rule_spec, save_tables
from podnet.core.services.kubeproxy import KubeProxyIptables
from podnet.core.services.packetinfo import CtState, PacketInfo
from podnet.errors import ConfigError, PodnetError

NO_CHAIN = "iptables: No chain/target/match by that name."
PORTED_PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}
DEFAULT_SPORT = 32768   # the first port of Linux's ip_local_port_range
_TCP_SYN = 0x02


class ToolError(PodnetError):
    """An error the real tool reports in its own words: printed as it is, with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _table(ruleset: Ruleset, name: str, *, unknown: str, exit_code: int) -> Table:
    if name in ruleset.table_names:
        return ruleset.table(name)
    if name in BUILTIN_CHAINS:
        return Table.empty(name)
    raise ToolError(unknown.format(name=name), exit_code)


def save_rules(ruleset: Ruleset, table: str | None = None, *, counters: bool = False,
               header: str | None = None) -> str:
    """`iptables-save [-t TABLE] [-c]`; `header` stands where iptables-save prints the date."""
    if table is None:
        return ruleset.save(counters=counters, header=header)
    chosen = _table(ruleset, table, unknown="Table `{name}' does not exist", exit_code=1)
    return save_tables({table: chosen}, [table], counters=counters, header=header)


def list_rules(ruleset: Ruleset, table: str = "filter", chain: str | None = None, *, numeric: bool = False,
               verbose: bool = False, exact: bool = False, line_numbers: bool = False) -> str:
    """`iptables -t TABLE -L [CHAIN] [-n] [-v] [-x] [--line-numbers]`."""
    chosen = _table(ruleset, table, unknown="iptables: table '{name}' does not exist", exit_code=3)
    options = {"numeric": numeric, "verbose": verbose, "exact": exact, "line_numbers": line_numbers}
    if chain is None:
        return listing.list_table(chosen, **options)
    if chain not in chosen.chains:
        raise ToolError(NO_CHAIN, 1)
    return listing.list_chain(chosen, chosen.chains[chain], **options)


# ---- the first packet of a connection --------------------------------------------------------------

def _address(text: str | int, what: str) -> int:
    if isinstance(text, int):
        return text
    try:
        return int(ipaddress.IPv4Address(text))
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not an IPv4 address") from None


def protocol_number(proto: str | int) -> int:
    """`tcp`, `udp`, `6`, ... as iptables reads -p."""
    if isinstance(proto, int):
        return proto
    try:
        return parse_protocol(proto)
    except ParseError as exc:
        raise ConfigError(f"--proto: {exc}") from None


def first_packet(*, src: str | int, dst: str | int, proto: str | int = "tcp", sport: int = DEFAULT_SPORT,
                 dport: int = 0) -> PacketInfo:
    """The first packet of a connection as the hooks see it: conntrack state NEW, a SYN for TCP.
    Protocols without ports (ICMP) carry none."""
    number = protocol_number(proto)
    if number in PORTED_PROTOCOLS:
        for value, what in ((sport, "--sport"), (dport, "--dport")):
            if not isinstance(value, int) or not 1 <= value <= 65535:
                raise ConfigError(f"{what}: a {PORTED_PROTOCOLS[number]} port must be in 1..65535, got {value!r}")
    else:
        sport = dport = 0
    return PacketInfo(_address(src, "--src"), _address(dst, "--dst"), number, sport, dport,
                      ct_state=CtState.NEW, tcp_flags=_TCP_SYN if number == 6 else 0, length=60)


def trace_connection(ruleset: Ruleset, *, src: str | int, dst: str | int, proto: str | int = "tcp",
                     sport: int = DEFAULT_SPORT, dport: int = 0, local_addresses: Iterable[str | int] = (),
                     all_branches: bool = False, rng: random.Random | None = None,
                     now: float = 0.0) -> list[Outcome]:
    """Where the first packet of src:sport -> dst:dport goes: nat PREROUTING (nat OUTPUT when `src`
    is one of `local_addresses`), filter INPUT or FORWARD as routing picks after DNAT, nat
    POSTROUTING (`core.services.iptables.trace` has the hooks). Without all_branches, one walk whose
    `statistic` draws come from `rng`; with it, every reachable outcome with its probability."""
    pkt = first_packet(src=src, dst=dst, proto=proto, sport=sport, dport=dport)
    local = frozenset(_address(a, "--local-ip") for a in local_addresses)
    ctx = EvalContext(now=now, local_addresses=local, rng=rng if rng is not None else random.Random(0))
    return trace_first_packet(ruleset, pkt, ctx, all_branches=all_branches)


def rule_text(ruleset: Ruleset, step: str) -> str:
    """The rule a path step names ("nat/KUBE-SVC-X:2" -> its iptables-save text after `-A CHAIN`;
    "nat/PREROUTING:policy" -> "policy ACCEPT")."""
    where, _, position = step.rpartition(":")
    table, _, chain = where.partition("/")
    try:
        found = ruleset.chain(table, chain)
        if position == "policy":
            return f"policy {found.policy}"
        return rule_spec(found.rules[int(position) - 1])
    except (ConfigError, ValueError, IndexError):
        return "(no such rule now)"


def path_rules(ruleset: Ruleset, outcomes: Iterable[Outcome]) -> dict[str, str]:
    """Every step of every outcome's path with its rule text."""
    return {step: rule_text(ruleset, step) for outcome in outcomes for step in outcome.path}


# ---- kube-proxy's jumps from the built-in chains ------------------------------------------------

def _words(args: Iterable[str]) -> str:
    return " ".join(f'"{word}"' if " " in word else word for word in args)


def needs_kube_proxy_jumps(ruleset: Ruleset) -> bool:
    """kube-proxy's KUBE-SERVICES is in nat but neither nat PREROUTING nor OUTPUT jumps to it: the
    rules are a restore payload without the jumps kube-proxy adds with `iptables -I`."""
    if "nat" not in ruleset.table_names or "KUBE-SERVICES" not in ruleset.table("nat").chains:
        return False
    nat = ruleset.table("nat")
    return not any(rule.jump_chain == "KUBE-SERVICES"
                   for hook in ("PREROUTING", "OUTPUT") for rule in nat.chains[hook].rules)


def add_kube_proxy_jumps(ruleset: Ruleset, proxy: KubeProxyIptables | None = None) -> list[tuple[str, str, str]]:
    """Insert the jumps kube-proxy ensures from the built-in chains, in its order at the head of
    each chain, skipping any (chain, target) pair already there; a missing target chain is created
    empty. Returns the rules added as (table, chain, rule text after the chain)."""
    proxy = proxy or KubeProxyIptables()
    added: list[tuple[str, str, str]] = []
    sections: list[str] = []
    for table_name in ("filter", "nat"):
        table = ruleset.table(table_name) if table_name in ruleset.table_names else Table.empty(table_name)
        declared: list[str] = []
        lines: list[str] = []
        position: dict[str, int] = {}
        for rule_table, chain, args in proxy.jump_rules():
            target = args[args.index("-j") + 1]
            if rule_table != table_name or any(r.jump_chain == target for r in table.chains[chain].rules):
                continue
            if target not in table.chains and target not in declared:
                declared.append(target)
            position[chain] = position.get(chain, 0) + 1
            lines.append(f"-I {chain} {position[chain]} {_words(args)}")
            added.append((table_name, chain, _words(args)))
        if lines:
            sections.append("\n".join([f"*{table_name}", *(f":{c} - [0:0]" for c in declared), *lines, "COMMIT"]))
    if sections:
        ruleset.restore("\n".join(sections) + "\n", noflush=True)
    return added


def load_rules(text: str) -> tuple[Ruleset, list[tuple[str, str, str]]]:
    """A ruleset from iptables-restore text (iptables-save output, or a kube-proxy payload, to
    which kube-proxy's jumps are added: see `needs_kube_proxy_jumps`). Returns the jumps added."""
    ruleset = Ruleset()
    ruleset.restore(text)
    added = add_kube_proxy_jumps(ruleset) if needs_kube_proxy_jumps(ruleset) else []
    return ruleset, added
