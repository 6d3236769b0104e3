"""The cluster plan as data: node addresses and MACs, pod placement, errors naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from podnet.cluster.model import (Container, Deployment, Manifests, Node, NodeAddress, ObjectMeta, Pod,
                                  PodTemplate)
from podnet.cluster.topology import ClusterConfig, plan_cluster
from podnet.errors import ConfigError


def _pod(name: str, node: str | None = None) -> Pod:
    return Pod(ObjectMeta(name), (Container("main", command=("sleep", "1")),), node_name=node)


def _nodes(*names: str) -> tuple[Node, ...]:
    return tuple(Node(ObjectMeta(n, "")) for n in names)


def test_nodes_get_underlay_addresses_macs_and_the_subnet_they_ask_for():
    nodes = _nodes("a", "b") + (Node(ObjectMeta("c", ""), pod_cidr="10.244.40.0/24",
                                      addresses=(NodeAddress("InternalIP", "172.18.0.99"),)),)
    plan = plan_cluster(Manifests(nodes=nodes))
    assert [(n.name, n.ip, n.uplink_mac, n.vtep_mac, n.pod_cidr) for n in plan.nodes] == [
        ("a", "172.18.0.11", "02:00:ac:12:00:0b", "0e:00:ac:12:00:0b", "10.244.1.0/24"),
        ("b", "172.18.0.12", "02:00:ac:12:00:0c", "0e:00:ac:12:00:0c", "10.244.2.0/24"),
        ("c", "172.18.0.99", "02:00:ac:12:00:63", "0e:00:ac:12:00:63", "10.244.40.0/24")]
    assert plan.node("b").node_object("10.244.7.0/24").pod_cidr == "10.244.7.0/24"


def test_pods_go_where_node_name_says_and_the_rest_spread_to_the_least_loaded():
    pods = (_pod("p1", "b"), _pod("p2"), _pod("p3"), _pod("p4"), _pod("p5", "b"))
    plan = plan_cluster(Manifests(nodes=_nodes("a", "b", "c"), pods=pods))
    assert [(p.name, p.node_name) for p in plan.manifests.pods] == [
        ("p1", "b"), ("p2", "a"), ("p3", "c"), ("p4", "a"), ("p5", "b")]
    assert [p.name for p in plan.pods_of("a")] == ["p2", "p4"]


def test_a_deployment_is_left_to_the_control_plane_its_node_name_checked():
    template = PodTemplate({"app": "w"}, containers=(Container("main", command=("sleep", "1")),))
    deployment = Deployment(ObjectMeta("w"), template, replicas=3)
    plan = plan_cluster(Manifests(nodes=_nodes("a", "b"), pods=(_pod("p1"),), deployments=(deployment,)))
    assert plan.manifests.deployments == (deployment,)   # its template untouched: the same pod-template-hash
    pinned = Deployment(ObjectMeta("w"), dataclasses.replace(template, node_name="z"), replicas=3)
    with pytest.raises(ConfigError, match=r'Deployment "default/w": spec.nodeName: node "z" not found'):
        plan_cluster(Manifests(nodes=_nodes("a", "b"), deployments=(pinned,)))


def test_errors_name_the_object_and_field():
    with pytest.raises(ConfigError, match=r'Pod "default/p": spec.nodeName: node "z" not found'):
        plan_cluster(Manifests(nodes=_nodes("a"), pods=(_pod("p", "z"),)))
    with pytest.raises(ConfigError, match="needs Node objects"):
        plan_cluster(Manifests(pods=(_pod("p"),)))
    clash = (Node(ObjectMeta("x", ""), addresses=(NodeAddress("InternalIP", "172.18.0.11"),)),)
    with pytest.raises(ConfigError, match=r'underlay address 172.18.0.11 is also Node "a"'):
        plan_cluster(Manifests(nodes=_nodes("a") + clash))
    with pytest.raises(ConfigError, match="not a host address of the underlay"):
        plan_cluster(Manifests(nodes=(Node(ObjectMeta("x", ""), addresses=(NodeAddress("InternalIP", "10.0.0.1"),)),)))
    with pytest.raises(ConfigError, match="--network"):
        ClusterConfig(network="geneve")


def test_the_external_client_takes_the_lowest_free_underlay_address_and_never_a_taken_one():
    from podnet.cluster.service import Service, ServicePort
    plan = plan_cluster(Manifests(nodes=_nodes("a", "b")))
    assert (plan.external.ip, plan.external.mac, plan.external.prefixlen) == ("172.18.0.1", "02:00:ac:12:00:01", 24)
    # a node that holds .1 (its InternalIP), a LoadBalancer IP and an externalIP push it further up
    lb = Service(ObjectMeta("lb"), ports=(ServicePort("http", 80),), type="LoadBalancer",
                 load_balancer_ingress=("172.18.0.2",), external_ips=("172.18.0.3",))
    held = (Node(ObjectMeta("c", ""), addresses=(NodeAddress("InternalIP", "172.18.0.1"),)),)
    plan = plan_cluster(Manifests(nodes=_nodes("a") + held, services=(lb,)))
    assert plan.external.ip == "172.18.0.4"
    assert plan_cluster(Manifests(nodes=_nodes("a")), external_ip="172.18.0.200").external.ip == "172.18.0.200"
    with pytest.raises(ConfigError, match=r'external_ip 172.18.0.11 is Node "a"\'s address'):
        plan_cluster(Manifests(nodes=_nodes("a")), external_ip="172.18.0.11")
    with pytest.raises(ConfigError, match=r"external_ip 172.18.0.2 is a LoadBalancer ingress IP of Service default/lb"):
        plan_cluster(Manifests(nodes=_nodes("a"), services=(lb,)), external_ip="172.18.0.2")
    with pytest.raises(ConfigError, match="not a host address of the underlay"):
        plan_cluster(Manifests(nodes=_nodes("a")), external_ip="172.18.0.255")
    with pytest.raises(ConfigError, match="ClusterConfig.external_ip: not an IPv4 address"):
        ClusterConfig(external_ip="outside")
