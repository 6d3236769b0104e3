"""Cilium's conntrack in the eBPF backend: lifetimes, closing, GC and its adaptive interval."""

from __future__ import annotations

import pytest

from podnet.core.services.ebpf.ct import (RX_CLOSING, SEEN_NON_SYN, TUPLE_F_OUT, TUPLE_F_SERVICE, TX_CLOSING, CtMap,
                                          CtTimeouts, CtTuple)

A, B, VIP = 0x0AF40009, 0x0AF40005, 0x0A60000A
NOW = 5000.0


def tcp(sport: int = 40000, flags: int = TUPLE_F_OUT) -> CtTuple:
    return CtTuple.of_flow(A, sport, B, 8080, 6, flags)


def test_default_timeouts_are_the_agents():
    t = CtTimeouts()
    assert (t.regular_tcp, t.tcp_syn, t.tcp_fin, t.regular_any, t.service_tcp, t.service_any) == \
        (21600, 60, 10, 60, 21600, 60)
    ct = CtMap()
    assert (ct.tcp.name, ct.tcp.max_entries, ct.any.name, ct.any.max_entries) == \
        ("cilium_ct4_global", 524288, "cilium_ct_any4_global", 262144)
    assert ct.interval_s == 300


@pytest.mark.parametrize("proto, tcp_flags, service, lifetime", [
    (6, 0x02, False, 60),            # SYN only: CT_SYN_TIMEOUT
    (6, 0x10, False, 21600),         # picked up mid-stream: CT_CONNECTION_LIFETIME_TCP
    (6, 0x02, True, 60),
    (17, 0, False, 60),              # CT_CONNECTION_LIFETIME_NONTCP
    (17, 0, True, 60),               # CT_SERVICE_LIFETIME_NONTCP
])
def test_lifetime_at_creation(proto, tcp_flags, service, lifetime):
    ct = CtMap()
    tup = CtTuple.of_flow(A, 40000, VIP, 80, proto, TUPLE_F_SERVICE if service else TUPLE_F_OUT)
    entry = ct.create(tup, NOW, tcp_flags=tcp_flags)
    assert entry.lifetime == int(NOW) + lifetime
    assert ct.map_for(proto) is (ct.tcp if proto == 6 else ct.any)


def test_refresh_moves_a_tcp_flow_to_its_long_lifetime_and_fin_to_the_close_timeout():
    ct = CtMap()
    ct.create(tcp(), NOW, tcp_flags=0x02)
    entry = ct.refresh(tcp(), NOW + 1, tcp_flags=0x10, length=52)
    assert entry.flags & SEEN_NON_SYN and entry.lifetime == int(NOW) + 1 + 21600 and entry.tx_packets == 2
    entry = ct.refresh(tcp(), NOW + 2, tcp_flags=0x11)
    assert entry.flags & TX_CLOSING and entry.lifetime == int(NOW) + 2 + 10


def test_an_expired_entry_is_not_found_and_gc_deletes_what_is_past():
    ct = CtMap()
    ct.create(tcp(1), NOW, tcp_flags=0x02)           # lifetime NOW + 60
    ct.create(tcp(2), NOW, tcp_flags=0x10)           # lifetime NOW + 21600
    assert ct.lookup(tcp(1), NOW + 60) is not None   # lifetime == now: still alive
    assert ct.lookup(tcp(1), NOW + 61) is None
    deleted = ct.gc(NOW + 60)
    assert deleted == [] and len(ct) == 2            # the agent deletes only lifetime < now
    deleted = ct.gc(NOW + 61)
    assert deleted == [tcp(1).pack()] and len(ct) == 1 and ct.gc_deleted == 1


def test_close_marks_tcp_closing_and_leaves_other_protocols_to_run_out():
    ct = CtMap()
    ct.create(tcp(), NOW, tcp_flags=0x10)
    udp = CtTuple.of_flow(A, 5353, B, 53, 17, TUPLE_F_OUT)
    ct.create(udp, NOW)
    ct.close(tcp(), NOW + 100)
    ct.close(udp, NOW + 100)
    t = ct.lookup(tcp(), NOW + 100)
    assert t.flags & (RX_CLOSING | TX_CLOSING) == RX_CLOSING | TX_CLOSING and t.lifetime == int(NOW) + 110
    assert ct.lookup(udp, NOW).lifetime == int(NOW) + 60


@pytest.mark.parametrize("previous, ratio, expected", [
    (300, 0.0, 300),        # nothing deleted: unchanged
    (300, 0.01, 450),       # under 5%: 1.5x
    (40000, 0.01, 43200),   # ... up to the LRU maximum, 12 h
    (300, 0.10, 300),       # between 5% and 25%: unchanged
    (300, 0.50, 150),       # over 25%: shorter by the ratio
    (300, 0.95, 30),        # ratio capped at 0.9
    (20, 0.95, 10),         # never below 10 s
])
def test_gc_interval_adapts_like_ciliums(previous, ratio, expected):
    assert CtMap().next_interval(previous, ratio) == expected


def test_gc_interval_follows_the_deletion_ratio_and_can_be_fixed():
    ct = CtMap(tcp_max_entries=10)
    for port in range(6):
        ct.create(tcp(port), NOW, tcp_flags=0x02)
    ct.gc(NOW + 100)                 # 6 of 10 deleted: 60% -> 300 * 0.4
    assert ct.interval_s == 120
    fixed = CtMap(gc_interval_s=30)
    fixed.gc(NOW)
    assert fixed.interval_s == 30


def test_a_full_ct_map_evicts_instead_of_failing():
    ct = CtMap(tcp_max_entries=2)
    for port in range(3):
        ct.create(tcp(port), NOW, tcp_flags=0x02)
    assert len(ct) == 2 and ct.tcp.evictions == 1 and ct.lookup(tcp(0), NOW) is None
