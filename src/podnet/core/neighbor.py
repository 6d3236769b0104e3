"""The neighbour table of one L2 link (the node's uplink): ARP resolution as Linux's neighbour core does it.

Layer: core, sans-IO. A node that routes to another node's address on a shared underlay (direct
routing, or the outer header of VXLAN) needs that node's MAC. `NeighborTable` keeps the states and
timers of Linux's NUD machine (net/core/neighbour.c) with the default ARP parameters
(`/proc/sys/net/ipv4/neigh/default/*`), reduced to what a single link needs:

    (none) --resolve--> INCOMPLETE --reply--> REACHABLE --base_reachable_time--> STALE
    INCOMPLETE --mcast_solicit requests unanswered--> FAILED (queued frames dropped, counted)
    STALE --used--> DELAY --delay_first_probe_time--> PROBE --ucast_solicit unanswered--> FAILED
    any --reply/request from it--> REACHABLE (a request only refreshes, as arp_process does)
    PERMANENT: configured (`ip neigh replace ... nud permanent`), never changes, never probed

Frames waiting for resolution are queued per neighbour up to `unres_qlen_bytes` (the kernel's
default is 212,992 bytes, counted by truesize there and by frame length here); beyond that the
oldest is dropped, as __neigh_event_send does. Every drop is counted by reason.

The caller (the datapath) sends the ARP requests this table asks for: `resolve` and `handle_timer`
return `Solicit(ip, unicast_mac)` items; a unicast probe (PROBE state) goes to the known MAC, a
broadcast one (INCOMPLETE) to ff:ff:ff:ff:ff:ff. `show()` prints the table as `ip neigh show` does.

Times are the caller's clock in seconds (trio.current_time() in the lab); the reachable time is
drawn once per table in [base/2, 3·base/2) as the kernel draws it, from a seeded generator so runs
repeat.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass, field

from .packet import ip_str, mac_str

# /proc/sys/net/ipv4/neigh/default/* on Linux (values in seconds, counts, bytes)
BASE_REACHABLE_TIME_S = 30.0
RETRANS_TIME_S = 1.0
DELAY_FIRST_PROBE_TIME_S = 5.0
MCAST_SOLICIT = 3
UCAST_SOLICIT = 3
UNRES_QLEN_BYTES = 212_992
GC_STALE_TIME_S = 60.0


class Nud(enum.Enum):
    INCOMPLETE = "INCOMPLETE"
    REACHABLE = "REACHABLE"
    STALE = "STALE"
    DELAY = "DELAY"
    PROBE = "PROBE"
    FAILED = "FAILED"
    PERMANENT = "PERMANENT"


@dataclass(frozen=True)
class Solicit:
    """Send an ARP request for `ip`: broadcast when `mac` is None, else unicast to `mac`."""

    ip: int
    mac: bytes | None = None


@dataclass
class Neighbor:
    ip: int
    state: Nud
    mac: bytes | None = None
    updated: float = 0.0       # when the state last changed (the kernel's `updated`)
    confirmed: float = 0.0     # when reachability was last confirmed
    used: float = 0.0
    probes: int = 0            # requests sent in the current INCOMPLETE / PROBE round
    deadline: float | None = None
    queue: deque = field(default_factory=deque)
    queued_bytes: int = 0


@dataclass
class NeighborStatistics:
    """`ip -s ntable`'s counters, as far as one table has them."""

    lookups: int = 0
    hits: int = 0
    resolved: int = 0
    solicits: int = 0
    failed: int = 0                    # resolutions that ended in FAILED
    dropped_unresolved: int = 0        # frames dropped because their neighbour FAILED
    dropped_queue_full: int = 0        # frames dropped because unres_qlen_bytes was reached
    entries: int = 0


class NeighborTable:
    """One link's neighbours. `resolve(ip, frame, now)` either returns the MAC (send now) or queues
    the frame and tells you which ARP requests to send; `arp_seen` feeds ARP packets in and returns
    the frames that were waiting for that neighbour, now sendable."""

    def __init__(self, *, device: str = "uplink", seed: int = 0,
                 base_reachable_time_s: float = BASE_REACHABLE_TIME_S, retrans_time_s: float = RETRANS_TIME_S,
                 delay_first_probe_time_s: float = DELAY_FIRST_PROBE_TIME_S, mcast_solicit: int = MCAST_SOLICIT,
                 ucast_solicit: int = UCAST_SOLICIT, unres_qlen_bytes: int = UNRES_QLEN_BYTES,
                 gc_stale_time_s: float = GC_STALE_TIME_S) -> None:
        self.device = device
        # neigh_rand_reach_time: uniformly in [base/2, 3*base/2)
        self.reachable_time_s = random.Random(seed).uniform(0.5, 1.5) * base_reachable_time_s
        self.retrans_time_s = retrans_time_s
        self.delay_first_probe_time_s = delay_first_probe_time_s
        self.mcast_solicit = mcast_solicit
        self.ucast_solicit = ucast_solicit
        self.unres_qlen_bytes = unres_qlen_bytes
        self.gc_stale_time_s = gc_stale_time_s
        self._entries: dict[int, Neighbor] = {}
        self.stats = NeighborStatistics()

    # ---- configuration ------------------------------------------------------------------------

    def set_permanent(self, ip: int, mac: bytes, now: float = 0.0) -> list[bytes]:
        """`ip neigh replace IP lladdr MAC nud permanent`; returns frames that were waiting for it."""
        entry = self._entries.get(ip)
        waiting = list(entry.queue) if entry is not None else []
        self._entries[ip] = Neighbor(ip, Nud.PERMANENT, mac, updated=now, confirmed=now)
        return waiting

    def delete(self, ip: int) -> bool:
        return self._entries.pop(ip, None) is not None

    def get(self, ip: int) -> Neighbor | None:
        return self._entries.get(ip)

    # ---- the data path ------------------------------------------------------------------------

    def resolve(self, ip: int, frame: bytes | None, now: float) -> tuple[bytes | None, list[Solicit]]:
        """The MAC to send to now, or (None, requests to send) with `frame` queued until it resolves."""
        self.stats.lookups += 1
        entry = self._entries.get(ip)
        if entry is not None and entry.state in (Nud.REACHABLE, Nud.PERMANENT, Nud.DELAY, Nud.PROBE):
            entry.used = now
            self.stats.hits += 1
            return entry.mac, []
        if entry is not None and entry.state is Nud.STALE:
            # a STALE entry is still used, and starts the wait before the first unicast probe
            self.stats.hits += 1
            entry.used = now
            self._set(entry, Nud.DELAY, now, now + self.delay_first_probe_time_s)
            return entry.mac, []
        if entry is None or entry.state is Nud.FAILED:
            entry = Neighbor(ip, Nud.INCOMPLETE)
            self._entries[ip] = entry
            self._set(entry, Nud.INCOMPLETE, now, now + self.retrans_time_s)
            entry.probes = 1
            entry.used = now
            self._enqueue(entry, frame)
            self.stats.solicits += 1
            return None, [Solicit(ip)]
        # INCOMPLETE: already asking
        entry.used = now
        self._enqueue(entry, frame)
        return None, []

    def _enqueue(self, entry: Neighbor, frame: bytes | None) -> None:
        if frame is None:
            return
        entry.queue.append(frame)
        entry.queued_bytes += len(frame)
        while entry.queued_bytes > self.unres_qlen_bytes and entry.queue:
            old = entry.queue.popleft()
            entry.queued_bytes -= len(old)
            self.stats.dropped_queue_full += 1

    def arp_seen(self, sender_ip: int, sender_mac: bytes, now: float, *, is_reply: bool) -> list[bytes]:
        """An ARP packet from `sender_ip`: a reply confirms it (REACHABLE); a request addressed to us
        creates or refreshes it (STALE if the MAC changed or it was unknown, as arp_process does).
        Returns the frames that were queued for it, to send now to `sender_mac`."""
        entry = self._entries.get(sender_ip)
        if entry is not None and entry.state is Nud.PERMANENT:
            return []
        if entry is None:
            if not is_reply:
                entry = Neighbor(sender_ip, Nud.STALE, sender_mac)
                self._entries[sender_ip] = entry
                self._set(entry, Nud.STALE, now, now + self.gc_stale_time_s)
            return []
        waiting = list(entry.queue)
        entry.queue.clear()
        entry.queued_bytes = 0
        if entry.state is Nud.INCOMPLETE:
            self.stats.resolved += 1
        if is_reply:
            entry.mac = sender_mac
            entry.confirmed = now
            self._set(entry, Nud.REACHABLE, now, now + self.reachable_time_s)
        elif entry.mac != sender_mac or entry.state in (Nud.INCOMPLETE, Nud.FAILED):
            entry.mac = sender_mac
            self._set(entry, Nud.STALE, now, now + self.gc_stale_time_s)
        return waiting

    def _set(self, entry: Neighbor, state: Nud, now: float, deadline: float | None) -> None:
        entry.state = state
        entry.updated = now
        entry.deadline = deadline
        if state in (Nud.REACHABLE, Nud.STALE, Nud.DELAY):
            entry.probes = 0

    # ---- timers -------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        deadlines = [e.deadline for e in self._entries.values() if e.deadline is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[Solicit]:
        """Advance every entry whose timer ran out; returns the ARP requests to send."""
        out: list[Solicit] = []
        for ip, entry in list(self._entries.items()):
            if entry.deadline is None or entry.deadline > now:
                continue
            if entry.state is Nud.INCOMPLETE:
                if entry.probes >= self.mcast_solicit:
                    self._fail(entry, now)
                else:
                    entry.probes += 1
                    entry.deadline = now + self.retrans_time_s
                    self.stats.solicits += 1
                    out.append(Solicit(ip))
            elif entry.state is Nud.REACHABLE:
                # neigh_timer_handler: still confirmed → stay; used lately → DELAY; else STALE
                if now < entry.confirmed + self.reachable_time_s:
                    entry.deadline = entry.confirmed + self.reachable_time_s
                elif now < entry.used + self.delay_first_probe_time_s:
                    self._set(entry, Nud.DELAY, now, now + self.delay_first_probe_time_s)
                else:
                    self._set(entry, Nud.STALE, now, now + self.gc_stale_time_s)
            elif entry.state is Nud.DELAY:
                if now < entry.confirmed + self.delay_first_probe_time_s:
                    self._set(entry, Nud.REACHABLE, now, entry.confirmed + self.reachable_time_s)
                else:
                    self._set(entry, Nud.PROBE, now, now + self.retrans_time_s)
                    entry.probes = 1
                    self.stats.solicits += 1
                    out.append(Solicit(ip, entry.mac))
            elif entry.state is Nud.PROBE:
                if entry.probes >= self.ucast_solicit:
                    self._fail(entry, now)
                else:
                    entry.probes += 1
                    entry.deadline = now + self.retrans_time_s
                    self.stats.solicits += 1
                    out.append(Solicit(ip, entry.mac))
            elif entry.state in (Nud.STALE, Nud.FAILED):
                # garbage collection of entries nobody used for gc_stale_time
                if entry.used + self.gc_stale_time_s <= now:
                    del self._entries[ip]
                else:
                    entry.deadline = entry.used + self.gc_stale_time_s
        return out

    def _fail(self, entry: Neighbor, now: float) -> None:
        self.stats.failed += 1
        self.stats.dropped_unresolved += len(entry.queue)
        entry.queue.clear()
        entry.queued_bytes = 0
        entry.mac = None if entry.state is Nud.INCOMPLETE else entry.mac
        self._set(entry, Nud.FAILED, now, now + self.gc_stale_time_s)

    # ---- reading ------------------------------------------------------------------------------

    def statistics(self) -> NeighborStatistics:
        self.stats.entries = len(self._entries)
        return self.stats

    def show(self) -> list[str]:
        """`ip neigh show` lines for this device, sorted by address."""
        lines = []
        for ip in sorted(self._entries):
            e = self._entries[ip]
            mac = f" lladdr {mac_str(e.mac)}" if e.mac is not None and e.state is not Nud.FAILED else ""
            lines.append(f"{ip_str(ip)} dev {self.device}{mac} {e.state.value}")
        return lines
