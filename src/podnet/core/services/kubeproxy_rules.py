"""kube-proxy's iptables mode, one sync's worth of rule text (core layer, sans-IO).

Follows kubernetes/kubernetes pkg/proxy/iptables/proxier.go (syncProxyRules,
writeServiceToEndpointRules, portProtoHash, servicePortEndpointChainName, computeProbability)
and pkg/proxy/topology.go (CategorizeEndpoints). Every rule is written with the words, the word
order and the quoting the real proxier hands to iptables-restore, because the payload is shown to
users and checked against the expected dumps of kube-proxy's own unit tests.

Invariants this module keeps:
- Buffers are filled in the real proxier's order: filter and nat chain lines first (top-level
  chains, then each service's EXT, FW, SVC, SVL and SEP chains, then stale chains), then rules
  (fixed rules, each service's rules interleaved as the proxier writes them, `-X` lines for stale
  chains, the "must be the last rule" KUBE-SERVICES rule, then the KUBE-FORWARD rules).
- A service port that is not rewritten in a partial sync still has its chain names marked active
  and its rules counted (kube-proxy's discard buffer), so stale-chain detection and rule counts
  match a full sync.
- Comments containing spaces are wrapped in literal double quotes inside the payload; a comment
  that is a bare service port name ("ns/svc:port") is not.
- Pure functions of their inputs: no clock, no iptables, no I/O.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from podnet.core.services.kubeproxy import ProxyEndpoint, ProxyServicePort

# Top-level chains (proxier.go constants).
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_FIREWALL = "KUBE-FIREWALL"   # kubelet's anti-martian chain, duplicated by kube-proxy

FILTER_TOP_LEVEL_CHAINS = (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS,
                           KUBE_PROXY_FIREWALL)
NAT_TOP_LEVEL_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)

SVC_PREFIX = "KUBE-SVC-"   # Cluster traffic policy endpoint dispatch
SVL_PREFIX = "KUBE-SVL-"   # Local traffic policy endpoint dispatch
EXT_PREFIX = "KUBE-EXT-"   # external destinations (externalIPs, LB IPs, NodePorts)
FW_PREFIX = "KUBE-FW-"     # loadBalancerSourceRanges
SEP_PREFIX = "KUBE-SEP-"   # one endpoint
SERVICE_CHAIN_PREFIXES = (SVC_PREFIX, SVL_PREFIX, SEP_PREFIX, FW_PREFIX, EXT_PREFIX)

# nfacct counter names (pkg/proxy/metrics)
NFACCT_CT_STATE_INVALID = "ct_state_invalid_dropped_pkts"
NFACCT_LOCALHOST_NODEPORTS = "localhost_nps_accepted_pkts"

NODEPORTS_LAST_RULE_COMMENT = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """The 16 base32 characters shared by a service port's SVC/SVL/EXT/FW chains.

    `protocol` is lower case ("tcp"); sha256 of the two strings concatenated, standard base32
    (RFC 4648 alphabet, as Go's base32.StdEncoding), first 16 characters.
    """
    digest = hashlib.sha256((service_port_name + protocol).encode()).digest()
    return base64.b32encode(digest)[:16].decode()


@functools.lru_cache(maxsize=1 << 17)
def endpoint_chain_name(service_port_name: str, protocol: str, endpoint: str) -> str:
    """KUBE-SEP-… for one endpoint; `endpoint` is "ip:port" ("[ip6]:port" for IPv6).

    Cached: kube-proxy computes it once per endpoint (endpointInfo.ChainName), and a sync of a
    large cluster would otherwise spend most of its time hashing.
    """
    digest = hashlib.sha256((service_port_name + protocol + endpoint).encode()).digest()
    return SEP_PREFIX + base64.b32encode(digest)[:16].decode()


def compute_probability(n: int) -> str:
    """`--probability` text for a rule that picks one of `n` remaining endpoints (`%0.10f` of 1/n)."""
    return f"{1.0 / n:.10f}"


def is_service_chain(chain: str) -> bool:
    """True for the per-service chains kube-proxy owns and garbage-collects (isServiceChainName)."""
    return chain.startswith(SERVICE_CHAIN_PREFIXES)


@dataclass(frozen=True, slots=True)
class ServiceChains:
    svc: str
    svl: str
    ext: str
    fw: str


@functools.lru_cache(maxsize=1 << 14)
def service_chains(service_port_name: str, protocol: str) -> ServiceChains:
    h = port_proto_hash(service_port_name, protocol)
    return ServiceChains(SVC_PREFIX + h, SVL_PREFIX + h, EXT_PREFIX + h, FW_PREFIX + h)


@dataclass(frozen=True, slots=True)
class Categorized:
    """CategorizeEndpoints' four results."""

    cluster: tuple[ProxyEndpoint, ...]
    local: tuple[ProxyEndpoint, ...]
    reachable: tuple[ProxyEndpoint, ...]   # union of the two, in endpoint-string order
    has_any: bool                          # usable endpoints exist somewhere in the cluster


def categorize_endpoints(svc: ProxyServicePort, node_zone: str | None) -> Categorized:
    """Which endpoints Cluster and Local traffic policy use (pkg/proxy/topology.go).

    Ready endpoints are used; when there are none, serving+terminating ones are (separately for
    the Cluster and the Local set). Topology (zone hints) narrows only the Ready Cluster set, and
    only when the service asks for it, this node has a zone, every ready endpoint carries a zone
    hint and at least one hint names this node's zone.
    """
    endpoints = svc.endpoints
    uses_cluster = svc.uses_cluster_endpoints
    uses_local = svc.uses_local_endpoints
    cluster: tuple[ProxyEndpoint, ...] = ()
    local: tuple[ProxyEndpoint, ...] = ()
    has_any = False
    use_topology = False
    use_serving_terminating = False

    if uses_cluster:
        use_topology = _can_use_topology(svc, node_zone)
        if use_topology:
            cluster = tuple(ep for ep in endpoints if ep.ready and ep.zone == node_zone)
        else:
            cluster = tuple(ep for ep in endpoints if ep.ready)
        if not cluster:
            # best effort to keep connections alive: topology is not considered here
            cluster = tuple(ep for ep in endpoints if ep.serving and ep.terminating)
        has_any = bool(cluster)

    if not uses_local:
        return Categorized(cluster, (), cluster, has_any)

    has_local_ready = has_local_serving_terminating = False
    for ep in endpoints:
        if ep.ready:
            has_any = True
            has_local_ready = has_local_ready or ep.is_local
        elif ep.serving and ep.terminating:
            has_any = True
            has_local_serving_terminating = has_local_serving_terminating or ep.is_local
    if has_local_ready:
        local = tuple(ep for ep in endpoints if ep.is_local and ep.ready)
    elif has_local_serving_terminating:
        use_serving_terminating = True
        local = tuple(ep for ep in endpoints if ep.is_local and ep.serving and ep.terminating)

    if not uses_cluster:
        return Categorized((), local, local, has_any)
    if not use_topology and not use_serving_terminating:
        # cluster holds every ready endpoint, local only ready ones: cluster is a superset
        return Categorized(cluster, local, cluster, has_any)
    # kube-proxy merges the two through a Go map (random order); we keep endpoint-string order
    merged = {ep.endpoint: ep for ep in cluster}
    merged.update((ep.endpoint, ep) for ep in local)
    reachable = tuple(merged[key] for key in sorted(merged))
    return Categorized(cluster, local, reachable, has_any)


def _can_use_topology(svc: ProxyServicePort, node_zone: str | None) -> bool:
    if not svc.topology_aware_hints or not node_zone:
        return False
    has_endpoint_for_zone = False
    for ep in svc.endpoints:
        if not ep.ready:
            continue
        if ep.zone is None:
            return False
        if ep.zone == node_zone:
            has_endpoint_for_zone = True
    return has_endpoint_for_zone


@dataclass(frozen=True, slots=True)
class RulesConfig:
    """The generator's settings, resolved once (what NewProxier computes from its flags)."""

    ipv6: bool
    masquerade_mark: str
    masquerade_all: bool
    local_match: str | None       # e.g. "-s 10.244.0.0/16"; None for the no-op detector
    not_local_match: str | None   # e.g. "! -s 10.244.0.0/16"
    localhost_node_ports: bool
    node_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    node_ports_match_all: bool
    node_port_ips: tuple[str, ...]   # used when not match_all (loopback candidates included)
    nfacct: bool
    conntrack_tcp_be_liberal: bool
    random_fully: bool
    node_zone: str | None
    large_cluster_endpoints: int


class _Lines:
    """proxyutil.LineBuffer: lines joined with newlines, and a count."""

    __slots__ = ("lines",)

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)

    def __len__(self) -> int:
        return len(self.lines)


class _Discard:
    """proxyutil.DiscardLineBuffer: counts what would have been written."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def write(self, line: str) -> None:
        self.count += 1

    def __len__(self) -> int:
        return self.count


@dataclass
class SyncOutput:
    payload: str
    filter_chains: list[str]
    nat_chains: list[str]                 # declared, in payload order, stale chains included
    deleted_chains: list[str]             # stale chains flushed and removed with -X
    active_nat_chains: set[str]           # every service chain in use (written or skipped)
    filter_rules: int
    nat_rules_written: int                # -A lines in the nat part
    nat_rules_skipped: int                # rules of services not rewritten (partial sync)
    total_endpoints: int
    large_cluster_mode: bool
    services_rewritten: int
    no_local_endpoints_internal: int = 0
    no_local_endpoints_external: int = 0


def write_sync(config: RulesConfig, services: Sequence[ProxyServicePort], *,
               rewrite: Iterable[str] | None, existing_chains: set[str] | frozenset[str],
               cleanup_stale: bool) -> SyncOutput:
    """The iptables-restore input of one sync.

    `services` in the order they are written; `rewrite` is None for a full sync, else the
    namespaced names ("ns/name") whose per-service chains are rewritten; `existing_chains` are the
    nat service chains present before this restore (what kube-proxy reads with iptables-save);
    `cleanup_stale` False skips stale-chain deletion (large-cluster mode between cleanups).
    """
    writer = _SyncWriter(config, services, None if rewrite is None else set(rewrite))
    for svc in services:
        writer.service(svc)
    return writer.finish(existing_chains, cleanup_stale)


class _SyncWriter:
    def __init__(self, config: RulesConfig, services: Sequence[ProxyServicePort],
                 rewrite: set[str] | None) -> None:
        self.config = config
        self.rewrite = rewrite
        self.filter_chains = _Lines()
        self.filter_rules = _Lines()
        self.nat_chains = _Lines()
        self.nat_rules = _Lines()
        self.skipped_chains = _Discard()
        self.skipped_rules = _Discard()
        self.active: set[str] = set()
        self.services_rewritten = 0
        self.no_local_internal = 0
        self.no_local_external = 0
        self.total_endpoints = sum(len(svc.endpoints) for svc in services)
        self.large = self.total_endpoints > config.large_cluster_endpoints
        self._write_fixed_head()

    def _write_fixed_head(self) -> None:
        c = self.config
        for chain in FILTER_TOP_LEVEL_CHAINS:
            self.filter_chains.write(f":{chain} - [0:0]")
        for chain in NAT_TOP_LEVEL_CHAINS:
            self.nat_chains.write(f":{chain} - [0:0]")
        mark = c.masquerade_mark
        self.nat_rules.write(f"-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN")
        # clear the mark so a packet that re-traverses the stack is not masqueraded twice
        self.nat_rules.write(f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}")
        masq = f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
        self.nat_rules.write(masq + " --random-fully" if c.random_fully else masq)
        self.nat_rules.write(f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}")
        if not c.ipv6 and c.localhost_node_ports:
            # route_localnet=1 opens 127/8 to the wire; kubelet writes the same rule (issue 90259)
            self.filter_chains.write(f":{KUBE_FIREWALL} - [0:0]")
            self.filter_rules.write(
                f'-A {KUBE_FIREWALL} -m comment --comment "block incoming localnet connections" '
                "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP")

    # -- one service port ------------------------------------------------------------------

    def service(self, svc: ProxyServicePort) -> None:  # noqa: C901 - mirrors syncProxyRules' loop body
        c = self.config
        proto = svc.protocol.lower()
        name = svc.service_port_name
        chains = service_chains(name, proto)
        mpp = f"-m {proto} -p {proto}"
        external_ips, lb_ips, source_ranges = self._family_addresses(svc)
        externally_accessible = svc.node_port is not None or bool(lb_ips) or bool(external_ips)
        external_policy_local = svc.external_policy_local and externally_accessible

        cat = categorize_endpoints(svc, c.node_zone)
        uses_cluster_chain = bool(cat.cluster) and svc.uses_cluster_endpoints
        uses_local_chain = bool(cat.local) and svc.uses_local_endpoints

        internal_chain = chains.svc
        has_internal = cat.has_any
        if svc.internal_policy_local:
            internal_chain = chains.svl
            if not cat.local:
                has_internal = False
        external_policy_chain = chains.svc
        has_external = cat.has_any
        if external_policy_local:
            external_policy_chain = chains.svl
            if not cat.local:
                has_external = False
        uses_ext_chain = cat.has_any and externally_accessible
        uses_fw_chain = cat.has_any and bool(lb_ips) and bool(source_ranges)
        lb_chain = chains.fw if uses_fw_chain else chains.ext

        internal_target = internal_comment = external_target = external_comment = ""
        if not cat.has_any:
            internal_target = external_target = "REJECT"
            internal_comment = external_comment = f'"{name} has no endpoints"'
        else:
            if not has_internal:
                internal_target, internal_comment = "DROP", f'"{name} has no local endpoints"'
                self.no_local_internal += 1
            if not has_external:
                external_target, external_comment = "DROP", f'"{name} has no local endpoints"'
                self.no_local_external += 1

        filter_rules = self.filter_rules
        nat_chains: _Lines | _Discard = self.nat_chains
        nat_rules: _Lines | _Discard = self.nat_rules
        cip, port = svc.cluster_ip, svc.port

        # ClusterIP
        if has_internal:
            nat_rules.write(f'-A {KUBE_SERVICES} -m comment --comment "{name} cluster IP" {mpp} '
                            f"-d {cip} --dport {port} -j {internal_chain}")
        else:
            filter_rules.write(f"-A {KUBE_SERVICES} -m comment --comment {internal_comment} {mpp} "
                               f"-d {cip} --dport {port} -j {internal_target}")

        # externalIPs
        for ip in external_ips:
            if cat.has_any:
                nat_rules.write(f'-A {KUBE_SERVICES} -m comment --comment "{name} external IP" {mpp} '
                                f"-d {ip} --dport {port} -j {chains.ext}")
            if not has_external:
                filter_rules.write(f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} {mpp} "
                                   f"-d {ip} --dport {port} -j {external_target}")

        # load-balancer ingress IPs
        for ip in lb_ips:
            if cat.has_any:
                nat_rules.write(f'-A {KUBE_SERVICES} -m comment --comment "{name} loadbalancer IP" {mpp} '
                                f"-d {ip} --dport {port} -j {lb_chain}")
            if uses_fw_chain:
                filter_rules.write(f'-A {KUBE_PROXY_FIREWALL} -m comment --comment "{name} traffic not accepted by '
                                   f'{chains.fw}" {mpp} -d {ip} --dport {port} -j DROP')
        if not has_external:
            for ip in lb_ips:
                filter_rules.write(f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} {mpp} "
                                   f"-d {ip} --dport {port} -j {external_target}")

        # NodePort (not subject to loadBalancerSourceRanges)
        if svc.node_port is not None:
            np = svc.node_port
            if cat.has_any:
                if c.localhost_node_ports and not c.ipv6 and c.nfacct:
                    nat_rules.write(f"-A {KUBE_NODEPORTS} -m comment --comment {name} {mpp} -d 127.0.0.0/8 "
                                    f"--dport {np} -m nfacct --nfacct-name {NFACCT_LOCALHOST_NODEPORTS} "
                                    f"-j {chains.ext}")
                nat_rules.write(f"-A {KUBE_NODEPORTS} -m comment --comment {name} {mpp} --dport {np} "
                                f"-j {chains.ext}")
            if not has_external:
                filter_rules.write(f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} "
                                   f"-m addrtype --dst-type LOCAL {mpp} --dport {np} -j {external_target}")

        # healthCheckNodePort: accepted whether or not this node has local endpoints
        if svc.health_check_node_port is not None:
            filter_rules.write(f'-A {KUBE_NODEPORTS} -m comment --comment "{name} health check node port" '
                               f"-m tcp -p tcp --dport {svc.health_check_node_port} -j ACCEPT")

        # Per-service chains: rewritten only on full syncs and for changed services; otherwise
        # counted and thrown away (the chains stay in the kernel untouched).
        if self.rewrite is not None and svc.namespaced_name not in self.rewrite:
            nat_chains, nat_rules = self.skipped_chains, self.skipped_rules
        else:
            self.services_rewritten += 1
        active = self.active

        if has_internal:
            args = f'-m comment --comment "{name} cluster IP" {mpp} -d {cip} --dport {port}'
            if c.masquerade_all:
                nat_rules.write(f"-A {internal_chain} {args} -j {KUBE_MARK_MASQ}")
            elif c.not_local_match is not None:
                # off-cluster traffic to a VIP (static route to any node) may bounce off-node
                nat_rules.write(f"-A {internal_chain} {args} {c.not_local_match} -j {KUBE_MARK_MASQ}")

        if uses_ext_chain:
            ext = chains.ext
            nat_chains.write(f":{ext} - [0:0]")
            active.add(ext)
            if not external_policy_local:
                nat_rules.write(f'-A {ext} -m comment --comment "masquerade traffic for {name} external '
                                f'destinations" -j {KUBE_MARK_MASQ}')
            else:
                if c.local_match is not None:
                    # pods reaching an external IP behave as if they went out to the LB and back
                    nat_rules.write(f'-A {ext} -m comment --comment "pod traffic for {name} external '
                                    f'destinations" {c.local_match} -j {chains.svc}')
                nat_rules.write(f'-A {ext} -m comment --comment "masquerade LOCAL traffic for {name} external '
                                f'destinations" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}')
                nat_rules.write(f'-A {ext} -m comment --comment "route LOCAL traffic for {name} external '
                                f'destinations" -m addrtype --src-type LOCAL -j {chains.svc}')
            if has_external:
                nat_rules.write(f"-A {ext} -j {external_policy_chain}")

        if uses_fw_chain:
            fw = chains.fw
            nat_chains.write(f":{fw} - [0:0]")
            active.add(fw)
            head = f'-A {fw} -m comment --comment "{name} loadbalancer IP"'
            allow_from_node = False
            for cidr in source_ranges:
                nat_rules.write(f"{head} -s {cidr} -j {chains.ext}")
                if c.node_ip is not None and c.node_ip in ipaddress.ip_network(cidr):
                    allow_from_node = True
            if allow_from_node:
                # a node reaching a VIP-style LB IP loops back with the LB IP as source
                for ip in lb_ips:
                    nat_rules.write(f"{head} -s {ip} -j {chains.ext}")
            nat_rules.write(f'-A {fw} -m comment --comment "other traffic to {name} will be dropped by '
                            f'{KUBE_PROXY_FIREWALL}"')

        if uses_cluster_chain:
            nat_chains.write(f":{chains.svc} - [0:0]")
            active.add(chains.svc)
            self._service_to_endpoints(nat_rules, svc, proto, chains.svc, cat.cluster)
        if uses_local_chain:
            nat_chains.write(f":{chains.svl} - [0:0]")
            active.add(chains.svl)
            self._service_to_endpoints(nat_rules, svc, proto, chains.svl, cat.local)

        comment = "" if self.large else f" -m comment --comment {name}"
        affinity = svc.affinity_timeout_s is not None
        for ep in cat.reachable:
            sep = endpoint_chain_name(name, proto, ep.endpoint)
            nat_chains.write(f":{sep} - [0:0]")
            active.add(sep)
            # hairpin: a pod reaching itself through the service must be masqueraded
            nat_rules.write(f"-A {sep}{comment} -s {ep.ip} -j {KUBE_MARK_MASQ}")
            recent = f" -m recent --name {sep} --set" if affinity else ""
            nat_rules.write(f"-A {sep}{comment}{recent} {mpp} -j DNAT --to-destination {ep.endpoint}")

    def _service_to_endpoints(self, nat_rules: _Lines | _Discard, svc: ProxyServicePort, proto: str,
                              chain: str, endpoints: tuple[ProxyEndpoint, ...]) -> None:
        name = svc.service_port_name
        large = self.large
        if svc.affinity_timeout_s is not None:
            for ep in endpoints:
                sep = endpoint_chain_name(name, proto, ep.endpoint)
                comment = "" if large else f' -m comment --comment "{name} -> {ep.endpoint}"'
                nat_rules.write(f"-A {chain}{comment} -m recent --name {sep} --rcheck "
                                f"--seconds {svc.affinity_timeout_s} --reap -j {sep}")
        n = len(endpoints)
        for i, ep in enumerate(endpoints):
            sep = endpoint_chain_name(name, proto, ep.endpoint)
            comment = "" if large else f' -m comment --comment "{name} -> {ep.endpoint}"'
            if i < n - 1:
                nat_rules.write(f"-A {chain}{comment} -m statistic --mode random "
                                f"--probability {compute_probability(n - i)} -j {sep}")
            else:
                nat_rules.write(f"-A {chain}{comment} -j {sep}")

    def _family_addresses(self, svc: ProxyServicePort) -> tuple[list[str], list[str], list[str]]:
        """externalIPs, LB IPs and source ranges of this proxier's family (the rest is ignored,
        as ServiceChangeTracker does for dual-stack Services)."""
        want = 6 if self.config.ipv6 else 4
        ext = [ip for ip in svc.external_ips if ipaddress.ip_address(ip).version == want]
        lb = [ip for ip in svc.load_balancer_ips if ipaddress.ip_address(ip).version == want]
        ranges = [cidr for cidr in svc.source_ranges if ipaddress.ip_network(cidr).version == want]
        return ext, lb, ranges

    # -- the end of the sync ---------------------------------------------------------------

    def finish(self, existing_chains: set[str] | frozenset[str], cleanup_stale: bool) -> SyncOutput:
        c = self.config
        deleted: list[str] = []
        if cleanup_stale:
            # kube-proxy iterates a set; sorted here so the payload is deterministic
            for chain in sorted(existing_chains - self.active):
                if not is_service_chain(chain):
                    continue
                # a chain line flushes it, so the -X cannot fail on its own rules
                self.nat_chains.write(f":{chain} - [0:0]")
                self.nat_rules.write(f"-X {chain}")
                deleted.append(chain)

        if c.node_ports_match_all:
            dest = "-m addrtype --dst-type LOCAL"
            if c.ipv6:
                dest += " ! -d ::1/128"            # localhost NodePorts never work on IPv6
            elif not c.localhost_node_ports:
                dest += " ! -d 127.0.0.0/8"
            self.nat_rules.write(f"-A {KUBE_SERVICES} -m comment --comment {NODEPORTS_LAST_RULE_COMMENT} "
                                 f"{dest} -j {KUBE_NODEPORTS}")
        else:
            for ip in c.node_port_ips:
                if ipaddress.ip_address(ip).is_loopback and (c.ipv6 or not c.localhost_node_ports):
                    continue
                self.nat_rules.write(f"-A {KUBE_SERVICES} -m comment --comment {NODEPORTS_LAST_RULE_COMMENT} "
                                     f"-d {ip} -j {KUBE_NODEPORTS}")

        if not c.conntrack_tcp_be_liberal:
            # INVALID packets would otherwise reset connections (issues 74839, 117924)
            nfacct = f" -m nfacct --nfacct-name {NFACCT_CT_STATE_INVALID}" if c.nfacct else ""
            self.filter_rules.write(f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID{nfacct} -j DROP")
        # forward what we marked, so NodePorts work even with a DROP FORWARD policy
        mark = c.masquerade_mark
        self.filter_rules.write(f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" '
                                f"-m mark --mark {mark}/{mark} -j ACCEPT")
        self.filter_rules.write(f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
                                "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")

        parts = ["*filter", *self.filter_chains.lines, *self.filter_rules.lines, "COMMIT",
                 "*nat", *self.nat_chains.lines, *self.nat_rules.lines, "COMMIT", ""]
        nat_chain_names = [line[1:].split(" ", 1)[0] for line in self.nat_chains.lines]
        filter_chain_names = [line[1:].split(" ", 1)[0] for line in self.filter_chains.lines]
        nat_rules_written = len(self.nat_rules) - len(deleted)
        return SyncOutput(
            payload="\n".join(parts),
            filter_chains=filter_chain_names,
            nat_chains=nat_chain_names,
            deleted_chains=deleted,
            active_nat_chains=self.active,
            filter_rules=len(self.filter_rules),
            nat_rules_written=nat_rules_written,
            nat_rules_skipped=len(self.skipped_rules),
            total_endpoints=self.total_endpoints,
            large_cluster_mode=self.large,
            services_rewritten=self.services_rewritten,
            no_local_endpoints_internal=self.no_local_internal,
            no_local_endpoints_external=self.no_local_external,
        )
