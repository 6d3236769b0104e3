"""Every match: what it matches (the kernel's semantics) and how it reads and prints (iptables').
Stateful matches get explicit `now` values and seeded random sources."""

from __future__ import annotations

import ipaddress
import random

import pytest

from podnet.core.services.iptables import EvalContext, RecentTables, Ruleset
from podnet.core.services.packetinfo import CtState, PacketInfo

LOCAL = frozenset({int(ipaddress.IPv4Address("192.168.0.1"))})


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def pkt(src="10.244.1.5", dst="10.96.0.10", proto=6, sport=40000, dport=80, **kw) -> PacketInfo:
    return PacketInfo(ip(src), ip(dst), proto, sport, dport, **kw)


def accepts(spec: str, packet: PacketInfo, *, chain: str = "FORWARD", ctx: EvalContext | None = None) -> bool:
    rs = Ruleset()
    rs.restore(f"*filter\n:{chain} DROP [0:0]\n-A {chain} {spec} -j ACCEPT\nCOMMIT\n")
    return rs.evaluate("filter", chain, packet, ctx or EvalContext(local_addresses=LOCAL)).kind == "ACCEPT"


def saved(spec: str, table: str = "filter", chain: str = "FORWARD") -> str:
    rs = Ruleset()
    rs.restore(f"*{table}\n-A {chain} {spec}\nCOMMIT\n")
    return next(line for line in rs.save(table).splitlines() if line.startswith("-A"))


@pytest.mark.parametrize("spec, packet, expected", [
    ("-s 10.244.0.0/16", pkt(), True),
    ("-s 10.244.0.0/16", pkt(src="10.245.0.1"), False),
    ("! -s 10.244.0.0/16", pkt(src="10.245.0.1"), True),
    ("! -s 10.244.0.0/16", pkt(), False),
    ("-s 10.244.1.5", pkt(), True),
    ("-s 10.244.1.6", pkt(), False),
    ("-s 10.0.0.0/255.0.255.0", pkt(src="10.9.9.7"), False),
    ("-s 10.0.0.0/255.0.255.0", pkt(src="10.9.0.7"), True),
    ("-d 10.96.0.10/32", pkt(), True),
    ("! -d 10.96.0.0/12", pkt(), False),
    ("-p tcp", pkt(), True),
    ("-p udp", pkt(), False),
    ("! -p udp", pkt(), True),
    ("-p 6", pkt(), True),
    ("-i eth0", pkt(in_iface="eth0"), True),
    ("-i eth0", pkt(in_iface="eth01"), False),
    ("-i veth+", pkt(in_iface="veth1234"), True),
    ("-i veth+", pkt(in_iface="eth0"), False),
    ("! -i veth+", pkt(in_iface="eth0"), True),
    ("-o tun0", pkt(out_iface="tun0"), True),
    ("! -o tun0", pkt(out_iface=None), True),
    ("-i +", pkt(in_iface=None), True),
])
def test_header_fields(spec, packet, expected):
    assert accepts(spec, packet) is expected


@pytest.mark.parametrize("spec, packet, expected", [
    ("-p tcp --dport 80", pkt(), True),
    ("-p tcp --dport 81", pkt(), False),
    ("-p tcp ! --dport 81", pkt(), True),
    ("-p tcp --dport 70:90", pkt(), True),
    ("-p tcp --dport 81:", pkt(), False),
    ("-p tcp --sport :40000", pkt(), True),
    ("-p tcp --sport 1000:2000 --dport 80", pkt(), False),
    ("-p tcp --syn", pkt(tcp_flags=0x02), True),
    ("-p tcp --syn", pkt(tcp_flags=0x12), False),
    ("-p tcp ! --syn", pkt(tcp_flags=0x10), True),
    ("-p tcp --tcp-flags SYN,ACK ACK", pkt(tcp_flags=0x18), True),
    ("-p tcp --tcp-flags ALL NONE", pkt(tcp_flags=0), True),
    ("-p udp --dport 53", pkt(proto=17, dport=53), True),
    ("-p udp -m udp ! --sport 1:1024", pkt(proto=17, sport=53), False),
    ("-p sctp --dport 80", pkt(proto=132), True),
    ("-p sctp -m sctp ! --dport 80", pkt(proto=132), False),
    ("-p tcp -m multiport --dports 22,80:90", pkt(), True),
    ("-p tcp -m multiport --dports 22,81:90", pkt(), False),
    ("-p tcp -m multiport ! --dports 22,81:90", pkt(), True),
    ("-p tcp -m multiport --sports 40000", pkt(), True),
    ("-p tcp -m multiport --ports 40000", pkt(sport=1, dport=40000), True),
    ("-p tcp -m multiport --ports 7,8", pkt(), False),
])
def test_port_matches(spec, packet, expected):
    assert accepts(spec, packet) is expected


@pytest.mark.parametrize("spec, mark, expected", [
    ("-m mark --mark 0x4000/0x4000", 0x4001, True),
    ("-m mark --mark 0x4000/0x4000", 0x1, False),
    ("-m mark ! --mark 0x4000/0x4000", 0x1, True),
    ("-m mark --mark 5", 5, True),
    ("-m mark --mark 5", 0x105, False),
])
def test_mark_match(spec, mark, expected):
    assert accepts(spec, pkt(mark=mark)) is expected


@pytest.mark.parametrize("spec, packet, expected", [
    ("-m addrtype --dst-type LOCAL", pkt(dst="192.168.0.1"), True),
    ("-m addrtype --dst-type LOCAL", pkt(dst="192.168.0.2"), False),
    ("-m addrtype --dst-type LOCAL", pkt(dst="127.0.0.53"), True),      # lo's 127.0.0.0/8 local route
    ("-m addrtype ! --dst-type LOCAL", pkt(dst="192.168.0.2"), True),
    ("-m addrtype --src-type LOCAL", pkt(src="192.168.0.1"), True),
    ("-m addrtype --dst-type UNICAST", pkt(), True),
    ("-m addrtype --dst-type MULTICAST", pkt(dst="239.1.1.1"), True),
    ("-m addrtype --dst-type BROADCAST", pkt(dst="255.255.255.255"), True),
    ("-m addrtype --src-type LOCAL --dst-type LOCAL", pkt(src="192.168.0.1", dst="8.8.8.8"), False),
])
def test_addrtype_uses_the_contexts_local_addresses(spec, packet, expected):
    assert accepts(spec, packet) is expected


@pytest.mark.parametrize("spec, state, expected", [
    ("-m conntrack --ctstate NEW", CtState.NEW, True),
    ("-m conntrack --ctstate NEW", CtState.ESTABLISHED, False),
    ("-m conntrack --ctstate RELATED,ESTABLISHED", CtState.ESTABLISHED, True),
    ("-m conntrack --ctstate INVALID", CtState.INVALID, True),
    ("-m conntrack --ctstate DNAT", CtState.NEW | CtState.DNAT, True),
    ("-m conntrack --ctstate SNAT", CtState.NEW | CtState.DNAT, False),
    ("-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT", CtState.NEW, True),
    ("-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT", CtState.NEW | CtState.DNAT, False),
    ("-m state --state NEW", CtState.NEW, True),
    ("-m state ! --state NEW", CtState.ESTABLISHED, True),
])
def test_conntrack_state(spec, state, expected):
    assert accepts(spec, pkt(ct_state=state)) is expected


def test_comment_always_matches():
    assert accepts('-m comment --comment "anything at all"', pkt())


# --- statistic -------------------------------------------------------------------------------------

def test_statistic_random_matches_with_the_stored_probability():
    rs = Ruleset()
    rs.restore("*filter\n-A INPUT -m statistic --mode random --probability 0.3 -j DROP\nCOMMIT\n")
    rng = random.Random(1234)
    n = 20000
    drops = sum(rs.evaluate("filter", "INPUT", pkt(), EvalContext(rng=rng)).kind == "DROP" for _ in range(n))
    assert abs(drops / n - 0.3) < 0.01               # 3 sigma is 0.0097


def test_kube_proxy_probabilities_spread_evenly_over_three_endpoints():
    rs = Ruleset()
    rs.restore("*nat\n:SVC - [0:0]\n-A PREROUTING -j SVC\n"
               "-A SVC -m statistic --mode random --probability 0.3333333333 -j DNAT --to-destination 10.0.0.1\n"
               "-A SVC -m statistic --mode random --probability 0.5000000000 -j DNAT --to-destination 10.0.0.2\n"
               "-A SVC -j DNAT --to-destination 10.0.0.3\nCOMMIT\n")
    rng = random.Random(99)
    n = 9000
    seen: dict[int, int] = {}
    for _ in range(n):
        to = rs.evaluate("nat", "PREROUTING", pkt(), EvalContext(rng=rng)).to_ip
        seen[to] = seen.get(to, 0) + 1
    assert sorted(seen) == [ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3")]
    assert all(abs(count / n - 1 / 3) < 0.02 for count in seen.values())   # 3 sigma is 0.015
    assert rs.counters("nat", "SVC")[0][0] == seen[ip("10.0.0.1")]


@pytest.mark.parametrize("spec, pattern", [
    ("--every 3 --packet 0", "..X..X..X"),
    ("--every 3 --packet 1", ".X..X..X."),
    ("--every 3 --packet 2", "X..X..X.."),
    ("--every 1 --packet 0", "XXXXXXXXX"),
    ("! --every 3 --packet 0", "XX.XX.XX."),
])
def test_statistic_nth(spec, pattern):
    rs = Ruleset()
    rs.restore(f"*filter\n-A INPUT -m statistic --mode nth {spec} -j DROP\nCOMMIT\n")
    got = "".join("X" if rs.evaluate("filter", "INPUT", pkt(), EvalContext()).kind == "DROP" else "."
                  for _ in pattern)
    assert got == pattern


def test_statistic_nth_counts_only_packets_that_reach_it():
    rs = Ruleset()
    rs.restore("*filter\n-A INPUT -p tcp -m statistic --mode nth --every 2 --packet 0 -j DROP\nCOMMIT\n")
    kinds = [rs.evaluate("filter", "INPUT", pkt(proto=p), EvalContext()).kind for p in (6, 17, 17, 6)]
    assert kinds == ["ACCEPT", "ACCEPT", "ACCEPT", "DROP"]


@pytest.mark.parametrize("text, saved_as", [
    ("--mode random --probability 0.3333333333", "--mode random --probability 0.33333333349"),
    ("--mode random --probability 0.5000000000", "--mode random --probability 0.50000000000"),
    ("--mode random --probability 0.0000099999", "--mode random --probability 0.00001000008"),
    ("--mode random --probability 0.999999999999", "--mode random --probability 1.00000000000"),
    ("--mode random ! --probability 0.1", "--mode random ! --probability 0.10000000009"),
    ("--mode nth --every 2 --packet 0", "--mode nth --every 2 --packet 0"),
    ("--mode nth ! --every 5 --packet 4", "--mode nth ! --every 5 --packet 4"),
])
def test_statistic_prints_like_iptables_save(text, saved_as):
    assert saved(f"-m statistic {text}") == f"-A FORWARD -m statistic {saved_as}"


# --- recent ----------------------------------------------------------------------------------------

RECENT = """*filter
-A INPUT -p udp -m recent --name SEEN --set
-A INPUT -p tcp -m recent --name SEEN --rcheck --seconds 60 -j DROP
COMMIT
"""


def walk(rs: Ruleset, now: float, src="10.0.0.1", proto=6) -> str:
    return rs.evaluate("filter", "INPUT", pkt(src=src, proto=proto), EvalContext(now=now)).kind


def test_recent_set_then_rcheck_within_seconds():
    rs = Ruleset()
    rs.restore(RECENT)
    assert walk(rs, 10.0) == "ACCEPT"                  # not on the list yet
    walk(rs, 20.0, proto=17)                           # --set at t=20
    assert rs.recent.addresses("SEEN") == {ip("10.0.0.1"): (20.0,)}
    assert walk(rs, 80.0) == "DROP"                    # 60 s later: still within --seconds 60
    assert walk(rs, 80.1) == "ACCEPT"                  # now older than 60 s
    assert walk(rs, 30.0, src="10.0.0.2") == "ACCEPT"  # another source


def test_recent_mask_groups_sources():
    rs = Ruleset()
    rs.restore("*filter\n-A INPUT -p udp -m recent --name NET --set --mask 255.255.255.0\n"
               "-A INPUT -p tcp -m recent --name NET --rcheck --mask 255.255.255.0 -j DROP\nCOMMIT\n")
    rs.evaluate("filter", "INPUT", pkt(src="10.1.2.3", proto=17), EvalContext(now=1.0))
    assert rs.recent.addresses("NET") == {ip("10.1.2.0"): (1.0,)}
    assert walk(rs, 2.0, src="10.1.2.200") == "DROP"
    assert walk(rs, 2.0, src="10.1.3.1") == "ACCEPT"


def test_recent_rdest_uses_the_destination():
    rs = Ruleset()
    rs.restore("*filter\n-A INPUT -m recent --name D --set --rdest\nCOMMIT\n")
    rs.evaluate("filter", "INPUT", pkt(), EvalContext(now=5.0))
    assert list(rs.recent.addresses("D")) == [ip("10.96.0.10")]


def test_recent_reap_forgets_the_stale_oldest_address():
    rs = Ruleset()
    rs.restore("*filter\n-A INPUT -p udp -m recent --name R --set\n"
               "-A INPUT -p tcp -m recent --name R --rcheck --seconds 10 --reap -j DROP\nCOMMIT\n")
    walk(rs, 0.0, src="10.0.0.1", proto=17)
    walk(rs, 5.0, src="10.0.0.2", proto=17)
    assert walk(rs, 12.0, src="10.0.0.2") == "DROP"     # .2 is fresh; the check reaps stale .1
    assert set(rs.recent.addresses("R")) == {ip("10.0.0.2")}


def test_recent_update_hitcount_and_remove():
    rs = Ruleset()
    rs.restore("*filter\n"
               "-A INPUT -p udp -m recent --name H --remove\n"
               "-A INPUT -p tcp -m recent --name H --update --seconds 100 --hitcount 3 -j DROP\n"
               "-A INPUT -p tcp -m recent --name H --set\nCOMMIT\n")
    # --update only refreshes when it matched; --set adds a stamp each time it is reached
    kinds = [walk(rs, t) for t in (1.0, 2.0, 3.0, 4.0, 5.0)]
    assert kinds == ["ACCEPT", "ACCEPT", "ACCEPT", "DROP", "DROP"]
    assert rs.recent.addresses("H") == {ip("10.0.0.1"): (1.0, 2.0, 3.0, 4.0, 5.0)}
    assert walk(rs, 5.0, proto=17) == "ACCEPT"            # --remove matched and forgot it
    assert rs.recent.addresses("H") == {}


def test_recent_lists_persist_across_evaluations_and_restores_while_referenced():
    rs = Ruleset()
    rs.restore(RECENT)
    assert rs.recent.names() == ["SEEN"]                  # loading the rule creates the list
    walk(rs, 1.0, proto=17)
    rs.restore(RECENT)                                    # the same rules again: the list survives
    assert rs.recent.addresses("SEEN")
    rs.restore("*filter\nCOMMIT\n")                       # no rule refers to it: the list goes
    assert rs.recent.names() == []


def test_recent_lists_can_be_passed_in_and_filled_from_outside():
    rs = Ruleset()
    rs.restore(RECENT)
    lists = RecentTables()
    lists.add("SEEN", ip("10.0.0.1"), 100.0)
    ctx = EvalContext(now=110.0, recent=lists)
    assert rs.evaluate("filter", "INPUT", pkt(src="10.0.0.1"), ctx).kind == "DROP"
    assert rs.recent.addresses("SEEN") == {}              # the ruleset's own lists were not used


def test_recent_prints_like_iptables_save():
    assert saved("-m recent --name KUBE-SEP-X --rcheck --seconds 10800 --reap -j ACCEPT") == (
        "-A FORWARD -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-X --mask 255.255.255.255 "
        "--rsource -j ACCEPT")
    assert saved("-m recent ! --update --seconds 5 --hitcount 2 --rdest") == (
        "-A FORWARD -m recent ! --update --seconds 5 --hitcount 2 --name DEFAULT --mask 255.255.255.255 --rdest")
