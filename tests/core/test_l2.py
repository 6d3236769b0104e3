"""The proxy-ARP gateway and the learning bridge (IEEE 802.1D learning, Linux's 300 s ageing)."""

from __future__ import annotations

import math

import pytest

from podnet.core import packet as pk
from podnet.core.l2 import BRIDGE_AGING_TIME_S, GATEWAY_IP, GATEWAY_MAC, BridgeStatistics, LearningBridge, ProxyArp
from podnet.testing import frames as F

MAC_A = bytes.fromhex("02000000000a")
MAC_B = bytes.fromhex("02000000000b")
MAC_C = bytes.fromhex("02000000000c")
BROADCAST = b"\xff" * 6


def just_before(t: float) -> float:
    return math.nextafter(t, -math.inf)


# --- ProxyArp ----------------------------------------------------------------------------------

def proxy() -> ProxyArp:
    return ProxyArp(pk.mac_bytes(GATEWAY_MAC), {pk.ip_int(GATEWAY_IP), pk.ip_int("10.244.0.1")})


def test_defaults_are_calicos():
    assert GATEWAY_IP == "169.254.1.1"
    assert GATEWAY_MAC == "ee:ee:ee:ee:ee:ee"
    assert BRIDGE_AGING_TIME_S == 300.0


@pytest.mark.parametrize("target", ["169.254.1.1", "10.244.0.1"])
def test_proxy_arp_answers_requests_for_its_addresses(target):
    assert proxy().answers(pk.parse_arp(F.arp_request("10.244.0.2", target)))


@pytest.mark.parametrize("target", ["10.244.0.3", "169.254.1.2", "0.0.0.0", "10.244.0.2"])
def test_proxy_arp_ignores_requests_for_other_addresses(target):
    assert not proxy().answers(pk.parse_arp(F.arp_request("10.244.0.2", target)))


def test_proxy_arp_does_not_answer_a_reply():
    reply = pk.ArpInfo(op=2, sha=MAC_A, spa=pk.ip_int("10.244.0.2"), tha=MAC_B, tpa=pk.ip_int("169.254.1.1"))
    assert not proxy().answers(reply)


def test_proxy_arp_keeps_its_own_copy_of_the_addresses():
    addresses = {pk.ip_int(GATEWAY_IP)}
    arp = ProxyArp(pk.mac_bytes(GATEWAY_MAC), addresses)
    addresses.add(pk.ip_int("10.244.0.9"))
    assert not arp.answers(pk.parse_arp(F.arp_request("10.244.0.2", "10.244.0.9")))


# --- LearningBridge ------------------------------------------------------------------------------

def bridge() -> LearningBridge:
    return LearningBridge({1, 2, 3})


def test_unknown_unicast_floods_to_every_other_port():
    br = bridge()
    assert br.lookup(MAC_B, 0.0) is None
    assert br.output_ports(MAC_B, 1, 0.0) == [2, 3]
    assert br.output_ports(MAC_B, 3, 0.0) == [1, 2]
    assert br.statistics().flooded_total == 2


def test_learned_unicast_goes_to_one_port():
    br = bridge()
    br.learn(MAC_B, 2, 10.0)
    assert br.lookup(MAC_B, 10.0) == 2
    assert br.output_ports(MAC_B, 1, 10.0) == [2]
    assert br.statistics() == BridgeStatistics(entries=1, learned_total=1, moved_total=0, aged_total=0,
                                               flooded_total=0)


def test_known_unicast_back_to_its_own_port_is_filtered():
    # 802.1D filtering, Linux's should_deliver(): both stations are on the ingress segment
    br = bridge()
    br.learn(MAC_B, 2, 0.0)
    assert br.output_ports(MAC_B, 2, 0.0) == []
    assert br.statistics().flooded_total == 0
    assert br.output_ports(MAC_B, 2, 300.0) == [1, 3]   # once aged, it is unknown again: flooded


def test_output_ports_can_be_asked_without_counting():
    br = bridge()
    assert br.output_ports(BROADCAST, 1, 0.0, count=False) == [2, 3]
    assert br.statistics().flooded_total == 0
    br.output_ports(BROADCAST, 1, 0.0)
    assert br.statistics().flooded_total == 1


def test_a_lone_port_has_nowhere_to_flood():
    br = LearningBridge({1})
    assert br.output_ports(BROADCAST, 1, 0.0) == []


@pytest.mark.parametrize("dst", [BROADCAST, bytes.fromhex("01005e000001"), bytes.fromhex("333300000001")])
def test_group_destinations_always_flood(dst):
    br = bridge()
    br.learn(MAC_A, 1, 0.0)
    assert br.output_ports(dst, 1, 0.0) == [2, 3]
    assert br.output_ports(dst, 2, 0.0) == [1, 3]


@pytest.mark.parametrize("src", [BROADCAST, bytes.fromhex("01005e000001"), bytes.fromhex("030000000000")])
def test_group_source_macs_are_never_learned(src):
    br = bridge()
    br.learn(src, 1, 0.0)
    assert br.lookup(src, 0.0) is None
    assert br.fdb == {}
    assert br.statistics().learned_total == 0 and br.statistics().entries == 0
    assert br.next_deadline() is None


def test_a_station_that_moves_is_followed():
    br = bridge()
    br.learn(MAC_A, 1, 0.0)
    br.learn(MAC_A, 1, 1.0)       # refresh on the same port: not a move
    br.learn(MAC_A, 3, 2.0)
    assert br.lookup(MAC_A, 2.0) == 3
    assert br.output_ports(MAC_A, 2, 2.0) == [3]
    stats = br.statistics()
    assert (stats.entries, stats.learned_total, stats.moved_total) == (1, 1, 1)
    assert [e.port for e in br.fdb.values()] == [3]  # exactly one port per MAC


def test_ageing_at_exactly_300_seconds():
    br = bridge()
    br.learn(MAC_A, 1, 100.0)
    deadline = 100.0 + 300.0
    assert br.next_deadline() == deadline
    assert br.lookup(MAC_A, just_before(deadline)) == 1
    assert br.output_ports(MAC_A, 2, just_before(deadline)) == [1]
    assert br.expire(just_before(deadline)) == 0
    assert br.lookup(MAC_A, just_before(deadline)) == 1
    # at the deadline the entry is no longer used, even before expire() runs
    assert br.lookup(MAC_A, deadline) is None
    assert br.output_ports(MAC_A, 2, deadline) == [1, 3]
    assert br.expire(deadline) == 1
    assert br.fdb == {} and br.next_deadline() is None
    assert br.statistics().aged_total == 1 and br.statistics().entries == 0


def test_ageing_after_the_deadline_and_refresh():
    br = bridge()
    br.learn(MAC_A, 1, 0.0)
    br.learn(MAC_B, 2, 50.0)
    assert br.next_deadline() == 300.0
    br.learn(MAC_A, 1, 200.0)            # traffic refreshes the entry
    assert br.next_deadline() == 350.0
    assert br.lookup(MAC_A, 310.0) == 1
    assert br.expire(349.0) == 0
    assert br.expire(1000.0) == 2
    assert br.lookup(MAC_A, 1000.0) is None and br.lookup(MAC_B, 1000.0) is None
    assert br.statistics().aged_total == 2


def test_custom_ageing_time():
    br = LearningBridge({1, 2}, aging_time_s=15.0)
    br.learn(MAC_A, 1, 0.0)
    assert br.next_deadline() == 15.0
    assert br.lookup(MAC_A, 14.5) == 1 and br.lookup(MAC_A, 15.0) is None


def test_remove_port_forgets_its_stations():
    br = bridge()
    br.learn(MAC_A, 1, 0.0)
    br.learn(MAC_B, 2, 0.0)
    br.learn(MAC_C, 2, 0.0)
    br.remove_port(2)
    assert br.lookup(MAC_B, 0.0) is None and br.lookup(MAC_C, 0.0) is None
    assert br.lookup(MAC_A, 0.0) == 1
    assert br.output_ports(MAC_B, 1, 0.0) == [3]     # removed ports are not flooded to
    br.add_port(4)
    assert br.output_ports(MAC_B, 1, 0.0) == [3, 4]


def test_statistics_count_everything():
    br = bridge()
    br.learn(MAC_A, 1, 0.0)
    br.learn(MAC_B, 2, 0.0)
    br.learn(MAC_B, 3, 1.0)                     # move
    br.learn(BROADCAST, 1, 1.0)                 # ignored
    br.output_ports(BROADCAST, 1, 1.0)          # flood
    br.output_ports(MAC_C, 1, 1.0)              # unknown: flood
    br.output_ports(MAC_A, 2, 1.0)              # known: no flood
    br.expire(300.5)                            # A (seen at 0) ages, B (seen at 1) stays
    assert br.statistics() == BridgeStatistics(entries=1, learned_total=2, moved_total=1, aged_total=1,
                                               flooded_total=2)
    with pytest.raises(AttributeError):
        br.statistics().entries = 5             # frozen
