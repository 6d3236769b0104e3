"""kube-proxy's IPVS proxier, as diffs: what syncProxyRules makes of the Service ports, applied to
IPVS's tables and kube-proxy's ipsets one changed entry at a time (core layer, sans-IO).

Follows kubernetes/kubernetes pkg/proxy/ipvs/proxier.go (syncProxyRules, syncService,
syncEndpoint, cleanLegacyService) and graceful_termination.go:

- Each Service port becomes virtual services keyed by (protocol, address, port): its ClusterIP,
  each externalIP, each LoadBalancer IP, and node IP:nodePort for each node IP. ClusterIPs,
  externalIPs and LB IPs are bound to kube-ipvs0 (the KUBE-IPVS-IPS set) unless the address already
  belongs to the node.
- Each usable endpoint becomes a real server with weight 1. The ClusterIP service uses the Local
  endpoints when internalTrafficPolicy is Local, the external ones when externalTrafficPolicy is
  Local — falling back to the Cluster endpoints when there is no local one (kubernetes PR 97081).
  New real servers are added in "ip:port" order (kube-proxy's order is Go's random map order), so
  the kernel's list, which puts each new one at its head, reads in reverse.
- A removed endpoint is deleted at once when it has no connections or the service is UDP or SCTP;
  otherwise it gets weight 0 (no new connections) and is deleted when ActiveConn + InActConn reach
  0 (`dest_unbound`; kube-proxy checks once a minute, podnet as soon as the last connection goes).
  An endpoint that comes back while draining is deleted and added again
  (MoveRSOutofGracefulDeleteList).
- sessionAffinity ClientIP makes the virtual service persistent with the affinity timeout; the mh
  scheduler gets the source-port flag (FlagSourceHash = IP_VS_SVC_F_SCHED2, "mh-port").

Invariants: the wanted state of each port is kept, and a sync only diffs the ports that changed
(by identity, then equality, with the previous sync) — `objects_written` counts exactly the virtual
services, real servers and set entries written. A full sync recomputes every port and still writes
only differences. Two ports claiming one virtual service is a ConfigError, raised before anything
changes. A virtual service changes hands cleanly within one sync (releases happen first).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from podnet.errors import ConfigError

from ..base import ProxyServicePort, SyncReport
from ..kubeproxy_rules import categorize_endpoints
from . import residual
from .residual import IpSets, ResidualRules
from .schedulers import make_scheduler
from .table import (
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, PROTO_NAMES, SVC_F_PERSISTENT, SVC_F_SCHED2, Dest, VirtualService,
)

__all__ = ["IpvsProxier"]

_PROTOCOLS = {"TCP": IPPROTO_TCP, "UDP": IPPROTO_UDP, "SCTP": IPPROTO_SCTP}


@dataclass(frozen=True, slots=True)
class _VsSpec:
    sched: str
    flags: int
    timeout: int
    endpoints: tuple[tuple[int, int, bool], ...]    # (ip, port, is_local) in "ip:port" order


@dataclass
class _PortState:
    vs: dict[tuple[int, int, int], _VsSpec] = field(default_factory=dict)
    entries: set[tuple[str, tuple]] = field(default_factory=set)        # (set name, entry)
    lb_no_node: set[tuple[int, int, int]] = field(default_factory=set)


@dataclass
class _Writes:
    vs: int = 0
    rs: int = 0
    ipset: int = 0

    @property
    def total(self) -> int:
        return self.vs + self.rs + self.ipset


def _ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


class IpvsProxier:
    """The sync half of kube-proxy's IPVS mode over shared tables: `services` (IPVS's virtual
    services by key), `sets` and `rules` (residual.py). `scheduler_for(port)` names a port's
    scheduler."""

    def __init__(self, sets: IpSets, rules: ResidualRules, *, node_ips: tuple[int, ...],
                 local_addresses: frozenset[int], partial_sync: bool,
                 scheduler_for: Callable[[ProxyServicePort], str]) -> None:
        self.services: dict[tuple[int, int, int], VirtualService] = {}
        self.sets = sets
        self.rules = rules
        self.node_ips = node_ips
        self.node_ip = node_ips[0] if node_ips else None
        self.local_addresses = local_addresses
        self.partial_sync = partial_sync
        self.scheduler_for = scheduler_for
        self._ports: dict[tuple[str, str], ProxyServicePort] = {}
        self._port_state: dict[tuple[str, str], _PortState] = {}
        self._vs_owner: dict[tuple[int, int, int], tuple[str, str]] = {}
        self._terminating: dict[tuple[tuple[int, int, int], tuple[int, int]], Dest] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._real_servers = 0
        self._vs_serial = 0
        self.syncs = 0
        self.graceful_deletes = 0
        self.last_sync: SyncReport | None = None

    @property
    def real_servers(self) -> int:
        return self._real_servers

    @property
    def terminating(self) -> int:
        """Real servers at weight 0 waiting for their connections to end."""
        return len(self._terminating)

    def mark_dirty(self, name: str) -> None:
        """Re-sync the ports of `name` ("ns/name:port" or "ns/name") next time (a scheduler changed)."""
        self._dirty.update(key for key, svc in self._ports.items()
                           if name in (svc.service_port_name, svc.namespaced_name))

    def sync(self, services: Iterable[ProxyServicePort], *, full: bool = True) -> SyncReport:
        do_full = full or not self.partial_sync or self.syncs == 0
        ports: dict[tuple[str, str], ProxyServicePort] = {}
        changed: list[tuple[str, str]] = []
        previous = self._ports
        for svc in services:
            if not isinstance(svc, ProxyServicePort):
                raise TypeError(f"services must be ProxyServicePort, got {type(svc).__name__}")
            key = (svc.service_port_name, svc.protocol)
            if key in ports:
                raise ConfigError(f"duplicate service port {svc.service_port_name} {svc.protocol}")
            ports[key] = svc
            prev = previous.get(key)
            if prev is svc and not do_full and key not in self._dirty:
                continue                 # the common case of a partial sync: nothing to look at
            if ipaddress.ip_address(svc.cluster_ip).version != 4:
                raise ConfigError(f"{svc.service_port_name}: cluster IP {svc.cluster_ip} is not IPv4, the family "
                                  "of this proxier")
            if do_full or key in self._dirty or prev != svc:
                changed.append(key)
        removed = [key for key in previous if key not in ports]
        wanted = {key: self._desired(ports[key]) for key in changed}
        self._check_conflicts(wanted, set(changed) | set(removed))
        writes = _Writes()
        for key in removed:                      # release first, so a moved address is free
            self._apply(key, _PortState(), writes)
            del self._port_state[key]
        for key in changed:
            self._release(key, wanted[key], writes)
        for key in changed:
            self._apply(key, wanted[key], writes)
        self._ports = ports
        self._dirty.clear()
        rules_changed = self.rules.rebuild()
        self.syncs += 1
        report = SyncReport(full=do_full, services=len(ports), objects_written=writes.total,
                            objects_total=len(self.services) + self._real_servers,
                            detail={"virtual_services_written": writes.vs, "real_servers_written": writes.rs,
                                    "ipset_entries_written": writes.ipset,
                                    "services_examined": len(changed) + len(removed),
                                    "iptables_rules": self.rules.rule_count(),
                                    "iptables_rules_changed": rules_changed,
                                    "terminating_real_servers": len(self._terminating)})
        self.last_sync = report
        return report

    def _desired(self, svc: ProxyServicePort) -> _PortState:
        """What kube-proxy's syncProxyRules makes of one service port."""
        proto = _PROTOCOLS[svc.protocol]
        sched = self.scheduler_for(svc)
        flags, timeout = 0, 0
        if svc.affinity_timeout_s is not None:
            flags, timeout = SVC_F_PERSISTENT, svc.affinity_timeout_s
        if sched == "mh":
            flags |= SVC_F_SCHED2
        cat = categorize_endpoints(svc, None)

        def endpoints(only_local: bool) -> tuple[tuple[int, int, bool], ...]:
            chosen = cat.local if only_local and cat.local else cat.cluster
            return tuple((_ip(ep.ip), ep.port, ep.is_local) for ep in chosen)

        state = _PortState()
        entries = state.entries
        for ep in svc.endpoints:
            if ep.is_local:
                entries.add((residual.LOOP_BACK, (_ip(ep.ip), proto, ep.port, _ip(ep.ip))))
        cluster_ip = _ip(svc.cluster_ip)
        entries.add((residual.CLUSTER_IP, (cluster_ip, proto, svc.port)))
        state.vs[(proto, cluster_ip, svc.port)] = _VsSpec(sched, flags, timeout, endpoints(svc.internal_policy_local))
        entries.add((residual.IPVS_IPS, (cluster_ip,)))
        external = endpoints(svc.external_policy_local)
        for text in svc.external_ips:
            ip = _ip(text)
            name = residual.EXTERNAL_IP_LOCAL if svc.external_policy_local else residual.EXTERNAL_IP
            entries.add((name, (ip, proto, svc.port)))
            state.vs[(proto, ip, svc.port)] = _VsSpec(sched, flags, timeout, external)
            if ip not in self.local_addresses:
                entries.add((residual.IPVS_IPS, (ip,)))
        for text in svc.load_balancer_ips:
            ip = _ip(text)
            entries.add((residual.LOAD_BALANCER, (ip, proto, svc.port)))
            if svc.external_policy_local:
                entries.add((residual.LOAD_BALANCER_LOCAL, (ip, proto, svc.port)))
            if svc.source_ranges:
                entries.add((residual.LOAD_BALANCER_FW, (ip, proto, svc.port)))
                allow_from_node = False
                for cidr in svc.source_ranges:
                    net = ipaddress.ip_network(cidr)
                    if net.version != 4:
                        continue
                    entries.add((residual.LOAD_BALANCER_SOURCE_CIDR,
                                 (ip, proto, svc.port, int(net.network_address), net.prefixlen)))
                    if self.node_ip is not None and ipaddress.IPv4Address(self.node_ip) in net:
                        allow_from_node = True
                if allow_from_node:
                    entries.add((residual.LOAD_BALANCER_SOURCE_IP, (ip, proto, svc.port, ip)))
                else:
                    state.lb_no_node.add((ip, proto, svc.port))
            state.vs[(proto, ip, svc.port)] = _VsSpec(sched, flags, timeout, external)
            if ip not in self.local_addresses:
                entries.add((residual.IPVS_IPS, (ip,)))
        if svc.node_port is not None and not self.node_ips:
            return state    # kube-proxy `continue`s: no node IPs, no NodePort (nor health check) entries
        if svc.node_port is not None:
            local = svc.external_policy_local
            if proto == IPPROTO_SCTP:
                for node_ip in self.node_ips:
                    entries.add((residual.NODE_PORT_SCTP, (node_ip, proto, svc.node_port)))
                    if local:
                        entries.add((residual.NODE_PORT_LOCAL_SCTP, (node_ip, proto, svc.node_port)))
            else:
                tcp = proto == IPPROTO_TCP
                entries.add((residual.NODE_PORT_TCP if tcp else residual.NODE_PORT_UDP, (svc.node_port,)))
                if local:
                    entries.add((residual.NODE_PORT_LOCAL_TCP if tcp else residual.NODE_PORT_LOCAL_UDP,
                                 (svc.node_port,)))
            for node_ip in self.node_ips:
                state.vs[(proto, node_ip, svc.node_port)] = _VsSpec(sched, flags, timeout, external)
        if svc.health_check_node_port is not None:
            entries.add((residual.HEALTH_CHECK_NODE_PORT, (svc.health_check_node_port,)))
        return state

    def _check_conflicts(self, wanted: dict[tuple[str, str], _PortState], moving: set[tuple[str, str]]) -> None:
        """Two service ports may not claim one virtual service (checked before anything changes)."""
        claimed: dict[tuple[int, int, int], tuple[str, str]] = {}
        for key, state in wanted.items():
            for vskey in state.vs:
                other = claimed.setdefault(vskey, key)
                if other == key:
                    other = self._vs_owner.get(vskey)
                    if other is None or other == key or other in moving:
                        continue
                proto, addr, port = vskey
                raise ConfigError(f"{key[0]}: virtual service {PROTO_NAMES[proto]} "
                                  f"{ipaddress.IPv4Address(addr)}:{port} is already {other[0]}'s")

    def _release(self, key: tuple[str, str], new: _PortState, writes: _Writes) -> None:
        """Delete what a changed port no longer wants (before any port adds, so moves are clean)."""
        old = self._port_state.get(key)
        if old is None:
            return
        for vskey in old.vs.keys() - new.vs.keys():
            self._delete_vs(vskey, writes)
        for name, entry in old.entries - new.entries:
            writes.ipset += self.sets[name].remove(entry)
        for entry in old.lb_no_node - new.lb_no_node:
            self._lb_no_node(entry, -1)
        self._port_state[key] = _PortState(
            vs={k: v for k, v in old.vs.items() if k in new.vs}, entries=old.entries & new.entries,
            lb_no_node=old.lb_no_node & new.lb_no_node)

    def _apply(self, key: tuple[str, str], new: _PortState, writes: _Writes) -> None:
        old = self._port_state.get(key, _PortState())
        for vskey in old.vs.keys() - new.vs.keys():
            self._delete_vs(vskey, writes)
        for name, entry in old.entries - new.entries:
            writes.ipset += self.sets[name].remove(entry)
        for name, entry in new.entries - old.entries:
            writes.ipset += self.sets[name].add(entry)
        for entry in old.lb_no_node - new.lb_no_node:
            self._lb_no_node(entry, -1)
        for entry in new.lb_no_node - old.lb_no_node:
            self._lb_no_node(entry, +1)
        for vskey, spec in new.vs.items():
            if old.vs.get(vskey) == spec and vskey in self.services:
                continue
            self._sync_vs(key, vskey, spec, writes)
        self._port_state[key] = new

    def _lb_no_node(self, entry: tuple[int, int, int], delta: int) -> None:
        counts = self.rules.lb_no_node_access
        counts[entry] += delta
        if counts[entry] <= 0:
            del counts[entry]

    def _sync_vs(self, owner: tuple[str, str], vskey: tuple[int, int, int], spec: _VsSpec, writes: _Writes) -> None:
        """syncService + syncEndpoint for one virtual service."""
        vs = self.services.get(vskey)
        if vs is None:
            proto, addr, port = vskey
            self._vs_serial += 1
            vs = VirtualService(proto, addr, port, make_scheduler(spec.sched), flags=spec.flags,
                                timeout=spec.timeout, owner=owner[0], serial=self._vs_serial)
            self.services[vskey] = vs
            self._vs_owner[vskey] = owner
            writes.vs += 1
        elif (vs.sched_name, vs.flags, vs.timeout) != (spec.sched, spec.flags, spec.timeout):
            if vs.sched_name != spec.sched:
                vs.set_scheduler(make_scheduler(spec.sched))
            vs.flags, vs.timeout = spec.flags, spec.timeout
            writes.vs += 1
        wanted = {(ip, port): local for ip, port, local in spec.endpoints}
        for (ip, port), local in wanted.items():           # "Create new endpoints"
            dest = vs.by_key.get((ip, port))
            if dest is not None:
                dest.is_local = local
                if self._terminating.pop((vskey, (ip, port)), None) is None:
                    continue
                self._del_dest(vs, dest)                       # MoveRSOutofGracefulDeleteList
                writes.rs += 1
            vs.add_dest(ip, port, 1, is_local=local)
            self._real_servers += 1
            writes.rs += 1
        for dest in sorted((d for d in vs.dests if d.key not in wanted), key=lambda d: d.key):
            if (vskey, dest.key) in self._terminating:        # "Delete old endpoints"
                continue
            writes.rs += self._graceful_delete(vs, dest)

    def _graceful_delete(self, vs: VirtualService, dest: Dest) -> int:
        """GracefulDeleteRS: delete now if nothing is left to drain, else weight 0 and wait."""
        if vs.protocol in (IPPROTO_UDP, IPPROTO_SCTP) or dest.total_conns() == 0:
            self._del_dest(vs, dest)
            return 1
        written = 0
        if dest.weight != 0:
            vs.update_dest(dest, 0)
            written = 1
        self._terminating[(vs.key, dest.key)] = dest
        return written

    def _del_dest(self, vs: VirtualService, dest: Dest) -> None:
        vs.del_dest(dest)
        self._real_servers -= 1

    def _delete_vs(self, vskey: tuple[int, int, int], writes: _Writes) -> None:
        vs = self.services.pop(vskey, None)
        self._vs_owner.pop(vskey, None)
        if vs is None:
            return
        for dest in vs.dests:        # __ip_vs_del_service unlinks every destination
            dest.available = False
            self._terminating.pop((vskey, dest.key), None)
            if dest.referenced():
                vs.trash[dest.key] = dest
        self._real_servers -= len(vs.dests)
        vs.dests.clear()
        vs.by_key.clear()
        writes.vs += 1

    def dest_unbound(self, dest: Dest) -> None:
        """A connection left `dest`: finish its graceful deletion once it has none left."""
        key = (dest.svc.key, dest.key)
        if dest.total_conns() == 0 and self._terminating.get(key) is dest:
            del self._terminating[key]
            if dest.available and self.services.get(dest.svc.key) is dest.svc:
                self._del_dest(dest.svc, dest)
                self.graceful_deletes += 1
