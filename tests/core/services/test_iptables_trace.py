"""trace_first_packet: the hooks a first packet crosses, in the kernel's order, without changing any
state; all_branches explores every statistic draw both ways."""

from __future__ import annotations

import ipaddress
import json
import random

import pytest

from podnet.core.services.iptables import EvalContext, Ruleset, outcomes_json, trace_first_packet
from podnet.core.services.packetinfo import PacketInfo

NODE = "192.168.0.1"


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def ctx(**kw) -> EvalContext:
    kw.setdefault("local_addresses", frozenset({ip(NODE)}))
    return EvalContext(**kw)


def pkt(src="10.244.1.5", dst="10.96.0.10", proto=6, sport=40000, dport=80) -> PacketInfo:
    return PacketInfo(ip(src), ip(dst), proto, sport, dport, length=60)


def load(text: str) -> Ruleset:
    rs = Ruleset()
    rs.restore(text)
    return rs


RULES = f"""*filter
:INPUT ACCEPT [0:0]
-A INPUT -d {NODE}/32 -p tcp --dport 22 -j REJECT
-A FORWARD -m conntrack --ctstate DNAT -m mark --mark 0x1 -j ACCEPT
-A FORWARD -d 10.244.9.9/32 -j DROP
-A OUTPUT -d 10.244.7.7/32 -j REJECT
COMMIT
*nat
-A PREROUTING -d 10.96.0.10/32 -p tcp --dport 80 -j DNAT --to-destination 10.244.2.2:8080
-A PREROUTING -d 10.96.0.99/32 -p tcp -j DNAT --to-destination {NODE}:22
-A OUTPUT -d 10.96.0.10/32 -p tcp --dport 80 -j DNAT --to-destination 10.244.3.3:8080
-A POSTROUTING ! -s 10.244.0.0/16 -j MASQUERADE
COMMIT
*mangle
-A PREROUTING -j MARK --set-mark 0x1
COMMIT
"""


def test_forwarded_packet_walks_prerouting_forward_postrouting_and_carries_mark_and_dnat_state():
    (outcome,) = trace_first_packet(load(RULES), pkt(), ctx())
    assert outcome.verdict == "DNAT" and outcome.destination == "10.244.2.2:8080"
    assert not outcome.masquerade and outcome.probability == 1.0
    assert outcome.path == ["mangle/PREROUTING:1", "mangle/PREROUTING:policy", "nat/PREROUTING:1",
                            "mangle/FORWARD:policy", "filter/FORWARD:1",
                            "mangle/POSTROUTING:policy", "nat/POSTROUTING:policy"]


def test_dnat_to_a_local_address_goes_to_input_and_not_postrouting():
    (outcome,) = trace_first_packet(load(RULES), pkt(dst="10.96.0.99"), ctx())
    assert outcome.verdict == "REJECT" and outcome.destination == f"{NODE}:22"
    assert outcome.path[-1] == "filter/INPUT:1"
    assert not any(step.startswith("nat/POSTROUTING") for step in outcome.path)


def test_locally_sent_packet_walks_output_then_postrouting():
    (outcome,) = trace_first_packet(load(RULES), pkt(src=NODE), ctx())
    assert outcome.destination == "10.244.3.3:8080" and outcome.masquerade
    assert outcome.path == ["mangle/OUTPUT:policy", "nat/OUTPUT:1", "filter/OUTPUT:policy",
                            "mangle/POSTROUTING:policy", "nat/POSTROUTING:1"]


def test_drop_and_reject_stop_the_trace():
    rs = load(RULES)
    (dropped,) = trace_first_packet(rs, pkt(dst="10.244.9.9"), ctx())
    assert dropped.verdict == "DROP" and dropped.path[-1] == "filter/FORWARD:2"
    (rejected,) = trace_first_packet(rs, pkt(src=NODE, dst="10.244.7.7"), ctx())
    assert rejected.verdict == "REJECT" and rejected.path[-1] == "filter/OUTPUT:1"


BRANCHY = """*nat
:SVC - [0:0]
:SEP1 - [0:0]
:SEP2 - [0:0]
:SEP3 - [0:0]
-A PREROUTING -j SVC
-A SVC -m statistic --mode random --probability 0.3333333333 -j SEP1
-A SVC -m statistic --mode random --probability 0.5000000000 -j SEP2
-A SVC -j SEP3
-A SEP1 -p tcp -j DNAT --to-destination 10.0.0.1:80
-A SEP2 -p tcp -j DNAT --to-destination 10.0.0.2:80
-A SEP3 -p tcp -j DNAT --to-destination 10.0.0.3:80
-A POSTROUTING -m statistic --mode random --probability 0.25 -j MASQUERADE
COMMIT
"""


def test_all_branches_lists_every_outcome_with_multiplied_probabilities():
    outcomes = trace_first_packet(load(BRANCHY), pkt(), ctx(), all_branches=True)
    got = [(o.destination, o.masquerade, round(o.probability, 6)) for o in outcomes]
    third = 0.33333333349                 # the probability iptables stores for 0.3333333333
    assert got == [
        ("10.0.0.1:80", True, round(third * 0.25, 6)), ("10.0.0.1:80", False, round(third * 0.75, 6)),
        ("10.0.0.2:80", True, round((1 - third) * 0.5 * 0.25, 6)),
        ("10.0.0.2:80", False, round((1 - third) * 0.5 * 0.75, 6)),
        ("10.0.0.3:80", True, round((1 - third) * 0.5 * 0.25, 6)),
        ("10.0.0.3:80", False, round((1 - third) * 0.5 * 0.75, 6)),
    ]
    assert sum(o.probability for o in outcomes) == pytest.approx(1.0)
    assert outcomes[0].path == ["nat/PREROUTING:1", "nat/SVC:1", "nat/SEP1:1", "filter/FORWARD:policy",
                                "nat/POSTROUTING:1"]


def test_a_single_trace_uses_the_contexts_rng_and_reports_its_branch_probability():
    outcomes = [trace_first_packet(load(BRANCHY), pkt(), ctx(rng=random.Random(seed)))[0] for seed in range(40)]
    assert {o.destination for o in outcomes} == {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}
    assert all(0 < o.probability < 1 for o in outcomes)


def test_trace_changes_no_counters_no_nth_state_no_recent_lists():
    text = ("*filter\n-A FORWARD -m statistic --mode nth --every 2 --packet 0 -j DROP\n"
            "-A FORWARD -m recent --name L --set\nCOMMIT\n")
    rs = load(text)
    before = rs.save(counters=True)
    for _ in range(3):
        (outcome,) = trace_first_packet(rs, pkt(), ctx())
        assert outcome.verdict == "ACCEPT"          # the nth counter does not move: always "1 of 2"
    assert rs.save(counters=True) == before and rs.recent.addresses("L") == {}
    assert rs.evaluate("filter", "FORWARD", pkt(), ctx()).kind == "ACCEPT"
    assert rs.evaluate("filter", "FORWARD", pkt(), ctx()).kind == "DROP"


def test_json_form():
    outcomes = trace_first_packet(load(BRANCHY), pkt(), ctx(), all_branches=True)
    data = json.loads(json.dumps(outcomes_json(outcomes)))
    assert len(data["outcomes"]) == 6
    assert data["outcomes"][0] == {"verdict": "DNAT", "destination": "10.0.0.1:80", "masquerade": True,
                                   "path": outcomes[0].path, "probability": outcomes[0].probability}
