"""kube-proxy's own unit tests, replayed against podnet's generator.

The expected dumps below are the expected rule texts of kubernetes/kubernetes
pkg/proxy/iptables/proxier_test.go (each block names its test function). Upstream compares them
with `assertIPTablesRulesEqual`, which leaves the expected text as written and normalises the
generated payload with `sortIPTablesRules` (tables by name; chains KUBE-NODEPORTS, KUBE-SERVICES,
other KUBE-* alphabetically, then the rest; rules grouped under their chain; KUBE-NODEPORTS and
KUBE-SERVICES rules stably sorted by the service name in their comment, the "must be the last
rule" rule kept last; `-X` lines after all rules). `sort_iptables_rules` below does the same to our
payload. Packet-flow tests (test_kubeproxy_flows.py) use the port of upstream's `tracePacket` kept here.

Two settings differ between kube-proxy's NewFakeProxier and a real node, and `fake_proxier()`
reproduces the fake: the fake iptables has no --random-fully, and both nfacct counters exist. The
fake also hard-codes the mark as "0x4000" where NewProxier formats it with "%#08x" ("0x00004000"),
so the expected texts are converted (`upstream()`) rather than the generator bent.
"""

from __future__ import annotations

import ipaddress
import re
import textwrap
from dataclasses import dataclass, field

import pytest

from podnet.core.services.kubeproxy import KubeProxyIptables, ProxyEndpoint, ProxyServicePort

# Conventions of proxier_test.go: pod IPs 10.0.0.0/8, ClusterIPs 172.30.0.0/16, node IP
# 192.168.0.2 (+ 192.168.1.2 and the external IP 192.168.99.11 on the same interface),
# LB IPs 1.2.3.4 / 5.6.7.8 / 9.10.11.12, external clients 203.0.113.0/24, LB source range
# 203.0.113.0/25.
TEST_NODE_IP = "192.168.0.2"
TEST_NODE_IP_ALT = "192.168.1.2"
TEST_EXTERNAL_IP = "192.168.99.11"
TEST_NODE_IPS = (TEST_NODE_IP, TEST_NODE_IP_ALT, TEST_EXTERNAL_IP, "2001:db8::1", "2001:db8:1::2")
TEST_EXTERNAL_CLIENT = "203.0.113.2"
TEST_EXTERNAL_CLIENT_BLOCKED = "203.0.113.130"

E = ProxyEndpoint


def fake_proxier(**overrides) -> KubeProxyIptables:
    """NewFakeProxier's settings."""
    kwargs = dict(cluster_cidr="10.0.0.0/8", node_ips=TEST_NODE_IPS, random_fully=False, nfacct=True)
    kwargs.update(overrides)
    return KubeProxyIptables(**kwargs)


def svc(ns: str, name: str, port_name: str, cluster_ip: str, port: int, *endpoints: ProxyEndpoint,
        protocol: str = "TCP", **kw) -> ProxyServicePort:
    return ProxyServicePort(ns, name, port_name, protocol, cluster_ip, port, endpoints=endpoints, **kw)


def upstream(text: str) -> str:
    """An expected dump as written in proxier_test.go, with NewProxier's mark text."""
    return textwrap.dedent(text).lstrip("\n").replace("0x4000", "0x00004000")


# -- ports of the upstream test helpers ------------------------------------------------------

WORD_RE = re.compile(r'(?:^|\s)("[^"]*"|[^"]\S*)')   # parse.go wordRegex
VALUE_PARAMS = frozenset({"-A", "--comment", "-p", "-s", "--src-type", "--sport", "-d", "--dst-type", "--dport",
                          "--match-set", "-j", "--probability", "--to-destination", "--mark", "--ctstate",
                          "--name", "--seconds", "--mode"})
BOOL_PARAMS = frozenset({"--random-fully", "--rcheck", "--set", "--reap"})


@dataclass
class Chain:
    name: str
    rules: list[str] = field(default_factory=list)
    deleted: bool = False


def parse_restore(text: str) -> dict[str, dict[str, Chain]]:
    """iptables-restore input as tables of chains (ParseIPTablesDump; a repeated table is merged,
    and a repeated chain line flushes the chain, as iptables-restore does)."""
    tables: dict[str, dict[str, Chain]] = {}
    table: dict[str, Chain] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = tables.setdefault(line[1:], {})
        elif line == "COMMIT":
            table = None
        elif table is None:
            raise AssertionError(f"line outside a table: {line!r}")
        elif line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name in table:
                table[name].rules.clear()
                table[name].deleted = False
            else:
                table[name] = Chain(name)
        elif line.startswith("-A "):
            chain = table[line.split(" ", 2)[1]]           # KeyError: rule for an undeclared chain
            assert not chain.deleted, f"rule added to deleted chain: {line}"
            chain.rules.append(line)
        elif line.startswith("-X "):
            chain = table[line.split(" ", 1)[1]]
            assert not chain.rules, f"cannot delete chain {chain.name} after adding rules"
            chain.deleted = True
        else:
            raise AssertionError(f"unparsable line {line!r}")
    assert table is None, "no COMMIT at the end"
    return tables


def parse_rule(rule: str) -> dict[str, tuple[bool, str | bool]]:
    """parse.go ParseRule, non-strict: {param: (negated, value)}; "-m MODULE" is skipped."""
    words = [m.group(1).strip('"') for m in WORD_RE.finditer(rule)]
    out: dict[str, tuple[bool, str | bool]] = {}
    negated = False
    w = 0
    while w < len(words):
        word = words[w]
        if word == "-m" and w < len(words) - 1:
            w += 2
            continue
        if word == "!":
            negated = True
            w += 1
            continue
        if word in VALUE_PARAMS:
            out[word] = (negated, words[w + 1])
            w += 2
        elif word in BOOL_PARAMS:
            out[word] = (negated, not negated)
            w += 1
        else:
            w += 1
        negated = False
    return out


def _service_name(rule: str) -> str:
    comment = parse_rule(rule).get("--comment")
    assert comment is not None, f"rule without a comment in a sorted chain: {rule}"
    return re.split(r"[ :]", str(comment[1]), maxsplit=1)[0]


def _chain_order(name: str) -> tuple[int, str]:
    if name == "KUBE-NODEPORTS":
        return (0, "")
    if name == "KUBE-SERVICES":
        return (1, "")
    return (2, name) if name.startswith("KUBE-") else (3, name)


def sort_iptables_rules(payload: str) -> str:
    """proxier_test.go sortIPTablesRules followed by IPTablesDump.String()."""
    tables = parse_restore(payload)
    out: list[str] = []
    for table_name in sorted(tables):
        chains = sorted(tables[table_name].values(), key=lambda c: _chain_order(c.name))
        for chain in chains:
            if chain.name == "KUBE-NODEPORTS" or (chain.name == "KUBE-SERVICES" and table_name == "filter"):
                chain.rules.sort(key=_service_name)
            elif chain.name == "KUBE-SERVICES":
                chain.rules.sort(key=lambda r: (1, "") if "must be the last rule" in r else (0, _service_name(r)))
        out.append(f"*{table_name}")
        out += [f":{c.name} - [0:0]" for c in chains]
        out += [rule for c in chains for rule in c.rules]
        out += [f"-X {c.name}" for c in chains if c.deleted]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def check_rule_jumps(payload: str) -> None:
    """proxier_test.go checkIPTablesRuleJumps: every jump goes to a created chain that has rules,
    and every created chain is used (top-level chains excepted)."""
    builtin_targets = {"ACCEPT", "REJECT", "DROP", "MARK", "RETURN", "DNAT", "SNAT", "MASQUERADE"}
    top_level = {"KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-FORWARD",
                 "KUBE-MARK-MASQ", "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL"}
    for table_name, chains in parse_restore(payload).items():
        created = {c.name for c in chains.values() if not c.deleted}
        filled = {c.name for c in chains.values() if c.rules}
        jumped = {str(parse_rule(r)["-j"][1]) for c in chains.values() for r in c.rules if "-j" in parse_rule(r)}
        jumped -= builtin_targets
        assert not (jumped - created), f"{table_name}: jumps to chains not created: {jumped - created}"
        assert not (jumped - filled - {"KUBE-NODEPORTS"}), f"{table_name}: jumps to empty chains"
        assert not (created - jumped - top_level), f"{table_name}: created but unused: {created - jumped - top_level}"


def assert_rules_equal(expected: str, payload: str, *, consistent: bool = True) -> None:
    assert sort_iptables_rules(payload) == upstream(expected)
    if consistent:
        check_rule_jumps(payload)


def chain_rules(payload: str, table: str, chain: str) -> list[str]:
    """assertIPTablesChainEqual's view: the rules of one chain, in order."""
    found = parse_restore(payload)[table].get(chain)
    return list(found.rules) if found else []


def _address_matches(value: tuple[bool, str | bool], ip: str) -> bool:
    negated, text = value
    addr = ipaddress.ip_address(ip)
    if "/" in str(text):
        net = ipaddress.ip_network(str(text))
        matches = addr.version == net.version and addr in net
    else:
        matches = addr == ipaddress.ip_address(str(text))
    return matches != negated


def _value_matches(value: tuple[bool, str | bool], have: str) -> bool:
    negated, text = value
    return (text == have) != negated


class Tracer:
    """proxier_test.go iptablesTracer: follows a NEW packet through nat PREROUTING, then the
    interesting filter chains; probabilistic jumps are all followed."""

    def __init__(self, ruleset: str, node_ips: tuple[str, ...] = TEST_NODE_IPS) -> None:
        self.tables = parse_restore(ruleset)
        self.local_ips = {"127.0.0.1", "::1", *node_ips}

    def _matches(self, p, src: str, proto: str, dst: str, dport: str) -> bool:
        if "-s" in p and not _address_matches(p["-s"], src):
            return False
        if "--src-type" in p and not _value_matches(p["--src-type"], "LOCAL" if src in self.local_ips else "x"):
            return False
        if "-p" in p and not _value_matches(p["-p"], proto):
            return False
        if "-d" in p and not _address_matches(p["-d"], dst):
            return False
        if "--dst-type" in p and not _value_matches(p["--dst-type"], "LOCAL" if dst in self.local_ips else "x"):
            return False
        if "--dport" in p and not _value_matches(p["--dport"], dport):
            return False
        # rules that look at history (affinity, marks, conntrack) never match a first packet here
        return not ("--rcheck" in p or "--mark" in p or "--ctstate" in p)

    def _run(self, table: str, chain: str, state: dict, src: str, proto: str, dst: str, dport: str) -> bool:
        found = self.tables.get(table, {}).get(chain)
        if found is None:
            return False
        for rule in found.rules:
            p = parse_rule(rule)
            if "-j" not in p or not self._matches(p, src, proto, dst, dport):
                continue
            state["matches"].append(rule)
            target = str(p["-j"][1])
            if target == "KUBE-MARK-MASQ":
                state["masq"] = True
            elif target in ("ACCEPT", "REJECT", "DROP"):
                state["outputs"].append(target)
                return True
            elif target == "DNAT":
                state["outputs"].append(str(p["--to-destination"][1]))
                return True
            elif self._run(table, target, state, src, proto, dst, dport) and "--probability" not in p:
                return True
        return False

    def trace(self, src: str, dst: str, dport: int, proto: str = "tcp") -> tuple[str, bool, list[str]]:
        state: dict = {"matches": [], "outputs": [], "masq": False}
        self._run("nat", "PREROUTING", state, src, proto, dst, str(dport))
        if state["outputs"]:
            dst = state["outputs"][0].split(":")[0]
        for chain in ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL"):
            self._run("filter", chain, state, src, proto, dst, str(dport))
        return ", ".join(state["outputs"]), state["masq"], state["matches"]


def tracer_for(kp: KubeProxyIptables, services) -> Tracer:
    payload = kp.sync(services, full=True).payload
    return Tracer(kp.jump_rules_restore() + payload)


def run_flows(tracer: Tracer, flows) -> None:
    """runPacketFlowTests: (name, source, dest, port, output, masq[, protocol])."""
    failures = []
    for name, src, dst, port, output, masq, *proto in flows:
        got, got_masq, matched = tracer.trace(src, dst, port, *(p.lower() for p in proto))
        if (got, got_masq) != (output, masq):
            failures.append(f"{name}: expected {output!r} masq={masq}, got {got!r} masq={got_masq}\n  "
                            + "\n  ".join(matched))
    assert not failures, "\n".join(failures)


# -- TestOverallIPTablesRules ---------------------------------------------------------------

def overall_services() -> list[ProxyServicePort]:
    return [
        # ClusterIP service
        svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.0.1", 80)),
        # LoadBalancer, Local traffic policy; its only endpoint is on another node
        svc("ns2", "svc2", "p80", "172.30.0.42", 80, E("10.180.0.2", 80), node_port=3001,
            load_balancer_ips=("1.2.3.4",), external_ips=("192.168.99.22",), external_policy_local=True,
            health_check_node_port=30000),
        # NodePort
        svc("ns3", "svc3", "p80", "172.30.0.43", 80, E("10.180.0.3", 80), node_port=3003),
        # ExternalIP
        svc("ns4", "svc4", "p80", "172.30.0.44", 80, E("10.180.0.4", 80), E("10.180.0.5", 80, is_local=True),
            external_ips=("192.168.99.33",)),
        # LoadBalancer, Cluster policy, source ranges, ClientIP affinity (its healthCheckNodePort is
        # ignored by kube-proxy since the policy is Cluster, so it is not part of the port's view)
        svc("ns5", "svc5", "p80", "172.30.0.45", 80, E("10.180.0.3", 80), node_port=3002,
            load_balancer_ips=("5.6.7.8",), source_ranges=(" 203.0.113.0/25",), affinity_timeout_s=10800),
        # ClusterIP without endpoints
        svc("ns6", "svc6", "p80", "172.30.0.46", 80),
    ]


OVERALL_EXPECTED = """
    *filter
    :KUBE-NODEPORTS - [0:0]
    :KUBE-SERVICES - [0:0]
    :KUBE-EXTERNAL-SERVICES - [0:0]
    :KUBE-FIREWALL - [0:0]
    :KUBE-FORWARD - [0:0]
    :KUBE-PROXY-FIREWALL - [0:0]
    -A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
    -A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
    -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j DROP
    -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
    -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
    -A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
    -A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    -A KUBE-PROXY-FIREWALL -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP
    COMMIT
    *nat
    :KUBE-NODEPORTS - [0:0]
    :KUBE-SERVICES - [0:0]
    :KUBE-EXT-4SW47YFZTEDKD3PK - [0:0]
    :KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
    :KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
    :KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-MARK-MASQ - [0:0]
    :KUBE-POSTROUTING - [0:0]
    :KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
    :KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
    :KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
    :KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
    :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
    :KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
    :KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
    :KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
    :KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
    :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
    -A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3001 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3003 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-X27LE4BHSL4DOUIK
    -A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
    -A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3002 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-NUKIZ6OKUXPJNT4C
    -A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
    -A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
    -A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 external IP" -m tcp -p tcp -d 192.168.99.33 --dport 80 -j KUBE-EXT-4SW47YFZTEDKD3PK
    -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
    -A KUBE-EXT-4SW47YFZTEDKD3PK -m comment --comment "masquerade traffic for ns4/svc4:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-4SW47YFZTEDKD3PK -j KUBE-SVC-4SW47YFZTEDKD3PK
    -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
    -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
    -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
    -A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
    -A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
    -A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
    -A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
    -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
    -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
    -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
    -A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
    -A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
    -A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
    -A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
    -A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
    -A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
    -A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
    -A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
    -A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
    -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
    -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
    -A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
    -A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
    -A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap -j KUBE-SEP-I77PXRDZVX7PMWMN
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
    -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
    -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
    COMMIT
    """


def test_overall_iptables_rules():
    """TestOverallIPTablesRules: ClusterIP, eTP=Local LB without local endpoints, NodePort,
    externalIP, LB with source ranges and affinity, and a service without endpoints."""
    kp = fake_proxier()
    result = kp.sync(overall_services(), full=True)
    assert_rules_equal(OVERALL_EXPECTED, result.payload)
    # countRulesFromMetric == countRules(nat)
    nat_rules = sum(len(c.rules) for c in parse_restore(result.payload)["nat"].values())
    assert result.statistics.nat_rules_total == result.statistics.nat_rules_written == nat_rules


def test_overall_rules_are_independent_of_input_order():
    kp1, kp2 = fake_proxier(), fake_proxier()
    services = overall_services()
    assert kp1.sync(services, full=True).payload == kp2.sync(reversed(services), full=True).payload


# -- TestSyncProxyRulesRepeated (partial syncs) ---------------------------------------------

REPEATED_FILTER = """
    *filter
    :KUBE-NODEPORTS - [0:0]
    :KUBE-SERVICES - [0:0]
    :KUBE-EXTERNAL-SERVICES - [0:0]
    :KUBE-FIREWALL - [0:0]
    :KUBE-FORWARD - [0:0]
    :KUBE-PROXY-FIREWALL - [0:0]
    {kube_services}-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
    -A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    COMMIT
    """
REPEATED_NAT_HEAD = """
    *nat
    :KUBE-NODEPORTS - [0:0]
    :KUBE-SERVICES - [0:0]
    :KUBE-MARK-MASQ - [0:0]
    :KUBE-POSTROUTING - [0:0]
    """
REPEATED_NAT_FIXED = """
    -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
    -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
    -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
    -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
    -A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
    """
SVC1_RULE = ('-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 '
             "--dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O")
SVC2_RULE = ('-A KUBE-SERVICES -m comment --comment "ns2/svc2:p8080 cluster IP" -m tcp -p tcp -d 172.30.0.42 '
             "--dport 8080 -j KUBE-SVC-2VJB64SDSIJUP5T6")
SVC3_RULE = ('-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 '
             "--dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK")
SVC4_RULE = ('-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 '
             "--dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK")


def repeated_expected(chains: str, services_rules: list[str], rules: str, filter_services: str = "") -> str:
    """One expected dump of TestSyncProxyRulesRepeated, assembled from its literal lines: the
    filter table and the fixed nat rules are the same in every step."""
    fixed = textwrap.dedent(REPEATED_NAT_FIXED).strip().splitlines()
    nat_lines = (textwrap.dedent(REPEATED_NAT_HEAD).strip().splitlines()
                 + textwrap.dedent(chains).strip().splitlines()
                 + services_rules + fixed + textwrap.dedent(rules).strip().splitlines() + ["COMMIT"])
    filter_text = textwrap.dedent(REPEATED_FILTER).strip().format(
        kube_services=filter_services + "\n" if filter_services else "")
    return "\n".join([*filter_text.splitlines(), *(line for line in nat_lines if line)]) + "\n"


def test_sync_proxy_rules_repeated():
    """TestSyncProxyRulesRepeated: partial syncs rewrite only changed services' chains, stale
    chains are flushed and deleted, and a failed partial restore is followed by a full sync."""
    kp = fake_proxier()
    svc1 = svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.0.1.1", 80))
    svc2 = svc("ns2", "svc2", "p8080", "172.30.0.42", 8080, E("10.0.2.1", 8080))
    totals = []

    def sync(services, **kw):
        result = kp.sync(services, full=False, **kw)
        nat_rules = sum(len(c.rules) for c in parse_restore(result.payload)["nat"].values())
        assert result.statistics.nat_rules_written == nat_rules          # ..._iptables_last
        totals.append(result.statistics.nat_rules_total)                 # ..._iptables_total
        return result

    # The first sync is full even when a partial one is asked for (needFullSync).
    result = sync([svc1, svc2])
    assert result.full
    assert_rules_equal(repeated_expected("""
        :KUBE-SEP-SNQ3ZNILQDEJNDQO - [0:0]
        :KUBE-SEP-UHEGFW77JX3KXTOV - [0:0]
        :KUBE-SVC-2VJB64SDSIJUP5T6 - [0:0]
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        """, [SVC1_RULE, SVC2_RULE], """
        -A KUBE-SEP-SNQ3ZNILQDEJNDQO -m comment --comment ns1/svc1:p80 -s 10.0.1.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SNQ3ZNILQDEJNDQO -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.1.1:80
        -A KUBE-SEP-UHEGFW77JX3KXTOV -m comment --comment ns2/svc2:p8080 -s 10.0.2.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-UHEGFW77JX3KXTOV -m comment --comment ns2/svc2:p8080 -m tcp -p tcp -j DNAT --to-destination 10.0.2.1:8080
        -A KUBE-SVC-2VJB64SDSIJUP5T6 -m comment --comment "ns2/svc2:p8080 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 8080 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-2VJB64SDSIJUP5T6 -m comment --comment "ns2/svc2:p8080 -> 10.0.2.1:8080" -j KUBE-SEP-UHEGFW77JX3KXTOV
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.0.1.1:80" -j KUBE-SEP-SNQ3ZNILQDEJNDQO
        """), result.payload)

    # Add a service and its endpoints: only its SVC and SEP chains are written.
    svc3 = svc("ns3", "svc3", "p80", "172.30.0.43", 80, E("10.0.3.1", 80))
    result = sync([svc1, svc2, svc3])
    assert not result.full
    assert_rules_equal(repeated_expected("""
        :KUBE-SEP-BSWRHOQ77KEXZLNL - [0:0]
        :KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
        """, [SVC1_RULE, SVC2_RULE, SVC3_RULE], """
        -A KUBE-SEP-BSWRHOQ77KEXZLNL -m comment --comment ns3/svc3:p80 -s 10.0.3.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-BSWRHOQ77KEXZLNL -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.1:80
        -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.1:80" -j KUBE-SEP-BSWRHOQ77KEXZLNL
        """), result.payload, consistent=False)

    # Delete a service: its chains are declared (flushed) and removed; nothing else rewritten.
    result = sync([svc1, svc3])
    assert_rules_equal(repeated_expected("""
        :KUBE-SEP-UHEGFW77JX3KXTOV - [0:0]
        :KUBE-SVC-2VJB64SDSIJUP5T6 - [0:0]
        """, [SVC1_RULE, SVC3_RULE], """
        -X KUBE-SEP-UHEGFW77JX3KXTOV
        -X KUBE-SVC-2VJB64SDSIJUP5T6
        """), result.payload, consistent=False)
    assert result.chains_deleted == ("KUBE-SEP-UHEGFW77JX3KXTOV", "KUBE-SVC-2VJB64SDSIJUP5T6")

    # A service without endpoints: only the filter REJECT rule.
    svc4 = svc("ns4", "svc4", "p80", "172.30.0.44", 80)
    result = sync([svc1, svc3, svc4])
    assert_rules_equal(repeated_expected("", [SVC1_RULE, SVC3_RULE], "", filter_services=(
        '-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 has no endpoints" -m tcp -p tcp '
        "-d 172.30.0.44 --dport 80 -j REJECT")), result.payload, consistent=False)

    # ...then its endpoints arrive.
    svc4 = svc("ns4", "svc4", "p80", "172.30.0.44", 80, E("10.0.4.1", 80))
    result = sync([svc1, svc3, svc4])
    assert_rules_equal(repeated_expected("""
        :KUBE-SEP-AYCN5HPXMIRJNJXU - [0:0]
        :KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
        """, [SVC1_RULE, SVC3_RULE, SVC4_RULE], """
        -A KUBE-SEP-AYCN5HPXMIRJNJXU -m comment --comment ns4/svc4:p80 -s 10.0.4.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-AYCN5HPXMIRJNJXU -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.4.1:80
        -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.0.4.1:80" -j KUBE-SEP-AYCN5HPXMIRJNJXU
        """), result.payload, consistent=False)

    # Change an endpoint: the service's SVC and SEP chains are rewritten, the old SEP removed.
    svc3 = svc("ns3", "svc3", "p80", "172.30.0.43", 80, E("10.0.3.2", 80))
    result = sync([svc1, svc3, svc4])
    assert_rules_equal(repeated_expected("""
        :KUBE-SEP-BSWRHOQ77KEXZLNL - [0:0]
        :KUBE-SEP-DKCFIS26GWF2WLWC - [0:0]
        :KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
        """, [SVC1_RULE, SVC3_RULE, SVC4_RULE], """
        -A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -s 10.0.3.2 -j KUBE-MARK-MASQ
        -A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.2:80
        -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.2:80" -j KUBE-SEP-DKCFIS26GWF2WLWC
        -X KUBE-SEP-BSWRHOQ77KEXZLNL
        """), result.payload, consistent=False)

    # Add an endpoint.
    svc3 = svc("ns3", "svc3", "p80", "172.30.0.43", 80, E("10.0.3.2", 80), E("10.0.3.3", 80))
    result = sync([svc1, svc3, svc4])
    svc3_two_endpoints = """
        -A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -s 10.0.3.2 -j KUBE-MARK-MASQ
        -A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.2:80
        -A KUBE-SEP-JVVZVJ7BSEPPRNBS -m comment --comment ns3/svc3:p80 -s 10.0.3.3 -j KUBE-MARK-MASQ
        -A KUBE-SEP-JVVZVJ7BSEPPRNBS -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.3:80
        """
    svc3_svc_rules = """
        -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.2:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-DKCFIS26GWF2WLWC
        -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.3:80" -j KUBE-SEP-JVVZVJ7BSEPPRNBS
        """
    assert_rules_equal(repeated_expected("""
        :KUBE-SEP-DKCFIS26GWF2WLWC - [0:0]
        :KUBE-SEP-JVVZVJ7BSEPPRNBS - [0:0]
        :KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
        """, [SVC1_RULE, SVC3_RULE, SVC4_RULE], svc3_two_endpoints + svc3_svc_rules),
        result.payload, consistent=False)

    # No change: no per-service chain is written.
    result = sync([svc1, svc3, svc4])
    assert_rules_equal(repeated_expected("", [SVC1_RULE, SVC3_RULE, SVC4_RULE], ""), result.payload,
                       consistent=False)
    assert result.statistics.services_rewritten == 0

    # A partial restore that the kernel rejects (upstream forces it with a dangling jump into
    # svc4's endpoint) leaves the old chains in place; the retry is a full sync that removes them.
    kp.sync([svc1, svc3], full=False)
    kp.restore_failed()
    assert kp.needs_full_sync and kp.partial_restore_failures == 1
    result = sync([svc1, svc3])
    assert result.full
    assert_rules_equal(repeated_expected("""
        :KUBE-SEP-AYCN5HPXMIRJNJXU - [0:0]
        :KUBE-SEP-DKCFIS26GWF2WLWC - [0:0]
        :KUBE-SEP-JVVZVJ7BSEPPRNBS - [0:0]
        :KUBE-SEP-SNQ3ZNILQDEJNDQO - [0:0]
        :KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
        :KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        """, [SVC1_RULE, SVC3_RULE], svc3_two_endpoints + """
        -A KUBE-SEP-SNQ3ZNILQDEJNDQO -m comment --comment ns1/svc1:p80 -s 10.0.1.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SNQ3ZNILQDEJNDQO -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.1.1:80
        """ + svc3_svc_rules + """
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.0.1.1:80" -j KUBE-SEP-SNQ3ZNILQDEJNDQO
        -X KUBE-SEP-AYCN5HPXMIRJNJXU
        -X KUBE-SVC-4SW47YFZTEDKD3PK
        """), result.payload, consistent=False)

    # The rule totals upstream tracks through the same steps (rulesTotal +5, -5, ... -5).
    assert totals == [15, 20, 15, 15, 20, 20, 23, 23, 18]


# -- TestSyncProxyRulesLargeClusterMode ------------------------------------------------------

def _endpoints_and_comments(payload: str, match: str) -> tuple[str, int, int]:
    """countEndpointsAndComments."""
    matched, endpoints, comments = "", 0, 0
    for line in payload.splitlines():
        if line.startswith("-A KUBE-SEP-") and "-j DNAT" in line:
            endpoints += 1
            comments += "--comment" in line
            if match in line:
                matched = line
    return matched, endpoints, comments


def test_sync_proxy_rules_large_cluster_mode():
    """TestSyncProxyRulesLargeClusterMode: past 1000 endpoints the per-endpoint comments go, and
    stale chains are only deleted once per sync period."""
    kp = fake_proxier(masquerade_all=True, sync_period_s=30.0)
    half = 1000 // 2 - 1
    svc1 = svc("ns1", "svc1", "p80", "172.30.0.41", 80,
               *(E(f"10.0.{i % 256}.{i // 256}", 80) for i in range(half)))
    svc2 = svc("ns2", "svc2", "p8080", "172.30.0.42", 8080,
               *(E(f"10.1.{i % 256}.{i // 256}", 8080) for i in range(half)))
    svc3 = svc("ns3", "svc3", "p8081", "172.30.0.43", 8081)

    payload = kp.sync([svc1, svc2, svc3], full=True, now=0.0).payload
    first, n, comments = _endpoints_and_comments(payload, "10.0.0.0")
    assert first == ("-A KUBE-SEP-DKGQUZGBKLTPAR56 -m comment --comment ns1/svc1:p80 -m tcp -p tcp "
                     "-j DNAT --to-destination 10.0.0.0:80")
    assert n == comments == 2 * half

    # Crossing the threshold in a partial sync only rewrites the changed service, uncommented.
    svc3 = svc("ns3", "svc3", "p8081", "172.30.0.43", 8081,
               E("203.0.113.4", 8081), E("203.0.113.8", 8081), E("203.0.113.12", 8081))
    result = kp.sync([svc1, svc2, svc3], full=False, now=1.0)
    assert result.statistics.large_cluster_mode
    first, n, comments = _endpoints_and_comments(result.payload, "203.0.113.4")
    assert first == "-A KUBE-SEP-RUVVH7YV3PHQBDOS -m tcp -p tcp -j DNAT --to-destination 203.0.113.4:8081"
    assert (n, comments) == (3, 0)

    # A full resync rewrites the older services without comments too.
    payload = kp.sync([svc1, svc2, svc3], full=True, now=2.0).payload
    first, n, comments = _endpoints_and_comments(payload, "10.0.0.0")
    assert first == "-A KUBE-SEP-DKGQUZGBKLTPAR56 -m tcp -p tcp -j DNAT --to-destination 10.0.0.0:80"
    assert (n, comments) == (2 * half + 3, 0)

    svc4 = svc("ns4", "svc4", "p8082", "172.30.0.44", 8082, E("10.4.0.1", 8082))
    payload = kp.sync([svc1, svc2, svc3, svc4], full=False, now=3.0).payload
    first, n, _ = _endpoints_and_comments(payload, "10.4.0.1")
    assert first == "-A KUBE-SEP-SU5STNODRYEWJAUF -m tcp -p tcp -j DNAT --to-destination 10.4.0.1:8082"
    assert n == 1

    # Deleting svc4 within the sync period: nothing rewritten, nothing deleted yet.
    payload = kp.sync([svc1, svc2, svc3], full=False, now=4.0).payload
    assert _endpoints_and_comments(payload, "10.4.0.1") == ("", 0, 0)
    assert "-X " not in payload
    # A sync period after the last cleanup the stale chains go.
    payload = kp.sync([svc1, svc2, svc3], full=False, now=31.0).payload
    assert _endpoints_and_comments(payload, "10.4.0.1") == ("", 0, 0)
    assert "-X KUBE-SVC-EBDQOQU5SJFXRIL3" in payload
    assert "-X KUBE-SEP-SU5STNODRYEWJAUF" in payload

    payload = kp.sync([svc1, svc2, svc3], full=True, now=32.0).payload
    assert _endpoints_and_comments(payload, "10.0.0.0")[1] == 2 * half + 3


# -- single-chain expectations ---------------------------------------------------------------

@pytest.mark.parametrize("random_fully", [False, True])
def test_masquerade_rule(random_fully):
    """TestMasqueradeRule."""
    payload = fake_proxier(random_fully=random_fully).sync([], full=True).payload
    masq = '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
    assert chain_rules(payload, "nat", "KUBE-POSTROUTING") == upstream(f"""
        -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
        {masq}{" --random-fully" if random_fully else ""}
        """).splitlines()


@pytest.mark.parametrize("nfacct, tcp_liberal, drop_rule", [
    (False, False, "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"),
    (True, False, "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name "
                  "ct_state_invalid_dropped_pkts -j DROP"),
    (False, True, None),
])
def test_drop_invalid_rule(nfacct, tcp_liberal, drop_rule):
    """TestDropInvalidRule."""
    kp = fake_proxier(nfacct=nfacct, conntrack_tcp_be_liberal=tcp_liberal)
    expected = ([drop_rule] if drop_rule else []) + upstream("""
        -A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        """).splitlines()
    assert chain_rules(kp.sync([], full=True).payload, "filter", "KUBE-FORWARD") == expected
