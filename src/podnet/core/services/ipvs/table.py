"""IPVS's own tables: virtual services, real servers, connections and persistence templates
(core layer, sans-IO).

Follows the kernel's net/netfilter/ipvs: ip_vs_ctl.c (services and destinations), ip_vs_conn.c
(the connection table, binding, templates, expiry), ip_vs_proto_{tcp,udp,sctp}.c (states and their
timeouts), ip_vs_est.c (the rate estimator).

Rules this module keeps (the kernel's):
- A virtual service is keyed by (protocol, address, port). Its destinations form an ordered list;
  a new destination goes to the *head* of the list (list_add_rcu), which is the order the
  schedulers walk and break ties in. Listings sort; schedulers never do.
- A destination's weight may be 0 (quiesced: no new connections, existing ones go on).
  `last_weight` keeps the latest weight given at add time or any non-zero update (mh uses it).
- A connection is bound to its destination INACTIVE (it counts in InActConn); entering
  ESTABLISHED moves it to ActiveConn and leaving ESTABLISHED moves it back (TCP, SCTP); UDP never
  becomes active. A persistence template counts in PersistConn instead. Unbinding undoes the
  count. With u_threshold set, the destination is OVERLOADED while active+inactive >= u_threshold
  and is cleared below l_threshold (or 3/4 of u_threshold).
- A deleted destination that connections still reference leaves the list (its counters live on
  in the service's trash); adding it again revives the same object, counters and all.
- Every connection has a deadline: its state's timeout after it was last refreshed. An expiring
  template that still controls connections is re-armed for 60 s (ip_vs_conn_expire's
  expire_later, which also sets its timeout to 60 s). An invalidated template is unhashed at once
  (it shows port 65535) but stays in the table until it expires with nothing left to control.
- podnet's backend sees only the first packet of a connection. A connection therefore stays
  while the datapath still holds the Decision that made it (a conntrack entry keeps it in
  `entry.backend`; the connection keeps a weak reference, `hold`): when its timer runs out and
  the Decision is still held, the timer is re-armed as the flow's packets would re-arm it in the
  kernel. When the Decision is gone, a TCP or SCTP connection leaves the table at the next call
  (`reap`: the datapath dropped the first packet, or forgot the flow), while a UDP one waits for
  its timeout, as the kernel keeps a UDP entry 300 s after its last packet. The weak reference's
  callback only queues the connection; the table changes in `reap`, never inside a callback.
- The timer heap holds at most a few stale items per connection; every operation is O(1) or
  O(log n) in the number of connections, and nothing here scans all services.
"""

from __future__ import annotations

import enum
import heapq
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = [
    "IPPROTO_SCTP", "IPPROTO_TCP", "IPPROTO_UDP", "PROTO_NAMES", "Connection", "ConnectionTable", "Dest",
    "IpvsState", "IpvsTimeouts", "Stats", "SVC_F_PERSISTENT", "SVC_F_SCHED1", "SVC_F_SCHED2", "SVC_F_SCHED3",
    "VirtualService",
]

IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_SCTP = 132
PROTO_NAMES = {0: "IP", IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP", IPPROTO_SCTP: "SCTP"}

# include/uapi/linux/ip_vs.h: virtual service flags
SVC_F_PERSISTENT = 0x0001
SVC_F_HASHED = 0x0002
SVC_F_ONEPACKET = 0x0004
SVC_F_SCHED1 = 0x0008   # sh-fallback / mh-fallback
SVC_F_SCHED2 = 0x0010   # sh-port / mh-port (kube-proxy's FlagSourceHash)
SVC_F_SCHED3 = 0x0020

EXPIRE_LATER_S = 60.0   # ip_vs_conn_expire: a template still in control is re-armed for 60 s


class IpvsState(enum.Enum):
    """Connection states with the names /proc/net/ip_vs_conn (and ipvsadm -Lnc) prints."""

    NONE = "NONE"
    ESTABLISHED = "ESTABLISHED"
    SYN_SENT = "SYN_SENT"
    SYN_RECV = "SYN_RECV"
    FIN_WAIT = "FIN_WAIT"
    TIME_WAIT = "TIME_WAIT"
    CLOSE = "CLOSE"
    CLOSE_WAIT = "CLOSE_WAIT"
    LAST_ACK = "LAST_ACK"
    LISTEN = "LISTEN"
    SYNACK = "SYNACK"
    UDP = "UDP"             # IP_VS_UDP_S_NORMAL, the only UDP state
    CLOSED = "CLOSED"       # IP_VS_SCTP_S_CLOSED


@dataclass(frozen=True, slots=True)
class IpvsTimeouts:
    """State timeouts in seconds. `ipvsadm --set tcp tcpfin udp` (and kube-proxy's
    --ipvs-tcp-timeout/--ipvs-tcpfin-timeout/--ipvs-udp-timeout) change the first three; the rest
    are ip_vs_proto_tcp.c's fixed tcp_timeouts[] (and SCTP's ESTABLISHED/CLOSED)."""

    tcp: float = 900          # ESTABLISHED
    tcpfin: float = 120       # FIN_WAIT
    udp: float = 300
    none: float = 2
    syn_sent: float = 120
    syn_recv: float = 60
    time_wait: float = 120
    close: float = 10
    close_wait: float = 60
    last_ack: float = 30
    listen: float = 120
    synack: float = 120
    sctp_established: float = 900
    sctp_closed: float = 10

    def of(self, protocol: int, state: IpvsState) -> float:
        if protocol == IPPROTO_UDP:
            return self.udp
        if protocol == IPPROTO_SCTP:
            return self.sctp_established if state is IpvsState.ESTABLISHED else self.sctp_closed
        return {
            IpvsState.ESTABLISHED: self.tcp, IpvsState.FIN_WAIT: self.tcpfin, IpvsState.NONE: self.none,
            IpvsState.SYN_SENT: self.syn_sent, IpvsState.SYN_RECV: self.syn_recv,
            IpvsState.TIME_WAIT: self.time_wait, IpvsState.CLOSE: self.close,
            IpvsState.CLOSE_WAIT: self.close_wait, IpvsState.LAST_ACK: self.last_ack,
            IpvsState.LISTEN: self.listen, IpvsState.SYNACK: self.synack,
        }[state]


class Stats:
    """struct ip_vs_stats: counters plus the 2-second rate estimator of ip_vs_est.c.

    The estimator's timer ticks at t = 2, 4, 6, ... (podnet's monotonic seconds). It is advanced
    lazily, before the counters change and before rates are read, so it costs nothing while idle:
    between two advances the counters did not move, so only the first pending tick sees a delta.
    """

    __slots__ = ("conns", "inpkts", "outpkts", "inbytes", "outbytes", "_tick", "_last", "_est")

    def __init__(self) -> None:
        self.conns = self.inpkts = self.outpkts = self.inbytes = self.outbytes = 0
        self._tick = 0                       # estimator ticks applied so far (tick k is at t = 2k)
        self._last = (0, 0, 0, 0, 0)
        self._est = [0, 0, 0, 0, 0]          # cps, inpps, outpps scaled by 2^10; bps by 2^5

    def counters(self) -> tuple[int, int, int, int, int]:
        return self.conns, self.inpkts, self.outpkts, self.inbytes, self.outbytes

    def advance(self, now: float) -> None:
        target = int(now // 2)
        if target <= self._tick:
            return
        current = self.counters()
        shifts = (9, 9, 9, 4, 4)    # "scaled by 2^10, but divided 2 seconds"; bytes by 2^5 / 2
        while self._tick < target:
            self._tick += 1
            for i, shift in enumerate(shifts):
                rate = (current[i] - self._last[i]) << shift
                self._est[i] += (rate - self._est[i]) >> 2
            self._last = current
            if not any(self._est):
                self._tick = target     # nothing moves any more: skip the idle ticks
        self._last = current

    def rates(self, now: float) -> tuple[int, int, int, int, int]:
        """ip_vs_read_estimator: (cps, inpps, outpps, inbps, outbps) at `now`."""
        self.advance(now)
        cps, inpps, outpps, inbps, outbps = self._est
        return ((cps + 0x1FF) >> 10, (inpps + 0x1FF) >> 10, (outpps + 0x1FF) >> 10,
                (inbps + 0xF) >> 5, (outbps + 0xF) >> 5)

    def count_connection(self, now: float, length: int) -> None:
        self.advance(now)
        self.conns += 1
        self.count_packet(now, length)

    def count_packet(self, now: float, length: int) -> None:
        self.advance(now)
        self.inpkts += 1
        self.inbytes += length


class Dest:
    """struct ip_vs_dest: one real server of one virtual service."""

    __slots__ = ("svc", "addr", "port", "weight", "last_weight", "fwd", "activeconns", "inactconns",
                 "persistconns", "u_threshold", "l_threshold", "overloaded", "available", "stats", "is_local")

    def __init__(self, svc: VirtualService, addr: int, port: int, weight: int, *, is_local: bool = False) -> None:
        self.svc = svc
        self.addr = addr
        self.port = port
        self.weight = weight
        self.last_weight = weight
        self.fwd = "Masq"          # kube-proxy always adds real servers with -m (NAT)
        self.activeconns = 0
        self.inactconns = 0
        self.persistconns = 0
        self.u_threshold = 0
        self.l_threshold = 0
        self.overloaded = False
        self.available = True      # IP_VS_DEST_F_AVAILABLE: in the service's list
        self.stats = Stats()
        self.is_local = is_local   # kube-proxy's view, for KUBE-LOOP-BACK

    @property
    def key(self) -> tuple[int, int]:
        return self.addr, self.port

    def overhead(self) -> int:
        """ip_vs_dest_conn_overhead(): activeconns * 256 + inactconns."""
        return (self.activeconns << 8) + self.inactconns

    def total_conns(self) -> int:
        return self.activeconns + self.inactconns

    def referenced(self) -> bool:
        return bool(self.activeconns or self.inactconns or self.persistconns)

    def __repr__(self) -> str:
        return (f"Dest({_ip(self.addr)}:{self.port} w={self.weight} act={self.activeconns} "
                f"inact={self.inactconns} pers={self.persistconns})")


class VirtualService:
    """struct ip_vs_service for one (protocol, address, port)."""

    __slots__ = ("protocol", "addr", "port", "sched_name", "scheduler", "flags", "timeout", "netmask",
                 "dests", "by_key", "trash", "stats", "owner", "serial")

    def __init__(self, protocol: int, addr: int, port: int, scheduler, *, flags: int = 0,
                 timeout: int = 0, owner: str = "", serial: int = 0) -> None:
        self.protocol = protocol
        self.addr = addr
        self.port = port
        self.sched_name = scheduler.name
        self.scheduler = scheduler
        self.flags = flags
        self.timeout = timeout
        self.netmask = 0xFFFFFFFF
        self.dests: list[Dest] = []
        self.by_key: dict[tuple[int, int], Dest] = {}
        self.trash: dict[tuple[int, int], Dest] = {}
        self.stats = Stats()
        self.owner = owner            # the service port name kube-proxy made it for
        self.serial = serial          # creation order (the kernel adds to a hash bucket's head)
        scheduler.init_service(self)

    @property
    def key(self) -> tuple[int, int, int]:
        return self.protocol, self.addr, self.port

    @property
    def persistent(self) -> bool:
        return bool(self.flags & SVC_F_PERSISTENT)

    def add_dest(self, addr: int, port: int, weight: int, *, is_local: bool = False) -> Dest:
        """ip_vs_add_dest: revive a trashed destination or make one; it goes to the list head."""
        dest = self.trash.pop((addr, port), None)
        if dest is None:
            dest = Dest(self, addr, port, weight, is_local=is_local)
        else:
            dest.available = True
            dest.is_local = is_local
        dest.last_weight = weight            # "if (add || udest->weight != 0)"
        dest.weight = weight
        self.dests.insert(0, dest)
        self.by_key[dest.key] = dest
        self.scheduler.add_dest(self, dest)
        return dest

    def update_dest(self, dest: Dest, weight: int) -> None:
        """ip_vs_edit_dest: a new weight (the forwarding method never changes here)."""
        if weight != 0:
            dest.last_weight = weight
        dest.weight = weight
        self.scheduler.upd_dest(self, dest)

    def del_dest(self, dest: Dest) -> None:
        """ip_vs_del_dest: unlink; keep it in the trash while connections still reference it."""
        index = self.dests.index(dest)
        del self.dests[index]
        del self.by_key[dest.key]
        dest.available = False
        self.scheduler.del_dest(self, dest, index)
        if dest.referenced():
            self.trash[dest.key] = dest

    def set_scheduler(self, scheduler) -> None:
        """ip_vs_edit_service with another scheduler: unbind the old one, bind and init the new."""
        self.scheduler = scheduler
        self.sched_name = scheduler.name
        scheduler.init_service(self)

    def __repr__(self) -> str:
        return f"VirtualService({PROTO_NAMES[self.protocol]} {_ip(self.addr)}:{self.port} {self.sched_name})"


class Connection:
    """struct ip_vs_conn (a persistence template when `template` is set)."""

    __slots__ = ("id", "protocol", "caddr", "cport", "vaddr", "vport", "daddr", "dport", "dest", "svc",
                 "template", "inactive", "state", "timeout", "deadline", "timer_seq", "control", "n_control",
                 "decision", "hashed", "tkey")

    def __init__(self, conn_id: int, protocol: int, caddr: int, cport: int, vaddr: int, vport: int,
                 dest: Dest, *, template: bool) -> None:
        self.id = conn_id
        self.protocol = protocol
        self.caddr, self.cport, self.vaddr, self.vport = caddr, cport, vaddr, vport
        self.daddr, self.dport = dest.addr, dest.port
        self.dest: Dest | None = dest
        self.svc = dest.svc
        self.template = template
        self.inactive = True
        self.state = IpvsState.NONE if protocol != IPPROTO_UDP else IpvsState.UDP
        self.timeout = 0.0
        self.deadline = 0.0
        self.timer_seq = 0
        self.control: Connection | None = None
        self.n_control = 0
        self.decision: weakref.ref | None = None
        self.hashed = True
        self.tkey: tuple[int, int, int, int] | None = None   # a template's persistence key

    @property
    def tuple_key(self) -> tuple[int, int, int, int, int]:
        return self.protocol, self.caddr, self.cport, self.vaddr, self.vport

    def decision_alive(self) -> bool:
        return self.decision is not None and self.decision() is not None

    def __repr__(self) -> str:
        kind = "template" if self.template else self.state.value
        return (f"Connection({self.id} {PROTO_NAMES.get(self.protocol)} {_ip(self.caddr)}:{self.cport} -> "
                f"{_ip(self.vaddr)}:{self.vport} -> {_ip(self.daddr)}:{self.dport} {kind})")


class ConnectionTable:
    """ip_vs_conn_tab: connections by their client tuple, templates by their persistence key, and
    one timer heap. `on_unbind(dest)` is told when a connection leaves a destination (kube-proxy's
    graceful termination waits for that)."""

    def __init__(self, timeouts: IpvsTimeouts = IpvsTimeouts(), *, size_bits: int = 12,
                 expire_quiescent_template: bool = True,
                 on_unbind: Callable[[Dest], None] | None = None) -> None:
        self.timeouts = timeouts
        self.size = 1 << size_bits             # ipvsadm's "(size=4096)"
        self.expire_quiescent_template = expire_quiescent_template
        self.on_unbind = on_unbind
        self.conns: dict[int, Connection] = {}                       # creation order, for -Lnc
        self.by_tuple: dict[tuple[int, int, int, int, int], Connection] = {}
        self.templates: dict[tuple[int, int, int, int], Connection] = {}
        self._heap: list[tuple[float, int, int]] = []
        self._released: list[int] = []      # connections whose Decision was collected, to reap
        self._next_id = 1
        self._seq = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self.conns)

    def __iter__(self) -> Iterator[Connection]:
        return iter(self.conns.values())

    # -- binding (ip_vs_bind_dest / ip_vs_unbind_dest) -------------------------------------------

    @staticmethod
    def _bind(conn: Connection, dest: Dest) -> None:
        if conn.template:
            dest.persistconns += 1
        else:
            dest.inactconns += 1      # the dest's conn_flags always carry IP_VS_CONN_F_INACTIVE
        if dest.u_threshold and dest.total_conns() >= dest.u_threshold:
            dest.overloaded = True

    def _unbind(self, conn: Connection) -> None:
        dest = conn.dest
        if dest is None:
            return
        conn.dest = None
        if conn.template:
            dest.persistconns -= 1
        elif conn.inactive:
            dest.inactconns -= 1
        else:
            dest.activeconns -= 1
        if dest.l_threshold:
            if dest.total_conns() < dest.l_threshold:
                dest.overloaded = False
        elif dest.u_threshold:
            if dest.total_conns() * 4 < dest.u_threshold * 3:
                dest.overloaded = False
        else:
            dest.overloaded = False
        if not dest.available and not dest.referenced():
            dest.svc.trash.pop(dest.key, None)
        if self.on_unbind is not None:
            self.on_unbind(dest)

    # -- creation ---------------------------------------------------------------------------------

    def new(self, protocol: int, caddr: int, cport: int, vaddr: int, vport: int, dest: Dest, now: float, *,
            template: bool = False, timeout: float | None = None, state: IpvsState | None = None) -> Connection:
        """ip_vs_conn_new + the first state transition: bound INACTIVE, then moved to `state`."""
        conn = Connection(self._next_id, protocol, caddr, cport, vaddr, vport, dest, template=template)
        self._next_id += 1
        self._bind(conn, dest)
        self.conns[conn.id] = conn
        if template:
            conn.timeout = float(timeout if timeout is not None else 0)
            self._arm(conn, now + conn.timeout)
        else:
            self.by_tuple[conn.tuple_key] = conn
            self.set_state(conn, state if state is not None else conn.state, now)
        return conn

    def hold(self, conn: Connection, decision: object) -> None:
        """Tie `conn` to the Decision the datapath keeps for its flow (see the module text)."""
        released = self._released
        conn.decision = weakref.ref(decision, lambda _ref, conn_id=conn.id: released.append(conn_id))

    def reap(self) -> int:
        """Expire the TCP/SCTP connections whose Decision the datapath let go; how many."""
        reaped = 0
        while self._released:
            conn = self.conns.get(self._released.pop())
            if conn is not None and conn.protocol != IPPROTO_UDP and not conn.decision_alive():
                self.expire(conn)
                reaped += 1
        return reaped

    def add_template(self, key: tuple[int, int, int, int], conn: Connection) -> None:
        conn.tkey = key
        self.templates[key] = conn

    # -- states -----------------------------------------------------------------------------------

    def set_state(self, conn: Connection, state: IpvsState, now: float) -> None:
        """set_tcp_state()/set_sctp_state(): move between ActiveConn and InActConn, re-arm."""
        dest = conn.dest
        if dest is not None and conn.protocol != IPPROTO_UDP and not conn.template:
            if not conn.inactive and state is not IpvsState.ESTABLISHED:
                dest.activeconns -= 1
                dest.inactconns += 1
                conn.inactive = True
            elif conn.inactive and state is IpvsState.ESTABLISHED:
                dest.activeconns += 1
                dest.inactconns -= 1
                conn.inactive = False
        conn.state = state
        conn.timeout = self.timeouts.of(conn.protocol, state)
        self._arm(conn, now + conn.timeout)

    def refresh(self, conn: Connection, now: float) -> None:
        """ip_vs_conn_put(): restart the timer with the connection's timeout."""
        self._arm(conn, now + conn.timeout)

    # -- templates --------------------------------------------------------------------------------

    def template_valid(self, ct: Connection) -> bool:
        """ip_vs_check_template()'s test: the destination is there and not quiesced."""
        dest = ct.dest
        return dest is not None and dest.available and not (self.expire_quiescent_template and dest.weight == 0)

    def invalidate_template(self, ct: Connection) -> None:
        """Unhash it so no new connection finds it; its timer is left alone."""
        if ct.tkey is not None and self.templates.get(ct.tkey) is ct:
            del self.templates[ct.tkey]
        ct.hashed = False
        ct.vport = ct.dport = 0xFFFF
        ct.cport = 0

    @staticmethod
    def control_add(conn: Connection, ct: Connection) -> None:
        conn.control = ct
        ct.n_control += 1

    # -- expiry -----------------------------------------------------------------------------------

    def expire(self, conn: Connection) -> None:
        """ip_vs_conn_expire() for an entry nobody controls: unlink, uncontrol, unbind."""
        if self.conns.pop(conn.id, None) is None:
            return
        if not conn.template and self.by_tuple.get(conn.tuple_key) is conn:
            del self.by_tuple[conn.tuple_key]
        if conn.template and conn.tkey is not None and self.templates.get(conn.tkey) is conn:
            del self.templates[conn.tkey]
        if conn.control is not None:
            conn.control.n_control -= 1
            conn.control = None
        self.expired += 1
        self._unbind(conn)

    def _arm(self, conn: Connection, deadline: float) -> None:
        conn.deadline = deadline
        self._seq += 1
        conn.timer_seq = self._seq
        heapq.heappush(self._heap, (deadline, self._seq, conn.id))
        if len(self._heap) > 64 + 4 * len(self.conns):
            self._heap = [(c.deadline, c.timer_seq, c.id) for c in self.conns.values()]
            heapq.heapify(self._heap)

    def next_deadline(self) -> float | None:
        self.reap()
        heap = self._heap
        while heap:
            deadline, seq, conn_id = heap[0]
            conn = self.conns.get(conn_id)
            if conn is not None and conn.timer_seq == seq:
                return deadline
            heapq.heappop(heap)
        return None

    def handle_timer(self, now: float) -> int:
        """Run every timer due at or before `now`, in deadline order; returns the entries expired."""
        expired = self.reap()
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, seq, conn_id = heapq.heappop(heap)
            conn = self.conns.get(conn_id)
            if conn is None or conn.timer_seq != seq:
                continue
            if conn.template:
                if conn.n_control:
                    conn.timeout = EXPIRE_LATER_S
                    self._arm(conn, deadline + EXPIRE_LATER_S)
                    continue
            elif conn.decision_alive():
                # the datapath still holds the flow: its packets would have kept the timer going
                self._arm(conn, deadline + conn.timeout)
                continue
            self.expire(conn)
            expired += 1
        return expired


def _ip(addr: int) -> str:
    return f"{addr >> 24 & 255}.{addr >> 16 & 255}.{addr >> 8 & 255}.{addr & 255}"
