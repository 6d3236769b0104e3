"""Stateful match extensions: statistic and recent, and the recent module's address lists
(core layer, no I/O, no clock).

- `statistic --mode random --probability p`: iptables stores p as a 31-bit fixed-point number
  (lround(p * 2^31)); the kernel matches when a random 31-bit number is below it. We draw from the
  evaluation's `random.Random` (or, in a trace, ask the branch explorer), against the stored value,
  so the probability in force is exactly the one iptables-save prints (0.3333333333 → 0.33333333349).
- `statistic --mode nth --every n --packet p`: a counter per rule starting at p; each packet that
  reaches the match moves it on (n-1 wraps to 0) and the packet matches when it becomes 0.
- `recent`: named lists of addresses, each with its last timestamps (xt_recent): at most
  `IP_LIST_TOT` addresses per list (the least recently seen is evicted) and `IP_PKT_LIST_TOT` stamps
  per address. Time is the evaluation context's `now` (monotonic seconds); nothing here reads a clock.

State changes happen only when the walk has `effects` on; a trace walks with effects off, so it reads
the lists and the nth counters without moving them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from .rules import Match, ParseError, format_ipv4, parse_ipv4

IP_LIST_TOT = 200          # xt_recent ip_list_tot: addresses per list
IP_PKT_LIST_TOT = 20       # xt_recent ip_pkt_list_tot: timestamps per address
FIXED_ONE = 0x80000000     # statistic's fixed-point 1.0


# --- statistic -------------------------------------------------------------------------------------

@dataclass(eq=True)
class Statistic(Match):
    name: ClassVar[str] = "statistic"
    options: ClassVar[dict[str, int]] = {"mode": 1, "probability": 1, "every": 1, "packet": 1}
    invertible: ClassVar[frozenset[str]] = frozenset({"probability", "every"})
    mode: str | None = None
    probability: int | None = None      # fixed point, FIXED_ONE == 1.0
    every: int | None = None
    packet: int | None = None
    invert: bool = False
    count: int | None = field(default=None, compare=False, repr=False)   # nth state

    def parse(self, option, args, invert, rule):
        value = args[0]
        if option == "mode":
            if value not in ("random", "nth"):
                raise ParseError(f"statistic: Bad mode \"{value}\"")
            self.mode = value
        elif option == "probability":
            try:
                prob = float(value)
            except ValueError:
                prob = -1.0
            if not 0.0 <= prob <= 1.0:
                raise ParseError('statistic: bad value for option "--probability", or out of range (0-1).')
            self.probability = math.floor(FIXED_ONE * prob + 0.5)       # lround
            self.invert = self.invert or invert
        elif option == "every":
            if not value.isdigit() or not 1 <= int(value) <= 0xFFFFFFFF:
                raise ParseError('statistic: bad value for option "--every", or out of range (1-4294967295).')
            self.every = int(value)
            self.invert = self.invert or invert
        else:
            if not value.isdigit() or int(value) > 0xFFFFFFFF:
                raise ParseError('statistic: bad value for option "--packet", or out of range (0-4294967295).')
            self.packet = int(value)

    def finish(self, rule):
        if self.mode is None:
            raise ParseError('statistic: option "--mode" must be specified')
        if self.probability is not None and self.every is not None:
            raise ParseError('statistic: option "--probability" cannot be used together with "--every".')
        if self.mode == "random":
            if self.every is not None or self.packet is not None:
                raise ParseError("statistic: --every and --packet are for --mode nth only")
            if self.probability is None:
                raise ParseError("statistic: --mode random needs --probability")
        else:
            if self.probability is not None:
                raise ParseError("statistic: --probability is for --mode random only")
            if self.every is None:
                raise ParseError("statistic: --mode nth needs --every")
            if self.packet is None:
                raise ParseError('statistic: option "--every" also requires "--packet".')
            if self.packet > self.every - 1:
                raise ParseError("the --packet p must be 0 <= p <= n-1")
        self.count = self.packet

    @property
    def probability_value(self) -> float:
        return (self.probability or 0) / FIXED_ONE

    def _text(self, prefix: str, saving: bool) -> str:
        bang = " !" if self.invert else ""
        if self.mode == "random":
            return f" {prefix}mode random{bang} {prefix}probability {self.probability_value:.11f}"
        out = f" {prefix}mode nth{bang} {prefix}every {self.every}"
        if self.packet or saving:
            out += f" {prefix}packet {self.packet}"
        return out

    def save(self):
        return self._text("--", True)

    def describe(self, numeric):
        return " statistic" + self._text("", False)

    def matches(self, pkt, walk):
        if self.mode == "random":
            return walk.chance(self.probability_value) != self.invert
        current = self.packet if self.count is None else self.count
        nxt = 0 if current == self.every - 1 else current + 1
        if walk.effects:
            self.count = nxt
        return (nxt == 0) != self.invert


# --- recent ----------------------------------------------------------------------------------------

@dataclass
class RecentEntry:
    stamps: list[float]
    ttl: int = 0


class RecentTable:
    """One named list: address → timestamps, kept in least-recently-updated-first order."""

    def __init__(self, name: str):
        self.name = name
        self.entries: dict[int, RecentEntry] = {}
        self.max_stamps = IP_PKT_LIST_TOT

    def insert(self, addr: int, now: float) -> RecentEntry:
        if len(self.entries) >= IP_LIST_TOT:
            del self.entries[next(iter(self.entries))]
        entry = self.entries[addr] = RecentEntry([now])
        return entry

    def update(self, addr: int, now: float) -> None:
        entry = self.entries.pop(addr)
        entry.stamps.append(now)
        del entry.stamps[:-self.max_stamps]
        self.entries[addr] = entry

    def reap(self, cutoff: float, working: RecentEntry, updating: bool) -> None:
        """xt_recent's --reap: look at the least recently updated address only, and forget it when
        even its newest stamp is older than the cutoff (unless it is the one being updated)."""
        if not self.entries:
            return
        addr = next(iter(self.entries))
        oldest = self.entries[addr]
        if oldest is working and updating:
            return
        if cutoff > oldest.stamps[-1]:
            del self.entries[addr]


class RecentTables:
    """All `recent` lists of one network namespace, by name (what /proc/net/xt_recent/ shows)."""

    def __init__(self) -> None:
        self._tables: dict[str, RecentTable] = {}

    def table(self, name: str) -> RecentTable:
        if name not in self._tables:
            self._tables[name] = RecentTable(name)
        return self._tables[name]

    def get(self, name: str) -> RecentTable | None:
        return self._tables.get(name)

    def names(self) -> list[str]:
        return sorted(self._tables)

    def addresses(self, name: str) -> dict[int, tuple[float, ...]]:
        table = self._tables.get(name)
        return {} if table is None else {a: tuple(e.stamps) for a, e in table.entries.items()}

    def add(self, name: str, addr: int, now: float) -> None:
        """Put an address on a list, as `echo +ADDR > /proc/net/xt_recent/NAME` does."""
        table = self.table(name)
        if addr in table.entries:
            table.update(addr, now)
        else:
            table.insert(addr, now)

    def keep_only(self, names: set[str]) -> None:
        """Lists live as long as a rule refers to them (the kernel refcounts them per name)."""
        for name in list(self._tables):
            if name not in names:
                del self._tables[name]


@dataclass(eq=True)
class Recent(Match):
    name: ClassVar[str] = "recent"
    options: ClassVar[dict[str, int]] = {
        "set": 0, "rcheck": 0, "update": 0, "remove": 0, "seconds": 1, "hitcount": 1, "rttl": 0,
        "reap": 0, "name": 1, "rsource": 0, "rdest": 0, "mask": 1,
    }
    invertible: ClassVar[frozenset[str]] = frozenset({"set", "rcheck", "update", "remove"})
    command: str | None = None         # "set" | "rcheck" | "update" | "remove"
    seconds: int = 0
    hitcount: int = 0
    rttl: bool = False
    reap: bool = False
    list_name: str = "DEFAULT"
    mask: int = 0xFFFFFFFF
    side: str = "source"
    invert: bool = False

    def parse(self, option, args, invert, rule):
        if option in ("set", "rcheck", "update", "remove"):
            if self.command is not None:
                raise ParseError(f'recent: option "--{self.command}" cannot be used together with "--{option}".')
            self.command, self.invert = option, invert
        elif option in ("seconds", "hitcount"):
            if not args[0].isdigit() or int(args[0]) > 0xFFFFFFFF:
                raise ParseError(f'recent: bad value for option "--{option}", or out of range.')
            setattr(self, option, int(args[0]))
        elif option in ("rttl", "reap"):
            setattr(self, option, True)
        elif option == "name":
            if not args[0] or len(args[0]) >= 200:
                raise ParseError("recent: --name must be 1 to 199 characters")
            self.list_name = args[0]
        elif option == "mask":
            self.mask = parse_ipv4(args[0])
        else:
            self.side = "source" if option == "rsource" else "dest"

    def finish(self, rule):
        if self.command is None:
            raise ParseError("recent: you must specify one of `--set', `--rcheck' `--update' or `--remove'")
        if self.reap and not self.seconds:
            raise ParseError('recent: option "--reap" also requires "--seconds".')
        if (self.seconds or self.hitcount or self.reap) and self.command not in ("rcheck", "update"):
            raise ParseError("recent: --seconds, --hitcount and --reap go with --rcheck or --update")

    def save(self):
        out = f"{' !' if self.invert else ''} --{self.command}"
        if self.seconds:
            out += f" --seconds {self.seconds}"
        if self.reap:
            out += " --reap"
        if self.hitcount:
            out += f" --hitcount {self.hitcount}"
        if self.rttl:
            out += " --rttl"
        side = "--rsource" if self.side == "source" else "--rdest"
        return out + f" --name {self.list_name} --mask {format_ipv4(self.mask)} {side}"

    def describe(self, numeric):
        word = {"set": "SET", "rcheck": "CHECK", "update": "UPDATE", "remove": "REMOVE"}[self.command]
        out = f"{' !' if self.invert else ''} recent: {word}"
        if self.seconds:
            out += f" seconds: {self.seconds}"
        if self.reap:
            out += " reap"
        if self.hitcount:
            out += f" hit_count: {self.hitcount}"
        if self.rttl:
            out += " TTL-Match"
        return out + f" name: {self.list_name} side: {self.side} mask: {format_ipv4(self.mask)}"

    def matches(self, pkt, walk):
        """xt_recent's recent_mt, step by step (TTLs are not modelled: --rttl compares nothing)."""
        addr = (pkt.src if self.side == "source" else pkt.dst) & self.mask
        now = walk.ctx.now
        effects = walk.effects
        table = walk.recent.table(self.list_name) if effects else walk.recent.get(self.list_name)
        if table is not None and self.hitcount > table.max_stamps:
            table.max_stamps = self.hitcount
        hit = self.invert
        entry = table.entries.get(addr) if table is not None else None
        if entry is None:
            if self.command != "set":
                return hit
            if effects:
                table.insert(addr, now)
            return not hit
        if self.command == "set":
            hit = not hit
        elif self.command == "remove":
            if effects:
                del table.entries[addr]
            return not hit
        else:
            cutoff = now - self.seconds
            hits = 0
            for stamp in entry.stamps:
                if self.seconds and cutoff > stamp:
                    continue
                hits += 1
                if not self.hitcount or hits >= self.hitcount:
                    hit = not hit
                    break
            if self.reap and effects:
                table.reap(cutoff, entry, self.command == "update" and hit)
        if effects and (self.command == "set" or (self.command == "update" and hit)) \
                and addr in table.entries:
            table.update(addr, now)
        return hit
