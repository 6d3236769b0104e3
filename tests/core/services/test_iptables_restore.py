"""iptables-restore input and iptables-save output: commands, flush/noflush, atomic COMMIT, errors
that name the line, the normalised print forms, and the round trip parse(save(parse(x))) == parse(x).
The print forms asserted here were read off the real iptables-save 1.8.9 (the root tests in
test_iptables_kube.py compare whole rulesets with it)."""

from __future__ import annotations

import pytest

from podnet.core.services.iptables import EvalContext, IptablesError, Ruleset
from podnet.core.services.iptables.ruleparse import split_words
from podnet.core.services.packetinfo import PacketInfo
from podnet.errors import ConfigError


def load(text: str, **kw) -> Ruleset:
    ruleset = Ruleset()
    ruleset.restore(text, **kw)
    return ruleset


def rules_of(rs: Ruleset, table: str = "filter") -> list[str]:
    return [line for line in rs.save(table).splitlines() if line.startswith("-A")]


def saved(spec: str, table: str = "filter", chain: str = "FORWARD", prelude: str = "") -> str:
    return rules_of(load(f"*{table}\n{prelude}-A {chain} {spec}\nCOMMIT\n"), table)[-1]


# --- the normalised print forms ----------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ('-m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp -p udp -d 10.96.0.10 --dport 53 -j ACCEPT',
     '-d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j ACCEPT'),
    ("-p tcp -m comment --comment x --dport 80", "-p tcp -m comment --comment x -m tcp --dport 80"),
    ("-p tcp --dport 80 -m comment --comment x", "-p tcp -m tcp --dport 80 -m comment --comment x"),
    ("-s 10.1.2.3/8", "-s 10.0.0.0/8"),
    ("-s 10.1", "-s 10.1.0.0/32"),
    ("-s 10.0.0.0/255.255.0.255", "-s 10.0.0.0/255.255.0.255"),
    ("-s 192.168.1.1/0 -d 0/0 -j DROP", "-j DROP"),
    ("-i eth0+ ! -o veth+ -s 1.2.3.4 ! -d 5.6.7.0/24", "-s 1.2.3.4/32 ! -d 5.6.7.0/24 -i eth0+ ! -o veth+"),
    ("-p TCP", "-p tcp"), ("-p 6", "-p tcp"), ("-p 47", "-p gre"), ("-p all", ""), ("! -p udp", "! -p udp"),
    ("-p 255", "-p 255"),
    ("-p tcp --syn", "-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN"),
    ("-p tcp --tcp-flags ALL NONE", "-p tcp -m tcp --tcp-flags FIN,SYN,RST,PSH,ACK,URG NONE"),
    ("-p tcp ! --dport 22 --sport 1000:2000", "-p tcp -m tcp --sport 1000:2000 ! --dport 22"),
    ("-p tcp --dport 80:", "-p tcp -m tcp --dport 80:65535"),
    ("-p tcp --dport 0:65535", "-p tcp -m tcp"),
    ("-p sctp -m sctp ! --dport 0:65535", "-p sctp -m sctp ! --dport 0:65535"),
    ("-p udp -m multiport ! --dports 1,2:5", "-p udp -m multiport ! --dports 1,2:5"),
    ("-m state --state ESTABLISHED,RELATED", "-m state --state RELATED,ESTABLISHED"),
    ("-m conntrack --ctstate dnat,NEW,ESTABLISHED,RELATED,INVALID",
     "-m conntrack --ctstate INVALID,NEW,RELATED,ESTABLISHED,DNAT"),
    ("-m mark --mark 16/0xff", "-m mark --mark 0x10/0xff"),
    ("-m mark ! --mark 0x1/0xffffffff", "-m mark ! --mark 0x1"),
    ("-m addrtype --dst-type LOCAL,UNICAST", "-m addrtype --dst-type UNICAST,LOCAL"),
    ("-m addrtype ! --src-type LOCAL", "-m addrtype ! --src-type LOCAL"),
    ('-m comment --comment "a \\"quoted\\" it\'s"', '-m comment --comment "a \\"quoted\\" it\\\'s"'),
    ('-m comment --comment ""', '-m comment --comment ""'),
    ("-m comment --comment abc_DEF-9", "-m comment --comment abc_DEF-9"),
    ("-m comment --comment ns/a", '-m comment --comment "ns/a"'),
    ("-j REJECT", "-j REJECT --reject-with icmp-port-unreachable"),
    ("-j REJECT --reject-with host-unreach", "-j REJECT --reject-with icmp-host-unreachable"),
    ("-j MARK --or-mark 0x4000", "-j MARK --set-xmark 0x4000/0x4000"),
    ("-j MARK --xor-mark 0x4000", "-j MARK --set-xmark 0x4000/0x0"),
    ("-j MARK --set-mark 0x17", "-j MARK --set-xmark 0x17/0xffffffff"),
    ("-j MARK --set-mark 0x1/0x3", "-j MARK --set-xmark 0x1/0x3"),
    ("-j MARK --and-mark 0xff", "-j MARK --set-xmark 0x0/0xffffff00"),
    ("-j MARK --set-xmark 5", "-j MARK --set-xmark 0x5/0xffffffff"),
])
def test_saved_forms(spec, expected):
    assert saved(spec) == ("-A FORWARD " + expected).rstrip()


@pytest.mark.parametrize("spec, expected", [
    ("-p tcp -j DNAT --to-destination 10.244.1.2:8080", "-p tcp -j DNAT --to-destination 10.244.1.2:8080"),
    ("-j DNAT --to-destination 10.0.0.1", "-j DNAT --to-destination 10.0.0.1"),
    ("-p tcp -j DNAT --to-destination 10.0.0.1-10.0.0.5:80-90 --persistent --random",
     "-p tcp -j DNAT --to-destination 10.0.0.1-10.0.0.5:80-90 --random --persistent"),
])
def test_saved_dnat_forms(spec, expected):
    assert saved(spec, "nat", "PREROUTING") == "-A PREROUTING " + expected


@pytest.mark.parametrize("spec, expected", [
    ("-j MASQUERADE --random-fully", "-j MASQUERADE --random-fully"),
    ("-p tcp -j MASQUERADE --random --to-ports 1000-2000", "-p tcp -j MASQUERADE --to-ports 1000-2000 --random"),
    ("-j SNAT --to-source 1.2.3.4 --random-fully", "-j SNAT --to-source 1.2.3.4 --random-fully"),
])
def test_saved_source_nat_forms(spec, expected):
    assert saved(spec, "nat", "POSTROUTING") == "-A POSTROUTING " + expected


def test_address_lists_expand_to_one_rule_per_pair():
    rs = load("*filter\n-A INPUT -s 1.1.1.1,2.2.2.0/24 -d 3.3.3.3 -j DROP\nCOMMIT\n")
    assert rules_of(rs) == ["-A INPUT -s 1.1.1.1/32 -d 3.3.3.3/32 -j DROP",
                            "-A INPUT -s 2.2.2.0/24 -d 3.3.3.3/32 -j DROP"]


def test_save_layout_chain_order_counters_and_header():
    rs = load("*filter\n:INPUT DROP [3:300]\n:ZED - [0:0]\n:ALPHA - [0:0]\n:a-lower - [0:0]\n"
              "[7:700] -A INPUT -j ZED\n-A ZED -g ALPHA\nCOMMIT\n", counters=True)
    assert rs.save("filter", header="Thu Jan  1 00:00:00 2026") == (
        "# Generated by podnet iptables-save on Thu Jan  1 00:00:00 2026\n*filter\n"
        ":INPUT DROP [3:300]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":ALPHA - [0:0]\n:ZED - [0:0]\n:a-lower - [0:0]\n"
        "-A INPUT -j ZED\n-A ZED -g ALPHA\nCOMMIT\n# Completed on Thu Jan  1 00:00:00 2026\n")
    assert rules_of_counted(rs) == ["[7:700] -A INPUT -j ZED", "[0:0] -A ZED -g ALPHA"]


def rules_of_counted(rs: Ruleset) -> list[str]:
    return [line for line in rs.save("filter", counters=True).splitlines() if line.startswith("[")]


def test_tables_print_in_iptables_nft_order():
    rs = load("*raw\nCOMMIT\n*nat\nCOMMIT\n*mangle\nCOMMIT\n")
    assert [line for line in rs.save().splitlines() if line.startswith("*")] == ["*mangle", "*raw", "*filter", "*nat"]


# --- the round trip ----------------------------------------------------------------------------------

ROUND_TRIP = [
    "*filter\n:KUBE-FORWARD - [0:0]\n-A FORWARD -j KUBE-FORWARD\n"
    "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n"
    '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT\n'
    "-A INPUT -p tcp --syn -m multiport --dports 1,2:9 -m addrtype ! --dst-type LOCAL -j REJECT --reject-with tcp-reset\n"
    "COMMIT\n",
    "*nat\n:SEP - [0:0]\n-A PREROUTING -p tcp -j SEP\n"
    "-A SEP -m comment --comment it's -m recent --name SEP --set -p tcp -j DNAT --to-destination 10.1.1.1:80\n"
    "-A SEP -m statistic --mode random --probability 0.3333333333 -j RETURN\n"
    "-A SEP -m statistic --mode nth --every 4 --packet 2 -j MARK --xor-mark 0x4000\n"
    "-A POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n-A POSTROUTING -j MASQUERADE --random-fully\n"
    "COMMIT\n",
    '*mangle\n-A PREROUTING -i veth+ -m comment --comment "back\\\\slash \\"q\\"" -j MARK --set-mark 1\nCOMMIT\n'
    "*raw\n-A OUTPUT ! -d 127.0.0.0/8 -j ACCEPT\nCOMMIT\n",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(text):
    first = load(text)
    second = load(first.save())
    for table in first.table_names:
        assert second.table(table) == first.table(table)
    assert second.save() == first.save()


def test_round_trip_keeps_counters_with_c():
    first = load("*filter\n:INPUT ACCEPT [5:500]\n[3:42] -A INPUT -j ACCEPT\nCOMMIT\n", counters=True)
    second = load(first.save(counters=True), counters=True)
    assert second.counters("filter", "INPUT") == [(3, 42)] and second.policy_counters("filter", "INPUT") == (5, 500)
    assert load(first.save(counters=True)).counters("filter", "INPUT") == [(0, 0)]   # without -c: ignored


# --- words ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, words", [
    ('-A X -m comment --comment "two words" -j Y', ["-A", "X", "-m", "comment", "--comment", "two words", "-j", "Y"]),
    ('a  \t b', ["a", "b"]),
    ('"a \\" b"', ['a " b']),
    ('"\\\\"', ["\\"]),
    ("'a b'", ["'a", "b'"]),
    ('""', [""]),
    ('"unterminated rest', ["unterminated rest"]),
    ('x"y z"', ["xy z"]),
])
def test_split_words_like_iptables_restore(line, words):
    assert split_words(line) == words


# --- restore semantics --------------------------------------------------------------------------------

BASE = ("*filter\n:A - [0:0]\n:B - [0:0]\n:C - [0:0]\n-A INPUT -j B\n-A A -j ACCEPT\n-A B -j DROP\n"
        "-A C -j DROP\n-A C -p tcp --dport 1 -j DROP\n-A C -p tcp --dport 2 -j DROP\nCOMMIT\n")


def test_without_noflush_a_section_replaces_the_whole_table():
    rs = load(BASE)
    rs.restore("*filter\n:INPUT DROP [0:0]\nCOMMIT\n")
    rs.restore("*filter\n:D - [0:0]\n-A FORWARD -j D\nCOMMIT\n")
    assert rs.chains("filter") == ["INPUT", "FORWARD", "OUTPUT", "D"]
    assert rules_of(rs) == ["-A FORWARD -j D"]
    assert rs.chain("filter", "INPUT").policy == "ACCEPT"       # built-ins come back with ACCEPT


def test_noflush_flushes_only_declared_chains_and_never_builtins():
    rs = load(BASE)
    rs.restore("*filter\n:INPUT ACCEPT [0:0]\n:C - [0:0]\n:NEW - [0:0]\n-A C -j RETURN\nCOMMIT\n", noflush=True)
    assert rules_of(rs) == ["-A INPUT -j B", "-A A -j ACCEPT", "-A B -j DROP", "-A C -j RETURN"]
    assert "NEW" in rs.chains("filter")


def test_noflush_keeps_counters_of_untouched_rules():
    rs = load(BASE)
    rs.evaluate("filter", "INPUT", PacketInfo(1, 2, 6, 3, 4), EvalContext())
    rs.restore("*filter\n:C - [0:0]\nCOMMIT\n", noflush=True)
    assert rs.counters("filter", "B") == [(1, 0)]


@pytest.mark.parametrize("commands, expected_c", [
    ("-D C -p tcp --dport 1 -j DROP", ["-j DROP", "-p tcp -m tcp --dport 2 -j DROP"]),
    ("-D C 1", ["-p tcp -m tcp --dport 1 -j DROP", "-p tcp -m tcp --dport 2 -j DROP"]),
    ("-I C -j RETURN", ["-j RETURN", "-j DROP", "-p tcp -m tcp --dport 1 -j DROP", "-p tcp -m tcp --dport 2 -j DROP"]),
    ("-I C 4 -j ACCEPT", ["-j DROP", "-p tcp -m tcp --dport 1 -j DROP", "-p tcp -m tcp --dport 2 -j DROP", "-j ACCEPT"]),
    ("-R C 2 -s 1.2.3.4 -j RETURN", ["-j DROP", "-s 1.2.3.4/32 -j RETURN", "-p tcp -m tcp --dport 2 -j DROP"]),
    ("-F C", []),
    ("-F", []),
])
def test_rule_commands(commands, expected_c):
    rs = load(BASE)
    rs.restore(f"*filter\n{commands}\nCOMMIT\n", noflush=True)
    assert [r[len("-A C "):] for r in rules_of(rs) if r.startswith("-A C ")] == expected_c


def test_chain_commands():
    rs = load(BASE)
    rs.restore("*filter\n-N NEW\n-E A RENAMED\n-A NEW -j RENAMED\n-P FORWARD DROP\n-F C\n-X C\nCOMMIT\n",
               noflush=True)
    assert rs.chains("filter") == ["INPUT", "FORWARD", "OUTPUT", "B", "NEW", "RENAMED"]
    assert rs.chain("filter", "FORWARD").policy == "DROP"
    assert rules_of(rs) == ["-A INPUT -j B", "-A B -j DROP", "-A NEW -j RENAMED", "-A RENAMED -j ACCEPT"]
    rs.restore("*filter\n-F\n-X\nCOMMIT\n", noflush=True)
    assert rs.chains("filter") == ["INPUT", "FORWARD", "OUTPUT"]


def test_rename_updates_the_jumps_to_the_chain():
    rs = load("*filter\n:A - [0:0]\n-A INPUT -j A\n-A FORWARD -g A\nCOMMIT\n")
    rs.restore("*filter\n-E A B\nCOMMIT\n", noflush=True)
    assert rules_of(rs) == ["-A INPUT -j B", "-A FORWARD -g B"]


def test_kube_proxy_stale_chain_removal():
    rs = load("*nat\n:SVC - [0:0]\n:SEP-OLD - [0:0]\n:SEP-NEW - [0:0]\n-A PREROUTING -j SVC\n-A SVC -j SEP-OLD\n"
              "-A SEP-OLD -j DNAT --to-destination 10.0.0.1\nCOMMIT\n")
    rs.restore("*nat\n:SVC - [0:0]\n:SEP-OLD - [0:0]\n:SEP-NEW - [0:0]\n-A SVC -j SEP-NEW\n"
               "-A SEP-NEW -j DNAT --to-destination 10.0.0.2\n-X SEP-OLD\nCOMMIT\n", noflush=True)
    assert "SEP-OLD" not in rs.chains("nat")


# --- errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, line, reason", [
    ("*filter\n-A INPUT -m nope -j ACCEPT\nCOMMIT\n", 2, "Couldn't load match `nope'"),
    ("*filter\n-A INPUT --dport 80 -j ACCEPT\nCOMMIT\n", 2, 'unknown option "--dport"'),
    ("*filter\n\n# comment\n-A INPUT -p tcp --bogus 1\nCOMMIT\n", 4, 'unknown option "--bogus"'),
    ("*filter\n-A INPUT -j NOPE\nCOMMIT\n", 2, "Couldn't load target `NOPE'"),
    ("*filter\n-A INPUT -g ACCEPT\nCOMMIT\n", 2, "Chain 'ACCEPT' does not exist"),
    ("*filter\n-A NOPE -j ACCEPT\nCOMMIT\n", 2, "Chain 'NOPE' does not exist"),
    ("*filter\n-A INPUT -j ACCEPT\n", 3, "COMMIT expected"),
    ("*filter\n-A INPUT -j ACCEPT\n*nat\nCOMMIT\n", 3, "COMMIT expected"),
    ("-A INPUT -j ACCEPT\n", 1, "not inside a *table section"),
    ("*bogus\nCOMMIT\n", 1, "table 'bogus' does not exist"),
    ("*nat\n-A PREROUTING -j DROP\nCOMMIT\n", 2, 'The "nat" table is not intended for filtering'),
    ("*nat\n-P PREROUTING DROP\nCOMMIT\n", 2, 'The "nat" table is not intended for filtering'),
    ("*filter\n-A INPUT -o eth0\nCOMMIT\n", 2, "Can't use -o with INPUT"),
    ("*filter\n-A INPUT -p tcp -p udp\nCOMMIT\n", 2, "multiple -p flags not allowed"),
    ("*filter\n-A INPUT -m multiport --dports 1\nCOMMIT\n", 2, "multiport needs"),
    ("*filter\n-A INPUT -m tcp --dport 1\nCOMMIT\n", 2, "TCP match requires '-p tcp'"),
    ("*filter\n-A INPUT -j REJECT --reject-with tcp-reset\nCOMMIT\n", 2, "needs -p tcp"),
    ("*filter\n-A INPUT -j REJECT --reject-with bogus\nCOMMIT\n", 2, "unknown reject type"),
    ("*filter\n-A INPUT -j DNAT --to-destination 1.2.3.4\nCOMMIT\n", 2, "only valid in the nat table"),
    ("*nat\n:X - [0:0]\n-A POSTROUTING -j X\n-A X -j DNAT --to-destination 1.2.3.4\nCOMMIT\n", 4,
     "Invalid argument"),
    ("*nat\n-A OUTPUT -j MASQUERADE\nCOMMIT\n", 2, "only valid from POSTROUTING"),
    ("*filter\n:A - [0:0]\n:B - [0:0]\n-A INPUT -j A\n-A A -j B\n-A B -j A\nCOMMIT\n", 6, "Too many links"),
    ("*filter\n:A - [0:0]\n-A INPUT -j A\n-X A\nCOMMIT\n", 4, "Device or resource busy"),
    ("*filter\n:A - [0:0]\n-A A -j ACCEPT\n-X A\nCOMMIT\n", 4, "Device or resource busy"),
    ("*filter\n-X INPUT\nCOMMIT\n", 2, "built-in"),
    ("*filter\n-N A\n-N A\nCOMMIT\n", 3, "Chain already exists"),
    ("*filter\n:MARK - [0:0]\nCOMMIT\n", 2, "clash with target name"),
    ("*filter\n:ABCDEFGHIJKLMNOPQRSTUVWXYZ123 - [0:0]\nCOMMIT\n", 2, "too long"),
    ("*filter\n-D INPUT 1\nCOMMIT\n", 2, "Index of deletion too big"),
    ("*filter\n-I INPUT 2 -j ACCEPT\nCOMMIT\n", 2, "Index of insertion too big"),
    ("*filter\n-D INPUT -j ACCEPT\nCOMMIT\n", 2, "does a matching rule exist"),
    ("*filter\n-A INPUT -s 10.0.0.256\nCOMMIT\n", 2, "host/network `10.0.0.256' not found"),
    ("*filter\n-A INPUT -m statistic --mode nth --every 3\nCOMMIT\n", 2, 'also requires "--packet"'),
    ("*filter\n-A INPUT -m recent --rcheck --reap\nCOMMIT\n", 2, 'also requires "--seconds"'),
    ("*filter\n-A INPUT -m comment ! --comment x\nCOMMIT\n", 2, "cannot be inverted"),
    ("*filter\n-t nat -A INPUT\nCOMMIT\n", 2, "-t option cannot be used"),
])
def test_errors_name_the_line_and_its_text(text, line, reason):
    with pytest.raises(IptablesError) as caught:
        load(text)
    err = caught.value
    assert isinstance(err, ConfigError)
    assert err.line == line
    assert reason in str(err)
    assert f"line {line} failed" in str(err)
    expected_text = text.split("\n")[line - 1].strip()
    if expected_text:
        assert expected_text in str(err)


def test_a_failing_section_changes_nothing_but_earlier_commits_stay():
    rs = load(BASE)
    before = rs.save()
    with pytest.raises(IptablesError, match="line 3 failed"):
        rs.restore("*filter\n-A A -j DROP\n-A A -j NOPE\nCOMMIT\n", noflush=True)
    assert rs.save() == before
    with pytest.raises(IptablesError, match="line 5 failed"):
        rs.restore("*filter\n-A A -j DROP\nCOMMIT\n*nat\n-A OUTPUT -j DROP\nCOMMIT\n", noflush=True)
    assert rules_of(rs)[1:3] == ["-A A -j ACCEPT", "-A A -j DROP"]


def test_test_mode_checks_without_applying():
    rs = load(BASE)
    before = rs.save()
    rs.restore("*filter\n-F\nCOMMIT\n", test=True)
    assert rs.save() == before
    with pytest.raises(IptablesError):
        rs.restore("*filter\n-A INPUT -j NOPE\nCOMMIT\n", test=True)


def test_unreachable_loops_are_allowed_like_the_kernel():
    rs = load("*filter\n:X - [0:0]\n:Y - [0:0]\n-A X -j Y\n-A Y -j X\nCOMMIT\n")
    assert rs.rule_count() == 2
