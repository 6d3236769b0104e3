"""core/neighbor.py: the NUD states and ARP timers of Linux's neighbour table, with default parameters."""

from __future__ import annotations

import pytest

from podnet.core.neighbor import (DELAY_FIRST_PROBE_TIME_S, MCAST_SOLICIT, UCAST_SOLICIT, NeighborTable, Nud,
                                  Solicit)
from podnet.core.packet import ip_int

PEER = ip_int("172.18.0.3")
PEER_MAC = bytes.fromhex("020000000003")
OTHER_MAC = bytes.fromhex("020000000033")


def run_timers(table: NeighborTable, until: float) -> list[tuple[float, Solicit]]:
    """Fire every deadline up to `until`, as the lab's timer task does; returns what was solicited when."""
    sent = []
    while (deadline := table.next_deadline()) is not None and deadline <= until:
        sent += [(deadline, s) for s in table.handle_timer(deadline)]
    return sent


def test_unknown_neighbour_is_asked_by_broadcast_and_frames_wait_for_the_reply():
    table = NeighborTable()
    mac, ask = table.resolve(PEER, b"frame-1", now=0.0)
    assert mac is None and ask == [Solicit(PEER)]            # broadcast: no MAC known
    mac, ask = table.resolve(PEER, b"frame-2", now=0.1)
    assert mac is None and ask == []                          # already asking: queued, not asked twice
    assert table.get(PEER).state is Nud.INCOMPLETE
    released = table.arp_seen(PEER, PEER_MAC, now=0.2, is_reply=True)
    assert released == [b"frame-1", b"frame-2"]
    assert table.get(PEER).state is Nud.REACHABLE
    assert table.resolve(PEER, b"frame-3", now=0.3) == (PEER_MAC, [])
    assert table.show() == ["172.18.0.3 dev uplink lladdr 02:00:00:00:00:03 REACHABLE"]


def test_no_answer_fails_after_mcast_solicit_requests_one_second_apart_and_drops_what_waited():
    table = NeighborTable()
    _, first = table.resolve(PEER, b"x" * 100, now=10.0)
    sent = run_timers(table, until=20.0)
    # the kernel's default: 3 requests at 0, 1, 2 s; FAILED at 3 s (ping says "Destination Host Unreachable")
    assert [t for t, _ in [(10.0, first[0])] + sent] == [10.0, 11.0, 12.0]
    assert len(first) + len(sent) == MCAST_SOLICIT
    assert table.get(PEER).state is Nud.FAILED and table.get(PEER).mac is None
    stats = table.statistics()
    assert stats.failed == 1 and stats.dropped_unresolved == 1 and stats.solicits == MCAST_SOLICIT
    assert table.show() == ["172.18.0.3 dev uplink FAILED"]
    # a new packet starts a fresh resolution
    assert table.resolve(PEER, None, now=30.0) == (None, [Solicit(PEER)])


def test_reachable_goes_stale_then_delay_probe_and_a_unicast_probe_answers():
    table = NeighborTable(seed=1)
    table.resolve(PEER, None, now=0.0)
    table.arp_seen(PEER, PEER_MAC, now=0.0, is_reply=True)
    reach = table.reachable_time_s
    assert 15.0 <= reach < 45.0                               # [base/2, 3·base/2)
    run_timers(table, until=reach + 0.01)
    assert table.get(PEER).state is Nud.STALE                 # not used lately: STALE, MAC kept
    # used while STALE: sent at once to the old MAC, and DELAY before the first unicast probe
    assert table.resolve(PEER, b"f", now=reach + 1) == (PEER_MAC, [])
    assert table.get(PEER).state is Nud.DELAY
    sent = run_timers(table, until=reach + 1 + DELAY_FIRST_PROBE_TIME_S)
    assert sent == [(reach + 1 + DELAY_FIRST_PROBE_TIME_S, Solicit(PEER, PEER_MAC))]   # unicast
    assert table.get(PEER).state is Nud.PROBE
    table.arp_seen(PEER, PEER_MAC, now=reach + 6.5, is_reply=True)
    assert table.get(PEER).state is Nud.REACHABLE


def test_probe_without_answer_fails_after_ucast_solicit():
    table = NeighborTable()
    table.resolve(PEER, None, now=0.0)
    table.arp_seen(PEER, PEER_MAC, now=0.0, is_reply=True)
    run_timers(table, until=table.reachable_time_s + 0.01)
    start = table.reachable_time_s + 1
    table.resolve(PEER, None, now=start)
    sent = run_timers(table, until=start + 60)
    assert [s for _, s in sent] == [Solicit(PEER, PEER_MAC)] * UCAST_SOLICIT
    assert table.get(PEER) is None or table.get(PEER).state is Nud.FAILED


def test_a_request_from_an_unknown_host_creates_a_stale_entry_and_a_new_mac_replaces_the_old():
    table = NeighborTable()
    assert table.arp_seen(PEER, PEER_MAC, now=0.0, is_reply=False) == []
    assert table.get(PEER).state is Nud.STALE and table.get(PEER).mac == PEER_MAC
    # an unsolicited reply from an unknown host is not learned (arp_accept=0)
    assert table.arp_seen(ip_int("172.18.0.9"), OTHER_MAC, now=0.0, is_reply=True) == []
    assert table.get(ip_int("172.18.0.9")) is None
    table.arp_seen(PEER, OTHER_MAC, now=1.0, is_reply=True)
    assert table.get(PEER).mac == OTHER_MAC and table.get(PEER).state is Nud.REACHABLE


def test_permanent_entries_never_change_and_release_what_waited():
    table = NeighborTable()
    table.resolve(PEER, b"waiting", now=0.0)
    assert table.set_permanent(PEER, PEER_MAC) == [b"waiting"]
    table.arp_seen(PEER, OTHER_MAC, now=1.0, is_reply=True)
    run_timers(table, until=1000.0)
    assert table.get(PEER).state is Nud.PERMANENT and table.get(PEER).mac == PEER_MAC
    assert table.show() == ["172.18.0.3 dev uplink lladdr 02:00:00:00:00:03 PERMANENT"]


def test_the_queue_keeps_the_newest_frames_within_unres_qlen_bytes():
    table = NeighborTable(unres_qlen_bytes=3000)
    for i in range(5):
        table.resolve(PEER, bytes([i]) * 1000, now=0.0)
    assert table.statistics().dropped_queue_full == 2
    released = table.arp_seen(PEER, PEER_MAC, now=0.5, is_reply=True)
    assert [f[0] for f in released] == [2, 3, 4]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reachable_time_is_drawn_per_table_and_repeatable(seed):
    a, b = NeighborTable(seed=seed), NeighborTable(seed=seed)
    assert a.reachable_time_s == b.reachable_time_s
