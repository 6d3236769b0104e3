"""Cilium's own connection tracking: cilium_ct4_global / cilium_ct_any4_global, timeouts and GC.

Layer: core, sans-IO. The eBPF backend keeps these maps beside podnet's conntrack (which still pins
the NAT of every flow): they hold what Cilium's datapath records per flow — the CT_SERVICE entry
with the chosen backend and the rev_nat_index a reply is translated back with — and they are what
`cilium bpf ct list global` shows. Follows cilium/cilium bpf/lib/conntrack.h (ct_create4,
ct_update_timeout), pkg/maps/ctmap (layouts, dump format) and pkg/maps/ctmap/gc (the GC interval).

Rules this module keeps
- Keys are `struct ipv4_ct_tuple` (14 B packed): daddr, saddr, dport, sport, nexthdr, flags. The
  address names are right for the reply direction (daddr holds the flow's client), the ports for
  the original one (dport holds the service/server port) — so Cilium's dumper, which reverses the
  addresses, prints the flow as the client sent it.
- Values are `struct ct_entry` (56 B). On CT_SERVICE entries the rx_bytes union holds backend_id.
  rev_nat_index is stored in network byte order. `lifetime` is absolute, in whole seconds of the
  monotonic clock the caller passes as `now`.
- Lifetimes (ct_update_timeout): TCP before a non-SYN packet has been seen: CT_SYN_TIMEOUT (60 s);
  TCP afterwards: 6 h (service and regular entries alike by default); non-TCP: 60 s; a closing TCP
  entry: CT_CLOSE_TIMEOUT (10 s). Each `refresh` sets lifetime = now + the timeout again.
- An entry whose lifetime is past is no longer found; GC deletes entries with lifetime < now, as
  the agent's filter does. Both maps are LRU: a full map evicts, creation never fails.
- The GC interval adapts as Cilium's: it starts at 5 min; after a pass that deleted more than 25%
  of a map's max_entries it shrinks by (1 - ratio) (ratio capped at 0.9, floor 10 s); below 5% it
  grows 1.5x up to 12 h (the LRU maximum); `gc_interval_s` fixes it (--conntrack-gc-interval).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from .lbmaps import PROTO_NAMES, addr_text, swab16
from .maps import BpfMap, MapType

__all__ = ["CtEntry", "CtMap", "CtTimeouts", "CtTuple", "TUPLE_F_IN", "TUPLE_F_OUT", "TUPLE_F_RELATED",
           "TUPLE_F_SERVICE"]

TUPLE_F_OUT, TUPLE_F_IN, TUPLE_F_RELATED, TUPLE_F_SERVICE = 0, 1, 2, 4
IPPROTO_TCP = 6

# ct_entry flag bits, in the order pkg/maps/ctmap names them
RX_CLOSING, TX_CLOSING, NAT64, LB_LOOPBACK, SEEN_NON_SYN, NODE_PORT, PROXY_REDIRECT, DSR, FROM_L7LB, \
    RESERVED1, FROM_TUNNEL = (1 << i for i in range(11))
_FLAG_NAMES = ((RX_CLOSING, "RxClosing"), (TX_CLOSING, "TxClosing"), (NAT64, "Nat64"), (LB_LOOPBACK, "LBLoopback"),
               (SEEN_NON_SYN, "SeenNonSyn"), (NODE_PORT, "NodePort"), (PROXY_REDIRECT, "ProxyRedirect"),
               (DSR, "DSR"), (FROM_L7LB, "FromL7LB"), (FROM_TUNNEL, "FromTunnel"))
_MAX_FLAGS = 1 << 11

_TUPLE = struct.Struct(">IIHHBB")
_ENTRY = struct.Struct("<QQQQIHHHBBIII")


class CtTuple(NamedTuple):
    """struct ipv4_ct_tuple, field for field."""

    daddr: int
    saddr: int
    dport: int
    sport: int
    nexthdr: int
    flags: int
    SIZE = 14

    @classmethod
    def of_flow(cls, src: int, sport: int, dst: int, dport: int, proto: int, flags: int) -> CtTuple:
        """The tuple Cilium stores for a flow src:sport -> dst:dport (see the module's rules)."""
        return cls(src, dst, dport, sport, proto, flags)

    def pack(self) -> bytes:
        return _TUPLE.pack(*self)

    @classmethod
    def unpack(cls, data: bytes) -> CtTuple:
        return cls(*_TUPLE.unpack(data))

    def describe(self) -> str:
        """CtKey4Global.Dump(reverse=true): 'TCP OUT 10.0.0.1:40000 -> 10.96.0.10:80 service '."""
        direction = "IN" if self.flags & TUPLE_F_IN else "OUT"
        text = (f"{PROTO_NAMES.get(self.nexthdr, str(self.nexthdr))} {direction} {addr_text(self.daddr)}:{self.sport}"
                f" -> {addr_text(self.saddr)}:{self.dport} ")
        if self.flags & TUPLE_F_RELATED:
            text += "related "
        if self.flags & TUPLE_F_SERVICE:
            text += "service "
        return text


class CtEntry(NamedTuple):
    """struct ct_entry (56 B). `rx_bytes` is the backend_id on CT_SERVICE entries."""

    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    lifetime: int = 0
    flags: int = 0
    rev_nat_index: int = 0
    ifindex: int = 0
    tx_flags_seen: int = 0
    rx_flags_seen: int = 0
    src_sec_id: int = 0
    last_tx_report: int = 0
    last_rx_report: int = 0
    SIZE = 56

    @property
    def backend_id(self) -> int:
        return self.rx_bytes

    def pack(self) -> bytes:
        return _ENTRY.pack(self.rx_packets, self.rx_bytes, self.tx_packets, self.tx_bytes, self.lifetime,
                           self.flags, swab16(self.rev_nat_index), self.ifindex, self.tx_flags_seen,
                           self.rx_flags_seen, self.src_sec_id, self.last_tx_report, self.last_rx_report)

    @classmethod
    def unpack(cls, data: bytes) -> CtEntry:
        fields = list(_ENTRY.unpack(data))
        fields[6] = swab16(fields[6])
        return cls(*fields)

    def flags_text(self) -> str:
        words = "".join(f"{name} " for bit, name in _FLAG_NAMES if self.flags & bit)
        unknown = self.flags & ~(_MAX_FLAGS - 1)
        if unknown:
            words += f"Unknown={unknown:#06x} "
        return f"Flags={self.flags:#06x} [ {words}]"

    def describe(self) -> str:
        """CtEntry.String(): the value part of a `cilium bpf ct list` line (with its ' \\n')."""
        return (f"expires={self.lifetime} RxPackets={self.rx_packets} RxBytes={self.rx_bytes} "
                f"RxFlagsSeen={self.rx_flags_seen:#04x} LastRxReport={self.last_rx_report} "
                f"TxPackets={self.tx_packets} TxBytes={self.tx_bytes} TxFlagsSeen={self.tx_flags_seen:#04x} "
                f"LastTxReport={self.last_tx_report} {self.flags_text()} RevNAT={self.rev_nat_index} "
                f"SourceSecurityID={self.src_sec_id} IfIndex={self.ifindex} \n")


@dataclass(frozen=True)
class CtTimeouts:
    """The agent's --bpf-ct-timeout-* defaults (pkg/defaults/defaults.go), in seconds."""

    regular_tcp: int = 21600
    tcp_syn: int = 60
    tcp_fin: int = 10
    regular_any: int = 60
    service_tcp: int = 21600
    service_any: int = 60
    gc_start_s: float = 300.0          # ConntrackGCStartingInterval
    gc_min_s: float = 10.0             # ConntrackGCMinInterval
    gc_max_lru_s: float = 43200.0      # ConntrackGCMaxLRUInterval


class CtMap:
    """The two global IPv4 CT maps (TCP and any) with their GC."""

    def __init__(self, *, tcp_max_entries: int = 524288, any_max_entries: int = 262144,
                 timeouts: CtTimeouts = CtTimeouts(), gc_interval_s: float | None = None) -> None:
        self.tcp = BpfMap("cilium_ct4_global", MapType.LRU_HASH, 14, 56, tcp_max_entries)
        self.any = BpfMap("cilium_ct_any4_global", MapType.LRU_HASH, 14, 56, any_max_entries)
        self.timeouts = timeouts
        self.gc_interval_s = gc_interval_s
        self.interval_s = gc_interval_s if gc_interval_s is not None else timeouts.gc_start_s
        self.gc_runs = 0
        self.gc_deleted = 0

    def map_for(self, proto: int) -> BpfMap:
        return self.tcp if proto == IPPROTO_TCP else self.any

    def __len__(self) -> int:
        return len(self.tcp) + len(self.any)

    def timeout(self, proto: int, service: bool, seen_non_syn: bool, closing: bool = False) -> int:
        t = self.timeouts
        if proto != IPPROTO_TCP:
            return t.service_any if service else t.regular_any
        if closing:
            return t.tcp_fin
        if not seen_non_syn:
            return t.tcp_syn
        return t.service_tcp if service else t.regular_tcp

    def lookup(self, tup: CtTuple, now: float, *, count: bool = True) -> CtEntry | None:
        """The live entry for `tup` (an entry past its lifetime is not found)."""
        m = self.map_for(tup.nexthdr)
        raw = m.lookup(tup.pack()) if count else m.peek(tup.pack())
        if raw is None:
            return None
        entry = CtEntry.unpack(raw)
        return entry if entry.lifetime >= int(now) else None

    def create(self, tup: CtTuple, now: float, *, tcp_flags: int = 0, rev_nat_index: int = 0,
               backend_id: int = 0, length: int = 0, node_port: bool = False, loopback: bool = False) -> CtEntry:
        """ct_create4: a new entry, lifetime by ct_update_timeout for its first packet."""
        service = bool(tup.flags & TUPLE_F_SERVICE)
        syn_only = tup.nexthdr == IPPROTO_TCP and tcp_flags & 0x02 and not tcp_flags & 0x10
        seen_non_syn = tup.nexthdr == IPPROTO_TCP and not syn_only
        flags = (SEEN_NON_SYN if seen_non_syn else 0) | (NODE_PORT if node_port else 0) \
            | (LB_LOOPBACK if loopback else 0)
        entry = CtEntry(rx_bytes=backend_id if service else 0, tx_packets=1, tx_bytes=0 if service else length,
                        lifetime=int(now) + self.timeout(tup.nexthdr, service, seen_non_syn), flags=flags,
                        rev_nat_index=rev_nat_index, tx_flags_seen=tcp_flags & 0xFF, last_tx_report=int(now))
        self.map_for(tup.nexthdr).update(tup.pack(), entry.pack())
        return entry

    def refresh(self, tup: CtTuple, now: float, *, tcp_flags: int = 0, length: int = 0) -> CtEntry | None:
        """ct_update_timeout for one more packet of the flow (original direction)."""
        m = self.map_for(tup.nexthdr)
        raw = m.peek(tup.pack())
        if raw is None:
            return None
        entry = CtEntry.unpack(raw)
        flags = entry.flags
        if tup.nexthdr == IPPROTO_TCP:
            if not tcp_flags & 0x02 or tcp_flags & 0x10:
                flags |= SEEN_NON_SYN
            if tcp_flags & 0x05:         # FIN or RST
                flags |= TX_CLOSING if tcp_flags & 0x01 else RX_CLOSING | TX_CLOSING
        closing = bool(flags & (RX_CLOSING | TX_CLOSING)) and tup.nexthdr == IPPROTO_TCP
        service = bool(tup.flags & TUPLE_F_SERVICE)
        lifetime = int(now) + self.timeout(tup.nexthdr, service, bool(flags & SEEN_NON_SYN), closing)
        entry = entry._replace(tx_packets=entry.tx_packets + 1,
                               tx_bytes=entry.tx_bytes if service else entry.tx_bytes + length,
                               lifetime=lifetime, flags=flags, tx_flags_seen=entry.tx_flags_seen | (tcp_flags & 0xFF))
        m.update(tup.pack(), entry.pack())
        return entry

    def close(self, tup: CtTuple, now: float) -> None:
        """The flow ended (podnet's conntrack forgot it): a TCP entry gets both closing flags and
        CT_CLOSE_TIMEOUT, as after a FIN exchange; other protocols simply run out their lifetime."""
        if tup.nexthdr != IPPROTO_TCP:
            return
        m = self.map_for(tup.nexthdr)
        raw = m.peek(tup.pack())
        if raw is None:
            return
        entry = CtEntry.unpack(raw)
        lifetime = min(entry.lifetime, int(now) + self.timeouts.tcp_fin)
        m.update(tup.pack(), entry._replace(flags=entry.flags | RX_CLOSING | TX_CLOSING, lifetime=lifetime).pack())

    def delete(self, tup: CtTuple) -> bool:
        return self.map_for(tup.nexthdr).delete(tup.pack())

    def gc(self, now: float) -> list[bytes]:
        """One GC pass: delete every entry with lifetime < now; adapt the interval; return the
        deleted keys."""
        deleted: list[bytes] = []
        ratio = 0.0
        for m in (self.tcp, self.any):
            gone = [key for key, raw in m.items() if _ENTRY.unpack_from(raw)[4] < int(now)]
            for key in gone:
                m.delete(key)
            deleted += gone
            ratio = max(ratio, len(gone) / m.max_entries)
        self.gc_runs += 1
        self.gc_deleted += len(deleted)
        self.interval_s = self.next_interval(self.interval_s, ratio)
        return deleted

    def next_interval(self, previous: float, ratio: float) -> float:
        """calculateIntervalWithConfig of pkg/maps/ctmap/gc, rounded to whole seconds."""
        if self.gc_interval_s is not None:
            return self.gc_interval_s
        t = self.timeouts
        if ratio == 0.0:
            return previous
        if ratio > 0.25:
            return max(float(round(previous * (1.0 - min(ratio, 0.9)))), t.gc_min_s)
        if ratio < 0.05:
            return min(float(round(previous * 1.5)), t.gc_max_lru_s)
        return previous

    def entries(self):
        """(CtTuple, CtEntry) for every entry: the TCP map first, then the any map (GlobalMaps order)."""
        for m in (self.tcp, self.any):
            for key, raw in m.items():
                yield CtTuple.unpack(key), CtEntry.unpack(raw)
