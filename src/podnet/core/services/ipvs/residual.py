"""kube-proxy IPVS mode's ipsets and its small residual iptables ruleset (core layer, sans-IO).

Follows kubernetes/kubernetes pkg/proxy/ipvs/proxier.go (writeIptablesRules, acceptIPVSTraffic,
createAndLinkKubeChain, iptablesJumpChain, ipsetWithIptablesChain) and ipset.go (the sets, their
types and comments).

Why this module walks the rules itself instead of loading them into podnet's chain engine: the
rules match on ipsets (`-m set --match-set NAME dst,dst`), on IPVS's own state (`-m ipvs
--vaddr ...`) and on bridge ports (`-m physdev`), three match extensions the engine does not have;
and the nat POSTROUTING rules must see the packet *after* IPVS rewrote its destination, between two
hooks the engine's first-packet walk treats as one. So the rules are kept here as data — the same
data prints kube-proxy's iptables-restore payload, word for word — and `walk()` runs them the way
the kernel's ipt_do_table does: in order, jumps with return points, RETURN, MARK continuing,
ACCEPT/DROP/REJECT/MASQUERADE ending the table at that hook, built-in policy ACCEPT. The number of
rules is constant (it does not grow with the number of Services; only the per-LoadBalancer
KUBE-IPVS-OUT-FILTER drops do, as in kube-proxy), and every set match is one hash lookup.

Invariants:
- A set entry is present while at least one service port contributes it (reference counts), as
  kube-proxy's rebuild-and-diff of activeEntries gives; `add`/`remove` report real changes only.
- Rules for empty sets are left out, as kube-proxy writes them only `if !set.isEmpty()`.
- `physdev ! --physdev-is-in` is taken as true: podnet's pods sit on routed TAP ports, never on a
  bridge that would hand their frames to iptables.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..kubeproxy import masquerade_mark_text
from .table import IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP

__all__ = ["IpSet", "IpSets", "ResidualRules", "Walk", "set_entry_text"]

LOOP_BACK = "KUBE-LOOP-BACK"
CLUSTER_IP = "KUBE-CLUSTER-IP"
EXTERNAL_IP = "KUBE-EXTERNAL-IP"
EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
LOAD_BALANCER = "KUBE-LOAD-BALANCER"
LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP"
LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH"
NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"
HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
IPVS_IPS = "KUBE-IPVS-IPS"

# ipsetInfo: name, type, comment — in kube-proxy's order
SET_INFO: tuple[tuple[str, str, str], ...] = (
    (LOOP_BACK, "hash:ip,port,ip", "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    (CLUSTER_IP, "hash:ip,port", "Kubernetes service cluster ip + port for masquerade purpose"),
    (EXTERNAL_IP, "hash:ip,port", "Kubernetes service external ip + port for masquerade and filter purpose"),
    (EXTERNAL_IP_LOCAL, "hash:ip,port", "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    (LOAD_BALANCER, "hash:ip,port", "Kubernetes service lb portal"),
    (LOAD_BALANCER_FW, "hash:ip,port",
     "Kubernetes service load balancer ip + port for load balancer with sourceRange"),
    (LOAD_BALANCER_LOCAL, "hash:ip,port",
     "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"),
    (LOAD_BALANCER_SOURCE_IP, "hash:ip,port,ip",
     "Kubernetes service load balancer ip + port + source IP for packet filter purpose"),
    (LOAD_BALANCER_SOURCE_CIDR, "hash:ip,port,net",
     "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"),
    (NODE_PORT_TCP, "bitmap:port", "Kubernetes nodeport TCP port for masquerade purpose"),
    (NODE_PORT_LOCAL_TCP, "bitmap:port", "Kubernetes nodeport TCP port with externalTrafficPolicy=local"),
    (NODE_PORT_UDP, "bitmap:port", "Kubernetes nodeport UDP port for masquerade purpose"),
    (NODE_PORT_LOCAL_UDP, "bitmap:port", "Kubernetes nodeport UDP port with externalTrafficPolicy=local"),
    (NODE_PORT_SCTP, "hash:ip,port", "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'"),
    (NODE_PORT_LOCAL_SCTP, "hash:ip,port",
     "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'"),
    (HEALTH_CHECK_NODE_PORT, "bitmap:port", "Kubernetes health check node port"),
    (IPVS_IPS, "hash:ip", "Addresses on the ipvs interface"),
)

# ipsetWithIptablesChain: set, table, from chain, target, match directions, -p
SET_JUMPS: tuple[tuple[str, str, str, str, str, str], ...] = (
    (LOOP_BACK, "nat", "KUBE-POSTROUTING", "MASQUERADE", "dst,dst,src", ""),
    (LOAD_BALANCER, "nat", "KUBE-SERVICES", "KUBE-LOAD-BALANCER", "dst,dst", ""),
    (LOAD_BALANCER_LOCAL, "nat", "KUBE-LOAD-BALANCER", "RETURN", "dst,dst", ""),
    (NODE_PORT_LOCAL_TCP, "nat", "KUBE-NODE-PORT", "RETURN", "dst", "tcp"),
    (NODE_PORT_TCP, "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst", "tcp"),
    (NODE_PORT_LOCAL_UDP, "nat", "KUBE-NODE-PORT", "RETURN", "dst", "udp"),
    (NODE_PORT_UDP, "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst", "udp"),
    (NODE_PORT_LOCAL_SCTP, "nat", "KUBE-NODE-PORT", "RETURN", "dst,dst", "sctp"),
    (NODE_PORT_SCTP, "nat", "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst,dst", "sctp"),
    (LOAD_BALANCER_FW, "filter", "KUBE-PROXY-FIREWALL", "KUBE-SOURCE-RANGES-FIREWALL", "dst,dst", ""),
    (LOAD_BALANCER_SOURCE_CIDR, "filter", "KUBE-SOURCE-RANGES-FIREWALL", "RETURN", "dst,dst,src", ""),
    (LOAD_BALANCER_SOURCE_IP, "filter", "KUBE-SOURCE-RANGES-FIREWALL", "RETURN", "dst,dst,src", ""),
)

NAT_CHAINS = ("KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER", "KUBE-MARK-MASQ")
FILTER_CHAINS = ("KUBE-FORWARD", "KUBE-NODE-PORT", "KUBE-PROXY-FIREWALL", "KUBE-SOURCE-RANGES-FIREWALL",
                 "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER")
# iptablesJumpChain, ensured with `iptables -I` (prepend): the last one for a chain ends up first
JUMPS: tuple[tuple[str, str, str, str], ...] = (
    ("nat", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
    ("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
    ("nat", "POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules"),
    ("filter", "FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules"),
    ("filter", "INPUT", "KUBE-NODE-PORT", "kubernetes health check rules"),
    ("filter", "INPUT", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    ("filter", "FORWARD", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    ("filter", "INPUT", "KUBE-IPVS-FILTER", "kubernetes ipvs access filter"),
    ("filter", "OUTPUT", "KUBE-IPVS-OUT-FILTER", "kubernetes ipvs access filter"),
)
_PROTO_NAMES = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_SCTP: "sctp"}
_PORT_PROTOCOLS = frozenset(_PROTO_NAMES)


def _ip(addr: int) -> str:
    return str(ipaddress.IPv4Address(addr))


def set_entry_text(set_type: str, entry: tuple) -> str:
    """An entry as ipset prints it (and kube-proxy's Entry.String() writes it)."""
    if set_type == "hash:ip,port":
        return f"{_ip(entry[0])},{_PROTO_NAMES[entry[1]]}:{entry[2]}"
    if set_type == "hash:ip,port,ip":
        return f"{_ip(entry[0])},{_PROTO_NAMES[entry[1]]}:{entry[2]},{_ip(entry[3])}"
    if set_type == "hash:ip,port,net":
        return f"{_ip(entry[0])},{_PROTO_NAMES[entry[1]]}:{entry[2]},{_ip(entry[3])}/{entry[4]}"
    if set_type == "bitmap:port":
        return str(entry[0])
    return _ip(entry[0])


class IpSet:
    """One ipset. Entries are tuples of ints (see set_entry_text) with a reference count."""

    __slots__ = ("name", "type", "comment", "members", "prefixes")

    def __init__(self, name: str, set_type: str, comment: str) -> None:
        self.name, self.type, self.comment = name, set_type, comment
        self.members: Counter[tuple] = Counter()
        self.prefixes: Counter[int] = Counter()     # hash:ip,port,net: the prefix lengths present

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, entry: tuple) -> bool:
        return entry in self.members

    def add(self, entry: tuple) -> bool:
        self.members[entry] += 1
        if self.members[entry] > 1:
            return False
        if self.type == "hash:ip,port,net":
            self.prefixes[entry[4]] += 1
        return True

    def remove(self, entry: tuple) -> bool:
        count = self.members.get(entry, 0)
        if count > 1:
            self.members[entry] = count - 1
            return False
        if count == 0:
            return False
        del self.members[entry]
        if self.type == "hash:ip,port,net":
            self.prefixes[entry[4]] -= 1
            if not self.prefixes[entry[4]]:
                del self.prefixes[entry[4]]
        return True

    def match(self, walk: Walk, dirs: str) -> bool:
        """`-m set --match-set NAME dirs` for this packet (one lookup per stored prefix length for
        hash:ip,port,net, as the kernel's hash:net types try each cidr size present)."""
        walk.lookups += 1
        kind = self.type
        if kind == "hash:ip":
            return ((walk.dst if dirs == "dst" else walk.src),) in self.members
        if walk.proto not in _PORT_PROTOCOLS:
            return False
        if kind == "bitmap:port":
            return (walk.dport,) in self.members
        first = walk.src if dirs.startswith("src") else walk.dst
        if kind == "hash:ip,port":
            return (first, walk.proto, walk.dport) in self.members
        if kind == "hash:ip,port,ip":
            return (first, walk.proto, walk.dport, walk.src) in self.members
        for plen in self.prefixes:
            mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
            if (first, walk.proto, walk.dport, walk.src & mask, plen) in self.members:
                return True
        return False

    def entries_text(self) -> list[str]:
        return sorted(set_entry_text(self.type, e) for e in self.members)


class IpSets(dict):
    """All of kube-proxy's sets by name, in ipsetInfo order."""

    def __init__(self) -> None:
        super().__init__((name, IpSet(name, kind, comment)) for name, kind, comment in SET_INFO)

    def listing(self) -> str:
        """`ipset list`, abridged to what podnet knows: name, type, entries and members (the
        kernel's header line with hashsize/initval and the memory size are left out)."""
        out: list[str] = []
        for s in self.values():
            out += [f"Name: {s.name}", f"Type: {s.type}", f"Number of entries: {len(s)}", "Members:"]
            out += s.entries_text()
            out.append("")
        return "\n".join(out[:-1]) + "\n" if out else ""


class Walk:
    """One packet at the residual rules' hooks (what netfilter matching sees of it)."""

    __slots__ = ("src", "dst", "proto", "sport", "dport", "mark", "src_local", "dst_local", "new",
                 "vaddr", "vport", "vproto", "path", "examined", "lookups")

    def __init__(self, src: int, dst: int, proto: int, sport: int, dport: int, *, src_local: bool,
                 dst_local: bool, new: bool = True) -> None:
        self.src, self.dst, self.proto, self.sport, self.dport = src, dst, proto, sport, dport
        self.mark = 0
        self.src_local, self.dst_local, self.new = src_local, dst_local, new
        self.vaddr: int | None = None      # -m ipvs: the virtual service IPVS handled it for
        self.vport = 0
        self.vproto = 0
        self.path: list[str] = []
        self.examined = 0
        self.lookups = 0


@dataclass(frozen=True, slots=True)
class _Rule:
    words: str                                   # everything after "-A CHAIN"
    target: str
    test: Callable[[Walk], bool] = lambda w: True
    mark_or: int = 0
    mark_xor: int = 0
    random_fully: bool = False


class ResidualRules:
    """The rules kube-proxy writes in IPVS mode, rebuilt from the sets' state by `rebuild()`."""

    def __init__(self, sets: IpSets, *, cluster_cidr: str | None, masquerade_all: bool = False,
                 masquerade_bit: int = 14, random_fully: bool = True) -> None:
        self.sets = sets
        self.cluster_cidr = ipaddress.IPv4Network(cluster_cidr) if cluster_cidr else None
        self.masquerade_all = masquerade_all
        self.mark_text = masquerade_mark_text(masquerade_bit)
        self.mark = 1 << masquerade_bit
        self.random_fully = random_fully
        self.lb_no_node_access: Counter[tuple[int, int, int]] = Counter()   # (lb ip, proto, port)
        self.chains: dict[tuple[str, str], list[_Rule]] = {}
        self.written: list[tuple[str, str, _Rule]] = []   # (table, chain, rule) in kube-proxy's write order
        self._shape: tuple | None = None
        self.rebuild()

    # -- building ---------------------------------------------------------------------------------

    def rebuild(self) -> bool:
        """Regenerate the rules if the set of non-empty sets (or the LB drops) changed; True if so."""
        shape = (tuple(bool(s) for s in self.sets.values()), tuple(sorted(self.lb_no_node_access)))
        if shape == self._shape:
            return False
        self._shape = shape
        chains: dict[tuple[str, str], list[_Rule]] = {}
        for table, builtin, target, comment in reversed(JUMPS):
            chains.setdefault((table, builtin), []).append(
                _Rule(f'-m comment --comment "{comment}" -j {target}', target))
        for name in NAT_CHAINS:
            chains[("nat", name)] = []
        for name in FILTER_CHAINS:
            chains[("filter", name)] = []

        written: list[tuple[str, str, _Rule]] = []

        def add(table: str, chain: str, rule: _Rule) -> None:
            chains[(table, chain)].append(rule)
            written.append((table, chain, rule))

        def set_test(name: str, dirs: str, proto: int = 0) -> Callable[[Walk], bool]:
            s = self.sets[name]
            if proto:
                return lambda w: w.proto == proto and s.match(w, dirs)
            return lambda w: s.match(w, dirs)

        add("nat", "KUBE-SERVICES", _Rule("-s 127.0.0.0/8 -j RETURN", "RETURN",
                                          lambda w: w.src >> 24 == 127))
        proto_numbers = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "sctp": IPPROTO_SCTP}
        for name, table, chain, target, dirs, proto in SET_JUMPS:
            s = self.sets[name]
            if not s:
                continue
            words = (f"-p {proto} " if proto else "") + \
                f'-m comment --comment "{s.comment}" -m set --match-set {name} {dirs} -j {target}'
            add(table, chain, _Rule(words, target, set_test(name, dirs, proto_numbers.get(proto, 0)),
                                    random_fully=False))
        cluster = self.sets[CLUSTER_IP]
        if cluster:
            head = f'-m comment --comment "{cluster.comment}" -m set --match-set {CLUSTER_IP}'
            in_set = set_test(CLUSTER_IP, "dst,dst")
            if self.masquerade_all:
                add("nat", "KUBE-SERVICES", _Rule(f"{head} dst,dst -j KUBE-MARK-MASQ", "KUBE-MARK-MASQ", in_set))
            elif self.cluster_cidr is not None:
                net, mask = int(self.cluster_cidr.network_address), int(self.cluster_cidr.netmask)
                add("nat", "KUBE-SERVICES", _Rule(
                    f"{head} dst,dst ! -s {self.cluster_cidr} -j KUBE-MARK-MASQ", "KUBE-MARK-MASQ",
                    lambda w, t=in_set: t(w) and (w.src & mask) != net))
            else:
                by_source = set_test(CLUSTER_IP, "src,dst")
                add("nat", "KUBE-SERVICES", _Rule(f"{head} src,dst -j KUBE-MARK-MASQ", "KUBE-MARK-MASQ", by_source))
        for name, mark in ((EXTERNAL_IP, True), (EXTERNAL_IP_LOCAL, False)):
            s = self.sets[name]
            if not s:
                continue
            head = f'-m comment --comment "{s.comment}" -m set --match-set {name} dst,dst'
            in_set = set_test(name, "dst,dst")
            if mark:
                add("nat", "KUBE-SERVICES", _Rule(f"{head} -j KUBE-MARK-MASQ", "KUBE-MARK-MASQ", in_set))
            add("nat", "KUBE-SERVICES", _Rule(
                f"{head} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT", "ACCEPT",
                lambda w, t=in_set: t(w) and not w.src_local))
            add("nat", "KUBE-SERVICES", _Rule(f"{head} -m addrtype --dst-type LOCAL -j ACCEPT", "ACCEPT",
                                              lambda w, t=in_set: t(w) and w.dst_local))
        add("nat", "KUBE-SERVICES", _Rule("-m addrtype --dst-type LOCAL -j KUBE-NODE-PORT", "KUBE-NODE-PORT",
                                          lambda w: w.dst_local))
        add("nat", "KUBE-LOAD-BALANCER", _Rule("-j KUBE-MARK-MASQ", "KUBE-MARK-MASQ"))
        add("filter", "KUBE-SOURCE-RANGES-FIREWALL", _Rule("-j DROP", "DROP"))
        for ip, proto, port in sorted(self.lb_no_node_access):
            add("filter", "KUBE-IPVS-OUT-FILTER", _Rule(
                f"-s {_ip(ip)} -m ipvs --vaddr {_ip(ip)} --vproto {_PROTO_NAMES[proto]} --vport {port} -j DROP",
                "DROP", lambda w, ip=ip, proto=proto, port=port: (
                    w.src == ip and w.vaddr == ip and w.vproto == proto and w.vport == port)))
        for name in (CLUSTER_IP, LOAD_BALANCER):     # acceptIPVSTraffic
            if self.sets[name]:
                add("nat", "KUBE-SERVICES", _Rule(f"-m set --match-set {name} dst,dst -j ACCEPT", "ACCEPT",
                                                  set_test(name, "dst,dst")))
        mark, mark_text = self.mark, self.mark_text
        add("filter", "KUBE-FORWARD", _Rule(
            f'-m comment --comment "kubernetes forwarding rules" -m mark --mark {mark_text}/{mark_text} -j ACCEPT',
            "ACCEPT", lambda w: w.mark & mark == mark))
        add("filter", "KUBE-FORWARD", _Rule(
            '-m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate '
            "RELATED,ESTABLISHED -j ACCEPT", "ACCEPT", lambda w: not w.new))
        hc = self.sets[HEALTH_CHECK_NODE_PORT]
        add("filter", "KUBE-NODE-PORT", _Rule(
            f'-m comment --comment "{hc.comment}" -m set --match-set {HEALTH_CHECK_NODE_PORT} dst -j ACCEPT',
            "ACCEPT", set_test(HEALTH_CHECK_NODE_PORT, "dst")))
        for name, dirs in ((LOAD_BALANCER, "dst,dst"), (CLUSTER_IP, "dst,dst"), (EXTERNAL_IP, "dst,dst"),
                           (EXTERNAL_IP_LOCAL, "dst,dst"), (HEALTH_CHECK_NODE_PORT, "dst")):
            add("filter", "KUBE-IPVS-FILTER", _Rule(f"-m set --match-set {name} {dirs} -j RETURN", "RETURN",
                                                    set_test(name, dirs)))
        ipvs_ips = set_test(IPVS_IPS, "dst")
        add("filter", "KUBE-IPVS-FILTER", _Rule(
            f"-m conntrack --ctstate NEW -m set --match-set {IPVS_IPS} dst -j REJECT", "REJECT",
            lambda w: w.new and ipvs_ips(w)))
        add("nat", "KUBE-POSTROUTING", _Rule(f"-m mark ! --mark {mark_text}/{mark_text} -j RETURN", "RETURN",
                                             lambda w: w.mark & mark != mark))
        add("nat", "KUBE-POSTROUTING", _Rule(f"-j MARK --xor-mark {mark_text}", "MARK", mark_xor=mark))
        add("nat", "KUBE-POSTROUTING", _Rule(
            '-m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
            + (" --random-fully" if self.random_fully else ""), "MASQUERADE", random_fully=self.random_fully))
        add("nat", "KUBE-MARK-MASQ", _Rule(f"-j MARK --or-mark {mark_text}", "MARK", mark_or=mark))
        self.chains = chains
        self.written = written
        return True

    def rule_count(self) -> int:
        """Rules kube-proxy writes in its restore payload (the built-in chains' jumps excluded)."""
        return sum(len(rules) for (table, chain), rules in self.chains.items()
                   if chain.startswith("KUBE-"))

    # -- walking ----------------------------------------------------------------------------------

    def walk(self, table: str, hook: str, w: Walk) -> _Rule | None:
        """Run `table` at `hook`; the rule whose target ended the walk, or None (policy ACCEPT)."""
        chains = self.chains
        rules, i, name = chains.get((table, hook), ()), 0, hook
        frames: list[tuple] = []
        while True:
            if i >= len(rules):
                if not frames:
                    return None
                rules, i, name = frames.pop()
                continue
            rule = rules[i]
            i += 1
            w.examined += 1
            if not rule.test(w):
                continue
            w.path.append(f"{table}/{name}:{i}")
            target = rule.target
            if (table, target) in chains:
                frames.append((rules, i, name))
                rules, i, name = chains[(table, target)], 0, target
            elif target == "RETURN":
                if not frames:
                    return None
                rules, i, name = frames.pop()
            elif target == "MARK":
                w.mark = (w.mark | rule.mark_or) ^ rule.mark_xor
            else:
                return rule

    # -- text -------------------------------------------------------------------------------------

    def restore_payload(self) -> str:
        """The iptables-restore input kube-proxy hands to `iptables-restore --noflush --counters`:
        nat chains and rules, then filter chains and rules."""
        out: list[str] = []
        for table, names in (("nat", NAT_CHAINS), ("filter", FILTER_CHAINS)):
            out.append(f"*{table}")
            out += [f":{name} - [0:0]" for name in names]
            out += [f"-A {chain} {rule.words}" for t, chain, rule in self.written if t == table]
            out.append("COMMIT")
        return "\n".join(out) + "\n"

    def jump_rules(self) -> list[tuple[str, str, str]]:
        """(table, built-in chain, rule words) as `iptables -S` shows kube-proxy's jumps."""
        return [(table, chain, rule.words) for (table, chain), rules in self.chains.items()
                if not chain.startswith("KUBE-") for rule in rules]

