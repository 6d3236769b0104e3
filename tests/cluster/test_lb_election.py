"""MetalLB's L2 election as data: who answers for a LoadBalancer IP (podnet.cluster.lb_election)."""

from __future__ import annotations

import hashlib

from podnet.cluster.lb_election import (EXCLUDE_FROM_LB_LABEL, announced_ips, announcements, elect, election_order,
                                        speakers)
from podnet.cluster.model import Node, ObjectMeta
from podnet.cluster.service import SERVICE_NAME_LABEL, Endpoint, EndpointSlice, Service, ServicePort


def _service(name: str, *ips: str, policy: str = "Cluster", external_ips: tuple[str, ...] = ()) -> Service:
    return Service(ObjectMeta(name, "default"), ports=(ServicePort("http", 80, node_port=30080),),
                   type="LoadBalancer", selector={"app": name}, load_balancer_ingress=ips,
                   external_traffic_policy=policy, external_ips=external_ips)


def _slice(service: str, *endpoints: Endpoint) -> EndpointSlice:
    return EndpointSlice(ObjectMeta(f"{service}-abcde", "default", {SERVICE_NAME_LABEL: service}),
                         endpoints=endpoints)


def _on(node: str, ip: str = "10.244.1.5", **conditions) -> Endpoint:
    return Endpoint((ip,), node_name=node, **conditions)


def test_the_order_is_sha256_of_node_hash_ip_smallest_first():
    order = election_order(["node-1", "node-2", "node-3"], "172.18.0.102")
    assert order == sorted(order, key=lambda n: hashlib.sha256(f"{n}#172.18.0.102".encode()).hexdigest())
    assert order == ["node-1", "node-3", "node-2"]
    assert election_order(["node-1", "node-2", "node-3"], "172.18.0.103")[0] == "node-1"


def test_metallb_s_own_cases_pick_the_same_speakers():
    """speaker/layer2_controller_test.go TestShouldAnnounce: speakers iris1 and iris2, Local policy,
    a ready endpoint on each: 10.20.30.1 is iris2's, 10.20.30.2 iris1's."""
    both = [_slice("a", _on("iris1", "2.3.4.5"), _on("iris2", "2.3.4.15"))]
    assert elect(_service("a", "10.20.30.1", policy="Local"), both, {"iris1", "iris2"}) == "iris2"
    assert elect(_service("a", "10.20.30.2", policy="Local"), both, {"iris1", "iris2"}) == "iris1"
    # iris2's endpoint not ready (and not serving): only iris1 may announce
    one = [_slice("a", _on("iris1", "2.3.4.5"), _on("iris2", "2.3.4.15", ready=False, serving=False))]
    assert elect(_service("a", "10.20.30.1", policy="Local"), one, {"iris1", "iris2"}) == "iris1"


def test_cluster_policy_elects_among_every_speaker_local_among_nodes_with_an_endpoint():
    slices = [_slice("web", _on("node-2"), _on("node-3", "10.244.3.5"))]
    nodes = {"node-1", "node-2", "node-3"}
    assert elect(_service("web", "172.18.0.102"), slices, nodes) == "node-1"   # no endpoint there: no matter
    assert elect(_service("web", "172.18.0.102", policy="Local"), slices, nodes) == "node-3"
    # a node with an endpoint but no speaker is no candidate
    assert elect(_service("web", "172.18.0.102", policy="Local"), slices, {"node-1", "node-2"}) == "node-2"
    assert elect(_service("web", "172.18.0.102", policy="Local"), slices, {"node-1"}) is None


def test_nobody_announces_without_an_endpoint_that_can_serve():
    nodes = {"node-1", "node-2"}
    assert elect(_service("web", "172.18.0.102"), [], nodes) is None
    assert elect(_service("web", "172.18.0.102"), [_slice("web")], nodes) is None
    unready = _slice("web", _on("node-2", ready=False, serving=False, terminating=True))
    assert elect(_service("web", "172.18.0.102"), [unready], nodes) is None
    # terminating but still serving can serve (epslices.EndpointCanServe)
    draining = _slice("web", _on("node-2", ready=False, serving=True, terminating=True))
    assert elect(_service("web", "172.18.0.102", policy="Local"), [draining], nodes) == "node-2"
    assert elect(_service("web"), [_slice("web", _on("node-2"))], nodes) is None   # no IP, nothing to announce


def test_the_first_ip_keys_the_election_and_one_node_answers_for_all_of_a_service_s_ips():
    svc = _service("web", "172.18.0.103", "172.18.0.102", external_ips=("192.0.2.7",))
    assert announced_ips(svc) == ("172.18.0.103", "172.18.0.102", "192.0.2.7")
    slices = [_slice("web", _on("node-2"))]
    result = announcements([svc], slices, {"node-1", "node-2", "node-3"})
    assert result.owners == dict.fromkeys(announced_ips(svc), election_order(["node-1", "node-2", "node-3"],
                                                                               "172.18.0.103")[0])
    assert result.of("node-1") == frozenset(announced_ips(svc)) and result.of("node-2") == frozenset()


def test_services_sharing_an_ip_are_announced_by_the_same_node_and_slices_match_by_service():
    """MetalLB's TestClusterPolicy property: the owner follows the IP, not the Service's name."""
    nodes = {"node-1", "node-2", "node-3"}
    for last in range(1, 40):
        ip = f"172.18.0.{last}"
        a, b = _service("a", ip), _service("b", ip)
        winners = {elect(s, [_slice(s.name, _on("node-2"))], nodes) for s in (a, b)}
        assert len(winners) == 1
    # each Service's endpoints are its own slices': "b" has none, so only "a" gets an owner
    result = announcements([_service("a", "172.18.0.50"), _service("b", "172.18.0.51")],
                           [_slice("a", _on("node-2"))], nodes)
    assert result.owners["172.18.0.50"] is not None and result.owners["172.18.0.51"] is None


def test_an_ip_two_services_claim_goes_to_the_first_by_namespace_and_name():
    slices = [_slice("b", _on("node-2")), _slice("a", _on("node-3", "10.244.3.5"))]
    result = announcements([_service("b", "172.18.0.102", policy="Local"),
                            _service("a", "172.18.0.102", policy="Local")], slices, {"node-2", "node-3"})
    assert result.owners == {"172.18.0.102": "node-3"}


def test_nodes_excluded_from_load_balancers_have_no_speaker():
    nodes = [Node(ObjectMeta("node-1", "")), Node(ObjectMeta("node-2", "", {EXCLUDE_FROM_LB_LABEL: ""}))]
    assert speakers(nodes) == frozenset({"node-1"})


def test_without_speakers_nobody_answers_and_with_cluster_policy_any_speaker_may():
    endpoints = [_slice("web", _on("node-2"))]
    assert elect(_service("web", "172.18.0.102"), endpoints, set()) is None
    assert elect(_service("web", "172.18.0.102"), endpoints, {"node-9"}) == "node-9"
