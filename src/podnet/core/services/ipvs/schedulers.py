"""The IPVS schedulers, with the kernel's arithmetic and tie-breaks (core layer, sans-IO).

One class per net/netfilter/ipvs/ip_vs_<name>.c: rr, wrr, lc, wlc, sed, nq, sh, dh, mh. A
scheduler is bound to one virtual service (`init_service`) and told about destination changes
the way the kernel tells it: `add_dest` after the new destination was put at the head of the list,
`del_dest` after one was unlinked (with the index it had), `upd_dest` after a weight change.

Rules every scheduler keeps (the kernel's):
- The destination list is walked in list order (newest first); ties go to the earlier one.
- A destination with weight 0 gets no new connection (quiesced), nor does an OVERLOADED one.
- `schedule(svc, pkt, commit)` returns (destination or None, destinations examined). With
  commit=False (a trace) nothing changes: rr's and wrr's positions stay where they were.
- Hash tables are rebuilt on every destination change, as the kernel does: sh and dh 256 buckets,
  mh a Maglev table of 4093 entries (CONFIG_IP_VS_MH_TAB_INDEX=12 -> primes[4]).
"""

from __future__ import annotations

import math

from podnet.errors import ConfigError

from .hashing import golden_multiply_low_bits, hash_32, hsiphash_u32
from .table import SVC_F_SCHED1, SVC_F_SCHED2, Dest, VirtualService

__all__ = ["SCHEDULERS", "Scheduler", "make_scheduler", "scheduler_flag_names"]


def _eligible(dest: Dest) -> bool:
    return dest.weight > 0 and not dest.overloaded


class Scheduler:
    """struct ip_vs_scheduler: hooks plus schedule()."""

    name = ""

    def init_service(self, svc: VirtualService) -> None:
        pass

    def add_dest(self, svc: VirtualService, dest: Dest) -> None:
        pass

    def del_dest(self, svc: VirtualService, dest: Dest, index: int) -> None:
        pass

    def upd_dest(self, svc: VirtualService, dest: Dest) -> None:
        pass

    def schedule(self, svc: VirtualService, pkt, commit: bool = True) -> tuple[Dest | None, int]:
        raise NotImplementedError


class RoundRobin(Scheduler):
    """ip_vs_rr.c: a circular walk starting after the last chosen destination (`pos`, -1 = the
    list head), at most once round the list."""

    name = "rr"

    def __init__(self) -> None:
        self.pos = -1

    def init_service(self, svc):
        self.pos = -1

    def add_dest(self, svc, dest):
        if self.pos >= 0:        # the pointer follows its node when a new one is put in front
            self.pos += 1

    def del_dest(self, svc, dest, index):
        if self.pos == index:    # ip_vs_rr_del_dest: step back to the previous node
            self.pos = index - 1
        elif self.pos > index:
            self.pos -= 1

    def schedule(self, svc, pkt, commit=True):
        dests = svc.dests
        order = list(range(self.pos + 1, len(dests)))
        if self.pos >= 0:        # a second pass only if we did not start at the head
            order += range(0, self.pos + 1)
        for examined, i in enumerate(order, 1):
            if _eligible(dests[i]):
                if commit:
                    self.pos = i
                return dests[i], examined
        return None, len(order)


class WeightedRoundRobin(Scheduler):
    """ip_vs_wrr.c: cw starts at mw = max weight - (gcd - 1) and steps down by gcd after each
    walk of the list; a destination is picked when its weight >= cw. Any change resets the
    position to the head and recomputes gcd and mw (cw is clamped or re-aligned)."""

    name = "wrr"

    def __init__(self) -> None:
        self.pos = -1    # mark->cl: the current destination, -1 = the list head
        self.cw = 0
        self.mw = 0
        self.di = 1

    @staticmethod
    def _gcd_weight(svc) -> int:
        g = 0
        for dest in svc.dests:
            if dest.weight > 0:
                g = math.gcd(dest.weight, g) if g > 0 else dest.weight
        return g or 1

    @staticmethod
    def _max_weight(svc) -> int:
        return max((d.weight for d in svc.dests), default=0) if svc.dests else 0

    def init_service(self, svc):
        self.pos = -1
        self.di = self._gcd_weight(svc)
        self.mw = max(self._max_weight(svc), 0) - (self.di - 1)
        self.cw = self.mw

    def _changed(self, svc):
        self.pos = -1
        self.di = self._gcd_weight(svc)
        self.mw = max(self._max_weight(svc), 0) - (self.di - 1)
        if self.cw > self.mw or not self.cw:
            self.cw = self.mw
        elif self.di > 1:
            self.cw = (self.cw // self.di) * self.di + 1

    def add_dest(self, svc, dest):
        self._changed(svc)

    def del_dest(self, svc, dest, index):
        self._changed(svc)

    def upd_dest(self, svc, dest):
        self._changed(svc)

    def schedule(self, svc, pkt, commit=True):
        dests = svc.dests
        pos, cw, mw, di = self.pos, self.cw, self.mw, self.di
        examined = 0
        chosen: Dest | None = None
        if mw == 0:
            return None, 0                       # err_noavail (mark->cl stays)
        last = pos
        stop: int | None = None
        last_pass = restarted = False
        start = pos + 1
        while True:
            done = False
            for i in range(start, len(dests)):
                examined += 1
                dest = dests[i]
                if not dest.overloaded and dest.weight >= cw:
                    chosen, pos, done = dest, i, True
                    break
                if i == stop:
                    pos, done = i, True          # err_over: mark->cl = dest
                    break
            if done:
                break
            start = 0
            cw -= di
            if cw <= 0:
                cw = mw
                if last_pass or last == -1:
                    pos = -1                     # err_over at the head
                    break
                restarted = True
            last_pass = cw <= di
            if last_pass and restarted and last != -1:
                stop = last
        if commit:
            self.pos, self.cw = pos, cw
        return chosen, examined


class LeastConnection(Scheduler):
    """ip_vs_lc.c: the least overhead (active*256 + inactive); ties keep the first."""

    name = "lc"

    def schedule(self, svc, pkt, commit=True):
        least, loh = None, 0
        for dest in svc.dests:
            if dest.overloaded or dest.weight == 0:
                continue
            doh = dest.overhead()
            if least is None or doh < loh:
                least, loh = dest, doh
        return least, len(svc.dests)


class WeightedLeastConnection(Scheduler):
    """ip_vs_wlc.c: the least overhead/weight, compared as loh*w_d > doh*w_least (no floats),
    starting from the first eligible destination; ties keep the earlier one."""

    name = "wlc"

    @staticmethod
    def overhead(dest: Dest) -> int:
        return dest.overhead()

    def schedule(self, svc, pkt, commit=True):
        dests = svc.dests
        least = None
        for first, dest in enumerate(dests):
            if _eligible(dest):
                least, loh = dest, self.overhead(dest)
                break
        if least is None:
            return None, len(dests)
        for dest in dests[first + 1:]:
            if dest.overloaded:
                continue
            doh = self.overhead(dest)
            if loh * dest.weight > doh * least.weight:
                least, loh = dest, doh
        return least, len(dests)


class ShortestExpectedDelay(WeightedLeastConnection):
    """ip_vs_sed.c: wlc with overhead = activeconns + 1 (inactive connections do not count)."""

    name = "sed"

    @staticmethod
    def overhead(dest: Dest) -> int:
        return dest.activeconns + 1


class NeverQueue(Scheduler):
    """ip_vs_nq.c: the first idle destination (no active connections) wins at once; otherwise the
    least (activeconns + 1)/weight as in sed."""

    name = "nq"

    def schedule(self, svc, pkt, commit=True):
        least, loh = None, 0
        for examined, dest in enumerate(svc.dests, 1):
            if dest.overloaded or not dest.weight:
                continue
            doh = dest.activeconns + 1
            if dest.activeconns == 0:
                return dest, examined
            if least is None or loh * dest.weight > doh * least.weight:
                least, loh = dest, doh
        return least, len(svc.dests)


class _RebuiltOnChange(Scheduler):
    """A scheduler whose lookup table is a pure function of the destination list (and weights):
    rebuilding it once, lazily, before the next lookup gives what rebuilding it on every change
    (as the kernel does) gives. sh, dh and mh."""

    stale = True

    def init_service(self, svc):
        self.stale = True

    def add_dest(self, svc, dest):
        self.stale = True

    def del_dest(self, svc, dest, index):
        self.stale = True

    def upd_dest(self, svc, dest):
        self.stale = True

    @staticmethod
    def _probe(svc, table, size: int, slot) -> tuple[Dest | None, int]:
        """The lookup sh and mh share: the slot for hash offset 0; if its server is unusable
        (overloaded, weight 0) and the service has the fallback flag, the slots for offsets
        (i + first) % size in turn, stopping at an empty one. Returns (server or None, lookups)."""
        first = slot(0)
        dest = table[first]
        if dest is None:
            return None, 1
        if _eligible(dest):
            return dest, 1
        if not svc.flags & SVC_F_SCHED1:
            return None, 1
        for offset in range(size):
            dest = table[slot((offset + first) % size)]
            if dest is None:
                break
            if _eligible(dest):
                return dest, offset + 2
        return None, size + 1

    def _refresh(self, svc) -> None:
        if self.stale:
            self._reassign(svc)
            self.stale = False

    def _reassign(self, svc) -> None:
        raise NotImplementedError


class _BucketHashing(_RebuiltOnChange):
    """The 256-bucket table shared by sh and dh (CONFIG_IP_VS_{SH,DH}_TAB_BITS = 8)."""

    TAB_BITS = 8
    TAB_SIZE = 1 << TAB_BITS
    TAB_MASK = TAB_SIZE - 1

    def __init__(self) -> None:
        self.buckets: list[Dest | None] = [None] * self.TAB_SIZE
        self.stale = True

    def table(self, svc) -> list[Dest | None]:
        self._refresh(svc)
        return self.buckets


class SourceHashing(_BucketHashing):
    """ip_vs_sh.c: buckets filled walking the list, `weight` consecutive buckets per destination
    (a weight-0 one still takes one), wrapping round; the bucket is chosen by the client address
    (plus its port with sh-port). An unavailable destination means no connection, unless
    sh-fallback probes the next offsets. `hash_32=True` uses newer kernels' hash_32() instead of
    the multiplication by 2654435761."""

    name = "sh"

    def __init__(self, *, hash_32: bool = False) -> None:
        super().__init__()
        self.use_hash_32 = hash_32

    def _reassign(self, svc):
        dests = svc.dests
        if not dests:
            self.buckets = [None] * self.TAB_SIZE
            return
        p, d_count = 0, 0
        for i in range(self.TAB_SIZE):
            dest = dests[p]
            self.buckets[i] = dest
            d_count += 1
            if d_count >= dest.weight:   # "don't move to next dest until filling weight"
                p = (p + 1) % len(dests)
                d_count = 0

    def hashkey(self, addr: int, port: int, offset: int) -> int:
        value = (port + addr) & 0xFFFFFFFF
        if self.use_hash_32:
            return (offset + hash_32(value, self.TAB_BITS)) & self.TAB_MASK
        return (offset + golden_multiply_low_bits(value, (1 << 64) - 1)) & self.TAB_MASK

    def schedule(self, svc, pkt, commit=True):
        port = pkt.sport if svc.flags & SVC_F_SCHED2 else 0
        return self._probe(svc, self.table(svc), self.TAB_SIZE,
                           lambda offset: self.hashkey(pkt.src, port, offset))


class DestinationHashing(_BucketHashing):
    """ip_vs_dh.c: one bucket per destination round the list (weight is not used for placement);
    the bucket is chosen by the packet's destination address — for kube-proxy, the VIP."""

    name = "dh"

    def _reassign(self, svc):
        dests = svc.dests
        for i in range(self.TAB_SIZE):
            self.buckets[i] = dests[i % len(dests)] if dests else None

    def schedule(self, svc, pkt, commit=True):
        dest = self.table(svc)[golden_multiply_low_bits(pkt.dst, self.TAB_MASK)]
        if dest is None or not dest.available or not _eligible(dest):
            return None, 1
        return dest, 1


MH_PRIMES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
MH_KEY1 = (2654435761, 2654435761)     # generate_hash_secret()
MH_KEY2 = (2654446892, 2654446892)


class MaglevHashing(_RebuiltOnChange):
    """ip_vs_mh.c: each destination gets offset = h1(addr+port) % M and skip = h2(addr+port) %
    (M-1) + 1; destinations take turns (last_weight/gcd, shifted right so the largest fits in
    IP_VS_MH_TAB_BITS bits) claiming their next free preferred slot until the M slots are full.
    Lookup: h1(client addr (+ port with mh-port)) % M. A weight-0 destination keeps its slots
    (last_weight) but gets nothing: no connection, unless mh-fallback probes further."""

    name = "mh"

    def __init__(self, tab_index: int = 12) -> None:
        if not 8 <= tab_index <= 17:
            raise ConfigError(f"mh: CONFIG_IP_VS_MH_TAB_INDEX must be in 8..17, got {tab_index}")
        self.size = MH_PRIMES[tab_index - 8]
        self.tab_bits = tab_index // 2
        self.lookup: list[Dest | None] = [None] * self.size
        self.gcd = 0
        self.rshift = 0
        self.stale = True

    def table(self, svc) -> list[Dest | None]:
        self._refresh(svc)
        return self.lookup

    def _hashkey(self, addr: int, port: int, key: tuple[int, int], offset: int) -> int:
        return hsiphash_u32((offset + port + addr) & 0xFFFFFFFF, key)

    def _reassign(self, svc) -> None:
        if len(svc.dests) > self.size:
            return   # ip_vs_mh_reassign's -EINVAL, which __ip_vs_update_dest ignores: the old table stays
        g = 0
        for dest in svc.dests:
            if dest.last_weight > 0:
                g = math.gcd(dest.last_weight, g) if g > 0 else dest.last_weight
        self.gcd = g
        if g < 1:
            self.rshift = 0
            self.lookup = [None] * self.size
            return
        mw = max(d.last_weight for d in svc.dests) // g
        self.rshift = max(mw.bit_length() - self.tab_bits, 0)
        size = self.size
        setups = []   # [dest, perm, skip, turns] in list order (ip_vs_mh_permutate)
        for dest in svc.dests:
            offset = self._hashkey(dest.addr, dest.port, MH_KEY1, 0) % size
            skip = self._hashkey(dest.addr, dest.port, MH_KEY2, 0) % (size - 1) + 1
            lw = dest.last_weight
            turns = ((lw // g) >> self.rshift) or (1 if lw != 0 else 0)
            setups.append([dest, offset, skip, turns])
        taken = bytearray(size)
        lookup: list[Dest | None] = [None] * size
        n = 0
        while n < size:   # ip_vs_mh_populate: rounds over the list, `turns` slots each
            for setup in setups:
                dest, _perm, skip, turns = setup
                for _ in range(turns if turns >= 1 else 0):
                    c = setup[1]
                    while taken[c]:
                        c += skip
                        if c >= size:
                            c -= size
                    setup[1] = c
                    taken[c] = 1
                    lookup[c] = dest
                    n += 1
                    if n == size:
                        break
                if n == size:
                    break
        self.lookup = lookup

    def schedule(self, svc, pkt, commit=True):
        port = pkt.sport if svc.flags & SVC_F_SCHED2 else 0
        size = self.size
        return self._probe(svc, self.table(svc), size,
                           lambda offset: self._hashkey(pkt.src, port, MH_KEY1, offset) % size)


SCHEDULERS: dict[str, type[Scheduler]] = {
    "rr": RoundRobin,
    "wrr": WeightedRoundRobin,
    "lc": LeastConnection,
    "wlc": WeightedLeastConnection,
    "sed": ShortestExpectedDelay,
    "nq": NeverQueue,
    "sh": SourceHashing,
    "dh": DestinationHashing,
    "mh": MaglevHashing,
}


def make_scheduler(name: str) -> Scheduler:
    try:
        return SCHEDULERS[name]()
    except KeyError:
        raise ConfigError(f"ipvs scheduler {name!r}: unknown (choose from {', '.join(SCHEDULERS)})") from None


def scheduler_flag_names(sched_name: str, flags: int) -> list[str]:
    """ipvsadm's print_sched_flags(): sh-/mh- names for sh and mh, flag-N otherwise."""
    if sched_name in ("sh", "mh"):
        names = [(SVC_F_SCHED1, f"{sched_name}-fallback"), (SVC_F_SCHED2, f"{sched_name}-port")]
    else:
        names = [(SVC_F_SCHED1, "flag-1"), (SVC_F_SCHED2, "flag-2"), (0x0020, "flag-3")]
    return [name for bit, name in names if flags & bit]
