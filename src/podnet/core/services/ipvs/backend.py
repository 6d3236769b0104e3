"""The IPVS backend: kube-proxy in IPVS mode on one node (core layer, sans-IO).

The pieces: proxier.py turns Service ports into IPVS virtual services, real servers and
kube-proxy's ipsets (only what changed, so an endpoint change is O(1) work); table.py and
schedulers.py are the kernel's IPVS; residual.py is kube-proxy's small iptables remainder;
ipvsadm.py shows it all the way the tool does. This module answers the datapath.

The scheduler: the backend's `scheduler` ("rr", kube-proxy's default) unless `schedulers` maps
the service port name ("ns/name:port") or the Service ("ns/name") to another one; `set_scheduler()`
changes the mapping and takes effect at the next sync. (The podnet.io/ipvs-scheduler annotation is
meant to fill this mapping.)

A first packet's way (decide), as on the node:
  nat PREROUTING (OUTPUT for the node's own traffic) -> KUBE-SERVICES;
  filter INPUT (only when the destination is local) -> KUBE-IPVS-FILTER, KUBE-PROXY-FIREWALL;
  IPVS: one dict lookup of (protocol, dst, dport), then persistence and the scheduler (for the
  node's own traffic IPVS runs at LOCAL_OUT, before filter OUTPUT's KUBE-IPVS-OUT-FILTER);
  nat POSTROUTING -> KUBE-POSTROUTING, with the destination already rewritten.
No virtual service: no service (ACCEPT), unless KUBE-IPVS-FILTER rejects a new connection to a
kube-ipvs0 address (a ClusterIP at a port no Service has, or a ping). A virtual service with no
usable real server: the kernel's ip_vs_leave() answers ICMP port unreachable whatever the protocol
("the TCP socket is not actually created, the TCP RST packet cannot be sent"), so the decision is
REJECT with icmp-port-unreachable. A TCP first packet that is not a SYN is not scheduled
(sloppy_tcp=0): it reaches the local stack, which has no listener on the VIP and resets it
(REJECT tcp-reset); a PacketInfo without TCP flags is taken to be a SYN. The cost of a decision
is the residual rules examined plus the hash lookups made (sets, virtual service, connection,
template) plus the destinations the scheduler looked at: nothing grows with the number of Services.

IPVS's connection table (table.py) counts ActiveConn/InActConn for the lc family and holds the
persistence templates. podnet's backend sees only the first packet of a connection, so:
- TCP and SCTP connections are entered ESTABLISHED (ActiveConn, 900 s) — the state the kernel
  reaches one round trip later — unless `track_tcp_states` is set: then they start in SYN_RECV
  (InActConn) as in the kernel and move when the datapath reports states with `flow_state()`.
- UDP connections are always InActConn (300 s).
- When conntrack forgets a flow (`flow_closed`) a TCP/SCTP connection leaves at once; a UDP one
  stays until its IPVS timeout, as the kernel's does after the last packet.
- A connection the datapath still holds (its Decision is on a conntrack entry) is never expired by
  IPVS's timer (see table.py). A Decision the datapath did not keep (the first packet was dropped
  after the decision: no route, conntrack full) lets a TCP/SCTP connection go at the next call;
  the kernel would keep it ~60 s in SYN_RECV and reuse it for a retransmitted SYN.
- A NEW UDP flow whose client tuple still has a connection reuses it (same real server, no
  scheduling) unless that real server is gone (expire_nodest_conn=1): then it is expired and the
  flow scheduled afresh. A TCP/SCTP tuple is always scheduled afresh: the datapath only asks about
  a flow conntrack does not have, so an entry still there belongs to a finished flow.
- Counters (ipvsadm --stats/--rate) see the first packet of each connection only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from podnet.errors import ConfigError

from ..base import Decision, ProxyServicePort, ServiceBackend, SyncReport, Verdict
from ..packetinfo import PacketInfo
from . import ipvsadm, residual
from .proxier import IpvsProxier
from .residual import IpSets, ResidualRules, Walk
from .schedulers import SCHEDULERS
from .table import (
    IPPROTO_TCP, IPPROTO_UDP, PROTO_NAMES, ConnectionTable, Dest, IpvsState, IpvsTimeouts, Stats, VirtualService,
)

__all__ = ["IpvsBackend", "IpvsDecision"]

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
        self.sets = IpSets()
        self.rules = ResidualRules(self.sets, cluster_cidr=cluster_cidr, masquerade_all=masquerade_all,
                                   masquerade_bit=masquerade_bit, random_fully=random_fully)
        self.proxier = IpvsProxier(self.sets, self.rules, node_ips=self.node_ips,
                                   local_addresses=self.local_addresses, partial_sync=partial_sync,
                                   scheduler_for=self.scheduler_for)
        self.services = self.proxier.services          # IPVS's virtual services by (proto, addr, port)
        self.conns = ConnectionTable(self.timeouts, size_bits=conn_tab_bits, on_unbind=self.proxier.dest_unbound)
        self.total_stats = Stats()
        self._ipvs_ips = self.sets[residual.IPVS_IPS]
        self.decisions = 0
        self.no_destination = 0

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
        self.proxier.mark_dirty(name)

    @property
    def bound_addresses(self) -> frozenset[int]:
        """The addresses on kube-ipvs0 (KUBE-IPVS-IPS): local to the node like its own."""
        return frozenset(entry[0] for entry in self._ipvs_ips.members)

    # -- sync -------------------------------------------------------------------------------------

    def sync(self, services: Iterable[ProxyServicePort], *, full: bool = True) -> SyncReport:
        """kube-proxy's syncProxyRules: only what changed is written (proxier.py)."""
        self.conns.reap()        # so a drained real server with no flow left goes at once
        return self.proxier.sync(services, full=full)

    @property
    def syncs(self) -> int:
        return self.proxier.syncs

    @property
    def last_sync(self) -> SyncReport | None:
        return self.proxier.last_sync

    # -- the first packet -------------------------------------------------------------------------

    def decide(self, pkt: PacketInfo, now: float, *, local_source: bool = False,
               effects: bool = True) -> Decision:
        if effects:
            self.conns.reap()
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
            self.conns.hold(conn, decision)
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
            # only UDP entries outlive their flow in podnet (TCP/SCTP ones leave with conntrack's)
            reuse = old.protocol == IPPROTO_UDP and old.dest is not None and old.dest.available
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
        self.conns.reap()
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
        self.conns.reap()
        return ipvsadm.list_services(self.services.values(), conn_tab_size=self.conns.size)

    def ipvsadm(self, now: float | None = None, *, stats: bool = False, rate: bool = False,
                thresholds: bool = False, persistent_conn: bool = False, connections: bool = False,
                timeout: bool = False, save: bool = False) -> str:
        """`ipvsadm -Ln` with one of --stats, --rate, --thresholds, --persistent-conn; `-Lnc`
        (connections, needs `now`); `-L --timeout`; `-Sn` (save)."""
        self.conns.reap()
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
        self.conns.reap()
        dests = [d for vs in self.services.values() for d in vs.dests]
        templates = sum(1 for c in self.conns if c.template)
        return {"virtual_services": len(self.services), "real_servers": len(dests),
                "connections": len(self.conns) - templates, "templates": templates,
                "active_conns": sum(d.activeconns for d in dests),
                "inactive_conns": sum(d.inactconns for d in dests),
                "terminating_real_servers": self.proxier.terminating,
                "graceful_deletes": self.proxier.graceful_deletes,
                "decisions": self.decisions, "no_destination": self.no_destination, "syncs": self.syncs,
                "ipset_entries": sum(len(s) for s in self.sets.values()),
                "iptables_rules": self.rules.rule_count(), "expired": self.conns.expired}
