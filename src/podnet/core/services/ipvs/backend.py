"""The IPVS backend: kube-proxy in IPVS mode on one node (core layer, sans-IO).

What it reproduces (kubernetes/kubernetes pkg/proxy/ipvs/proxier.go and graceful_termination.go,
over the kernel's IPVS in table.py and schedulers.py):

- Each Service port becomes virtual services keyed by (protocol, address, port): its ClusterIP,
  each externalIP, each LoadBalancer IP, and node IP:nodePort for each of `node_ips`. ClusterIPs,
  externalIPs and LB IPs are held as local addresses as on kube-ipvs0 (`bound_addresses`, the
  KUBE-IPVS-IPS set), unless the address already belongs to the node.
- Each usable endpoint becomes a real server with weight 1, forwarding Masq. The ClusterIP service
  uses the Local endpoints when internalTrafficPolicy is Local, the external ones when
  externalTrafficPolicy is Local — falling back to the Cluster endpoints when there is no local one,
  as kube-proxy's syncEndpoint does (kubernetes PR 97081).
- A removed endpoint is deleted at once when it has no connections, or when the service is UDP or
  SCTP; otherwise it gets weight 0 (no new connections, existing ones go on) and is deleted when
  ActiveConn + InActConn reach 0. (kube-proxy checks its list once a minute; podnet deletes it as
  soon as its last connection leaves the table.) An endpoint that comes back while being
  drained is deleted and added again, as MoveRSOutofGracefulDeleteList does.
- sessionAffinity ClientIP makes the virtual service persistent with the affinity timeout; the
  mh scheduler gets the source-port flag (FlagSourceHash = IP_VS_SVC_F_SCHED2 = mh-port).
- The residual iptables rules and ipsets decide masquerading, hairpin, source-range drops and the
  KUBE-IPVS-FILTER rejects (residual.py).

The scheduler: the backend's `scheduler` ("rr", kube-proxy's default) unless `schedulers` maps
the service port name ("ns/name:port") or the Service ("ns/name") to another one; `set_scheduler()`
changes the mapping and takes effect at the next sync. (The podnet.io/ipvs-scheduler annotation is
meant to fill this mapping.)

A first packet's way (decide), as on the node:
  nat PREROUTING (OUTPUT for the node's own traffic) -> KUBE-SERVICES;
  filter INPUT (only when the destination is local) -> KUBE-IPVS-FILTER, KUBE-PROXY-FIREWALL;
  IPVS: one dict lookup of (protocol, dst, dport), then persistence and the scheduler;
  nat POSTROUTING -> KUBE-POSTROUTING, with the destination already rewritten.
No virtual service: no service (ACCEPT), unless KUBE-IPVS-FILTER rejects a new connection to a
kube-ipvs0 address (a ClusterIP at a port no Service has). A virtual service with no usable real
server: the kernel's ip_vs_leave() answers ICMP port unreachable whatever the protocol ("the TCP
socket is not actually created, the TCP RST packet cannot be sent"), so the decision is REJECT
with icmp-port-unreachable. A TCP first packet that is not a SYN is not scheduled (sloppy_tcp=0):
it reaches the local stack, which has no listener on the VIP and resets it (REJECT tcp-reset);
a PacketInfo without TCP flags is taken to be a SYN.

IPVS's connection table (table.py) counts ActiveConn/InActConn for the lc family and holds the
persistence templates. podnet's backend sees only the first packet of a connection, so:
- TCP and SCTP connections are entered ESTABLISHED (ActiveConn, 900 s) — the state the kernel
  reaches one round trip later — unless `track_tcp_states` is set: then they start in SYN_RECV
  (InActConn) as in the kernel and move when the datapath reports states with `flow_state()`.
- UDP connections are always InActConn (300 s).
- When conntrack forgets a flow (`flow_closed`) a TCP/SCTP connection leaves at once; a UDP one
  stays until its IPVS timeout, as the kernel's does after the last packet.
- A connection the datapath still holds (its Decision is on a conntrack entry) is never expired by
  IPVS's timer (see table.py); a Decision the datapath dropped lets it expire.
- A NEW flow whose client tuple still has a connection reuses it (same real server, no
  scheduling), unless that connection's real server is gone (expire_nodest_conn=1) or it is a
  closed TCP/SCTP one (conn_reuse_mode=1): then it is expired and the flow scheduled afresh.

Sync does O(changes) work: unchanged service ports (by identity or equality with the previous
sync) are not looked at beyond that comparison; only changed virtual services, real servers and
set entries are written, and `objects_written` counts exactly those. A full sync recomputes every
port's wanted state and still writes only the differences, as kube-proxy's IPVS proxier does.
"""

from __future__ import annotations

import ipaddress
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from podnet.errors import ConfigError

from ..base import Decision, ProxyServicePort, ServiceBackend, SyncReport, Verdict
from ..kubeproxy_rules import categorize_endpoints
from ..packetinfo import PacketInfo
from . import ipvsadm, residual
from .residual import IpSets, ResidualRules, Walk
from .schedulers import SCHEDULERS, make_scheduler
from .table import (
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, PROTO_NAMES, SVC_F_PERSISTENT, SVC_F_SCHED2, ConnectionTable, Dest,
    IpvsState, IpvsTimeouts, Stats, VirtualService,
)

__all__ = ["IpvsBackend", "IpvsDecision"]

_PROTOCOLS = {"TCP": IPPROTO_TCP, "UDP": IPPROTO_UDP, "SCTP": IPPROTO_SCTP}
_TCP_SYN, _TCP_RST = 0x02, 0x04
# conntrack's TCP state names -> the IPVS state a report moves the connection to
_CT_TO_IPVS = {
    "NONE": IpvsState.NONE, "SYN_SENT": IpvsState.SYN_RECV, "SYN_SENT2": IpvsState.SYN_RECV,
    "SYN_RECV": IpvsState.SYN_RECV, "ESTABLISHED": IpvsState.ESTABLISHED, "FIN_WAIT": IpvsState.FIN_WAIT,
    "CLOSE_WAIT": IpvsState.CLOSE_WAIT, "LAST_ACK": IpvsState.LAST_ACK, "TIME_WAIT": IpvsState.TIME_WAIT,
    "CLOSE": IpvsState.CLOSE,
}


@dataclass(frozen=True, slots=True, weakref_slot=True)
class IpvsDecision(Decision):
    """A Decision that made (or reused) IPVS connection `conn`; flow_closed finds it by that id."""

    conn: int = 0


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


class IpvsBackend(ServiceBackend):
    """kube-proxy's IPVS mode. Keywords as IptablesBackend's, plus:

    `scheduler`: the default scheduler ("rr"); `schedulers`: {"ns/name:port" or "ns/name": name};
    `masquerade_all`, `masquerade_bit`, `random_fully`: kube-proxy's flags;
    `tcp_timeout_s`, `tcpfin_timeout_s`, `udp_timeout_s`: `ipvsadm --set tcp tcpfin udp`;
    `track_tcp_states`: the datapath reports TCP states with flow_state() (see the module text);
    `conn_tab_bits`: the connection table size ipvsadm prints (2^12 = 4096).
    `partial_sync` only chooses whether a sync asked to be partial may skip unchanged ports; `seed`
    is accepted for the common constructor and unused (IPVS draws no random numbers).
    """

    name = "ipvs"

    def __init__(self, *, cluster_cidr: str | None = "10.244.0.0/16", node_ips: Iterable[str] = (),
                 local_addresses: Iterable[int] = (), partial_sync: bool = True, seed: int = 0,
                 scheduler: str = "rr", schedulers: Mapping[str, str] | None = None,
                 masquerade_all: bool = False, masquerade_bit: int = 14, random_fully: bool = True,
                 tcp_timeout_s: float = 900, tcpfin_timeout_s: float = 120, udp_timeout_s: float = 300,
                 track_tcp_states: bool = False, conn_tab_bits: int = 12) -> None:
        self._check_scheduler(scheduler, "scheduler")
        self.scheduler = scheduler
        self.schedulers: dict[str, str] = {}
        for key, value in (schedulers or {}).items():
            self._check_scheduler(value, f"schedulers[{key!r}]")
            self.schedulers[key] = value
        self.node_ips = tuple(_ip(ip) for ip in node_ips if ipaddress.ip_address(ip).version == 4)
        self.node_ip = self.node_ips[0] if self.node_ips else None
        self.local_addresses = frozenset(local_addresses) | frozenset(self.node_ips)
        self.partial_sync = partial_sync
        self.seed = seed
        self.track_tcp_states = track_tcp_states
        self.timeouts = IpvsTimeouts(tcp=tcp_timeout_s, tcpfin=tcpfin_timeout_s, udp=udp_timeout_s)
        self.services: dict[tuple[int, int, int], VirtualService] = {}
        self.conns = ConnectionTable(self.timeouts, size_bits=conn_tab_bits, on_unbind=self._dest_unbound)
        self.sets = IpSets()
        self.rules = ResidualRules(self.sets, cluster_cidr=cluster_cidr, masquerade_all=masquerade_all,
                                   masquerade_bit=masquerade_bit, random_fully=random_fully)
        self.total_stats = Stats()
        self._ipvs_ips = self.sets[residual.IPVS_IPS]
        self._ports: dict[tuple[str, str], ProxyServicePort] = {}
        self._port_state: dict[tuple[str, str], _PortState] = {}
        self._vs_owner: dict[tuple[int, int, int], tuple[str, str]] = {}
        self._terminating: dict[tuple[tuple[int, int, int], tuple[int, int]], Dest] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._real_servers = 0
        self._vs_serial = 0
        self.syncs = 0
        self.decisions = 0
        self.no_destination = 0
        self.graceful_deletes = 0
        self.last_sync: SyncReport | None = None

    @staticmethod
    def _check_scheduler(name: str, what: str) -> None:
        if name not in SCHEDULERS:
            raise ConfigError(f"ipvs {what}: unknown scheduler {name!r} (choose from {', '.join(SCHEDULERS)})")

    # -- configuration ----------------------------------------------------------------------------

    def scheduler_for(self, svc: ProxyServicePort) -> str:
        return self.schedulers.get(svc.service_port_name) or self.schedulers.get(svc.namespaced_name) \
            or self.scheduler

    def set_scheduler(self, name: str, scheduler: str | None) -> None:
        """Choose the scheduler of a service port ("ns/name:port") or Service ("ns/name"); None
        returns it to the default. Applied at the next sync."""
        if scheduler is None:
            self.schedulers.pop(name, None)
        else:
            self._check_scheduler(scheduler, f"schedulers[{name!r}]")
            self.schedulers[name] = scheduler
        self._dirty.update(key for key, svc in self._ports.items()
                           if name in (svc.service_port_name, svc.namespaced_name))

    @property
    def bound_addresses(self) -> frozenset[int]:
        """The addresses on kube-ipvs0 (KUBE-IPVS-IPS): local to the node like its own."""
        return frozenset(entry[0] for entry in self._ipvs_ips.members)

    # -- sync -------------------------------------------------------------------------------------

    def sync(self, services: Iterable[ProxyServicePort], *, full: bool = True) -> SyncReport:
        ports: dict[tuple[str, str], ProxyServicePort] = {}
        for svc in services:
            if not isinstance(svc, ProxyServicePort):
                raise TypeError(f"services must be ProxyServicePort, got {type(svc).__name__}")
            if ipaddress.ip_address(svc.cluster_ip).version != 4:
                raise ConfigError(f"{svc.service_port_name}: cluster IP {svc.cluster_ip} is not IPv4, the family "
                                  "of this proxier")
            key = (svc.service_port_name, svc.protocol)
            if key in ports:
                raise ConfigError(f"duplicate service port {svc.service_port_name} {svc.protocol}")
            ports[key] = svc
        do_full = full or not self.partial_sync or self.syncs == 0
        removed = [key for key in self._ports if key not in ports]
        changed = [key for key, svc in ports.items()
                   if do_full or key in self._dirty or not (self._ports.get(key) is svc or self._ports.get(key) == svc)]
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
                                    "service_ports_examined": len(changed) + len(removed),
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
        owners = {vskey: owner for vskey, owner in self._vs_owner.items() if owner not in moving}
        for key, state in wanted.items():
            for vskey in state.vs:
                owner = owners.setdefault(vskey, key)
                if owner != key:
                    proto, addr, port = vskey
                    raise ConfigError(f"{key[0]}: virtual service {PROTO_NAMES[proto]} "
                                      f"{ipaddress.IPv4Address(addr)}:{port} is already {owner[0]}'s")

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

    def _dest_unbound(self, dest: Dest) -> None:
        """A connection left `dest`: finish its graceful deletion once it has none left."""
        key = (dest.svc.key, dest.key)
        if dest.total_conns() == 0 and self._terminating.get(key) is dest:
            del self._terminating[key]
            if dest.available and self.services.get(dest.svc.key) is dest.svc:
                self._del_dest(dest.svc, dest)
                self.graceful_deletes += 1

    # -- the first packet -------------------------------------------------------------------------

    def decide(self, pkt: PacketInfo, now: float, *, local_source: bool = False,
               effects: bool = True) -> Decision:
        local = self.local_addresses
        dst_local = pkt.dst in local or (pkt.dst,) in self._ipvs_ips.members
        src_local = local_source or pkt.src in local or (pkt.src,) in self._ipvs_ips.members
        w = Walk(pkt.src, pkt.dst, pkt.proto, pkt.sport, pkt.dport, src_local=src_local, dst_local=dst_local)
        w.mark = pkt.mark
        rules = self.rules
        rules.walk("nat", "OUTPUT" if local_source else "PREROUTING", w)
        vs = self.services.get((pkt.proto, pkt.dst, pkt.dport))
        cost = 1
        if local_source and vs is not None:
            w.vaddr, w.vport, w.vproto = vs.addr, vs.port, vs.protocol
            ended = rules.walk("filter", "OUTPUT", w)       # IPVS runs at LOCAL_OUT before filter
            if ended is not None and ended.target == "DROP":
                return self._refusal(Verdict.DROP, None, w, cost, effects)
        elif dst_local:
            if local_source:
                rules.walk("filter", "OUTPUT", w)
            ended = rules.walk("filter", "INPUT", w)
            if ended is not None and ended.target in ("DROP", "REJECT"):
                verdict = Verdict.DROP if ended.target == "DROP" else Verdict.REJECT
                reject_with = "icmp-port-unreachable" if verdict is Verdict.REJECT else None
                return self._refusal(verdict, reject_with, w, cost, effects)
        if vs is None:
            if effects:
                self.decisions += 1
            return Decision(path=tuple(w.path), cost=cost + w.examined + w.lookups, mark=w.mark)
        label = f"ipvs/{PROTO_NAMES[vs.protocol]} {ipaddress.IPv4Address(vs.addr)}:{vs.port} {vs.sched_name}"
        if pkt.proto == IPPROTO_TCP and pkt.tcp_flags and (not pkt.tcp_flags & _TCP_SYN or pkt.tcp_flags & _TCP_RST):
            w.path.append(f"{label}: not a SYN, to the local stack")
            return self._refusal(Verdict.REJECT, "tcp-reset", w, cost, effects)
        chosen = self._schedule(vs, pkt, now, effects)
        cost += chosen[2]
        if chosen[0] is None:
            w.path.append(f"{label}: no destination available")
            if effects:
                self.no_destination += 1
            return self._refusal(Verdict.REJECT, "icmp-port-unreachable", w, cost, effects)
        dest, conn, _, how = chosen
        dport = dest.port
        w.path.append(f"{label} -> {ipaddress.IPv4Address(dest.addr)}:{dport} ({how})")
        w.dst, w.dport = dest.addr, dport
        w.dst_local = dest.addr in local
        ended = rules.walk("nat", "POSTROUTING", w)
        masquerade = ended is not None and ended.target == "MASQUERADE"
        decision = IpvsDecision(dnat=(dest.addr, dport), masquerade=masquerade,
                                random_fully=masquerade and ended.random_fully, path=tuple(w.path),
                                cost=cost + w.examined + w.lookups, mark=w.mark,
                                conn=conn.id if conn is not None else 0)
        if effects:
            self.decisions += 1
            conn.decision = weakref.ref(decision)
        return decision

    def _refusal(self, verdict: Verdict, reject_with: str | None, w: Walk, cost: int, effects: bool) -> Decision:
        if effects:
            self.decisions += 1
        return Decision(verdict=verdict, reject_with=reject_with, path=tuple(w.path),
                        cost=cost + w.examined + w.lookups, mark=w.mark)

    def _schedule(self, vs: VirtualService, pkt: PacketInfo, now: float, commit: bool):
        """ip_vs_in's lookup + ip_vs_schedule/ip_vs_sched_persist: (dest, conn, lookups, how)."""
        table = self.conns
        lookups = 1
        old = table.by_tuple.get((pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport))
        if old is not None:
            reuse = old.dest is not None and old.dest.available and not (
                old.control is None and old.state in (IpvsState.TIME_WAIT, IpvsState.CLOSE, IpvsState.CLOSED))
            if reuse:
                if commit:
                    self._count(vs, old.dest, now, pkt.length, new=False)
                    table.refresh(old, now)
                return old.dest, old, lookups, f"connection {old.id} reused"
            if commit:
                table.expire(old)
        ct = None
        how = "scheduled"
        if vs.persistent:
            tkey = (pkt.proto, pkt.src & vs.netmask, pkt.dst, pkt.dport)
            ct = table.templates.get(tkey)
            lookups += 1
            if ct is not None and not table.template_valid(ct):
                if commit:
                    table.invalidate_template(ct)
                ct = None
            if ct is not None:
                dest = ct.dest
                how = f"persistence template {ct.id}"
            else:
                dest, examined = vs.scheduler.schedule(vs, pkt, commit)
                lookups += examined
                if dest is None:
                    return None, None, lookups, ""
        else:
            dest, examined = vs.scheduler.schedule(vs, pkt, commit)
            lookups += examined
            if dest is None:
                return None, None, lookups, ""
        if not commit:
            return dest, None, lookups, how
        if vs.persistent:
            if ct is None:
                ct = table.new(pkt.proto, pkt.src & vs.netmask, 0, pkt.dst, pkt.dport, dest, now,
                               template=True, timeout=vs.timeout)
                table.add_template(tkey, ct)
            else:
                table.refresh(ct, now)
        state = self._initial_state(vs.protocol)
        conn = table.new(pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport, dest, now, state=state)
        if ct is not None:
            table.control_add(conn, ct)
        self._count(vs, dest, now, pkt.length, new=True)
        return dest, conn, lookups, how

    def _initial_state(self, protocol: int) -> IpvsState:
        if protocol == IPPROTO_UDP:
            return IpvsState.UDP
        if self.track_tcp_states and protocol == IPPROTO_TCP:
            return IpvsState.SYN_RECV      # a SYN from the client: sNO -> sSR
        return IpvsState.ESTABLISHED

    def _count(self, vs: VirtualService, dest: Dest, now: float, length: int, *, new: bool) -> None:
        for stats in (vs.stats, dest.stats, self.total_stats):
            if new:
                stats.count_connection(now, length)
            else:
                stats.count_packet(now, length)

    # -- the datapath's news about flows ----------------------------------------------------------

    def _conn_of(self, decision: Decision):
        if not isinstance(decision, IpvsDecision) or not decision.conn:
            return None
        conn = self.conns.conns.get(decision.conn)
        if conn is None or conn.decision is None or conn.decision() is not decision:
            return None      # gone already, or reused by a newer flow
        return conn

    def flow_closed(self, decision: Decision, now: float) -> None:
        conn = self._conn_of(decision)
        if conn is not None and conn.protocol != IPPROTO_UDP:
            self.conns.expire(conn)

    def flow_state(self, decision: Decision, now: float, state) -> None:
        """The datapath's conntrack moved this flow's TCP state (a conntrack TcpState, its name,
        or an IpvsState): move the IPVS connection as the kernel's state table would, re-arming
        its timer. Meant for a datapath built with track_tcp_states=True."""
        conn = self._conn_of(decision)
        if conn is None or conn.protocol == IPPROTO_UDP:
            return
        if not isinstance(state, IpvsState):
            name = state if isinstance(state, str) else getattr(state, "name", str(state))
            if name not in _CT_TO_IPVS:
                raise ValueError(f"flow_state: unknown TCP state {state!r}")
            state = _CT_TO_IPVS[name]
        self.conns.set_state(conn, state, now)

    def handle_timer(self, now: float) -> None:
        self.conns.handle_timer(now)

    def next_deadline(self) -> float | None:
        return self.conns.next_deadline()

    # -- showing it -------------------------------------------------------------------------------

    def dump(self) -> str:
        """`ipvsadm -Ln`."""
        return ipvsadm.list_services(self.services.values(), conn_tab_size=self.conns.size)

    def ipvsadm(self, now: float | None = None, *, stats: bool = False, rate: bool = False,
                thresholds: bool = False, persistent_conn: bool = False, connections: bool = False,
                timeout: bool = False, save: bool = False) -> str:
        """`ipvsadm -Ln` with one of --stats, --rate, --thresholds, --persistent-conn; `-Lnc`
        (connections, needs `now`); `-L --timeout`; `-Sn` (save)."""
        if connections:
            if now is None:
                raise ValueError("ipvsadm -Lnc needs now")
            return ipvsadm.list_connections(self.conns, now)
        if timeout:
            return ipvsadm.list_timeout(self.timeouts)
        if save:
            return ipvsadm.save_rules(self.services.values())
        fmt = "stats" if stats else "rate" if rate else "thresholds" if thresholds else \
            "persistent-conn" if persistent_conn else "default"
        if fmt == "rate" and now is None:
            raise ValueError("ipvsadm --rate needs now")
        return ipvsadm.list_services(self.services.values(), fmt=fmt, now=now, conn_tab_size=self.conns.size)

    def iptables_restore_payload(self) -> str:
        """The residual rules as kube-proxy hands them to iptables-restore."""
        return self.rules.restore_payload()

    def ipset_list(self) -> str:
        return self.sets.listing()

    def statistics(self) -> dict:
        dests = [d for vs in self.services.values() for d in vs.dests]
        templates = sum(1 for c in self.conns if c.template)
        return {"virtual_services": len(self.services), "real_servers": len(dests),
                "connections": len(self.conns) - templates, "templates": templates,
                "active_conns": sum(d.activeconns for d in dests),
                "inactive_conns": sum(d.inactconns for d in dests),
                "terminating_real_servers": len(self._terminating), "graceful_deletes": self.graceful_deletes,
                "decisions": self.decisions, "no_destination": self.no_destination, "syncs": self.syncs,
                "ipset_entries": sum(len(s) for s in self.sets.values()),
                "iptables_rules": self.rules.rule_count(), "expired": self.conns.expired}
