"""podnet's kube-proxy iptables generator: names, numbers, model, and the sync state machine.

Exact upstream dumps are replayed in test_kubeproxy_upstream.py; the kernel is asked in
test_kubeproxy_kernel.py.
"""

from __future__ import annotations

import pytest

from podnet.core.services.kubeproxy import (
    KubeProxyIptables,
    ProxyEndpoint,
    ProxyServicePort,
    compute_probability,
    endpoint_chain_name,
    masquerade_mark_text,
    port_proto_hash,
)
from podnet.core.services.kubeproxy_rules import categorize_endpoints

E = ProxyEndpoint


def svc(ns="ns1", name="svc1", port_name="p80", cluster_ip="172.30.0.41", port=80, *endpoints, protocol="TCP",
        **kw) -> ProxyServicePort:
    return ProxyServicePort(ns, name, port_name, protocol, cluster_ip, port, endpoints=endpoints, **kw)


def declared(payload: str, table: str) -> list[str]:
    section = payload.split(f"*{table}\n", 1)[1].split("COMMIT", 1)[0]
    return [line[1:].split(" ")[0] for line in section.splitlines() if line.startswith(":")]


def lines(payload: str, prefix: str) -> list[str]:
    return [line for line in payload.splitlines() if line.startswith(prefix)]


# -- names and numbers -----------------------------------------------------------------------

@pytest.mark.parametrize("name, proto, expected", [
    ("ns1/svc1:p80", "tcp", "XPGD46QRK7WJZT7O"),   # reference §5
    ("ns1/svc1", "tcp", "AQI2S6QIMU7PVVRP"),       # unnamed port
    ("ns2/svc2:p80", "tcp", "GNZBNJ2PO5MGZ6GT"),   # proxier_test.go dumps
    ("ns3/svc3:p80", "tcp", "X27LE4BHSL4DOUIK"),
    ("ns4/svc4:p80", "tcp", "4SW47YFZTEDKD3PK"),
    ("ns5/svc5:p80", "tcp", "NUKIZ6OKUXPJNT4C"),
    ("ns2/svc2:p8080", "tcp", "2VJB64SDSIJUP5T6"),
    ("ns4/svc4:p8082", "tcp", "EBDQOQU5SJFXRIL3"),
])
def test_port_proto_hash_vectors(name, proto, expected):
    assert port_proto_hash(name, proto) == expected


@pytest.mark.parametrize("name, endpoint, expected", [
    ("ns1/svc1:p80", "10.180.0.1:80", "KUBE-SEP-SXIVWICOYRO3J4NJ"),
    ("ns1/svc1:p80", "[ff06::c1]:80", "KUBE-SEP-LIGRYQQLSZN4UWQ5"),
    ("ns1/svc1:p80", "10.0.0.0:80", "KUBE-SEP-DKGQUZGBKLTPAR56"),
    ("ns3/svc3:p8081", "203.0.113.4:8081", "KUBE-SEP-RUVVH7YV3PHQBDOS"),
    ("ns4/svc4:p8082", "10.4.0.1:8082", "KUBE-SEP-SU5STNODRYEWJAUF"),
    ("ns3/svc3:p80", "10.0.3.1:80", "KUBE-SEP-BSWRHOQ77KEXZLNL"),
])
def test_endpoint_chain_name_vectors(name, endpoint, expected):
    assert endpoint_chain_name(name, "tcp", endpoint) == expected


def test_chain_names_share_the_hash_and_fit_iptables():
    kp = KubeProxyIptables("10.0.0.0/8")
    payload = kp.sync([svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.0.1", 80, is_local=True),
                           node_port=30080, load_balancer_ips=("1.2.3.4",), source_ranges=("203.0.113.0/25",),
                           external_policy_local=True)], full=True).payload
    chains = declared(payload, "nat")
    for prefix in ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-"):
        assert prefix + "XPGD46QRK7WJZT7O" in chains
    assert max(len(c) for c in chains) <= 28     # XT_EXTENSION_MAXNAMELEN - 1


@pytest.mark.parametrize("n, expected", [
    (1, "1.0000000000"), (2, "0.5000000000"), (3, "0.3333333333"), (10, "0.1000000000"),
    (100, "0.0100000000"), (1000, "0.0010000000"), (10000, "0.0001000000"), (100000, "0.0000100000"),
    (100001, "0.0000099999"),
])
def test_compute_probability(n, expected):
    """TestComputeProbability's table."""
    assert compute_probability(n) == expected


def test_probabilities_strictly_decrease():
    values = [float(compute_probability(i)) for i in range(2, 5000)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_statistic_rules_for_three_endpoints():
    kp = KubeProxyIptables("10.0.0.0/8")
    payload = kp.sync([svc("ns1", "svc1", "p80", "172.30.0.41", 80, *(E(f"10.180.0.{i}", 80) for i in (1, 2, 3)))],
                      full=True).payload
    dispatch = [line for line in lines(payload, "-A KUBE-SVC-") if "-> " in line]
    assert [("0.3333333333" in d, "0.5000000000" in d, "--probability" in d) for d in dispatch] == [
        (True, False, True), (False, True, True), (False, False, False)]


def test_masquerade_mark_text():
    assert masquerade_mark_text(14) == "0x00004000"
    assert masquerade_mark_text(0) == "0x00000001"
    assert masquerade_mark_text(31) == "0x80000000"
    with pytest.raises(ValueError):
        masquerade_mark_text(32)
    payload = KubeProxyIptables(masquerade_bit=15).sync([], full=True).payload
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x00008000" in payload
    assert "-m mark ! --mark 0x00008000/0x00008000 -j RETURN" in payload


# -- the model -------------------------------------------------------------------------------

def test_service_port_name():
    assert svc().service_port_name == "ns1/svc1:p80"
    assert svc(port_name="").service_port_name == "ns1/svc1"


def test_model_normalises():
    port = svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.0.10", 80), E("10.180.0.2", 80),
               source_ranges=(" 203.0.113.7/25",))
    assert port.source_ranges == ("203.0.113.0/25",)
    # kube-proxy's EndpointSliceCache sorts by "ip:port" text, so .10 precedes .2
    assert [ep.endpoint for ep in port.endpoints] == ["10.180.0.10:80", "10.180.0.2:80"]
    assert E("fd00::0001", 80).endpoint == "[fd00::1]:80"
    assert port == svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.0.2", 80), E("10.180.0.10", 80),
                       source_ranges=("203.0.113.0/25",))


@pytest.mark.parametrize("kwargs", [
    dict(protocol="tcp"), dict(protocol="ICMP"), dict(port=0), dict(port=70000), dict(node_port=0),
    dict(cluster_ip="172.30.0.041"), dict(affinity_timeout_s=0), dict(affinity_timeout_s=86401),
    dict(health_check_node_port=30000), dict(external_ips=("not-an-ip",)), dict(source_ranges=("10.0.0.0/33",)),
])
def test_model_rejects_malformed_input(kwargs):
    base = dict(ns="ns1", name="svc1", port_name="p80", cluster_ip="172.30.0.41", port=80)
    base.update(kwargs)
    protocol = base.pop("protocol", "TCP")
    with pytest.raises(ValueError):
        svc(base.pop("ns"), base.pop("name"), base.pop("port_name"), base.pop("cluster_ip"), base.pop("port"),
            protocol=protocol, **base)


def test_model_rejects_bad_endpoints():
    with pytest.raises(ValueError, match="duplicate"):
        svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.0.0.1", 80), E("10.0.0.1", 80))
    with pytest.raises(ValueError, match="family"):
        svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("fd00::1", 80))
    with pytest.raises(ValueError):
        E("10.0.0.1", 0)


def test_sync_rejects_duplicates_and_other_family():
    kp = KubeProxyIptables("10.0.0.0/8")
    with pytest.raises(ValueError, match="duplicate"):
        kp.sync([svc(), svc()], full=True)
    with pytest.raises(ValueError, match="family"):
        kp.sync([svc(cluster_ip="fd00:172:30::41")], full=True)


# -- endpoint categorisation (topology.go) ---------------------------------------------------

def _cat(port, zone=None):
    c = categorize_endpoints(port, zone)
    return ([e.ip for e in c.cluster], [e.ip for e in c.local], [e.ip for e in c.reachable], c.has_any)


def test_categorize_cluster_policy():
    ready, term = E("10.0.0.1", 80), E("10.0.0.2", 80, ready=False, terminating=True)
    assert _cat(svc("ns", "s", "", "172.30.0.1", 80, ready, term)) == (["10.0.0.1"], [], ["10.0.0.1"], True)
    assert _cat(svc("ns", "s", "", "172.30.0.1", 80, term)) == (["10.0.0.2"], [], ["10.0.0.2"], True)
    dead = E("10.0.0.3", 80, ready=False, serving=False, terminating=True)
    assert _cat(svc("ns", "s", "", "172.30.0.1", 80, dead)) == ([], [], [], False)


def test_categorize_local_policy_falls_back_independently():
    eps = (E("10.0.0.1", 80), E("10.0.0.2", 80, ready=False, terminating=True, is_local=True))
    port = svc("ns", "s", "", "172.30.0.1", 80, *eps, node_port=30000, external_policy_local=True)
    # Cluster keeps the ready remote endpoint; Local falls back to the terminating local one;
    # reachable is their union.
    assert _cat(port) == (["10.0.0.1"], ["10.0.0.2"], ["10.0.0.1", "10.0.0.2"], True)
    # iTP=Local without external access never needs Cluster endpoints
    port = svc("ns", "s", "", "172.30.0.1", 80, *eps, internal_policy_local=True)
    assert _cat(port) == ([], ["10.0.0.2"], ["10.0.0.2"], True)


def test_categorize_topology_hints():
    eps = (E("10.0.0.1", 80, zone="a"), E("10.0.0.2", 80, zone="b"), E("10.0.0.3", 80, zone="a"))
    hinted = svc("ns", "s", "", "172.30.0.1", 80, *eps, topology_aware_hints=True)
    assert _cat(hinted, "a")[0] == ["10.0.0.1", "10.0.0.3"]
    assert _cat(hinted, "c")[0] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]       # no endpoint for our zone
    assert _cat(hinted, None)[0] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]      # node has no zone label
    unhinted = svc("ns", "s", "", "172.30.0.1", 80, *eps)
    assert _cat(unhinted, "a")[0] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]    # service did not ask
    missing = svc("ns", "s", "", "172.30.0.1", 80, *eps, E("10.0.0.4", 80), topology_aware_hints=True)
    assert _cat(missing, "a")[0] == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]


# -- payload layout --------------------------------------------------------------------------

def test_payload_is_in_the_real_proxiers_order():
    """Not sorted like the upstream test helper: the order kube-proxy writes its buffers in."""
    kp = KubeProxyIptables("10.0.0.0/8", random_fully=True)
    payload = kp.sync([svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.0.1", 80))], full=True).payload
    assert payload == (
        "*filter\n"
        ":KUBE-SERVICES - [0:0]\n"
        ":KUBE-EXTERNAL-SERVICES - [0:0]\n"
        ":KUBE-FORWARD - [0:0]\n"
        ":KUBE-NODEPORTS - [0:0]\n"
        ":KUBE-PROXY-FIREWALL - [0:0]\n"
        ":KUBE-FIREWALL - [0:0]\n"
        '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 '
        "! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n"
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n"
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x00004000/0x00004000 '
        "-j ACCEPT\n"
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate '
        "RELATED,ESTABLISHED -j ACCEPT\n"
        "COMMIT\n"
        "*nat\n"
        ":KUBE-SERVICES - [0:0]\n"
        ":KUBE-NODEPORTS - [0:0]\n"
        ":KUBE-POSTROUTING - [0:0]\n"
        ":KUBE-MARK-MASQ - [0:0]\n"
        ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]\n"
        ":KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]\n"
        "-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN\n"
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000\n"
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE '
        "--random-fully\n"
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000\n"
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 '
        "-j KUBE-SVC-XPGD46QRK7WJZT7O\n"
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 '
        "--dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ\n"
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" '
        "-j KUBE-SEP-SXIVWICOYRO3J4NJ\n"
        "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ\n"
        "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT "
        "--to-destination 10.180.0.1:80\n"
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in '
        'this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n'
        "COMMIT\n")


def test_services_are_written_in_name_order():
    kp = KubeProxyIptables("10.0.0.0/8")
    ports = [svc("b", "z", "", "172.30.0.1", 80), svc("a", "z", "", "172.30.0.2", 80),
             svc("a", "y", "p2", "172.30.0.3", 80), svc("a", "y", "p1", "172.30.0.4", 80)]
    payload = kp.sync(ports, full=True).payload
    rejects = lines(payload.split("*nat")[0], "-A KUBE-SERVICES")
    assert [r.split('"')[1].split(" ")[0] for r in rejects] == ["a/y:p1", "a/y:p2", "a/z", "b/z"]


def test_internal_traffic_policy_local():
    kp = KubeProxyIptables("10.0.0.0/8")
    local = svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.0.1", 80, is_local=True), E("10.180.1.1", 80),
                internal_policy_local=True)
    payload = kp.sync([local], full=True).payload
    # ClusterIP traffic goes straight to SVL, which carries the masquerade rule; no SVC chain.
    assert ('-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 '
            "--dport 80 -j KUBE-SVL-XPGD46QRK7WJZT7O") in payload
    assert lines(payload, "-A KUBE-SVL-")[0].endswith("! -s 10.0.0.0/8 -j KUBE-MARK-MASQ")
    assert "KUBE-SVC-" not in payload
    assert payload.count("-j DNAT") == 1

    remote_only = svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.1.1", 80), internal_policy_local=True)
    result = kp.sync([remote_only], full=True)
    assert ('-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 has no local endpoints" -m tcp -p tcp '
            "-d 172.30.0.41 --dport 80 -j DROP") in result.payload
    assert result.statistics.no_local_endpoints_internal == 1


def test_external_policy_local_with_local_endpoint_ends_in_svl():
    kp = KubeProxyIptables("10.0.0.0/8")
    port = svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.0.1", 80, is_local=True), E("10.180.1.1", 80),
               node_port=30080, external_policy_local=True, health_check_node_port=30000)
    payload = kp.sync([port], full=True).payload
    ext = lines(payload, "-A KUBE-EXT-XPGD46QRK7WJZT7O")
    assert ext[-1] == "-A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVL-XPGD46QRK7WJZT7O"
    assert lines(payload, "-A KUBE-SVL-") == [
        '-A KUBE-SVL-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" '
        "-j KUBE-SEP-SXIVWICOYRO3J4NJ"]
    assert "KUBE-EXTERNAL-SERVICES -m" not in payload


def test_external_policy_local_ignored_without_external_access():
    """kube-proxy computes ExternalPolicyLocal as eTP=Local *and* externally accessible."""
    kp = KubeProxyIptables("10.0.0.0/8")
    plain = kp.sync([svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.1.1", 80))], full=True).payload
    kp2 = KubeProxyIptables("10.0.0.0/8")
    marked = kp2.sync([svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.1.1", 80),
                           external_policy_local=True)], full=True).payload
    assert plain == marked


@pytest.mark.parametrize("detector, not_local, local", [
    ("cluster-cidr", "! -s 10.244.0.0/16", "-s 10.244.0.0/16"),
    ("node-cidr:10.244.3.0/24", "! -s 10.244.3.0/24", "-s 10.244.3.0/24"),
    ("bridge-interface:cni0", "! -i cni0", "-i cni0"),
    ("interface-name-prefix:veth", "! -i veth+", "-i veth+"),
])
def test_local_detectors(detector, not_local, local):
    kp = KubeProxyIptables(local_detector=detector)
    port = svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.244.1.5", 80, is_local=True), node_port=30080,
               external_policy_local=True)
    payload = kp.sync([port], full=True).payload
    assert f"--dport 80 {not_local} -j KUBE-MARK-MASQ" in payload
    assert f'"pod traffic for ns1/svc1:p80 external destinations" {local} -j KUBE-SVC-' in payload


def test_no_local_detector_and_masquerade_all():
    port = svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.244.1.5", 80, is_local=True), node_port=30080,
               external_policy_local=True)
    payload = KubeProxyIptables(local_detector="none").sync([port], full=True).payload
    assert "KUBE-MARK-MASQ" not in "\n".join(lines(payload, "-A KUBE-SVC-"))
    assert "pod traffic for" not in payload
    payload = KubeProxyIptables(local_detector="none", masquerade_all=True).sync([port], full=True).payload
    assert lines(payload, "-A KUBE-SVC-")[0].endswith("--dport 80 -j KUBE-MARK-MASQ")
    with pytest.raises(ValueError):
        KubeProxyIptables(local_detector="bridge")


def test_ipv6_proxier():
    kp = KubeProxyIptables("fd00:10::/64", node_ips=("2001:db8::1",))
    port = svc("ns1", "svc1", "p80", "fd00:172:30::41", 80, E("fd00:10:180::1", 80), node_port=30080,
               external_ips=("192.168.99.11", "2001:db8:99::11"))
    payload = kp.sync([port], full=True).payload
    assert "KUBE-FIREWALL" not in payload                       # IPv4 only
    assert "-j DNAT --to-destination [fd00:10:180::1]:80" in payload
    assert "-s fd00:10:180::1 -j KUBE-MARK-MASQ" in payload
    assert "! -s fd00:10::/64 -j KUBE-MARK-MASQ" in payload
    assert "-m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS" in payload
    assert "-d 2001:db8:99::11 --dport 80" in payload and "192.168.99.11" not in payload
    assert "nfacct" not in payload


def test_node_port_addresses_write_one_rule_per_node_ip():
    kp = KubeProxyIptables("10.0.0.0/8", node_ips=("192.168.0.2", "192.168.1.2"),
                           node_port_addresses=("192.168.0.0/16",))
    payload = kp.sync([], full=True).payload
    last = lines(payload, "-A KUBE-SERVICES")
    assert [r.split(" -d ")[1] for r in last] == ["192.168.0.2 -j KUBE-NODEPORTS", "192.168.1.2 -j KUBE-NODEPORTS"]
    assert "KUBE-FIREWALL" not in payload      # 127/8 is not among the NodePort addresses


def test_session_affinity_rules():
    kp = KubeProxyIptables("10.0.0.0/8")
    port = svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.0.1", 80), E("10.180.0.2", 80),
               affinity_timeout_s=600)
    rules = lines(kp.sync([port], full=True).payload, "-A KUBE-SVC-")[1:]
    sep1, sep2 = (endpoint_chain_name("ns1/svc1:p80", "tcp", f"10.180.0.{i}:80") for i in (1, 2))
    assert rules == [
        f'-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m recent --name {sep1} '
        f"--rcheck --seconds 600 --reap -j {sep1}",
        f'-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -m recent --name {sep2} '
        f"--rcheck --seconds 600 --reap -j {sep2}",
        f'-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic '
        f"--mode random --probability 0.5000000000 -j {sep1}",
        f'-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j {sep2}',
    ]


@pytest.mark.parametrize("endpoints, large", [(1000, False), (1001, True)])
def test_large_cluster_mode_threshold(endpoints, large):
    kp = KubeProxyIptables("10.0.0.0/8")
    port = svc("ns1", "svc1", "p80", "172.30.0.41", 80,
               *(E(f"10.180.{i // 250}.{i % 250 + 1}", 80) for i in range(endpoints)))
    result = kp.sync([port], full=True)
    assert result.statistics.large_cluster_mode is large
    seps = lines(result.payload, "-A KUBE-SEP-")
    dispatch = [r for r in lines(result.payload, "-A KUBE-SVC-") if "KUBE-MARK-MASQ" not in r]
    assert any("--comment" in r for r in seps + dispatch) is not large
    # the service-level comments stay
    assert '"ns1/svc1:p80 cluster IP"' in result.payload


# -- syncs: full, partial, stale chains, failures ----------------------------------------------

def three_services(svc2_endpoints=("10.0.2.1", "10.0.2.2")):
    return [svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.0.1.1", 80)),
            svc("ns2", "svc2", "p80", "172.30.0.42", 80, *(E(ip, 80) for ip in svc2_endpoints)),
            svc("ns3", "svc3", "p80", "172.30.0.43", 80, E("10.0.3.1", 80))]


TOP_LEVEL_FILTER = ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
                    "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL"]
TOP_LEVEL_NAT = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]


def test_first_sync_is_full():
    kp = KubeProxyIptables("10.0.0.0/8")
    assert kp.needs_full_sync
    result = kp.sync(three_services(), full=False)
    assert result.full and result.statistics.services_rewritten == 3
    assert not kp.needs_full_sync


def test_partial_sync_after_endpoint_change():
    kp = KubeProxyIptables("10.0.0.0/8")
    kp.sync(three_services(), full=True)
    svc2 = "ns2/svc2:p80"
    old_sep = endpoint_chain_name(svc2, "tcp", "10.0.2.2:80")
    new_sep = endpoint_chain_name(svc2, "tcp", "10.0.2.3:80")
    kept_sep = endpoint_chain_name(svc2, "tcp", "10.0.2.1:80")

    result = kp.sync(three_services(("10.0.2.1", "10.0.2.3")), full=False)
    assert not result.full
    assert declared(result.payload, "filter") == TOP_LEVEL_FILTER
    # all top-level chains, then only svc2's chains, then the stale SEP chain
    assert declared(result.payload, "nat") == TOP_LEVEL_NAT + [
        "KUBE-SVC-" + port_proto_hash(svc2, "tcp"), kept_sep, new_sep, old_sep]
    assert result.payload.endswith(
        f"-X {old_sep}\n"
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in '
        'this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n')
    assert result.chains_deleted == (old_sep,)
    assert ("nat", old_sep) not in result.chains_written
    # KUBE-SERVICES still jumps to the untouched services' chains
    assert "-j KUBE-SVC-" + port_proto_hash("ns1/svc1:p80", "tcp") in result.payload
    assert result.statistics.services_rewritten == 1
    assert old_sep not in kp.existing_chains and new_sep in kp.existing_chains


def test_partial_sync_with_explicit_changed_set_rewrites_whole_services():
    kp = KubeProxyIptables("10.0.0.0/8")
    ports = three_services() + [svc("ns1", "svc1", "p443", "172.30.0.41", 443, E("10.0.1.1", 443))]
    kp.sync(ports, full=True)
    result = kp.sync(ports, full=False, changed={"ns1/svc1:p80"})
    # kube-proxy tracks changes per Service, so both ports of ns1/svc1 are rewritten
    assert result.statistics.services_rewritten == 2
    svcs = [c for c in declared(result.payload, "nat") if c.startswith("KUBE-SVC-")]
    assert sorted(svcs) == sorted(["KUBE-SVC-" + port_proto_hash("ns1/svc1:p80", "tcp"),
                                   "KUBE-SVC-" + port_proto_hash("ns1/svc1:p443", "tcp")])
    assert kp.sync(ports, full=False, changed=set()).statistics.services_rewritten == 0


def test_partial_and_full_syncs_agree_on_the_result():
    """Applying a full sync then partial syncs leaves what one full sync of the final state writes."""
    def apply(state: dict[str, list[str]], payload: str) -> None:
        table = None
        for line in payload.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                state[f"{table} {line[1:].split()[0]}"] = []
            elif line.startswith("-A "):
                state[f"{table} {line.split()[1]}"].append(line)
            elif line.startswith("-X "):
                del state[f"{table} {line.split()[1]}"]

    kp = KubeProxyIptables("10.0.0.0/8")
    state: dict[str, list[str]] = {}
    steps = [three_services(), three_services(("10.0.2.9",)), three_services()[:2],
             three_services(("10.0.2.1", "10.0.2.5", "10.0.2.7"))]
    for services in steps:
        apply(state, kp.sync(services, full=False).payload)
    fresh: dict[str, list[str]] = {}
    apply(fresh, KubeProxyIptables("10.0.0.0/8").sync(steps[-1], full=True).payload)
    assert state == fresh


def test_restore_failed_rolls_back_and_forces_full_sync():
    kp = KubeProxyIptables("10.0.0.0/8")
    kp.sync(three_services(), full=True)
    before = kp.existing_chains
    kp.sync(three_services()[:1], full=False)           # deletes svc2 and svc3 chains...
    assert kp.existing_chains != before
    kp.restore_failed()                                  # ...but the kernel refused
    assert kp.existing_chains == before and kp.needs_full_sync
    assert (kp.restore_failures, kp.partial_restore_failures) == (1, 1)
    result = kp.sync(three_services()[:1], full=False)
    assert result.full and len(result.chains_deleted) == 5


def test_force_full_sync():
    kp = KubeProxyIptables("10.0.0.0/8")
    kp.sync(three_services(), full=True)
    kp.force_full_sync()
    assert kp.sync(three_services(), full=False).statistics.services_rewritten == 3


def test_statistics():
    kp = KubeProxyIptables("10.0.0.0/8")
    assert kp.statistics() is None
    result = kp.sync(three_services(), full=True)
    stats = kp.statistics()
    assert stats is result.statistics
    assert (stats.service_ports, stats.endpoints, stats.services_rewritten) == (3, 4, 3)
    assert stats.filter_chains == 6 and stats.filter_rules == 4
    # 4 top-level + 3 SVC + 4 SEP
    assert stats.nat_chains_written == stats.nat_chains_active == 11
    # 4 fixed + per service (1 KUBE-SERVICES + 1 masq + n dispatch + 2n SEP) + the last rule
    assert stats.nat_rules_written == stats.nat_rules_total == 4 + (1 + 1 + 3) + (1 + 1 + 6) + (1 + 1 + 3) + 1
    assert result.rules_written == stats.rules_written == result.payload.count("\n-A ")
    assert stats.payload_bytes == len(result.payload)
    partial = kp.sync(three_services(("10.0.2.1",)), full=False).statistics
    assert partial.nat_rules_total == stats.nat_rules_total - 3
    assert partial.nat_rules_written == 4 + 3 + (1 + 1 + 2) + 1
    assert partial.nat_chains_written == 4 + 2 and partial.nat_chains_deleted == 1
    assert partial.chains_total == 6 + 10


# -- jumps from the built-in chains ------------------------------------------------------------

def test_jump_rules_final_order():
    jumps = KubeProxyIptables().jump_rules()
    by_chain: dict[tuple[str, str], list[str]] = {}
    for table, chain, args in jumps:
        by_chain.setdefault((table, chain), []).append(args[-1])
    assert by_chain == {
        ("filter", "INPUT"): ["KUBE-FIREWALL", "KUBE-PROXY-FIREWALL", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES"],
        ("filter", "FORWARD"): ["KUBE-PROXY-FIREWALL", "KUBE-FORWARD", "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES"],
        ("filter", "OUTPUT"): ["KUBE-FIREWALL", "KUBE-PROXY-FIREWALL", "KUBE-SERVICES"],
        ("nat", "PREROUTING"): ["KUBE-SERVICES"],
        ("nat", "OUTPUT"): ["KUBE-SERVICES"],
        ("nat", "POSTROUTING"): ["KUBE-POSTROUTING"],
    }
    assert ("filter", "INPUT", ("-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                                "kubernetes externally-visible service portals", "-j", "KUBE-EXTERNAL-SERVICES")) in jumps
    assert ("filter", "INPUT", ("-j", "KUBE-FIREWALL")) in jumps


def test_jump_rules_restore_text():
    text = KubeProxyIptables().jump_rules_restore()
    assert text.startswith("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n")
    assert ('-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
            "-j KUBE-SERVICES\n") in text
    assert '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\n' in text
    assert text.count("COMMIT") == 2
    for chain in ("KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-SERVICES", "KUBE-FORWARD",
                  "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL", "KUBE-POSTROUTING"):
        assert f":{chain} - [0:0]" in text
