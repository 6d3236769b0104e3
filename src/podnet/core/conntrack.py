"""Connection tracking, netfilter style: tuples, states, timeouts, NAT bindings, a table limit.

Layer: core, sans-IO. Every call that needs the time takes `now` (monotonic seconds); entries
expire only in `handle_timer(now)` (or when a lookup given `now` meets one past its deadline), and
`next_deadline()` says when to call it. It follows Linux's nf_conntrack (nf_conntrack_core.c,
nf_conntrack_proto_{tcp,udp,icmp}.c, default sysctls) and prints what conntrack-tools 1.4.7 prints.

Rules this module keeps
-----------------------

Tuples and directions
- An entry has two tuples. The original tuple is the first packet as it arrived. The reply
  tuple is the inverse of that packet *after* NAT: a flow DNATed to a backend has the reply tuple
  backend -> client (or backend -> masquerade address when also SNATed). Both tuples key one dict,
  so `lookup` answers (entry, Direction) for a packet from either end.
- A tuple is (proto, src, sport, dst, dport) of ints (`FlowTuple`; a plain tuple in the same order
  hashes equal). For ICMP the slots hold the kernel's ICMP tuple: sport is the echo identifier and
  dport is type << 8 | code, so the reply tuple of an echo request (type 8, id X) is type 0, id X.
  Only the query types (echo, timestamp, info, address mask requests) may open an ICMP entry.
- The NAT decision comes from outside (a service backend) and is pinned at `new`: `nat` holds the
  `NatBinding` that rewrites both directions; SRC_NAT / DST_NAT are set only when a tuple really
  changes, as nf_nat_setup_info does. Two entries never share a tuple: a NEW flow whose original or
  reply tuple is taken is refused (insert_failed, the kernel's clash at confirm).

Time
- An entry expires when now >= deadline, never before. Every accepted packet sets the deadline to
  now + the timeout of the state it leaves the entry in; ignored and invalid packets do not.
- Timeouts are Linux's defaults (`Timeouts`, `TcpTimeouts`: the nf_conntrack_*_timeout* sysctls).
- The expiry heap holds at most one live item per entry, never later than the entry's deadline;
  a refresh that moves a deadline later touches no heap, one that moves it earlier pushes a new
  item (the old one is skipped when it surfaces). So per-packet cost stays O(1).

TCP (nf_conntrack_proto_tcp.c, tcp_conntracks[][][] and nf_conntrack_tcp_packet)
- The state moves by the table below on the packet's direction and its SYN / SYN+ACK / FIN / ACK
  / RST class (RST first, then SYN, FIN, ACK). Flag combinations the kernel's tcp_error() refuses
  (e.g. SYN+FIN, no flag at all, FIN without ACK) are INVALID.
- A flow opens with a SYN (SYN_SENT). With `tcp_loose` (nf_conntrack_tcp_loose=1, the default)
  a bare ACK also opens one, picked up mid-stream in ESTABLISHED; until a reply is seen its
  timeout is capped at `unacknowledged` (300 s). Any other first packet is INVALID, no entry.
- ASSURED is set by a valid packet that keeps or moves the entry to ESTABLISHED from SYN_RECV or
  ESTABLISHED after a reply was seen: the third packet of a handshake, or the first packet after
  the reply of a picked-up flow.
- Until a reply is seen: an RST deletes the entry at once (a refused connection leaves nothing),
  and a retransmitted SYN does not refresh the SYN_SENT timeout.
- A SYN that reopens a flow in TIME_WAIT or CLOSE after a FIN, or after an RST from the same side,
  deletes the entry and answers REPEAT: look the packet up again, it is NEW (the kernel's
  -NF_REPEAT). Other out-of-state SYNs and SYN+ACKs are ignored: accepted without a state change
  or a refresh; a SYN+ACK right after an ignored SYN from the other side resynchronises to
  SYN_RECV. An ACK in LAST_ACK answering a SYN ignored there is an RFC 5961 challenge ACK and does
  not close the flow. An RST always moves to CLOSE with the `close` timeout (10 s).
- No sequence-number / window tracking is done (as with nf_conntrack_tcp_no_window_check=1), so
  out-of-window packets are not INVALID, and the retransmission / unacknowledged-data timeouts
  (`max_retrans`, `unacknowledged`) apply only to the mid-stream pickup above. Where the kernel
  compares sequence numbers to decide (resync after an ignored SYN, RSTs answering an ignored
  packet) the packet is taken to match.

UDP (nf_conntrack_proto_udp.c, Linux >= 5.10 rules)
- `udp` (30 s) until a reply was seen. After that, a packet more than 2 s after the entry was
  created (the kernel's stream_ts) makes it a stream: ASSURED, and `udp_stream` (120 s) from then
  on; packets within those first 2 s keep 30 s. So a DNS-like query and answer keep the short
  timeout and stay unassured, which keeps them evictable.

ICMP and the rest
- ICMP queries: `icmp` (30 s) on every packet, never ASSURED. Other protocols: `generic` (600 s),
  never ASSURED, no ports (conntrack shows them as `unknown`).
- ICMP errors are not tracked themselves: `lookup_related` finds the flow of the packet they quote
  (its tuple inverted), and `nat.rewrite_icmp_error` translates them.

Packets and verdicts
- `update` answers the packet's conntrack state as iptables' conntrack match sees it: NEW for an
  original-direction packet before any reply, ESTABLISHED otherwise, INVALID when the state machine
  refuses it (counted in `invalid`, no state change, no refresh, not in the packet counters), or
  REPEAT (see TCP; also for an entry the caller kept after it left the table, so a datapath that
  caches entries can never revive a dead one). SEEN_REPLY is set once the first accepted reply
  packet was handled (ignored ones count), as nf_conntrack_in() does, so that packet itself is
  handled as not yet replied.
- Per-direction packet and byte counters count the packets the kernel would account (with
  nf_conntrack_acct); the listing shows them only when `accounting` is on, as the sysctl decides.

The table
- At most `max_entries` entries (nf_conntrack_max). A NEW flow on a full table first expires what
  is due; then, with `early_drop` (on by default, as in the kernel), it evicts one entry that is
  not ASSURED - the oldest such entry; the kernel drops the unassured entries of the first of 8
  hash buckets next to the new tuple's that has any - and counts `early_drop`. With nothing to
  evict the NEW packet is refused and counted in `drop`; existing flows keep flowing.
- Checks run in the kernel's order: the table limit at allocation, before the protocol decides a
  first packet is invalid.
- The TCP transitions, timeouts, ASSURED / UNREPLIED flags and INVALID verdicts were compared
  packet by packet with Linux 6.18's (see the transcripts in tests/core/test_conntrack.py).
- Statistics keep conntrack -S's names. `found` counts lookups that hit (current kernels no longer
  count per lookup and show 0); `insert` counts confirmed entries; `error` counts ICMP errors whose
  quoted flow is unknown; `search_restart`, `clash_resolve` and `chaintoolong` stay 0 here.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import ConfigError
from .conntrack_tcp import (_ACK_SET, _CL, _ES, _FW, _IG, _IV, _LA, _NO, _NONE_SET, _RST_SET, _S2, _SR, _SS,
                            _SYN_SET, _SYNACK_SET, _TCP_CLASS, _TCP_NEXT, _TW, TCP_ACK, TCP_CWR, TCP_ECE,
                            TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, TCP_URG)
from .nat import NatBinding, Rewrite
from .services.packetinfo import CtState

__all__ = ["Conntrack", "ConntrackStatistics", "Direction", "Entry", "FlowTuple", "REPEAT", "Refusal",
           "Status", "TcpState", "TcpTimeouts", "Timeouts", "invert", "TCP_ACK", "TCP_CWR", "TCP_ECE",
           "TCP_FIN", "TCP_PSH", "TCP_RST", "TCP_SYN", "TCP_URG"]

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17



class FlowTuple(NamedTuple):
    """(proto, src, sport, dst, dport), addresses as ints. ICMP: sport = id, dport = type << 8 | code."""

    proto: int
    src: int
    sport: int
    dst: int
    dport: int

    @classmethod
    def icmp(cls, src: int, dst: int, icmp_type: int, code: int, ident: int) -> FlowTuple:
        return cls(IPPROTO_ICMP, src, ident, dst, icmp_type << 8 | code)


class Direction(enum.IntEnum):
    ORIGINAL = 0   # IP_CT_DIR_ORIGINAL
    REPLY = 1      # IP_CT_DIR_REPLY


class Status(enum.IntFlag):
    """enum ip_conntrack_status, with the kernel's bit values."""

    EXPECTED = 1 << 0
    SEEN_REPLY = 1 << 1
    ASSURED = 1 << 2
    CONFIRMED = 1 << 3
    SRC_NAT = 1 << 4
    DST_NAT = 1 << 5
    SRC_NAT_DONE = 1 << 7
    DST_NAT_DONE = 1 << 8
    DYING = 1 << 9


class TcpState(enum.IntEnum):
    """enum tcp_conntrack; the names are the ones conntrack -L prints."""

    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    SYN_SENT2 = 9


class Refusal(enum.Enum):
    """Why `new` made no entry. Members are false in a boolean test, so `if not entry:` works."""

    TABLE_FULL = "drop"             # nf_conntrack_max reached, nothing evictable: drop the packet
    INVALID = "invalid"             # this packet cannot open a flow: it is INVALID, untracked
    CLASH = "insert_failed"         # a tuple is already taken: drop the packet

    def __bool__(self) -> bool:
        return False


# `update`'s answer when the entry is gone (a SYN reopened a closed flow, or the entry had left
# the table): look the packet up again. It is false, like every Refusal.
REPEAT = CtState(0)


@dataclass(frozen=True, slots=True)
class TcpTimeouts:
    """net.netfilter.nf_conntrack_tcp_timeout_<name>, in seconds, with Linux's defaults."""

    syn_sent: float = 120
    syn_recv: float = 60
    established: float = 432000
    fin_wait: float = 120
    close_wait: float = 60
    last_ack: float = 30
    time_wait: float = 120
    close: float = 10
    max_retrans: float = 300
    unacknowledged: float = 300

    def by_state(self) -> tuple[float, ...]:
        """Indexed by TcpState (SYN_SENT2 shares syn_sent's value, as in the kernel)."""
        return (self.close, self.syn_sent, self.syn_recv, self.established, self.fin_wait,
                self.close_wait, self.last_ack, self.time_wait, self.close, self.syn_sent)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """net.netfilter.nf_conntrack_{udp,icmp,generic}_timeout*, in seconds, with Linux's defaults.

    `udp_stream_after` is not a sysctl but the kernel's fixed 2 s (stream_ts = 2 * HZ): how long
    after its creation a replied UDP flow must still see packets to count as a stream."""

    tcp: TcpTimeouts = TcpTimeouts()
    udp: float = 30
    udp_stream: float = 120
    udp_stream_after: float = 2
    icmp: float = 30
    generic: float = 600


@dataclass(frozen=True, slots=True)
class ConntrackStatistics:
    """conntrack -S's counters (one CPU), plus what the table holds and what expired."""

    found: int
    invalid: int
    insert: int
    insert_failed: int
    drop: int
    early_drop: int
    error: int
    search_restart: int
    clash_resolve: int
    chaintoolong: int
    expired: int
    entries: int
    max_entries: int


# ---- tuples -------------------------------------------------------------------------------------

# ICMP query types and their answers (the kernel's invmap): echo, timestamp, info, address mask
_ICMP_INVERSE = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17}
_ICMP_OPENS = frozenset({8, 13, 15, 17})   # valid_new[]: only requests open a flow


def invert(t: tuple) -> FlowTuple | None:
    """The tuple of a packet going the other way; None for an ICMP type with no reply type."""
    proto, src, sport, dst, dport = t
    if proto == IPPROTO_ICMP:
        answer = _ICMP_INVERSE.get(dport >> 8)
        if answer is None:
            return None
        return FlowTuple(proto, dst, sport, src, answer << 8 | (dport & 0xFF))
    return FlowTuple(proto, dst, dport, src, sport)


# per-entry TCP flags (the kernel's IP_CT_TCP_FLAG_CLOSE_INIT per direction, last_flags bits)
_CLOSE_INIT_ORIGINAL = 1
_CLOSE_INIT_REPLY = 2
_SIMULTANEOUS_OPEN = 4
_EXPECT_CHALLENGE_ACK = 8

# plain ints on the per-packet path: IntFlag arithmetic costs a microsecond per operation
_SEEN_REPLY = int(Status.SEEN_REPLY)
_ASSURED = int(Status.ASSURED)
_CONFIRMED = int(Status.CONFIRMED)
_SRC_NAT = int(Status.SRC_NAT)
_DST_NAT = int(Status.DST_NAT)
_NAT_DONE = int(Status.SRC_NAT_DONE | Status.DST_NAT_DONE)
_DYING = int(Status.DYING)
_NEW = CtState.NEW
_ESTABLISHED = CtState.ESTABLISHED
_INVALID = CtState.INVALID
_NO_HEAP = float("inf")


class Entry:
    """One tracked flow. Read freely; change only `mark` and `backend` (the rest is conntrack's)."""

    __slots__ = ("id", "orig", "reply", "nat", "mark", "backend", "created", "deadline", "packets",
                 "bytes", "_status", "_tcp", "_last_class", "_last_dir", "_tcp_flags", "_stream_ts",
                 "_heap_seq", "_heap_at", "_hits")

    def __init__(self, entry_id: int, orig: FlowTuple, reply: FlowTuple, nat: NatBinding | None,
                 now: float) -> None:
        self.id = entry_id
        self.orig = orig
        self.reply = reply
        self.nat = nat
        self.mark = 0
        self.backend: object | None = None   # a service backend's own bookkeeping for this flow
        self.created = now
        self.deadline = now
        self.packets = [0, 0]   # per direction
        self.bytes = [0, 0]
        self._status = 0
        self._tcp = _NO
        self._last_class = _NONE_SET
        self._last_dir = 0
        self._tcp_flags = 0
        self._stream_ts = 0.0
        self._heap_seq = -1
        self._heap_at = _NO_HEAP
        # what the table answers for each tuple, built once
        self._hits = ((self, Direction.ORIGINAL), (self, Direction.REPLY))

    @property
    def proto(self) -> int:
        return self.orig[0]

    @property
    def status(self) -> Status:
        return Status(self._status)

    @property
    def state(self) -> TcpState | None:
        """The TCP state (None for other protocols, which have none)."""
        return TcpState(self._tcp) if self.orig[0] == IPPROTO_TCP else None

    @property
    def assured(self) -> bool:
        return bool(self._status & _ASSURED)

    @property
    def seen_reply(self) -> bool:
        return bool(self._status & _SEEN_REPLY)

    @property
    def nat_ctstate(self) -> CtState:
        """The SNAT / DNAT bits of `-m conntrack --ctstate` for this flow."""
        bits = CtState(0)
        if self._status & _SRC_NAT:
            bits |= CtState.SNAT
        if self._status & _DST_NAT:
            bits |= CtState.DNAT
        return bits

    def rewrite(self, direction: int) -> Rewrite | None:
        """What NAT sets on a packet in `direction` (None: the flow is not NATed)."""
        return self.nat.rewrites[direction] if self.nat is not None else None

    def remaining(self, now: float) -> int:
        """Whole seconds left, as conntrack -L shows them (never negative)."""
        return max(int(self.deadline - now), 0)

    @property
    def dying(self) -> bool:
        """The entry has left the table (expired, deleted, evicted): a cached reference is stale."""
        return bool(self._status & _DYING)

    def __repr__(self) -> str:
        return f"<conntrack Entry id={self.id} orig={self.orig} reply={self.reply} {self.status!r}>"


@dataclass
class _Counters:
    found: int = 0
    invalid: int = 0
    insert: int = 0
    insert_failed: int = 0
    drop: int = 0
    early_drop: int = 0
    error: int = 0
    expired: int = 0


class Conntrack:
    """The connection tracking table of one node (one network namespace)."""

    def __init__(self, max_entries: int = 262144, *, timeouts: Timeouts = Timeouts(),
                 tcp_loose: bool = True, early_drop: bool = True, accounting: bool = False,
                 on_destroy: Callable[[Entry], None] | None = None) -> None:
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigError(f"conntrack max_entries (nf_conntrack_max) {max_entries!r}: must be an integer >= 1")
        self.max_entries = max_entries
        self.timeouts = timeouts
        self.tcp_loose = tcp_loose
        self.early_drop = early_drop
        self.accounting = accounting
        # called once for every entry that leaves the table (expiry, delete, early drop, RST, flush),
        # like a conntrack -E DESTROY event: backends release what `entry.backend` holds
        self.on_destroy = on_destroy
        self._table: dict[tuple, tuple[Entry, Direction]] = {}
        self._entries: dict[int, Entry] = {}     # by id, in creation order
        self._unassured: dict[int, Entry] = {}   # early-drop candidates, oldest first
        self._heap: list[tuple[float, int, Entry]] = []
        self._seq = itertools.count()
        self._next_id = 1
        self._c = _Counters()

    @property
    def timeouts(self) -> Timeouts:
        return self._timeouts

    @timeouts.setter
    def timeouts(self, timeouts: Timeouts) -> None:
        # new values apply from each entry's next packet on, as a sysctl change does
        self._timeouts = timeouts
        self._tcp_timeouts = timeouts.tcp.by_state()

    # ---- lookups ----------------------------------------------------------------------------

    def lookup(self, key: tuple, now: float | None = None) -> tuple[Entry, Direction] | None:
        """The entry whose original or reply tuple is `key`, and which of the two it is.

        Given `now`, an entry past its deadline is expired on the spot and not found, as the
        kernel's lookup does; without it the caller relies on `handle_timer`."""
        hit = self._table.get(key)
        if hit is None:
            return None
        if now is not None and hit[0].deadline <= now:
            self._remove(hit[0])
            self._c.expired += 1
            return None
        self._c.found += 1
        return hit

    def lookup_related(self, inner: tuple, now: float | None = None) -> tuple[Entry, Direction] | None:
        """The flow an ICMP error belongs to, from the tuple of the packet it quotes.

        The quoted packet went the other way, so its tuple is inverted first; the direction
        answered is the error's own. Unknown flows are counted in `error`."""
        key = invert(inner)
        hit = self.lookup(key, now) if key is not None else None
        if hit is None:
            self._c.error += 1
        return hit

    def in_use(self, key: tuple) -> bool:
        """True when `key` is some entry's original or reply tuple (for choosing an SNAT port)."""
        return key in self._table

    # ---- new flows --------------------------------------------------------------------------

    def new(self, orig: tuple, now: float, *, dnat: tuple[int, int | None] | None = None,
            snat: tuple[int, int | None] | None = None, tcp_flags: int = 0, length: int = 0,
            mark: int = 0, confirm: bool = True) -> Entry | Refusal:
        """Track a flow from its first packet, `orig`, which `lookup` did not find.

        `dnat` / `snat` are the NAT decision as (address, port); a port of None keeps the
        packet's (for ICMP, the snat port is the echo identifier and a dnat port is ignored).
        The first packet goes through the protocol's state machine like any other. With
        `confirm=False` the entry is made but not inserted until `confirm` (the kernel confirms
        after the last hook, so a packet dropped on the way leaves nothing behind)."""
        c = self._c
        if len(self._entries) >= self.max_entries and not self._make_room(now):
            c.drop += 1
            return Refusal.TABLE_FULL
        orig = FlowTuple(*orig)
        proto = orig[0]
        if proto == IPPROTO_TCP:
            klass = _TCP_CLASS[tcp_flags & 0xFF]
            state = _TCP_NEXT[0][klass][_NO] if klass >= 0 else _IV
            if not (state == _SS or (state == _ES and self.tcp_loose)):
                c.invalid += 1
                return Refusal.INVALID
        elif proto == IPPROTO_ICMP and orig.dport >> 8 not in _ICMP_OPENS:
            c.invalid += 1
            return Refusal.INVALID

        _, src, sport, dst, dport = orig
        if snat is not None:
            src = snat[0]
            sport = sport if snat[1] is None else snat[1]
        if dnat is not None:
            dst = dnat[0]
            if proto != IPPROTO_ICMP and dnat[1] is not None:
                dport = dnat[1]
        translated = FlowTuple(proto, src, sport, dst, dport)
        reply = invert(translated)
        assert reply is not None   # ICMP types were checked above
        binding = NatBinding.between(orig, translated)
        entry = Entry(self._next_id, orig, reply, binding, now)
        self._next_id += 1
        entry.mark = mark
        entry._status = _NAT_DONE
        if binding is not None:
            if binding.snat:
                entry._status |= _SRC_NAT
            if binding.dnat:
                entry._status |= _DST_NAT

        # the first packet, through the protocol's handler
        if proto == IPPROTO_TCP:
            t = self._timeouts.tcp
            entry._tcp = state
            entry._last_class = klass
            timeout = t.syn_sent if state == _SS else min(t.established, t.unacknowledged)
        elif proto == IPPROTO_UDP:
            entry._stream_ts = now + self._timeouts.udp_stream_after
            timeout = self._timeouts.udp
        elif proto == IPPROTO_ICMP:
            timeout = self._timeouts.icmp
        else:
            timeout = self._timeouts.generic
        entry.deadline = now + timeout
        entry.packets[0] = 1
        entry.bytes[0] = length
        if confirm and not self.confirm(entry):
            return Refusal.CLASH
        return entry

    def confirm(self, entry: Entry) -> bool:
        """Insert an entry made with `new(confirm=False)`. False when one of its tuples was taken
        meanwhile (counted in insert_failed, as __nf_conntrack_confirm finds a clash) or the
        table filled up meanwhile and nothing could be evicted (counted in drop)."""
        if entry._status & (_CONFIRMED | _DYING):
            return not entry._status & _DYING
        if len(self._entries) >= self.max_entries and not self._make_room(entry.created):
            self._c.drop += 1
            return False
        table = self._table
        if entry.orig in table or (entry.reply != entry.orig and entry.reply in table):
            self._c.insert_failed += 1
            return False
        table[entry.orig] = entry._hits[0]
        if entry.reply != entry.orig:   # a flow to itself (same address and port) has one key
            table[entry.reply] = entry._hits[1]
        self._entries[entry.id] = entry
        if not entry._status & _ASSURED:
            self._unassured[entry.id] = entry
        entry._status |= _CONFIRMED
        self._push(entry)
        self._c.insert += 1
        return True

    def _make_room(self, now: float) -> bool:
        """Free one slot for a NEW flow on a full table, as __nf_conntrack_alloc tries to."""
        self.handle_timer(now)
        if len(self._entries) < self.max_entries:
            return True
        if self.early_drop and self._unassured:
            victim = next(iter(self._unassured.values()))
            self._remove(victim)
            self._c.early_drop += 1
            return True
        return False

    # ---- packets of tracked flows -----------------------------------------------------------

    def update(self, entry: Entry, direction: int, now: float, *, tcp_flags: int = 0,
               length: int = 0) -> CtState:
        """Account one packet of a tracked flow and advance its state (see the module rules).

        Answers NEW / ESTABLISHED / INVALID, or REPEAT when the entry is gone - a SYN reopened a
        closed TCP flow, or the caller held on to an entry that has since left the table: look
        the packet up again (it is then NEW)."""
        status = entry._status
        if status & _DYING:
            return REPEAT
        verdict = _ESTABLISHED if direction or status & _SEEN_REPLY else _NEW
        proto = entry.orig[0]
        if proto == IPPROTO_TCP:
            timeout = self._tcp_packet(entry, direction, tcp_flags, status)
            if timeout is None:
                # accepted without a refresh (ignored, or a retransmitted SYN); an accepted
                # reply still counts as seen, as in nf_conntrack_in()
                if direction and not status & _SEEN_REPLY:
                    entry._status |= _SEEN_REPLY
                return verdict
            if timeout < 0:
                if timeout == _TCP_INVALID:
                    self._c.invalid += 1
                    return _INVALID
                if timeout == _TCP_REPEAT:
                    return REPEAT
                # _TCP_KILL: an RST before any reply; the packet is accounted, the entry goes
                entry.packets[direction] += 1
                entry.bytes[direction] += length
                self._remove(entry)
                return verdict
        elif proto == IPPROTO_UDP:
            if status & _SEEN_REPLY:
                if now > entry._stream_ts:
                    timeout = self._timeouts.udp_stream
                    if not status & _ASSURED:
                        self._set_assured(entry)
                else:
                    timeout = self._timeouts.udp
            else:
                timeout = self._timeouts.udp
        elif proto == IPPROTO_ICMP:
            timeout = self._timeouts.icmp
        else:
            timeout = self._timeouts.generic

        deadline = now + timeout
        entry.deadline = deadline
        if deadline < entry._heap_at and entry._heap_seq >= 0:
            self._push(entry)
        entry.packets[direction] += 1
        entry.bytes[direction] += length
        if direction and not status & _SEEN_REPLY:
            entry._status |= _SEEN_REPLY
        return verdict

    def update_steady(self, entry: Entry, direction: int, now: float, tcp_flags: int, length: int) -> bool:
        """`update` for the packets that change nothing but the clock and the counters, cheaply:
        a TCP segment of the ACK class (no SYN, FIN or RST), of an ESTABLISHED flow that is ASSURED, or a packet of
        an ASSURED UDP stream. They refresh the deadline to the same timeout `update` would set and
        count; the deadline only moves later, so no heap work. Returns False, having done nothing,
        for every other packet, which then goes through `update`."""
        status = entry._status
        if not status & _ASSURED:
            return False
        proto = entry.orig[0]
        if proto == IPPROTO_TCP:
            if entry._tcp != _ES or _TCP_CLASS[tcp_flags & 0xFF] != _ACK_SET:   # the ACK class: no SYN, FIN or RST
                return False
            entry.deadline = now + self._tcp_timeouts[_ES]
            entry._last_class = _ACK_SET   # what `update` records too: later SYNs are judged by it
            entry._last_dir = direction
        elif proto == IPPROTO_UDP:
            entry.deadline = now + self.timeouts.udp_stream
        else:
            return False
        entry.packets[direction] += 1
        entry.bytes[direction] += length
        return True

    def _tcp_packet(self, entry: Entry, direction: int, flags: int, status: int):
        """nf_conntrack_tcp_packet without window tracking: the timeout to apply, None for an
        ignored packet, or one of the negative markers below."""
        klass = _TCP_CLASS[flags & 0xFF]
        if klass < 0:
            return _TCP_INVALID
        old = entry._tcp
        new = _TCP_NEXT[direction][klass][old]

        if new == _SS and old >= _TW:
            # a SYN in TIME_WAIT / CLOSE: a new connection on the same tuple if this one was
            # closed (a FIN was seen) or reset by the SYN's sender; else maybe out of sync
            if entry._tcp_flags & (_CLOSE_INIT_ORIGINAL | _CLOSE_INIT_REPLY) or (
                    entry._last_dir == direction and entry._last_class == _RST_SET):
                self._remove(entry)
                return _TCP_REPEAT
            new = _IG
        if new == _IG:
            if klass == _SYNACK_SET and entry._last_class == _SYN_SET and entry._last_dir != direction:
                # answers a SYN ignored earlier: both ends are in sync, we were not
                old, new = _SS, _SR
                entry._tcp_flags &= ~_EXPECT_CHALLENGE_ACK
            else:
                entry._last_class = klass
                entry._last_dir = direction
                if klass == _SYN_SET and direction == 0:
                    # the kernel starts this SYN's last_flags afresh
                    entry._tcp_flags &= ~(_EXPECT_CHALLENGE_ACK | _SIMULTANEOUS_OPEN)
                    if old == _LA:   # an RFC 5961 stack answers it with a challenge ACK
                        entry._tcp_flags |= _EXPECT_CHALLENGE_ACK
                return None
        elif new == _IV:
            return _TCP_INVALID
        elif new == _TW:
            if (old == _LA and klass == _ACK_SET and entry._last_dir != direction
                    and entry._last_class == _SYN_SET and entry._tcp_flags & _EXPECT_CHALLENGE_ACK):
                entry._tcp_flags &= ~_EXPECT_CHALLENGE_ACK
                return None   # a challenge ACK, not the last ACK
        elif new == _S2:
            entry._tcp_flags |= _SIMULTANEOUS_OPEN
        elif new == _SR:
            if direction and klass == _ACK_SET and entry._tcp_flags & _SIMULTANEOUS_OPEN:
                new = _ES

        entry._last_class = klass
        entry._last_dir = direction
        entry._tcp = new
        if new == _FW and old != _FW:
            entry._tcp_flags |= _CLOSE_INIT_REPLY if direction else _CLOSE_INIT_ORIGINAL
        t = self._tcp_timeouts
        timeout = t[_CL] if klass == _RST_SET else t[new]
        if not status & _SEEN_REPLY:
            if klass == _RST_SET:
                return _TCP_KILL
            if klass == _SYN_SET and old == _SS:
                return None   # a retransmitted SYN does not extend the entry's life
            if new == _ES:
                timeout = min(timeout, self._timeouts.tcp.unacknowledged)
        elif new == _ES and (old == _SR or old == _ES) and not status & _ASSURED:
            self._set_assured(entry)
        return timeout

    def _set_assured(self, entry: Entry) -> None:
        entry._status |= _ASSURED
        self._unassured.pop(entry.id, None)

    # ---- expiry -----------------------------------------------------------------------------

    def _push(self, entry: Entry) -> None:
        seq = next(self._seq)
        entry._heap_seq = seq
        entry._heap_at = entry.deadline
        heapq.heappush(self._heap, (entry.deadline, seq, entry))

    def handle_timer(self, now: float) -> int:
        """Expire every entry whose deadline is <= now; answers how many went."""
        heap = self._heap
        expired = 0
        while heap and heap[0][0] <= now:
            _, seq, entry = heap[0]
            if entry._heap_seq != seq:        # deleted, or superseded by an earlier item
                heapq.heappop(heap)
            elif entry.deadline > now:        # refreshed since: wait for its real deadline
                seq = next(self._seq)
                entry._heap_seq = seq
                entry._heap_at = entry.deadline
                heapq.heapreplace(heap, (entry.deadline, seq, entry))
            else:
                heapq.heappop(heap)
                self._remove(entry)
                expired += 1
        self._c.expired += expired
        return expired

    def next_deadline(self) -> float | None:
        """When the next entry expires (None: the table is empty)."""
        heap = self._heap
        while heap:
            at, seq, entry = heap[0]
            if entry._heap_seq != seq:
                heapq.heappop(heap)
            elif entry.deadline > at:
                seq = next(self._seq)
                entry._heap_seq = seq
                entry._heap_at = entry.deadline
                heapq.heapreplace(heap, (entry.deadline, seq, entry))
            else:
                return at
        return None

    # ---- the table --------------------------------------------------------------------------

    def _remove(self, entry: Entry) -> None:
        if self._entries.pop(entry.id, None) is None:
            return
        del self._table[entry.orig]
        if entry.reply != entry.orig:
            del self._table[entry.reply]
        self._unassured.pop(entry.id, None)
        entry._status |= _DYING
        entry._heap_seq = -1
        entry._heap_at = _NO_HEAP
        if len(self._heap) > 64 and len(self._heap) > 4 * len(self._entries):
            self._compact_heap()
        if self.on_destroy is not None:
            self.on_destroy(entry)

    def _compact_heap(self) -> None:
        # many deleted entries (a flush, a burst of RSTs) would otherwise linger until they surface
        # (in place: handle_timer holds a reference to the list while it removes entries)
        self._heap[:] = [item for item in self._heap if item[2]._heap_seq == item[1]]
        heapq.heapify(self._heap)

    def delete(self, entry: Entry) -> bool:
        """Remove an entry now (conntrack -D). False if it was not in the table."""
        if entry.id not in self._entries:
            return False
        self._remove(entry)
        return True

    def flush(self) -> int:
        """Remove every entry (conntrack -F); answers how many there were."""
        entries = list(self._entries.values())
        for entry in entries:
            self._remove(entry)
        self._heap.clear()
        return len(entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def statistics(self) -> ConntrackStatistics:
        c = self._c
        return ConntrackStatistics(found=c.found, invalid=c.invalid, insert=c.insert,
                                   insert_failed=c.insert_failed, drop=c.drop, early_drop=c.early_drop,
                                   error=c.error, search_restart=0, clash_resolve=0, chaintoolong=0,
                                   expired=c.expired, entries=len(self._entries),
                                   max_entries=self.max_entries)

    def listing(self, now: float, *, extended: bool = False) -> list[str]:
        """conntrack -L (or -L -o extended), one line per entry, in creation order."""
        from .conntrack_format import format_conntrack_L
        return [format_conntrack_L(e, now, accounting=self.accounting, extended=extended)
                for e in self._entries.values()]


_TCP_INVALID = -1
_TCP_REPEAT = -2
_TCP_KILL = -3
