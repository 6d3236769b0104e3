"""ClusterIP and NodePort allocation: requested values honoured, duplicates refused, random picks
seeded and banded like the API server's (KEP-3070, KEP-3668), exhaustion named. No root."""

from __future__ import annotations

import textwrap
from ipaddress import IPv4Address

import pytest

from podnet.cluster.ipalloc import (KUBERNETES_SERVICE, NodePortAllocator, RangeStatistics,
                                    ServiceIPAllocator, allocate_services)
from podnet.cluster.manifest import parse_manifests
from podnet.errors import ConfigError, IPAMExhausted


def services(*docs: str):
    return parse_manifests("---\n".join(textwrap.dedent(d) for d in docs), "svc.yaml")


def service(name: str, spec: str = "ports: [{port: 80}]", namespace: str = "default") -> str:
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
            f"spec:\n{textwrap.indent(textwrap.dedent(spec), '  ')}\n")


def last_octet(ip: str) -> int:
    return int(IPv4Address(ip)) & 0xFF


# --- ClusterIPs ---------------------------------------------------------------------------------


def test_requested_ip_is_honoured_and_cannot_be_taken_twice():
    ips = ServiceIPAllocator()
    assert ips.allocate('Service "default/a"', "10.96.0.10") == "10.96.0.10"
    assert ips.holder("10.96.0.10") == 'Service "default/a"'
    with pytest.raises(ConfigError, match=r'^Service "default/b": spec\.clusterIP: provided IP is '
                       r'already allocated: 10\.96\.0\.10 is held by Service "default/a"$'):
        ips.allocate('Service "default/b"', "10.96.0.10")


@pytest.mark.parametrize("requested", ["10.96.0.0", "10.111.255.255", "10.112.0.1", "10.0.0.1"])
def test_network_broadcast_and_outside_addresses_are_refused(requested):
    with pytest.raises(ConfigError, match=rf"the provided IP \({requested}\) is not in the valid "
                       r"range\. The range of valid IPs is 10\.96\.0\.0/12"):
        ServiceIPAllocator().allocate("x", requested)


def test_first_address_belongs_to_the_kubernetes_service():
    ips = ServiceIPAllocator()
    assert ips.first == "10.96.0.1"
    assert ips.holder("10.96.0.1") == KUBERNETES_SERVICE == 'Service "default/kubernetes"'
    assert ips.allocate(KUBERNETES_SERVICE) == "10.96.0.1"
    with pytest.raises(ConfigError, match='held by Service "default/kubernetes"'):
        ips.allocate('Service "default/web"', "10.96.0.1")


def test_dynamic_picks_come_from_the_upper_band_then_the_lower_and_never_the_first():
    # A /24 has 254 usable addresses; the lower band is max(16, 256/16) = 16 of them (.1-.16).
    ips = ServiceIPAllocator("10.0.0.0/24", seed=7)
    assert ips.statistics() == RangeStatistics(size=254, static_band=16, allocated=1, free=253)
    upper = [ips.allocate(f"s{i}") for i in range(254 - 16)]
    assert sorted(map(last_octet, upper)) == list(range(17, 255))
    lower = [ips.allocate(f"t{i}") for i in range(15)]
    assert sorted(map(last_octet, lower)) == list(range(2, 17))
    with pytest.raises(IPAMExhausted, match=r"^late: spec\.clusterIP: failed to allocate a "
                       r"serviceIP: range is full \(service CIDR 10\.0\.0\.0/24, 254 addresses\)$"):
        ips.allocate("late")
    ips.release(upper[0])
    assert ips.allocate("again") == upper[0]


def test_dynamic_allocation_is_random_but_seeded():
    def picks(seed):
        ips = ServiceIPAllocator(seed=seed)
        return [ips.allocate(f"s{i}") for i in range(5)]
    assert picks(1) == picks(1)
    assert picks(1) != picks(2)
    band_end = int(IPv4Address("10.96.0.0")) + 256  # /12: the lower band is capped at 256
    assert all(int(IPv4Address(ip)) > band_end for ip in picks(3))


def test_tiny_cidr_has_no_static_band():
    ips = ServiceIPAllocator("10.0.0.0/29")
    assert ips.statistics().static_band == 0
    assert sorted(ips.allocate(f"s{i}") for i in range(5)) == [f"10.0.0.{i}" for i in range(2, 7)]
    with pytest.raises(IPAMExhausted, match=r"service CIDR 10\.0\.0\.0/29"):
        ips.allocate("s5")


@pytest.mark.parametrize(("cidr", "problem"), [
    ("10.0.0.0/8", "too large: the mask must be >= 12"),
    ("10.0.0.0/31", "too small"),
    ("10.96.0.1/12", "must be an IPv4 CIDR"),
    ("fd00::/108", "must be an IPv4 CIDR"),
])
def test_bad_service_cidr(cidr, problem):
    with pytest.raises(ConfigError, match=problem):
        ServiceIPAllocator(cidr)


# --- NodePorts ----------------------------------------------------------------------------------


def test_node_ports_requested_duplicate_and_out_of_range():
    ports = NodePortAllocator()
    assert ports.allocate("a", 30080) == 30080
    with pytest.raises(ConfigError, match=r"^b: nodePort: provided port is already allocated: "
                       r"30080 is held by a$"):
        ports.allocate("b", 30080)
    with pytest.raises(ConfigError, match=r"provided port 80 is not in the valid range\. The "
                       r"range of valid ports is 30000-32767"):
        ports.allocate("b", 80)
    ports.release(30080)
    assert ports.allocate("b", 30080) == 30080


def test_node_port_bands_and_exhaustion():
    ports = NodePortAllocator(seed=3)
    # 2768 ports: the lower band is min(max(16, 2768/32), 128) = 86 ports, 30000-30085.
    assert ports.statistics().static_band == 86
    assert all(ports.allocate(f"s{i}") >= 30086 for i in range(200))

    small = NodePortAllocator("31000-31019")  # 20 ports: a lower band of 16
    picks = [small.allocate(f"s{i}") for i in range(20)]
    assert sorted(picks[:4]) == [31016, 31017, 31018, 31019]
    assert sorted(picks) == list(range(31000, 31020))
    with pytest.raises(IPAMExhausted, match=r"failed to allocate a nodePort: range is full "
                       r"\(node port range 31000-31019\)"):
        small.allocate("late")


@pytest.mark.parametrize("bad", ["32767-30000", "0-100", "a-b", "30000-70000"])
def test_bad_node_port_range(bad):
    with pytest.raises(ConfigError, match="node port range"):
        NodePortAllocator(bad)


# --- every Service of a set ---------------------------------------------------------------------


def test_allocate_services_fills_ips_and_node_ports():
    manifests = services(
        service("kubernetes", "ports: [{name: https, port: 443, targetPort: 6443}]"),
        service("dns", "clusterIP: 10.96.0.10\nports: [{name: dns, port: 53, protocol: UDP}, "
                       "{name: dns-tcp, port: 53}]"),
        service("np", "type: NodePort\nports: [{name: a, port: 53, protocol: UDP, nodePort: 30053},"
                      " {name: b, port: 53}, {name: c, port: 80}]"),
        service("lb", "type: LoadBalancer\nexternalTrafficPolicy: Local\nports: [{port: 443}]"),
        service("lb-no-np", "type: LoadBalancer\nallocateLoadBalancerNodePorts: false\n"
                            "ports: [{port: 80}]"),
        service("headless", "clusterIP: None\nselector: {app: db}"),
    )
    ips, node_ports = ServiceIPAllocator(seed=1), NodePortAllocator(seed=1)
    kubernetes, dns, np, lb, lb_no_np, headless = allocate_services(
        manifests, ips, node_ports).services

    assert kubernetes.cluster_ip == "10.96.0.1"
    assert dns.cluster_ip == "10.96.0.10"
    assert headless.cluster_ip == "None"
    for svc in (np, lb, lb_no_np):
        assert ips.holder(svc.cluster_ip) == f'Service "default/{svc.name}"'
    # Ports with the same number share the node port that one of them asked for.
    assert [p.node_port for p in np.ports][:2] == [30053, 30053]
    assert np.ports[2].node_port >= 30086
    assert lb.ports[0].node_port >= 30086 and lb.health_check_node_port >= 30086
    assert lb_no_np.ports[0].node_port is None and lb_no_np.health_check_node_port is None
    assert node_ports.holder(30053) == 'Service "default/np"'
    assert all(p.node_port is None for p in dns.ports)


def test_requested_addresses_are_taken_before_random_ones():
    # /29: .1 is the kubernetes Service's; four Services ask for .2-.5, so the first Service,
    # which asks for nothing, must get .6 whatever the random start.
    manifests = services(service("any"), *(service(f"s{i}", f"clusterIP: 10.0.0.{i}\n"
                                                            "ports: [{port: 80}]")
                                           for i in range(2, 6)))
    for seed in range(10):
        result = allocate_services(manifests, ServiceIPAllocator("10.0.0.0/29", seed=seed))
        assert result.services[0].cluster_ip == "10.0.0.6"


def test_allocate_services_keeps_origins_and_the_rest_of_the_set():
    manifests = services(service("a"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n")
    result = allocate_services(manifests)
    assert result.namespaces == manifests.namespaces
    assert result.origins == manifests.origins
    assert result.services[0].cluster_ip is not None and manifests.services[0].cluster_ip is None


def test_requested_node_port_already_held_names_the_file_and_port():
    manifests = services(
        service("a", "type: NodePort\nports: [{port: 80, nodePort: 30080}]"),
        service("b", "type: NodePort\nports: [{name: x, port: 81}, {name: y, port: 80, "
                     "nodePort: 30080}]"))
    with pytest.raises(ConfigError, match=r'^svc\.yaml: Service "default/b": '
                       r"spec\.ports\[1\]\.nodePort: provided port is already allocated"):
        allocate_services(manifests)
