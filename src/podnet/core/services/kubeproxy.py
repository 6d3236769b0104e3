"""kube-proxy's iptables mode: its Service view and the iptables-restore input it writes
(core layer, sans-IO).

Reproduces kubernetes/kubernetes pkg/proxy/iptables/proxier.go (kube-proxy >= 1.28, with partial
syncs). `KubeProxyIptables.sync()` returns the exact text kube-proxy hands to
`iptables-restore --noflush --counters`; `jump_rules()` lists the `iptables -I` jumps from the
built-in chains that kube-proxy ensures on full syncs. The iptables backend loads both into its
chain engine and shows them to users as iptables-save text. Rule text itself is written by
kubeproxy_rules.py.

The input model mirrors kube-proxy's internal view (ServicePort + Endpoint after the change
trackers ran), not the Kubernetes API objects: one ProxyServicePort per (Service, port) of this
proxier's IP family.

Invariants:
- Deterministic output. kube-proxy walks its service map in Go map order (random); podnet writes
  service ports sorted by (namespace, name, port name, protocol), endpoints sorted by their
  "ip:port" string (as kube-proxy's EndpointSliceCache does), stale chains sorted by name.
- The generator keeps what kube-proxy reads back from iptables-save: the per-service nat chains
  that exist after the previous restore. A chain that existed and is no longer in use is declared
  and removed (`:CHAIN - [0:0]` + `-X CHAIN`); chains of services not rewritten in a partial sync
  stay active and untouched.
- The first sync, and the first sync after `restore_failed()`, are full whatever the caller asks
  (kube-proxy's needFullSync).
- No clock: the large-cluster cleanup interval is judged from the `now` the caller passes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from podnet.core.services import kubeproxy_rules as rules
from podnet.core.services.kubeproxy_rules import (
    KUBE_EXTERNAL_SERVICES,
    KUBE_FIREWALL,
    KUBE_FORWARD,
    KUBE_NODEPORTS,
    KUBE_POSTROUTING,
    KUBE_PROXY_FIREWALL,
    KUBE_SERVICES,
    compute_probability,
    endpoint_chain_name,
    port_proto_hash,
)

__all__ = [
    "ProxyEndpoint", "ProxyServicePort", "KubeProxyIptables", "SyncResult", "SyncStatistics",
    "compute_probability", "endpoint_chain_name", "port_proto_hash", "masquerade_mark_text",
]

PROTOCOLS = frozenset({"TCP", "UDP", "SCTP"})
MAX_AFFINITY_TIMEOUT_S = 86400   # the API's limit for sessionAffinityConfig.clientIP.timeoutSeconds
DEFAULT_AFFINITY_TIMEOUT_S = 10800


def _port(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{what} must be an integer in 1..65535, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class ProxyEndpoint:
    """One endpoint of a service port, with its EndpointSlice conditions.

    `zone` is the endpoint's zone hint (hints.forZones), used only by topology-aware routing.
    `ip` is normalised to its canonical text form.
    """

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    is_local: bool = False
    zone: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ip", str(ipaddress.ip_address(self.ip)))
        _port(self.port, "endpoint port")

    @property
    def endpoint(self) -> str:
        """"ip:port", "[ip6]:port" for IPv6 (net.JoinHostPort), as in SEP names and DNAT targets."""
        if ":" in self.ip:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class ProxyServicePort:
    """One port of a Service as kube-proxy's ServicePort sees it.

    `port_name` is "" for an unnamed port. `health_check_node_port` is only set for
    externalTrafficPolicy=Local LoadBalancers (kube-proxy ignores it otherwise; here it is an
    error). `external_policy_local` only takes effect when the port is externally accessible
    (NodePort, LB IP or externalIP), as in kube-proxy. `topology_aware_hints` is the
    service.kubernetes.io/topology-mode=Auto annotation. Addresses are normalised, source ranges
    are stripped and masked to their network (kube-proxy's TrimSpace + ParseCIDR), endpoints are
    sorted by "ip:port".
    """

    namespace: str
    name: str
    port_name: str
    protocol: str
    cluster_ip: str
    port: int
    node_port: int | None = None
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    source_ranges: tuple[str, ...] = ()
    external_policy_local: bool = False
    internal_policy_local: bool = False
    affinity_timeout_s: int | None = None
    health_check_node_port: int | None = None
    endpoints: tuple[ProxyEndpoint, ...] = ()
    topology_aware_hints: bool = False

    def __post_init__(self) -> None:
        if not self.namespace or not self.name:
            raise ValueError("a service port needs a namespace and a name")
        for text in (self.namespace, self.name, self.port_name):
            if any(ch in text for ch in ' \t\n"/:'):
                raise ValueError(f"invalid character in Service namespace, name or port name: {text!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        cluster_ip = ipaddress.ip_address(self.cluster_ip)
        object.__setattr__(self, "cluster_ip", str(cluster_ip))
        _port(self.port, "service port")
        if self.node_port is not None:
            _port(self.node_port, "node port")
        if self.health_check_node_port is not None:
            _port(self.health_check_node_port, "health check node port")
            if not self.external_policy_local:
                raise ValueError(f"{self.service_port_name}: a health check node port exists only with "
                                 "externalTrafficPolicy=Local")
        if self.affinity_timeout_s is not None and (
                isinstance(self.affinity_timeout_s, bool) or not isinstance(self.affinity_timeout_s, int)
                or not 1 <= self.affinity_timeout_s <= MAX_AFFINITY_TIMEOUT_S):
            raise ValueError(f"affinity_timeout_s must be in 1..{MAX_AFFINITY_TIMEOUT_S}, "
                             f"got {self.affinity_timeout_s!r}")
        object.__setattr__(self, "external_ips",
                           tuple(str(ipaddress.ip_address(ip)) for ip in self.external_ips))
        object.__setattr__(self, "load_balancer_ips",
                           tuple(str(ipaddress.ip_address(ip)) for ip in self.load_balancer_ips))
        object.__setattr__(self, "source_ranges",
                           tuple(str(ipaddress.ip_network(cidr.strip(), strict=False))
                                 for cidr in self.source_ranges))
        endpoints = tuple(self.endpoints)
        by_text: dict[str, ProxyEndpoint] = {}
        for ep in endpoints:
            if not isinstance(ep, ProxyEndpoint):
                raise TypeError(f"endpoints must be ProxyEndpoint, got {type(ep).__name__}")
            if ipaddress.ip_address(ep.ip).version != cluster_ip.version:
                raise ValueError(f"{self.service_port_name}: endpoint {ep.endpoint} is not of the "
                                 f"cluster IP's family")
            if ep.endpoint in by_text:
                raise ValueError(f"{self.service_port_name}: duplicate endpoint {ep.endpoint}")
            by_text[ep.endpoint] = ep
        object.__setattr__(self, "endpoints", tuple(by_text[key] for key in sorted(by_text)))

    @property
    def service_port_name(self) -> str:
        """"ns/name:port", or "ns/name" for an unnamed port (proxy.ServicePortName.String())."""
        if self.port_name:
            return f"{self.namespace}/{self.name}:{self.port_name}"
        return f"{self.namespace}/{self.name}"

    @property
    def namespaced_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def externally_accessible(self) -> bool:
        return self.node_port is not None or bool(self.load_balancer_ips) or bool(self.external_ips)

    @property
    def uses_cluster_endpoints(self) -> bool:
        # external traffic needs Cluster endpoints even with eTP=Local (short-circuiting)
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        return self.internal_policy_local or (self.external_policy_local and self.externally_accessible)


def masquerade_mark_text(bit: int) -> str:
    """The mark as kube-proxy writes it: Go's "%#08x" pads 8 hex digits after the "0x"
    (bit 14 -> "0x00004000"; kube-proxy's unit tests hard-code "0x4000" instead)."""
    if isinstance(bit, bool) or not isinstance(bit, int) or not 0 <= bit <= 31:
        raise ValueError(f"masquerade_bit must be in 0..31, got {bit!r}")
    return f"0x{1 << bit:08x}"


@dataclass(frozen=True, slots=True)
class SyncStatistics:
    """What one sync wrote, in kube-proxy's metric terms where it has them."""

    full: bool
    service_ports: int
    endpoints: int                      # summed over service ports; decides large-cluster mode
    large_cluster_mode: bool
    services_rewritten: int             # service ports whose SVC/SEP/... chains were written
    filter_chains: int                  # declared in *filter
    filter_rules: int                   # sync_proxy_rules_iptables_total{table="filter"}
    nat_chains_written: int             # declared in *nat, stale ones excluded
    nat_chains_deleted: int
    nat_chains_active: int              # top-level + every per-service chain in use
    nat_rules_written: int              # sync_proxy_rules_iptables_last{table="nat"}
    nat_rules_total: int                # sync_proxy_rules_iptables_total{table="nat"}
    payload_bytes: int
    no_local_endpoints_internal: int    # sync_proxy_rules_no_local_endpoints_total{traffic_policy="internal"}
    no_local_endpoints_external: int

    @property
    def rules_written(self) -> int:
        return self.filter_rules + self.nat_rules_written

    @property
    def rules_total(self) -> int:
        return self.filter_rules + self.nat_rules_total

    @property
    def chains_total(self) -> int:
        return self.filter_chains + self.nat_chains_active


@dataclass(frozen=True, slots=True)
class SyncResult:
    payload: str                                  # iptables-restore input: *filter … COMMIT *nat … COMMIT
    chains_written: tuple[tuple[str, str], ...]   # (table, chain) declared, stale chains excluded
    chains_deleted: tuple[str, ...]               # nat chains flushed and removed with -X
    rules_written: int                            # -A lines in the payload
    full: bool
    statistics: SyncStatistics


# (table, target chain, built-in chain, comment, extra matches): iptablesJumpChains followed by
# iptablesKubeletJumpChains, in the order kube-proxy ensures them with `iptables -I`.
_JUMP_CHAINS: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("filter", KUBE_EXTERNAL_SERVICES, "INPUT", "kubernetes externally-visible service portals",
     ("-m", "conntrack", "--ctstate", "NEW")),
    ("filter", KUBE_EXTERNAL_SERVICES, "FORWARD", "kubernetes externally-visible service portals",
     ("-m", "conntrack", "--ctstate", "NEW")),
    ("filter", KUBE_NODEPORTS, "INPUT", "kubernetes health check service ports", ()),
    ("filter", KUBE_SERVICES, "FORWARD", "kubernetes service portals", ("-m", "conntrack", "--ctstate", "NEW")),
    ("filter", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", ("-m", "conntrack", "--ctstate", "NEW")),
    ("filter", KUBE_FORWARD, "FORWARD", "kubernetes forwarding rules", ()),
    ("filter", KUBE_PROXY_FIREWALL, "INPUT", "kubernetes load balancer firewall",
     ("-m", "conntrack", "--ctstate", "NEW")),
    ("filter", KUBE_PROXY_FIREWALL, "OUTPUT", "kubernetes load balancer firewall",
     ("-m", "conntrack", "--ctstate", "NEW")),
    ("filter", KUBE_PROXY_FIREWALL, "FORWARD", "kubernetes load balancer firewall",
     ("-m", "conntrack", "--ctstate", "NEW")),
    ("nat", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", ()),
    ("nat", KUBE_SERVICES, "PREROUTING", "kubernetes service portals", ()),
    ("nat", KUBE_POSTROUTING, "POSTROUTING", "kubernetes postrouting rules", ()),
    ("filter", KUBE_FIREWALL, "INPUT", "", ()),
    ("filter", KUBE_FIREWALL, "OUTPUT", "", ()),
)
_BUILTIN_CHAINS = {"filter": ("INPUT", "FORWARD", "OUTPUT"),
                   "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")}
LOCAL_DETECTORS = ("cluster-cidr", "node-cidr:<cidr>", "bridge-interface:<name>",
                   "interface-name-prefix:<prefix>", "none")


class KubeProxyIptables:
    """One kube-proxy (one IP family, given by `cluster_cidr`) generating iptables-restore input.

    `local_detector` picks how "traffic from a local pod" is matched (localdetector.go):
    "cluster-cidr" (`-s <cluster_cidr>`), "node-cidr:<cidr>", "bridge-interface:<name>"
    (`-i <name>`), "interface-name-prefix:<prefix>" (`-i <prefix>+`) or "none" (no masquerade of
    off-cluster ClusterIP traffic and no eTP=Local short-circuit for pods).
    `node_ips` are this node's addresses; the first of the family is kube-proxy's nodeIP (the
    loadBalancerSourceRanges allow-from-node check). `node_port_addresses` are CIDRs
    (--nodeport-addresses); empty means all local addresses (`-m addrtype --dst-type LOCAL`).
    `nfacct`: whether kube-proxy managed to create its nfacct counters (adds `-m nfacct` matches).
    `conntrack_tcp_be_liberal`: the sysctl is set (no INVALID drop rule).
    `node_zone`: this node's topology.kubernetes.io/zone, for topology-aware hints.
    `sync_period_s`: in large-cluster mode stale chains are deleted at most once per period.
    """

    def __init__(self, cluster_cidr: str = "10.244.0.0/16", node_ips: Iterable[str] = (),
                 masquerade_bit: int = 14, masquerade_all: bool = False, local_detector: str = "cluster-cidr",
                 large_cluster_endpoints: int = 1000, random_fully: bool = True, *,
                 localhost_node_ports: bool = True, node_port_addresses: Iterable[str] = (),
                 nfacct: bool = False, conntrack_tcp_be_liberal: bool = False, node_zone: str | None = None,
                 sync_period_s: float = 30.0) -> None:
        cidr = ipaddress.ip_network(cluster_cidr)
        self.ipv6 = cidr.version == 6
        self.cluster_cidr = str(cidr)
        self.node_ips = tuple(str(ipaddress.ip_address(ip)) for ip in node_ips)
        self.masquerade_mark = masquerade_mark_text(masquerade_bit)
        if large_cluster_endpoints < 0:
            raise ValueError("large_cluster_endpoints must be >= 0")
        self.large_cluster_endpoints = large_cluster_endpoints
        self.sync_period_s = sync_period_s
        local_match, not_local_match = self._local_detector(local_detector)

        family_ips = [ip for ip in self.node_ips if ipaddress.ip_address(ip).version == cidr.version]
        node_ip = ipaddress.ip_address(family_ips[0]) if family_ips else None
        match_all, contains_v4_loopback, node_port_ips = self._node_port_addresses(
            tuple(node_port_addresses), family_ips)
        if not contains_v4_loopback:
            localhost_node_ports = False   # NewProxier: no point opening 127/8 if it is not selected
        if self.ipv6:
            localhost_node_ports = False   # NewDualStackProxier passes false for IPv6
        self.config = rules.RulesConfig(
            ipv6=self.ipv6, masquerade_mark=self.masquerade_mark, masquerade_all=masquerade_all,
            local_match=local_match, not_local_match=not_local_match,
            localhost_node_ports=localhost_node_ports, node_ip=node_ip,
            node_ports_match_all=match_all, node_port_ips=node_port_ips, nfacct=nfacct,
            conntrack_tcp_be_liberal=conntrack_tcp_be_liberal, random_fully=random_fully,
            node_zone=node_zone, large_cluster_endpoints=large_cluster_endpoints)

        self._existing_chains: frozenset[str] = frozenset()     # nat service chains in the kernel
        self._previous: dict[tuple[str, str], ProxyServicePort] = {}
        self._needs_full_sync = True
        self._last_cleanup: float | None = None
        self._last_sync_was_full = True
        self._undo: tuple[frozenset[str], dict[tuple[str, str], ProxyServicePort], float | None] | None = None
        self._statistics: SyncStatistics | None = None
        self.restore_failures = 0
        self.partial_restore_failures = 0

    # -- configuration helpers -------------------------------------------------------------

    def _local_detector(self, spec: str) -> tuple[str | None, str | None]:
        kind, _, arg = spec.partition(":")
        if kind == "cluster-cidr" and not arg:
            return f"-s {self.cluster_cidr}", f"! -s {self.cluster_cidr}"
        if kind == "node-cidr" and arg:
            net = ipaddress.ip_network(arg)
            if (net.version == 6) != self.ipv6:
                raise ValueError(f"node CIDR {arg} is not of the cluster CIDR's family")
            return f"-s {net}", f"! -s {net}"
        if kind == "bridge-interface" and arg:
            return f"-i {arg}", f"! -i {arg}"
        if kind == "interface-name-prefix" and arg:
            return f"-i {arg}+", f"! -i {arg}+"
        if kind == "none" and not arg:
            return None, None
        raise ValueError(f"unknown local_detector {spec!r}; one of {', '.join(LOCAL_DETECTORS)}")

    def _node_port_addresses(self, cidrs: tuple[str, ...], family_ips: list[str]
                             ) -> tuple[bool, bool, tuple[str, ...]]:
        """(match_all, contains IPv4 loopback, node IPs selected) as NewNodePortAddresses and
        GetNodeIPs compute them; the node's addresses are its loopback address then `node_ips`."""
        version = 6 if self.ipv6 else 4
        nets = [ipaddress.ip_network(c.strip(), strict=False) for c in cidrs]
        nets = [n for n in nets if n.version == version]
        if not nets or any(n.prefixlen == 0 for n in nets):
            return True, not self.ipv6, ()
        contains_v4_loopback = any(n.version == 4 and ipaddress.ip_address("127.0.0.1") in n for n in nets)
        candidates = ["::1" if self.ipv6 else "127.0.0.1", *family_ips]
        selected: list[str] = []
        for ip in candidates:
            if ip not in selected and any(ipaddress.ip_address(ip) in n for n in nets):
                selected.append(ip)
        return False, contains_v4_loopback, tuple(selected)

    # -- syncing ---------------------------------------------------------------------------

    def sync(self, services: Iterable[ProxyServicePort], *, full: bool, changed: set[str] | None = None,
             now: float | None = None) -> SyncResult:
        """Generate one iptables-restore payload.

        `full`: rewrite every per-service chain (kube-proxy does this at start, after a failure,
        on topology changes and every hour); forced when the previous state is unknown.
        `changed`: for a partial sync, the service ports whose chains are rewritten; entries are
        service port names ("ns/svc:port" or "ns/svc"), and as in kube-proxy the granularity is
        the Service, so every port of a named Service is rewritten. None means: every Service whose
        ports differ from the previous sync (what kube-proxy's change trackers report).
        `now` (seconds, any epoch): only used to space stale-chain cleanups in large-cluster mode;
        None cleans up on every sync.
        """
        ports: dict[tuple[str, str], ProxyServicePort] = {}
        want = 6 if self.ipv6 else 4
        for svc in services:
            if not isinstance(svc, ProxyServicePort):
                raise TypeError(f"services must be ProxyServicePort, got {type(svc).__name__}")
            if ipaddress.ip_address(svc.cluster_ip).version != want:
                raise ValueError(f"{svc.service_port_name}: cluster IP {svc.cluster_ip} is not IPv{want}, "
                                 "the family of this proxier")
            key = (svc.service_port_name, svc.protocol)
            if key in ports:
                raise ValueError(f"duplicate service port {svc.service_port_name} {svc.protocol}")
            ports[key] = svc
        ordered = sorted(ports.values(), key=lambda s: (s.namespace, s.name, s.port_name, s.protocol))

        do_full = full or self._needs_full_sync
        rewrite: set[str] | None = None
        if not do_full:
            rewrite = self._changed_services(ports) if changed is None else {
                entry.split(":", 1)[0] for entry in changed}

        total_endpoints = sum(len(svc.endpoints) for svc in ordered)
        large = total_endpoints > self.large_cluster_endpoints
        cleanup = (not large or now is None or self._last_cleanup is None
                   or now - self._last_cleanup > self.sync_period_s)
        out = rules.write_sync(self.config, ordered, rewrite=rewrite, existing_chains=self._existing_chains,
                               cleanup_stale=cleanup)

        # What iptables-save will show next time, if this restore succeeds.
        self._undo = (self._existing_chains, self._previous, self._last_cleanup)
        deleted = set(out.deleted_chains)
        written = {c for c in out.nat_chains if rules.is_service_chain(c) and c not in deleted}
        self._existing_chains = frozenset((self._existing_chains - deleted) | written)
        self._previous = ports
        if cleanup and now is not None:
            self._last_cleanup = now
        self._needs_full_sync = False
        self._last_sync_was_full = do_full

        chains_written = tuple([("filter", c) for c in out.filter_chains]
                               + [("nat", c) for c in out.nat_chains if c not in deleted])
        stats = SyncStatistics(
            full=do_full, service_ports=len(ordered), endpoints=out.total_endpoints,
            large_cluster_mode=out.large_cluster_mode, services_rewritten=out.services_rewritten,
            filter_chains=len(out.filter_chains), filter_rules=out.filter_rules,
            nat_chains_written=len(out.nat_chains) - len(deleted), nat_chains_deleted=len(deleted),
            nat_chains_active=len(rules.NAT_TOP_LEVEL_CHAINS) + len(out.active_nat_chains),
            nat_rules_written=out.nat_rules_written,
            nat_rules_total=out.nat_rules_written + out.nat_rules_skipped,
            payload_bytes=len(out.payload.encode()),
            no_local_endpoints_internal=out.no_local_endpoints_internal,
            no_local_endpoints_external=out.no_local_endpoints_external)
        self._statistics = stats
        return SyncResult(payload=out.payload, chains_written=chains_written,
                          chains_deleted=tuple(out.deleted_chains),
                          rules_written=out.filter_rules + out.nat_rules_written, full=do_full,
                          statistics=stats)

    def _changed_services(self, ports: dict[tuple[str, str], ProxyServicePort]) -> set[str]:
        changed = {svc.namespaced_name for key, svc in ports.items() if self._previous.get(key) != svc}
        changed |= {svc.namespaced_name for key, svc in self._previous.items() if key not in ports}
        return changed

    def restore_failed(self) -> None:
        """The last payload was rejected: forget its effects and make the next sync full."""
        if self._undo is not None:
            self._existing_chains, self._previous, self._last_cleanup = self._undo
            self._undo = None
        self.restore_failures += 1
        if not self._last_sync_was_full:
            self.partial_restore_failures += 1
        self._needs_full_sync = True

    def force_full_sync(self) -> None:
        """The next sync is full (kube-proxy's canary chain vanished, or node topology changed)."""
        self._needs_full_sync = True

    @property
    def needs_full_sync(self) -> bool:
        return self._needs_full_sync

    @property
    def existing_chains(self) -> frozenset[str]:
        """The per-service nat chains believed to exist after the last sync."""
        return self._existing_chains

    def statistics(self) -> SyncStatistics | None:
        """Statistics of the last sync (None before the first)."""
        return self._statistics

    # -- jumps from the built-in chains ----------------------------------------------------

    def jump_rules(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """(table, built-in chain, rule args) in the order the rules end up in each built-in chain.

        kube-proxy prepends each jump (`iptables -I`) in list order, so the last one ensured is
        first in its chain. Comments are single argv words here (no quotes).
        """
        ensured = []
        for table, target, builtin, comment, extra in _JUMP_CHAINS:
            args = list(extra)
            if comment:
                args += ["-m", "comment", "--comment", comment]
            args += ["-j", target]
            ensured.append((table, builtin, tuple(args)))
        final: list[tuple[str, str, tuple[str, ...]]] = []
        for table, chains in _BUILTIN_CHAINS.items():
            for builtin in chains:
                final.extend(r for r in reversed(ensured) if r[0] == table and r[1] == builtin)
        return final

    def jump_rules_restore(self) -> str:
        """The jumps as iptables-restore input to put *before* a sync payload on empty tables (a
        fresh node or netns): built-in chains, the (empty) target chains, then `-A` lines in the
        final order. On a live host use jump_rules() with `iptables -I` instead."""
        rules_by_table: dict[str, list[tuple[str, tuple[str, ...]]]] = {"filter": [], "nat": []}
        targets: dict[str, list[str]] = {"filter": [], "nat": []}
        for table, target, _builtin, _comment, _extra in _JUMP_CHAINS:
            if target not in targets[table]:
                targets[table].append(target)
        for table, builtin, args in self.jump_rules():
            rules_by_table[table].append((builtin, args))
        lines: list[str] = []
        for table in ("filter", "nat"):
            lines.append(f"*{table}")
            lines += [f":{chain} ACCEPT [0:0]" for chain in _BUILTIN_CHAINS[table]]
            lines += [f":{chain} - [0:0]" for chain in targets[table]]
            for builtin, args in rules_by_table[table]:
                lines.append(f"-A {builtin} " + " ".join(_quote(word) for word in args))
            lines.append("COMMIT")
        return "\n".join(lines) + "\n"


def _quote(word: str) -> str:
    return f'"{word}"' if " " in word else word
