"""The chain engine on a kube-proxy-shaped ruleset (written by hand from
/work/shared/reference/kube-proxy-iptables.md): evaluation, cost, traces, and — as root, in a scratch
network namespace — the real iptables' verdict on our parser and printers."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import random
import secrets
import subprocess
from dataclasses import dataclass

import pytest

from podnet.core.services.iptables import (
    EvalContext, IptablesError, Ruleset, outcomes_json, trace_first_packet,
)
from podnet.core.services.packetinfo import PacketInfo

MASQ = "0x4000"
POD_CIDR = "10.244.0.0/16"
NODE_IP = "192.168.50.10"


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def chain_hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


@dataclass
class Service:
    namespace: str
    name: str
    port_name: str
    cluster_ip: str
    port: int
    protocol: str
    endpoints: list[tuple[str, int]]
    node_port: int | None = None
    affinity: bool = False

    @property
    def spn(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port_name}"

    @property
    def svc_chain(self) -> str:
        return "KUBE-SVC-" + chain_hash(self.spn + self.protocol)

    @property
    def ext_chain(self) -> str:
        return "KUBE-EXT-" + chain_hash(self.spn + self.protocol)

    def sep_chain(self, endpoint: tuple[str, int]) -> str:
        return "KUBE-SEP-" + chain_hash(f"{self.spn}{self.protocol}{endpoint[0]}:{endpoint[1]}")


def make_services(count: int, seed: int = 7) -> list[Service]:
    """`count` services: most with 1-4 endpoints, every 7th without endpoints, every 5th a NodePort,
    every 11th with ClientIP affinity. The first is kube-dns."""
    rng = random.Random(seed)
    services = [Service("kube-system", "kube-dns", "dns", "10.96.0.10", 53, "udp",
                        [("10.244.0.2", 53), ("10.244.1.3", 53)])]
    for i in range(1, count):
        n_endpoints = 0 if i % 7 == 0 else rng.randint(1, 4)
        endpoints = [(f"10.244.{rng.randint(0, 9)}.{rng.randint(2, 250)}", 8080) for _ in range(n_endpoints)]
        services.append(Service(f"ns{i % 13}", f"svc{i}", "http", f"10.96.{i // 250}.{i % 250 + 1}", 80,
                                "tcp", list(dict.fromkeys(endpoints)),
                                node_port=30000 + i if i % 5 == 0 else None, affinity=i % 11 == 0))
    return services


def kube_proxy_restore(services: list[Service]) -> str:
    """What a full kube-proxy sync writes (plus the built-in jumps it installs with -I)."""
    filt = ["*filter", ":KUBE-SERVICES - [0:0]", ":KUBE-EXTERNAL-SERVICES - [0:0]", ":KUBE-FORWARD - [0:0]",
            ":KUBE-NODEPORTS - [0:0]", ":KUBE-PROXY-FIREWALL - [0:0]", ":KUBE-FIREWALL - [0:0]"]
    filt += [
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
        "-A INPUT -j KUBE-FIREWALL",
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "-A OUTPUT -j KUBE-FIREWALL",
        '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP',
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {MASQ}/{MASQ} -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT',
    ]
    nat_chains = ["*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-POSTROUTING - [0:0]",
                  ":KUBE-MARK-MASQ - [0:0]"]
    nat = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ}/{MASQ} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ}",
    ]
    for svc in services:
        p, spn = svc.protocol, svc.spn
        match = f"-m {p} -p {p} -d {svc.cluster_ip} --dport {svc.port}"
        if not svc.endpoints:
            filt.append(f'-A KUBE-SERVICES -m comment --comment "{spn} has no endpoints" {match} -j REJECT')
            if svc.node_port:
                filt.append(f'-A KUBE-EXTERNAL-SERVICES -m comment --comment "{spn} has no endpoints" '
                            f"-m addrtype --dst-type LOCAL -m {p} -p {p} --dport {svc.node_port} -j REJECT")
            continue
        nat_chains.append(f":{svc.svc_chain} - [0:0]")
        nat.append(f'-A KUBE-SERVICES -m comment --comment "{spn} cluster IP" {match} -j {svc.svc_chain}')
        nat.append(f'-A {svc.svc_chain} -m comment --comment "{spn} cluster IP" {match} ! -s {POD_CIDR} -j KUBE-MARK-MASQ')
        if svc.node_port:
            nat_chains.append(f":{svc.ext_chain} - [0:0]")
            nat.append(f"-A KUBE-NODEPORTS -m comment --comment {spn} -m {p} -p {p} --dport {svc.node_port} -j {svc.ext_chain}")
            nat.append(f'-A {svc.ext_chain} -m comment --comment "masquerade traffic for {spn} external destinations" -j KUBE-MARK-MASQ')
            nat.append(f"-A {svc.ext_chain} -j {svc.svc_chain}")
        n = len(svc.endpoints)
        if svc.affinity:
            for ep in svc.endpoints:
                sep = svc.sep_chain(ep)
                nat.append(f'-A {svc.svc_chain} -m comment --comment "{spn} -> {ep[0]}:{ep[1]}" -m recent '
                           f"--name {sep} --rcheck --seconds 10800 --reap -j {sep}")
        for i, ep in enumerate(svc.endpoints):
            sep = svc.sep_chain(ep)
            stat = f" -m statistic --mode random --probability {1 / (n - i):0.10f}" if i < n - 1 else ""
            nat.append(f'-A {svc.svc_chain} -m comment --comment "{spn} -> {ep[0]}:{ep[1]}"{stat} -j {sep}')
        for ep in svc.endpoints:
            sep = svc.sep_chain(ep)
            nat_chains.append(f":{sep} - [0:0]")
            recent = f" -m recent --name {sep} --set" if svc.affinity else ""
            nat.append(f"-A {sep} -m comment --comment {spn} -s {ep[0]} -j KUBE-MARK-MASQ")
            nat.append(f"-A {sep} -m comment --comment {spn}{recent} -m {p} -p {p} -j DNAT --to-destination {ep[0]}:{ep[1]}")
    nat.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last '
               'rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    return "\n".join(filt + ["COMMIT"] + nat_chains + nat + ["COMMIT", ""])


SERVICES = make_services(300)
KUBE_TEXT = kube_proxy_restore(SERVICES)


def ctx(**kw) -> EvalContext:
    kw.setdefault("local_addresses", frozenset({ip(NODE_IP)}))
    kw.setdefault("rng", random.Random(1))
    return EvalContext(**kw)


@pytest.fixture(scope="module")
def kube() -> Ruleset:
    ruleset = Ruleset()
    ruleset.restore(KUBE_TEXT)
    return ruleset


def with_endpoints(n: int) -> Service:
    return next(s for s in SERVICES if len(s.endpoints) == n and not s.affinity)


# --- evaluation -------------------------------------------------------------------------------------

def test_cluster_ip_is_dnatted_to_an_endpoint_and_the_path_names_every_jump(kube):
    svc = with_endpoints(3)
    pkt = PacketInfo(ip("10.244.5.5"), ip(svc.cluster_ip), 6, 40000, 80, length=60)
    verdict = kube.evaluate("nat", "PREROUTING", pkt, ctx())
    assert verdict.kind == "DNAT"
    assert (verdict.to_ip, verdict.to_port) in {(ip(a), p) for a, p in svc.endpoints}
    position = next(i for i, rule in enumerate(kube.rules("nat", "KUBE-SERVICES"), 1)
                    if rule.target.label == svc.svc_chain)
    assert verdict.path[:2] == ["nat/PREROUTING:1", f"nat/KUBE-SERVICES:{position}"]
    assert verdict.path[-1].startswith("nat/KUBE-SEP-") and verdict.path[-1].endswith(":2")
    assert pkt.mark == 0                          # pod source: no masquerade mark


def test_off_cluster_source_gets_the_masquerade_mark_then_masquerade_in_postrouting(kube):
    svc = with_endpoints(1)
    pkt = PacketInfo(ip("172.16.0.9"), ip(svc.cluster_ip), 6, 40000, 80, length=60)
    assert kube.evaluate("nat", "PREROUTING", pkt, ctx()).kind == "DNAT"
    assert pkt.mark == 0x4000
    post = kube.evaluate("nat", "POSTROUTING", pkt, ctx())
    assert post.kind == "MASQUERADE" and post.random_fully
    assert pkt.mark == 0                          # KUBE-POSTROUTING cleared it with --xor-mark


def test_rules_examined_grows_with_the_position_of_the_service(kube):
    """The walk is linear: a later service costs more rules than an earlier one (no index)."""
    costs = []
    for svc in [s for s in SERVICES if s.endpoints and len(s.endpoints) == 1][:40:10]:
        pkt = PacketInfo(ip("10.244.5.5"), ip(svc.cluster_ip), 6 if svc.protocol == "tcp" else 17, 40000, svc.port)
        costs.append(kube.evaluate("nat", "PREROUTING", pkt, ctx()).rules_examined)
    assert costs == sorted(costs) and costs[0] < costs[-1]
    miss = kube.evaluate("nat", "PREROUTING", PacketInfo(ip("10.244.5.5"), ip("8.8.8.8"), 6, 1, 443), ctx())
    assert miss.kind == "ACCEPT"
    assert miss.rules_examined == 1 + len(kube.rules("nat", "KUBE-SERVICES"))


def test_service_without_endpoints_is_rejected_in_filter(kube):
    svc = next(s for s in SERVICES if not s.endpoints)
    pkt = PacketInfo(ip("10.244.5.5"), ip(svc.cluster_ip), 6, 40000, 80)
    assert kube.evaluate("nat", "PREROUTING", pkt, ctx()).kind == "ACCEPT"
    verdict = kube.evaluate("filter", "FORWARD", pkt, ctx())
    assert verdict.kind == "REJECT" and verdict.reject_with == "icmp-port-unreachable"


def test_kube_dns_split_follows_the_statistic_probabilities():
    ruleset = Ruleset()
    ruleset.restore(KUBE_TEXT)
    dns = SERVICES[0]
    rng = random.Random(42)
    hits = {ip(a): 0 for a, _ in dns.endpoints}
    for _ in range(4000):
        pkt = PacketInfo(ip("10.244.5.5"), ip(dns.cluster_ip), 17, 40000, 53)
        hits[ruleset.evaluate("nat", "PREROUTING", pkt, EvalContext(rng=rng)).to_ip] += 1
    assert all(abs(n / 4000 - 0.5) < 0.03 for n in hits.values())     # 0.03 > 3 sigma (0.024)


# --- traces -----------------------------------------------------------------------------------------

def test_trace_all_branches_lists_every_endpoint_with_its_probability(kube):
    svc = with_endpoints(4)
    pkt = PacketInfo(ip("10.244.5.5"), ip(svc.cluster_ip), 6, 40000, 80)
    outcomes = trace_first_packet(kube, pkt, ctx(), all_branches=True)
    assert [o.destination for o in outcomes] == [f"{a}:{p}" for a, p in svc.endpoints]
    assert all(o.verdict == "DNAT" and not o.masquerade for o in outcomes)
    assert [round(o.probability, 6) for o in outcomes] == [0.25] * 4
    assert sum(o.probability for o in outcomes) == pytest.approx(1.0)
    first = outcomes[0].path
    assert first[0] == "nat/PREROUTING:1" and "filter/FORWARD:policy" in first
    # no masquerade mark: KUBE-POSTROUTING returns at once and POSTROUTING's policy applies
    assert first[-3:] == ["nat/POSTROUTING:1", "nat/KUBE-POSTROUTING:1", "nat/POSTROUTING:policy"]
    json = outcomes_json(outcomes)
    assert set(json["outcomes"][0]) == {"verdict", "destination", "masquerade", "path", "probability"}


def test_trace_of_a_node_port_from_outside_masquerades(kube):
    svc = next(s for s in SERVICES if s.node_port and len(s.endpoints) == 2)
    pkt = PacketInfo(ip("172.16.0.9"), ip(NODE_IP), 6, 40000, svc.node_port)
    outcomes = trace_first_packet(kube, pkt, ctx(), all_branches=True)
    assert len(outcomes) == 2 and all(o.masquerade and o.verdict == "DNAT" for o in outcomes)
    assert any(step.startswith("nat/KUBE-NODEPORTS:") for step in outcomes[0].path)


def test_trace_of_a_locally_sent_packet_uses_nat_output_and_changes_nothing(kube):
    svc = with_endpoints(2)
    before = kube.save(counters=True)
    pkt = PacketInfo(ip(NODE_IP), ip(svc.cluster_ip), 6, 40000, 80)
    (outcome,) = trace_first_packet(kube, pkt, ctx())
    assert outcome.path[0] == "nat/OUTPUT:1" and outcome.verdict == "DNAT"
    assert outcome.masquerade                      # node source is not in the pod CIDR
    assert kube.save(counters=True) == before


def test_trace_follows_client_ip_affinity_once_the_list_holds_the_client():
    ruleset = Ruleset()
    ruleset.restore(KUBE_TEXT)
    svc = next(s for s in SERVICES if s.affinity and len(s.endpoints) >= 2)
    client = ip("10.244.5.5")
    pkt = PacketInfo(client, ip(svc.cluster_ip), 6, 40000, 80)
    assert len(trace_first_packet(ruleset, pkt, ctx(), all_branches=True)) == len(svc.endpoints)
    chosen = ruleset.evaluate("nat", "PREROUTING", PacketInfo(client, ip(svc.cluster_ip), 6, 40000, 80),
                              ctx(now=50.0))
    outcomes = trace_first_packet(ruleset, pkt, ctx(now=60.0), all_branches=True)
    assert [o.destination for o in outcomes] == [f"{ip_text(chosen.to_ip)}:{chosen.to_port}"]
    assert outcomes[0].probability == 1.0
    later = trace_first_packet(ruleset, pkt, ctx(now=50.0 + 10801), all_branches=True)
    assert len(later) == len(svc.endpoints)         # the affinity timed out


def ip_text(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


# --- the real iptables, in a scratch network namespace ------------------------------------------------

@pytest.fixture
def netns():
    name = f"pn-ipt-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def in_ns(ns: str, *argv: str, text: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], input=text, capture_output=True, text=True)


def kernel_restore(ns: str, text: str, *flags: str) -> None:
    done = in_ns(ns, "iptables-restore", *flags, text=text)
    assert done.returncode == 0, done.stderr


def without_comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#")]


@pytest.mark.root
def test_our_save_equals_the_kernels_iptables_save(netns):
    kernel_restore(netns, KUBE_TEXT)
    ours = Ruleset()
    ours.restore(KUBE_TEXT)
    for table in ("filter", "nat"):
        real = in_ns(netns, "iptables-save", "-t", table).stdout
        assert without_comments(ours.save(table)) == without_comments(real)
    assert ours.rule_count() > 1000


@pytest.mark.root
def test_iptables_list_output_is_the_same(netns):
    kernel_restore(netns, KUBE_TEXT)
    ours = Ruleset()
    ours.restore(KUBE_TEXT)
    svc = with_endpoints(3)
    for table, chain in [("nat", "KUBE-SERVICES"), ("nat", svc.svc_chain), ("nat", "KUBE-POSTROUTING"),
                         ("nat", svc.sep_chain(svc.endpoints[0])), ("filter", "KUBE-FORWARD")]:
        for flags in ([], ["-v"], ["-v", "-x", "--line-numbers"]):
            real = in_ns(netns, "iptables", "-t", table, "-L", chain, "-n", *flags).stdout
            mine = ours.list_chain(table, chain, verbose="-v" in flags, exact="-x" in flags,
                                   line_numbers="--line-numbers" in flags)
            assert mine == real, (table, chain, flags)
    for table in ("filter", "nat"):
        assert ours.list_table(table, verbose=True) == in_ns(netns, "iptables", "-t", table, "-L", "-n", "-v").stdout


@pytest.mark.root
def test_the_kernel_accepts_our_save_output_and_gives_it_back_unchanged(netns):
    ours = Ruleset()
    ours.restore(KUBE_TEXT)
    saved = ours.save(header="test")
    tested = in_ns(netns, "iptables-restore", "--test", text=saved)
    assert tested.returncode == 0, tested.stderr
    kernel_restore(netns, saved)
    assert without_comments(in_ns(netns, "iptables-save").stdout) == without_comments(saved)


@pytest.mark.root
def test_counters_and_a_partial_noflush_sync_match_the_kernel(netns):
    kernel_restore(netns, KUBE_TEXT)
    ours = Ruleset()
    ours.restore(KUBE_TEXT)
    svc = with_endpoints(2)
    stale = svc.sep_chain(svc.endpoints[1])
    partial = "\n".join([
        "*nat", ":KUBE-SERVICES - [0:0]", f":{svc.svc_chain} - [0:0]", f":{stale} - [0:0]",
        f"[7:420] -A KUBE-SERVICES -d {svc.cluster_ip}/32 -p tcp -m comment --comment \"{svc.spn} cluster IP\" "
        f"-m tcp --dport 80 -j {svc.svc_chain}",
        f"[3:180] -A {svc.svc_chain} -j {svc.sep_chain(svc.endpoints[0])}",
        f"-X {stale}", "-I KUBE-SERVICES 1 -p udp -j RETURN", "-I KUBE-SERVICES 1 -p sctp -j RETURN",
        "COMMIT", ""])
    # (iptables-nft cannot -D a rule added earlier in the same transaction, so edits come separately)
    edits = "*nat\n-D KUBE-SERVICES 1\n-R KUBE-SERVICES 2 -s 10.0.0.0/8 -j RETURN\n-Z KUBE-SERVICES\nCOMMIT\n"
    for text, flags in ((partial, ("--noflush", "--counters")), (edits, ("--noflush",))):
        kernel_restore(netns, text, *flags)
        ours.restore(text, noflush=True, counters="--counters" in flags)
    real = in_ns(netns, "iptables-save", "-c", "-t", "nat").stdout
    assert without_comments(ours.save("nat", counters=True)) == without_comments(real)
    real_list = in_ns(netns, "iptables", "-t", "nat", "-L", "-n", "-v", "-x").stdout
    assert ours.list_table("nat", verbose=True, exact=True) == real_list


# What iptables-restore accepts and refuses: we must agree with it line by line.
VERDICT_CASES = [
    ("filter", "-A INPUT -p tcp --dport 80 -j ACCEPT"),
    ("filter", "-A INPUT --dport 80 -j ACCEPT"),
    ("filter", "-A INPUT -m tcp --dport 80 -j ACCEPT"),
    ("filter", "-A INPUT -p udp -m multiport --dports 1,2:5 -j ACCEPT"),
    ("filter", "-A INPUT -m multiport --dports 1 -j ACCEPT"),
    ("filter", "-A INPUT -p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16 -j ACCEPT"),
    ("filter", "-A INPUT -o eth0 -j ACCEPT"),
    ("filter", "-A OUTPUT -i eth0 -j ACCEPT"),
    ("filter", "-A INPUT -j REJECT --reject-with tcp-reset"),
    ("filter", "-A INPUT -p tcp -j REJECT --reject-with tcp-reset"),
    ("filter", "-A INPUT -j DNAT --to-destination 1.2.3.4"),
    ("nat", "-A PREROUTING -j DROP"),
    ("nat", "-A POSTROUTING -j REJECT"),
    ("nat", "-A INPUT -j DNAT --to-destination 1.2.3.4"),
    ("nat", "-A INPUT -j SNAT --to-source 1.2.3.4"),
    ("nat", "-A OUTPUT -j MASQUERADE"),
    ("nat", "-A PREROUTING -j DNAT --to-destination 1.2.3.4:80"),
    ("nat", "-A PREROUTING -p tcp -j DNAT --to-destination 1.2.3.4:80"),
    ("nat", "-A PREROUTING -j NOPE"),
    ("nat", "-A PREROUTING -m nope -j ACCEPT"),
    ("filter", "-A INPUT -m statistic --mode random --probability 1.5 -j ACCEPT"),
    ("filter", "-A INPUT -m statistic --mode nth --every 3 --packet 3 -j ACCEPT"),
    ("filter", "-A INPUT -m statistic --mode nth --every 3 -j ACCEPT"),
    ("filter", "-A INPUT -m recent --rcheck --reap -j ACCEPT"),
    ("filter", "-A INPUT -m recent --set --rcheck -j ACCEPT"),
    ("filter", "-A INPUT -m mark --mark 0x1/0x1/0x1 -j ACCEPT"),
    ("filter", "-A INPUT -s 10.0.0.1/33 -j ACCEPT"),
    ("filter", "-A INPUT -j MARK"),
    ("filter", "-A INPUT -j MARK --set-mark 1 --or-mark 2"),
    ("filter", "-A INPUT ! -p all -j ACCEPT"),
    ("filter", "-N MARK"),
    ("filter", "-N ABCDEFGHIJKLMNOPQRSTUVWXYZ123"),
    ("filter", "-A INPUT -m comment --comment \"unterminated"),
    ("filter", "-A INPUT -g ACCEPT"),
    ("filter", "-I INPUT 2 -j ACCEPT"),
    ("filter", "-D INPUT -j ACCEPT"),
    ("filter", "-X INPUT"),
    ("filter", ":A - [0:0]\n:B - [0:0]\n-A INPUT -j A\n-A A -j B\n-A B -j A"),
    ("filter", ":A - [0:0]\n:B - [0:0]\n-A A -j B\n-A B -j A"),
    ("filter", ":A - [0:0]\n-A INPUT -j A\n-X A"),
    ("filter", ":A - [0:0]\n-A A -j ACCEPT\n-X A"),
]


@pytest.mark.root
@pytest.mark.parametrize("table, lines", VERDICT_CASES)
def test_we_accept_and_refuse_what_iptables_restore_does(netns, table, lines):
    text = f"*{table}\n{lines}\nCOMMIT\n"
    kernel_ok = in_ns(netns, "iptables-restore", text=text).returncode == 0
    try:
        Ruleset().restore(text)
        ours_ok = True
    except IptablesError:
        ours_ok = False
    assert ours_ok == kernel_ok


# Every match and target we print, in the forms iptables-save and iptables -L give back.
ZOO = r"""*filter
:INPUT DROP [3:300]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [123456:99999999999]
:ZED - [0:0]
:ALPHA - [0:0]
:a-lower - [0:0]
[7:700] -A INPUT -p tcp -m comment --comment x --dport 80 -j ACCEPT
[99999:100000] -A INPUT -p tcp --dport 80 -m comment --comment "a \"quoted\" it's" -i eth0+ -s 10.1.2.3/8 -j REJECT
[12345678:1234567890123] -A FORWARD -d 0.0.0.0/0 -o lo -j REJECT --reject-with tcp-reset -p tcp
[9999499:9999500] -A FORWARD ! -i veth+ ! -o eth1 -p udp -j REJECT --reject-with icmp-net-unreachable
-A INPUT -j REJECT --reject-with icmp-host-unreachable
-A INPUT -j REJECT --reject-with icmp-proto-unreachable
-A INPUT -j REJECT --reject-with icmp-net-prohibited
-A INPUT -j REJECT --reject-with icmp-host-prohibited
-A INPUT -j REJECT --reject-with admin-prohib
-A INPUT -p tcp --syn -j ZED
-A INPUT -p tcp ! --tcp-flags SYN,ACK ACK --sport 1000:2000 ! --dport 22 -g ZED
-A INPUT -p tcp -m tcp --tcp-flags ALL NONE -j ACCEPT
-A INPUT -p tcp -m tcp --tcp-flags FIN,ACK,PSH ALL -j ACCEPT
-A INPUT -p sctp --sport 5 --dport 6 -j ALPHA
-A INPUT -p sctp -m sctp ! --sport 1:2 ! --dport 0:65535 -j ACCEPT
-A INPUT -p udp -m udp ! --sport 1:2 ! --dport 3 -j ACCEPT
-A INPUT -p udp -m multiport ! --dports 1,2:5 -j ACCEPT
-A INPUT -p udp -m multiport --ports 7,8 -j ACCEPT
-A INPUT -p tcp -m multiport --sports 1:65535 -j ACCEPT
-A INPUT -m state --state ESTABLISHED,RELATED -j ACCEPT
-A INPUT -m state ! --state INVALID,NEW,UNTRACKED -j ACCEPT
-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED,INVALID,NEW,UNTRACKED,SNAT,DNAT -j ACCEPT
-A INPUT -m conntrack --ctstate NEW -m conntrack ! --ctstate SNAT -j ACCEPT
-A INPUT -m mark --mark 0x10 -j ACCEPT
-A INPUT -m mark ! --mark 16/0xff -j ACCEPT
-A INPUT -m addrtype --dst-type LOCAL,UNICAST -j ACCEPT
-A INPUT -m addrtype ! --src-type MULTICAST ! --dst-type BROADCAST -j ACCEPT
-A INPUT -m recent --name FOO --update --seconds 60 --hitcount 3 --rttl --rdest -j DROP
-A INPUT -m recent --remove -j DROP
-A INPUT -m recent ! --rcheck --mask 255.255.0.0 -j DROP
-A INPUT -m recent --set --name A -m recent ! --update --name B --seconds 5 --hitcount 2 --reap --rttl -j ACCEPT
-A INPUT -m statistic --mode random ! --probability 0.1 -j DROP
-A INPUT -m statistic --mode random --probability 0.0000099999 -j DROP
-A INPUT -m statistic --mode nth --every 2 --packet 0 -j DROP
-A INPUT -m statistic --mode nth ! --every 5 --packet 4 -j DROP
-A INPUT -p 47 -j DROP
-A INPUT ! -p tcp -j DROP
-A INPUT -s 1.1.1.1,2.2.2.0/24 -d 3.3.3.3 -j DROP
-A INPUT -s 10.0.0.0/255.255.0.255 -j DROP
-A INPUT -m comment --comment "" -j DROP
-A INPUT -m comment --comment "tab	and \\ backslash"
-A ALPHA -m mark --mark 0x1/0xffffffff
-A ZED -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:SEP - [0:0]
-A PREROUTING -p tcp -j DNAT --to-destination 10.0.0.1-10.0.0.5:80-90 --random --persistent
-A PREROUTING -p tcp -j DNAT --to-destination 10.0.0.1:80
-A PREROUTING -j DNAT --to-destination 10.0.0.1
-A OUTPUT -p udp -j DNAT --to-destination :53
-A POSTROUTING -j SNAT --to-source 1.2.3.4 --random-fully
-A POSTROUTING -p tcp -j SNAT --to-source 1.2.3.4:1000-2000 --random
-A POSTROUTING -p tcp -j MASQUERADE --to-ports 1000-2000 --random
-A POSTROUTING -j MASQUERADE
-A POSTROUTING -j MARK --and-mark 0xff
-A POSTROUTING -j MARK --set-mark 0x1/0x3
-A POSTROUTING -j MARK --set-xmark 0x0/0x0
-A POSTROUTING -j MARK --set-xmark 0x5
-A SEP -j ACCEPT
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j MARK --set-mark 5
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j ACCEPT
COMMIT
"""


@pytest.mark.root
def test_every_match_and_target_prints_as_the_kernel_gives_it_back(netns):
    kernel_restore(netns, ZOO, "--counters")
    ours = Ruleset()
    ours.restore(ZOO, counters=True)
    real_save = in_ns(netns, "iptables-save", "-c").stdout
    assert without_comments(ours.save(counters=True)) == without_comments(real_save)
    for table in ("filter", "nat", "mangle", "raw"):
        for flags in (["-n"], ["-n", "-v"], ["-n", "-v", "-x", "--line-numbers"]):
            real = in_ns(netns, "iptables", "-t", table, "-L", *flags).stdout
            assert ours.list_table(table, verbose="-v" in flags, exact="-x" in flags,
                                   line_numbers="--line-numbers" in flags) == real, (table, flags)
    # without -n: protocol names, "anywhere", "any" (ports would be /etc/services names: none here)
    real = in_ns(netns, "iptables", "-t", "nat", "-L", "-v").stdout
    assert ours.list_table("nat", numeric=False, verbose=True) == real
    tested = in_ns(netns, "iptables-restore", "--test", "--counters", text=ours.save(counters=True))
    assert tested.returncode == 0, tested.stderr
