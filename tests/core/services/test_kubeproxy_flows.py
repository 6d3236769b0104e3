"""kube-proxy's packet-flow tests (proxier_test.go runPacketFlowTests), replayed on podnet's rules.

Each test builds the services of the upstream test of the same name, loads our jump rules plus
our sync payload into the port of upstream's tracer (test_kubeproxy_upstream.Tracer) and checks
where a first packet ends up (endpoints, DROP, REJECT, ACCEPT) and whether it was marked for
masquerade.
"""

from __future__ import annotations

import pytest

from test_kubeproxy_upstream import (
    TEST_EXTERNAL_CLIENT,
    TEST_EXTERNAL_CLIENT_BLOCKED,
    TEST_NODE_IP,
    TEST_NODE_IP_ALT,
    E,
    Tracer,
    chain_rules,
    fake_proxier,
    overall_services,
    run_flows,
    svc,
    tracer_for,
)


def test_trace_overall_rules():
    """TestTracePacket's flows, over the TestOverallIPTablesRules rule set."""
    tracer = tracer_for(fake_proxier(), overall_services())
    run_flows(tracer, [
        ("no match", "10.0.0.2", "10.0.0.3", 80, "", False),
        ("single endpoint", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80", False),
        ("multiple endpoints", "10.0.0.2", "172.30.0.44", 80, "10.180.0.4:80, 10.180.0.5:80", False),
        ("LOCAL, KUBE-MARK-MASQ", TEST_NODE_IP, "192.168.99.22", 80, "10.180.0.2:80", True),
        ("DROP", TEST_EXTERNAL_CLIENT, "192.168.99.22", 80, "DROP", False),
        ("ACCEPT (NodePortHealthCheck)", TEST_NODE_IP, TEST_NODE_IP, 30000, "ACCEPT", False),
        ("REJECT", "10.0.0.2", "172.30.0.46", 80, "REJECT", False),
    ])



def test_cluster_ip_general():
    """TestClusterIPGeneral: named ports, target ports, one port number on three protocols."""
    services = [
        svc("ns1", "svc1", "http", "172.30.0.41", 80, E("10.180.0.1", 80, is_local=True)),
        svc("ns2", "svc2", "http", "172.30.0.42", 80, E("10.180.0.1", 80, is_local=True), E("10.180.2.1", 80)),
        svc("ns2", "svc2", "https", "172.30.0.42", 443, E("10.180.0.1", 8443, is_local=True),
            E("10.180.2.1", 8443)),
        svc("ns2", "svc2", "dns-udp", "172.30.0.42", 53, E("10.180.0.1", 53, is_local=True), E("10.180.2.1", 53),
            protocol="UDP"),
        svc("ns2", "svc2", "dns-tcp", "172.30.0.42", 53, E("10.180.0.1", 5353, is_local=True),
            E("10.180.2.1", 5353)),
        svc("ns2", "svc2", "dns-sctp", "172.30.0.42", 53, E("10.180.0.1", 53, is_local=True),
            E("10.180.2.1", 53), protocol="SCTP"),
    ]
    run_flows(tracer_for(fake_proxier(), services), [
        ("simple clusterIP", "10.180.0.2", "172.30.0.41", 80, "10.180.0.1:80", False),
        ("hairpin to cluster IP", "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80", True),
        ("clusterIP with multiple endpoints", "10.180.0.2", "172.30.0.42", 80, "10.180.0.1:80, 10.180.2.1:80", False),
        ("clusterIP with TargetPort", "10.180.0.2", "172.30.0.42", 443, "10.180.0.1:8443, 10.180.2.1:8443", False),
        ("same port (TCP)", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:5353, 10.180.2.1:5353", False, "TCP"),
        ("same port (UDP)", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", False, "UDP"),
        ("same port (SCTP)", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", False, "SCTP"),
        ("TCP-only port does not match UDP traffic", "10.180.0.2", "172.30.0.42", 80, "", False, "UDP"),
        ("svc1 does not accept svc2's ports", "10.180.0.2", "172.30.0.41", 443, "", False),
    ])


def test_load_balancer():
    """TestLoadBalancer: loadBalancerSourceRanges, including the node's own range."""
    service = svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.0.1", 80), node_port=3001,
                  load_balancer_ips=("1.2.3.4", "5.6.7.8"), source_ranges=("192.168.0.0/24", " 203.0.113.0/25"))
    ep = "10.180.0.1:80"
    run_flows(tracer_for(fake_proxier(), [service]), [
        ("pod to cluster IP", "10.0.0.2", "172.30.0.41", 80, ep, False),
        ("external to nodePort", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, ep, True),
        ("nodePort bypasses LoadBalancerSourceRanges", TEST_EXTERNAL_CLIENT_BLOCKED, TEST_NODE_IP, 3001, ep, True),
        ("accepted external to LB1", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, ep, True),
        ("accepted external to LB2", TEST_EXTERNAL_CLIENT, "5.6.7.8", 80, ep, True),
        ("blocked external to LB1", TEST_EXTERNAL_CLIENT_BLOCKED, "1.2.3.4", 80, "DROP", False),
        ("blocked external to LB2", TEST_EXTERNAL_CLIENT_BLOCKED, "5.6.7.8", 80, "DROP", False),
        ("pod to LB1 (blocked by LoadBalancerSourceRanges)", "10.0.0.2", "1.2.3.4", 80, "DROP", False),
        ("pod to LB2 (blocked by LoadBalancerSourceRanges)", "10.0.0.2", "5.6.7.8", 80, "DROP", False),
        ("node to LB1 (allowed by LoadBalancerSourceRanges)", TEST_NODE_IP, "1.2.3.4", 80, ep, True),
        ("node to LB2 (allowed by LoadBalancerSourceRanges)", TEST_NODE_IP, "5.6.7.8", 80, ep, True),
        ("same node to LB1, SNATted to LB1 (implicitly allowed)", "1.2.3.4", "1.2.3.4", 80, ep, True),
        ("same node to LB2, SNATted to LB2 (implicitly allowed)", "5.6.7.8", "5.6.7.8", 80, ep, True),
    ])


def test_no_endpoints_reject():
    """TestNoEndpointsReject."""
    service = svc("ns1", "svc1", "p80", "172.30.0.41", 80, node_port=3001, external_ips=("192.168.99.11",),
                  load_balancer_ips=("1.2.3.4",))
    run_flows(tracer_for(fake_proxier(), [service]), [
        ("pod to cluster IP with no endpoints", "10.0.0.2", "172.30.0.41", 80, "REJECT", False),
        ("external to external IP with no endpoints", TEST_EXTERNAL_CLIENT, "192.168.99.11", 80, "REJECT", False),
        ("pod to NodePort with no endpoints", "10.0.0.2", TEST_NODE_IP, 3001, "REJECT", False),
        ("external to NodePort with no endpoints", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "REJECT", False),
        ("pod to LoadBalancer IP with no endpoints", "10.0.0.2", "1.2.3.4", 80, "REJECT", False),
        ("external to LoadBalancer IP with no endpoints", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, "REJECT", False),
    ])


def test_external_traffic_policy_local():
    """TestExternalTrafficPolicyLocal: external sources reach only the local endpoint, unmasqueraded;
    pods are short-circuited to every endpoint."""
    service = svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.0.1", 80), E("10.180.2.1", 80, is_local=True),
                  node_port=3001, external_ips=("192.168.99.11",), load_balancer_ips=("1.2.3.4",),
                  external_policy_local=True, health_check_node_port=30000)
    both, local = "10.180.0.1:80, 10.180.2.1:80", "10.180.2.1:80"
    run_flows(tracer_for(fake_proxier(), [service]), [
        ("pod to cluster IP hits both endpoints, unmasqueraded", "10.0.0.2", "172.30.0.41", 80, both, False),
        ("pod to external IP hits both endpoints, unmasqueraded", "10.0.0.2", "192.168.99.11", 80, both, False),
        ("external to external IP hits only local endpoint", TEST_EXTERNAL_CLIENT, "192.168.99.11", 80, local, False),
        ("pod to LB IP hits only both endpoints, unmasqueraded", "10.0.0.2", "1.2.3.4", 80, both, False),
        ("external to LB IP hits only local endpoint, unmasqueraded", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, local, False),
        ("pod to NodePort hits both endpoints, unmasqueraded", "10.0.0.2", TEST_NODE_IP, 3001, both, False),
        ("external to NodePort hits only local endpoint", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, local, False),
    ])


def test_external_traffic_policy_cluster():
    """TestExternalTrafficPolicyCluster: every external destination is masqueraded."""
    service = svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.0.1", 80), E("10.180.2.1", 80, is_local=True),
                  node_port=3001, external_ips=("192.168.99.11",), load_balancer_ips=("1.2.3.4",))
    both = "10.180.0.1:80, 10.180.2.1:80"
    run_flows(tracer_for(fake_proxier(), [service]), [
        ("pod to cluster IP", "10.0.0.2", "172.30.0.41", 80, both, False),
        ("pod to external IP", "10.0.0.2", "192.168.99.11", 80, both, True),
        ("external to external IP", TEST_EXTERNAL_CLIENT, "192.168.99.11", 80, both, True),
        ("pod to LB IP", "10.0.0.2", "1.2.3.4", 80, both, True),
        ("external to LB IP", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, both, True),
        ("pod to NodePort", "10.0.0.2", TEST_NODE_IP, 3001, both, True),
        ("external to NodePort", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, both, True),
    ])


# TestInternalExternalMasquerade: svc1 plain LB, svc2 eTP=Local, svc3 iTP=Local.
MASQ_FLOWS = [
    ("pod to ClusterIP", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", False),
    ("pod to NodePort", "10.0.0.2", TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("pod to LB", "10.0.0.2", "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("node to ClusterIP", TEST_NODE_IP, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("node to NodePort", TEST_NODE_IP, TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("localhost to NodePort", "127.0.0.1", "127.0.0.1", 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("node to LB", TEST_NODE_IP, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("external to ClusterIP", TEST_EXTERNAL_CLIENT, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("external to NodePort", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("external to LB", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("pod to ClusterIP with eTP:Local", "10.0.0.2", "172.30.0.42", 80, "10.180.0.2:80, 10.180.1.2:80", False),
    ("pod to NodePort with eTP:Local", "10.0.0.2", TEST_NODE_IP, 3002, "10.180.0.2:80, 10.180.1.2:80", False),
    ("pod to LB with eTP:Local", "10.0.0.2", "5.6.7.8", 80, "10.180.0.2:80, 10.180.1.2:80", False),
    ("node to ClusterIP with eTP:Local", TEST_NODE_IP, "172.30.0.42", 80, "10.180.0.2:80, 10.180.1.2:80", True),
    ("node to NodePort with eTP:Local", TEST_NODE_IP, TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("localhost to NodePort with eTP:Local", "127.0.0.1", "127.0.0.1", 3002, "10.180.0.2:80, 10.180.1.2:80", True),
    ("node to LB with eTP:Local", TEST_NODE_IP, "5.6.7.8", 80, "10.180.0.2:80, 10.180.1.2:80", True),
    ("external to ClusterIP with eTP:Local", TEST_EXTERNAL_CLIENT, "172.30.0.42", 80,
     "10.180.0.2:80, 10.180.1.2:80", True),
    ("external to NodePort with eTP:Local", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3002, "10.180.0.2:80", False),
    ("external to LB with eTP:Local", TEST_EXTERNAL_CLIENT, "5.6.7.8", 80, "10.180.0.2:80", False),
    ("pod to ClusterIP with iTP:Local", "10.0.0.2", "172.30.0.43", 80, "10.180.0.3:80", False),
    ("pod to NodePort with iTP:Local", "10.0.0.2", TEST_NODE_IP, 3003, "10.180.0.3:80, 10.180.1.3:80", True),
    ("pod to LB with iTP:Local", "10.0.0.2", "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", True),
    ("node to ClusterIP with iTP:Local", TEST_NODE_IP, "172.30.0.43", 80, "10.180.0.3:80", True),
    ("node to NodePort with iTP:Local", TEST_NODE_IP, TEST_NODE_IP, 3003, "10.180.0.3:80, 10.180.1.3:80", True),
    ("localhost to NodePort with iTP:Local", "127.0.0.1", "127.0.0.1", 3003, "10.180.0.3:80, 10.180.1.3:80", True),
    ("node to LB with iTP:Local", TEST_NODE_IP, "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", True),
    ("external to ClusterIP with iTP:Local", TEST_EXTERNAL_CLIENT, "172.30.0.43", 80, "10.180.0.3:80", True),
    ("external to NodePort with iTP:Local", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3003,
     "10.180.0.3:80, 10.180.1.3:80", True),
    ("external to LB with iTP:Local", TEST_EXTERNAL_CLIENT, "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", True),
]
_NO_DETECTOR = {name: {"masq": False} for name in (
    "node to ClusterIP", "node to ClusterIP with eTP:Local", "node to ClusterIP with iTP:Local",
    "external to ClusterIP", "external to ClusterIP with eTP:Local", "external to ClusterIP with iTP:Local")}
_NO_DETECTOR.update({"pod to NodePort with eTP:Local": {"output": "10.180.0.2:80"},
                     "pod to LB with eTP:Local": {"output": "10.180.0.2:80"}})
_MASQ_ALL = {name: {"masq": True} for name in (
    "pod to ClusterIP", "pod to ClusterIP with eTP:Local", "pod to ClusterIP with iTP:Local")}
_MASQ_ALL_NO_DETECTOR = {**_MASQ_ALL, "pod to NodePort with eTP:Local": {"output": "10.180.0.2:80"},
                         "pod to LB with eTP:Local": {"output": "10.180.0.2:80"}}


@pytest.mark.parametrize("masquerade_all, detector, overrides", [
    (False, "cluster-cidr", {}),
    (False, "none", _NO_DETECTOR),
    (True, "cluster-cidr", _MASQ_ALL),
    (True, "none", _MASQ_ALL_NO_DETECTOR),
], ids=["base", "no LocalTrafficDetector", "masqueradeAll", "masqueradeAll, no LocalTrafficDetector"])
def test_internal_external_masquerade(masquerade_all, detector, overrides):
    """TestInternalExternalMasquerade."""
    services = [
        svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.0.1", 80, is_local=True), E("10.180.1.1", 80),
            node_port=3001, load_balancer_ips=("1.2.3.4",)),
        svc("ns2", "svc2", "p80", "172.30.0.42", 80, E("10.180.0.2", 80, is_local=True), E("10.180.1.2", 80),
            node_port=3002, load_balancer_ips=("5.6.7.8",), external_policy_local=True,
            health_check_node_port=30002),
        svc("ns3", "svc3", "p80", "172.30.0.43", 80, E("10.180.0.3", 80, is_local=True), E("10.180.1.3", 80),
            node_port=3003, load_balancer_ips=("9.10.11.12",), internal_policy_local=True),
    ]
    flows = []
    for name, src, dst, port, output, masq in MASQ_FLOWS:
        override = overrides.get(name, {})
        flows.append((name, src, dst, port, override.get("output", output), override.get("masq", masq)))
    assert set(overrides) <= {f[0] for f in MASQ_FLOWS}
    kp = fake_proxier(masquerade_all=masquerade_all, local_detector=detector)
    run_flows(tracer_for(kp, services), flows)


@pytest.mark.parametrize("localhost_node_ports, node_port_addresses, allow_alt, expect_firewall", [
    (True, (), True, True),
    (False, (), True, False),
    (False, ("192.168.0.0/24", "127.0.0.1/32"), False, False),
    (False, ("192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"), True, False),
], ids=["localhost-nodeports enabled", "localhost-nodeports disabled",
        "localhost-nodeports disabled, localhost in nodeport-addresses", "multiple nodeport-addresses"])
def test_node_ports(localhost_node_ports, node_port_addresses, allow_alt, expect_firewall):
    """TestNodePorts (its IPv4 cases)."""
    kp = fake_proxier(localhost_node_ports=localhost_node_ports, node_port_addresses=node_port_addresses)
    service = svc("ns1", "svc1", "p80", "172.30.0.41", 80, E("10.180.0.1", 80), E("10.180.2.1", 80, is_local=True),
                  node_port=3001)
    payload = kp.sync([service], full=True).payload
    tracer = Tracer(kp.jump_rules_restore() + payload)
    both = "10.180.0.1:80, 10.180.2.1:80"
    run_flows(tracer, [
        ("pod to cluster IP", "10.0.0.2", "172.30.0.41", 80, both, False),
        ("external to nodePort", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, both, True),
        ("node to nodePort", TEST_NODE_IP, TEST_NODE_IP, 3001, both, True),
        ("localhost to nodePort", "127.0.0.1", "127.0.0.1", 3001, both if localhost_node_ports else "",
         localhost_node_ports),
        ("external to nodePort on secondary IP", TEST_EXTERNAL_CLIENT, TEST_NODE_IP_ALT, 3001,
         both if allow_alt else "", allow_alt),
    ])
    firewall = ['-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 '
                "! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"]
    assert chain_rules(payload, "filter", "KUBE-FIREWALL") == (firewall if expect_firewall else [])


def test_health_check_node_port():
    """TestHealthCheckNodePort: accepted with no endpoints at all, gone with the service."""
    kp = fake_proxier(node_port_addresses=("127.0.0.0/8",))
    service = svc("ns1", "svc1", "p80", "172.30.0.42", 80, node_port=3001, external_policy_local=True,
                  health_check_node_port=30000)
    tracer = Tracer(kp.jump_rules_restore() + kp.sync([service], full=True).payload)
    run_flows(tracer, [("firewall accepts HealthCheckNodePort", "1.2.3.4", TEST_NODE_IP, 30000, "ACCEPT", False)])
    tracer = Tracer(kp.jump_rules_restore() + kp.sync([], full=False).payload)
    run_flows(tracer, [("HealthCheckNodePort no longer has any rule", "1.2.3.4", TEST_NODE_IP, 30000, "", False)])


def test_terminating_endpoints_fallback():
    """TestEndpointSliceWithTerminatingEndpointsTrafficPolicyCluster's cases: ready endpoints win;
    with none, serving+terminating ones are used; not-serving ones never."""
    def lb(*endpoints):
        return [svc("ns1", "svc1", "", "172.30.1.1", 80, *endpoints, node_port=30010,
                    load_balancer_ips=("1.2.3.4",))]

    ready_mixed = lb(E("10.0.1.1", 80, is_local=True), E("10.0.1.2", 80, is_local=True),
                     E("10.0.1.3", 80, ready=False, serving=True, terminating=True),
                     E("10.0.1.4", 80, ready=False, serving=False, terminating=True),
                     E("10.0.1.5", 80))
    only_terminating = lb(E("10.0.1.2", 80, ready=False, terminating=True, is_local=True),
                          E("10.0.1.3", 80, ready=False, terminating=True, is_local=True),
                          E("10.0.1.4", 80, ready=False, serving=False, terminating=True),
                          E("10.0.1.5", 80, ready=False, terminating=True))
    none_usable = lb(E("10.0.1.5", 80, ready=False, serving=False, terminating=True, is_local=True))
    for services, output in [(ready_mixed, "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80"),
                             (only_terminating, "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80"),
                             (none_usable, "REJECT")]:
        run_flows(tracer_for(fake_proxier(), services), [
            ("pod to clusterIP", "10.0.0.2", "172.30.1.1", 80, output, False),
            ("external to LB", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, output, output != "REJECT"),
        ])


def test_terminating_endpoints_fallback_local_policy():
    """TestEndpointSliceWithTerminatingEndpointsTrafficPolicyLocal's idea: with eTP=Local and no
    ready local endpoint, local serving+terminating endpoints take external traffic, while
    Cluster traffic keeps the remote ready ones."""
    service = svc("ns1", "svc1", "", "172.30.1.1", 80,
                  E("10.0.1.1", 80, ready=False, terminating=True, is_local=True),
                  E("10.0.1.2", 80, ready=False, terminating=True, is_local=True),
                  E("10.0.1.5", 80),
                  node_port=30010, load_balancer_ips=("1.2.3.4",), external_policy_local=True,
                  health_check_node_port=30000)
    run_flows(tracer_for(fake_proxier(), [service]), [
        ("pod to clusterIP", "10.0.0.2", "172.30.1.1", 80, "10.0.1.5:80", False),
        ("external to LB", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, "10.0.1.1:80, 10.0.1.2:80", False),
    ])
