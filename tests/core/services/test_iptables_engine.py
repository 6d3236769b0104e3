"""The chain walk: jump, goto, RETURN, policies, counters, the cost measure, terminal and
non-terminal targets (explicit `now`, seeded random sources, no clock)."""

from __future__ import annotations

import ipaddress
import random

import pytest

from podnet.core.services.iptables import EvalContext, Ruleset
from podnet.errors import ConfigError
from podnet.core.services.packetinfo import PacketInfo


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def pkt(src="10.244.1.5", dst="10.96.0.10", proto=6, sport=40000, dport=80, **kw) -> PacketInfo:
    kw.setdefault("length", 100)
    return PacketInfo(ip(src), ip(dst), proto, sport, dport, **kw)


def load(text: str) -> Ruleset:
    ruleset = Ruleset()
    ruleset.restore(text)
    return ruleset


def run(ruleset: Ruleset, table="filter", chain="INPUT", packet=None, **ctx):
    return ruleset.evaluate(table, chain, packet or pkt(), EvalContext(**ctx))


# --- jump, goto, RETURN ---------------------------------------------------------------------------

def test_jump_then_return_continues_after_the_jump():
    rs = load("*filter\n:A - [0:0]\n-A INPUT -j A\n-A INPUT -j DROP\n-A A -j RETURN\n-A A -j ACCEPT\nCOMMIT\n")
    verdict = run(rs)
    assert verdict.kind == "DROP"
    assert verdict.path == ["filter/INPUT:1", "filter/A:1", "filter/INPUT:2"]
    assert verdict.rules_examined == 3


def test_falling_off_a_user_chain_returns_to_the_caller():
    rs = load("*filter\n:A - [0:0]\n-A INPUT -j A\n-A INPUT -j REJECT\n-A A -p udp -j ACCEPT\nCOMMIT\n")
    verdict = run(rs)
    assert verdict.kind == "REJECT"
    assert verdict.path == ["filter/INPUT:1", "filter/INPUT:2"]
    assert verdict.rules_examined == 3


def test_return_from_a_gotoed_chain_returns_to_the_caller_of_the_chain_that_did_the_goto():
    rs = load("*filter\n:A - [0:0]\n:B - [0:0]\n"
              "-A INPUT -j A\n-A INPUT -j REJECT\n"
              "-A A -g B\n-A A -j DROP\n"
              "-A B -j RETURN\nCOMMIT\n")
    verdict = run(rs)
    assert verdict.kind == "REJECT"                          # not A's DROP: goto left no return point
    assert verdict.path == ["filter/INPUT:1", "filter/A:1", "filter/B:1", "filter/INPUT:2"]


def test_falling_off_a_gotoed_chain_also_skips_the_rest_of_the_goto_chain():
    rs = load("*filter\n:A - [0:0]\n:B - [0:0]\n"
              "-A INPUT -j A\n-A INPUT -j ACCEPT\n-A A -g B\n-A A -j DROP\nCOMMIT\n")
    assert run(rs).path == ["filter/INPUT:1", "filter/A:1", "filter/INPUT:2"]


def test_goto_from_a_builtin_chain_then_return_applies_the_policy():
    rs = load("*filter\n:INPUT DROP [0:0]\n:B - [0:0]\n-A INPUT -g B\n-A INPUT -j ACCEPT\n-A B -j RETURN\nCOMMIT\n")
    verdict = run(rs, packet=pkt(length=60))
    assert verdict.kind == "DROP"
    assert verdict.path == ["filter/INPUT:1", "filter/B:1", "filter/INPUT:policy"]
    assert rs.policy_counters("filter", "INPUT") == (1, 60)


def test_return_in_a_builtin_chain_applies_the_policy():
    rs = load("*filter\n:INPUT DROP [0:0]\n-A INPUT -j RETURN\n-A INPUT -j ACCEPT\nCOMMIT\n")
    verdict = run(rs)
    assert (verdict.kind, verdict.path, verdict.rules_examined) == ("DROP", ["filter/INPUT:1", "filter/INPUT:policy"], 1)


def test_nested_jumps_unwind_in_order():
    rs = load("*filter\n:A - [0:0]\n:B - [0:0]\n:C - [0:0]\n"
              "-A INPUT -j A\n-A INPUT -j DROP\n-A A -j B\n-A A -j REJECT\n-A B -j C\n-A B -j RETURN\n"
              "-A C -p udp -j ACCEPT\nCOMMIT\n")
    verdict = run(rs)
    assert verdict.kind == "REJECT"
    assert verdict.path == ["filter/INPUT:1", "filter/A:1", "filter/B:1", "filter/B:2", "filter/A:2"]
    assert verdict.rules_examined == 6


def test_evaluate_refuses_a_user_chain_or_an_unknown_table():
    rs = load("*filter\n:A - [0:0]\nCOMMIT\n")
    with pytest.raises(ConfigError, match="not a built-in chain"):
        run(rs, chain="A")
    with pytest.raises(ConfigError, match="mangle"):
        run(rs, table="mangle", chain="PREROUTING")


# --- counters and cost -----------------------------------------------------------------------------

def test_counters_count_matching_rules_only_before_the_target_runs():
    rs = load("*filter\n:A - [0:0]\n-A INPUT -p udp -j DROP\n-A INPUT -j A\n-A INPUT -j ACCEPT\n"
              "-A A -m comment --comment count-only\nCOMMIT\n")
    for length in (60, 1500):
        assert run(rs, packet=pkt(length=length)).kind == "ACCEPT"
    assert rs.counters("filter", "INPUT") == [(0, 0), (2, 1560), (2, 1560)]
    assert rs.counters("filter", "A") == [(2, 1560)]            # a rule without target counts, goes on
    assert rs.policy_counters("filter", "INPUT") == (0, 0)
    rs.zero()
    assert rs.counters("filter", "INPUT") == [(0, 0)] * 3


def test_policy_counters_count_packets_that_fall_through():
    rs = load("*filter\n:FORWARD DROP [0:0]\n-A FORWARD -p udp -j ACCEPT\nCOMMIT\n")
    verdict = run(rs, chain="FORWARD", packet=pkt(length=40))
    assert verdict.kind == "DROP" and verdict.path == ["filter/FORWARD:policy"]
    assert rs.policy_counters("filter", "FORWARD") == (1, 40)
    assert "policy DROP 1 packets, 40 bytes" in rs.list_chain("filter", "FORWARD", verbose=True)


@pytest.mark.parametrize("position", [1, 10, 250, 1000])
def test_rules_examined_is_the_position_of_the_matching_rule(position):
    lines = [f"-A INPUT -d 10.0.{i // 250}.{i % 250 + 1} -j ACCEPT" for i in range(1000)]
    rs = load("*filter\n" + "\n".join(lines) + "\nCOMMIT\n")
    target = f"10.0.{(position - 1) // 250}.{(position - 1) % 250 + 1}"
    verdict = run(rs, packet=pkt(dst=target))
    assert verdict.kind == "ACCEPT"
    assert verdict.rules_examined == position
    assert verdict.path == [f"filter/INPUT:{position}"]


def test_rules_examined_counts_rules_in_every_chain_walked():
    rs = load("*filter\n:A - [0:0]\n" + "-A INPUT -p udp -j DROP\n" * 5 + "-A INPUT -j A\n"
              + "-A A -p udp -j DROP\n" * 7 + "COMMIT\n")
    assert run(rs).rules_examined == 5 + 1 + 7


def test_rule_count_covers_every_table():
    rs = load("*filter\n-A INPUT -j ACCEPT\n-A OUTPUT -j ACCEPT\nCOMMIT\n*nat\n-A OUTPUT -j ACCEPT\nCOMMIT\n")
    assert rs.rule_count() == 3


# --- the nat table ---------------------------------------------------------------------------------

NAT = """*nat
:SVC - [0:0]
-A PREROUTING -d 10.96.0.10/32 -p tcp --dport 80 -j SVC
-A PREROUTING -d 10.96.0.11/32 -p udp -j DNAT --to-destination 10.244.2.2
-A PREROUTING -d 10.96.0.12/32 -p udp -j DNAT --to-destination :5353
-A PREROUTING -d 10.96.0.13/32 -p tcp -j DNAT --to-destination 10.244.3.1-10.244.3.9:8000-8009
-A PREROUTING -d 10.96.0.14/32 -j ACCEPT
-A PREROUTING -d 10.96.0.14/32 -j DNAT --to-destination 10.9.9.9
-A SVC -j MARK --or-mark 0x4000
-A SVC -p tcp -j DNAT --to-destination 10.244.1.2:8080
-A POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN
-A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE --random-fully
-A POSTROUTING -s 10.244.9.0/24 -p tcp -j SNAT --to-source 192.168.0.1:1024-2048
-A POSTROUTING -s 10.244.8.0/24 -p tcp -j MASQUERADE --to-ports 5000-6000
COMMIT
"""


def test_dnat_gives_address_and_port_and_mark_is_not_terminal():
    rs = load(NAT)
    packet = pkt()
    verdict = rs.evaluate("nat", "PREROUTING", packet, EvalContext())
    assert (verdict.kind, verdict.to_ip, verdict.to_port) == ("DNAT", ip("10.244.1.2"), 8080)
    assert verdict.path == ["nat/PREROUTING:1", "nat/SVC:1", "nat/SVC:2"]
    assert packet.mark == verdict.mark == 0x4000


@pytest.mark.parametrize("dst, proto, dport, to", [
    ("10.96.0.11", 17, 53, ("10.244.2.2", 53)),         # no port: the port is kept
    ("10.96.0.12", 17, 53, ("10.96.0.12", 5353)),       # no address: the address is kept
    ("10.96.0.13", 6, 80, ("10.244.3.1", 8000)),        # ranges: the first of each
])
def test_dnat_keeps_what_it_does_not_change(dst, proto, dport, to):
    verdict = load(NAT).evaluate("nat", "PREROUTING", pkt(dst=dst, proto=proto, dport=dport), EvalContext())
    assert (verdict.kind, verdict.to_ip, verdict.to_port) == ("DNAT", ip(to[0]), to[1])


def test_accept_in_nat_ends_the_table_without_nat():
    verdict = load(NAT).evaluate("nat", "PREROUTING", pkt(dst="10.96.0.14"), EvalContext())
    assert (verdict.kind, verdict.to_ip, verdict.path) == ("ACCEPT", None, ["nat/PREROUTING:5"])


def test_postrouting_masquerade_snat_and_return():
    rs = load(NAT)
    ctx = EvalContext()
    assert rs.evaluate("nat", "POSTROUTING", pkt(dst="10.244.1.2", mark=0x4000), ctx).kind == "ACCEPT"
    masq = rs.evaluate("nat", "POSTROUTING", pkt(src="172.16.0.1", mark=0x4000), ctx)
    assert (masq.kind, masq.random_fully, masq.to_ip) == ("MASQUERADE", True, None)
    snat = rs.evaluate("nat", "POSTROUTING", pkt(src="10.244.9.7", dst="8.8.8.8"), ctx)
    assert (snat.kind, snat.to_ip, snat.to_port, snat.random_fully) == ("SNAT", ip("192.168.0.1"), 1024, False)
    ports = rs.evaluate("nat", "POSTROUTING", pkt(src="10.244.8.7", dst="8.8.8.8"), ctx)
    assert (ports.kind, ports.to_port) == ("MASQUERADE", 5000)


# --- MARK arithmetic -------------------------------------------------------------------------------

@pytest.mark.parametrize("option, before, after", [
    ("--set-xmark 0x4000/0x4000", 0x1, 0x4001),
    ("--set-xmark 0x4000/0x4000", 0x4001, 0x4001),
    ("--set-xmark 0x5/0xff", 0x1234, 0x1205),
    ("--set-xmark 0x1/0x0", 0x3, 0x2),                # xor through set-xmark
    ("--set-mark 0x7", 0xFFFF, 0x7),
    ("--set-mark 0x1/0x3", 0xF6, 0xF5),
    ("--or-mark 0x4000", 0x1, 0x4001),
    ("--xor-mark 0x4000", 0x4001, 0x1),
    ("--xor-mark 0x4000", 0x1, 0x4001),
    ("--and-mark 0xff", 0x1234, 0x34),
])
def test_mark_target_arithmetic(option, before, after):
    rs = load(f"*mangle\n-A PREROUTING -j MARK {option}\nCOMMIT\n")
    packet = pkt(mark=before)
    assert rs.evaluate("mangle", "PREROUTING", packet, EvalContext()).kind == "ACCEPT"
    assert packet.mark == after


def test_mark_set_by_one_rule_is_seen_by_later_rules():
    rs = load("*mangle\n-A PREROUTING -j MARK --set-mark 0x2\n-A PREROUTING -m mark --mark 0x2 -j DROP\nCOMMIT\n")
    assert rs.evaluate("mangle", "PREROUTING", pkt(), EvalContext()).path == ["mangle/PREROUTING:1", "mangle/PREROUTING:2"]


# --- REJECT ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, expected", [
    ("", "icmp-port-unreachable"),
    ("--reject-with tcp-reset", "tcp-reset"),
    ("--reject-with tcp-rst", "tcp-reset"),
    ("--reject-with icmp-net-unreachable", "icmp-net-unreachable"),
    ("--reject-with host-unreach", "icmp-host-unreachable"),
    ("--reject-with icmp-proto-unreachable", "icmp-proto-unreachable"),
    ("--reject-with icmp-net-prohibited", "icmp-net-prohibited"),
    ("--reject-with icmp-host-prohibited", "icmp-host-prohibited"),
    ("--reject-with admin-prohib", "icmp-admin-prohibited"),
])
def test_reject_says_how(option, expected):
    rs = load(f"*filter\n-A FORWARD -p tcp -j REJECT {option}\nCOMMIT\n")
    verdict = run(rs, chain="FORWARD")
    assert (verdict.kind, verdict.reject_with) == ("REJECT", expected)
    assert rs.save("filter").splitlines()[5] == f"-A FORWARD -p tcp -j REJECT --reject-with {expected}"


# --- state across evaluations ---------------------------------------------------------------------

def test_random_draws_come_from_the_context_rng_and_are_reproducible():
    text = "*filter\n-A INPUT -m statistic --mode random --probability 0.5 -j DROP\nCOMMIT\n"
    rs_a, rs_b = load(text), load(text)
    rng_a, rng_b = random.Random(9), random.Random(9)
    seq_a = [rs_a.evaluate("filter", "INPUT", pkt(), EvalContext(rng=rng_a)).kind for _ in range(50)]
    seq_b = [rs_b.evaluate("filter", "INPUT", pkt(), EvalContext(rng=rng_b)).kind for _ in range(50)]
    assert seq_a == seq_b and {"DROP", "ACCEPT"} == set(seq_a)
