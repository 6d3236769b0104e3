"""A cluster node's L2 speaker without I/O: the Announcer in place of the datapath's uplink ARP
(podnet.cluster_speaker), fed the view a Lab would give it; ARP requests through a real Datapath."""

from __future__ import annotations

import dpkt

from podnet.cluster.model import ObjectMeta
from podnet.cluster.service import SERVICE_NAME_LABEL, Endpoint, EndpointSlice, Service, ServicePort
from podnet.cluster_speaker import Announcer, gratuitous_arp
from podnet.core import packet as pk
from podnet.core.datapath import Datapath
from podnet.core.l2 import ProxyArp
from podnet.testing import frames as F

NODE_IP, LB, LB_LOCAL = "172.18.0.12", "172.18.0.102", "172.18.0.103"
UPLINK_MAC = "02:00:ac:12:00:0c"


class View:
    """What the Lab serves: its Services and the cluster's EndpointSlices."""

    def __init__(self) -> None:
        self.services = [
            Service(ObjectMeta("lb", "default"), ports=(ServicePort("http", 80, node_port=30082),),
                    type="LoadBalancer", selector={"app": "web"}, load_balancer_ingress=(LB,)),
            Service(ObjectMeta("lb-local", "default"), ports=(ServicePort("http", 80, node_port=30083),),
                    type="LoadBalancer", selector={"app": "web"}, load_balancer_ingress=(LB_LOCAL,),
                    external_traffic_policy="Local")]
        self.endpoints = {"node-2": True, "node-3": True}

    def __call__(self):
        slices = [EndpointSlice(ObjectMeta(f"{svc.name}-x", "default", {SERVICE_NAME_LABEL: svc.name}),
                                endpoints=tuple(Endpoint((f"10.244.{n[-1]}.5",), ready=ready, serving=ready,
                                                         node_name=n) for n, ready in self.endpoints.items()))
                  for svc in self.services]
        return self.services, slices


def _announcer(node: str, view: View, won: list) -> Announcer:
    announcer = Announcer(ProxyArp(b"\xee" * 6, {pk.ip_int(NODE_IP)}), node, view, won.append)
    # what Lab._apply sets after a sync: its own address and every LB IP it serves
    announcer.addresses = {pk.ip_int(NODE_IP), pk.ip_int(LB), pk.ip_int(LB_LOCAL)}
    return announcer


def _packed(ip: str) -> bytes:
    return bytes(int(part) for part in ip.split("."))


def _answered(announcer: Announcer) -> set[str]:
    return {pk.ip_str(a) for a in announcer.addresses}


def test_before_the_speakers_are_known_only_the_node_s_own_address_is_answered():
    won: list = []
    announcer = _announcer("node-2", View(), won)
    assert _answered(announcer) == {NODE_IP} and won == []


def test_each_ip_is_answered_by_exactly_one_of_the_nodes_the_one_elected():
    view = View()
    nodes = {n: _announcer(n, view, []) for n in ("node-1", "node-2", "node-3")}
    for announcer in nodes.values():
        announcer.set_speakers(nodes)
    assert {n: _answered(a) - {NODE_IP} for n, a in nodes.items()} == {
        "node-1": {LB},             # Cluster policy: node-1 wins among all three
        "node-2": set(),
        "node-3": {LB_LOCAL}}       # Local: node-3 wins among the nodes with an endpoint
    assert all(a.owners == {LB: "node-1", LB_LOCAL: "node-3"} for a in nodes.values())


def test_an_ip_moves_when_its_owner_loses_its_endpoint_and_the_new_owner_hears_of_it():
    view = View()
    won2, won3 = [], []
    node2, node3 = _announcer("node-2", view, won2), _announcer("node-3", view, won3)
    for announcer in (node2, node3):
        announcer.set_speakers({"node-1", "node-2", "node-3"})
    assert won3 == [frozenset({pk.ip_int(LB_LOCAL)})] and won2 == []
    view.endpoints["node-3"] = False   # its pod is no longer ready: the next sync elects again
    for announcer in (node2, node3):
        announcer.addresses = {pk.ip_int(NODE_IP), pk.ip_int(LB), pk.ip_int(LB_LOCAL)}
    assert _answered(node3) == {NODE_IP} and _answered(node2) == {NODE_IP, LB_LOCAL}
    assert won2 == [frozenset({pk.ip_int(LB_LOCAL)})] and len(won3) == 1


def test_an_ip_the_lab_does_not_serve_is_not_answered_even_when_won():
    """A node answers only once its backend has been programmed with the IP."""
    announcer = _announcer("node-1", View(), [])
    announcer.set_speakers({"node-1", "node-2", "node-3"})
    assert LB in _answered(announcer)
    announcer.addresses = {pk.ip_int(NODE_IP)}    # a sync without the Service
    assert _answered(announcer) == {NODE_IP}


def test_the_datapath_answers_arp_through_it_on_an_underlay_uplink():
    dp = Datapath(node_cidr="10.244.2.0/24", node_ip=NODE_IP)
    uplink = dp.add_uplink("uplink", UPLINK_MAC, cidr="172.18.0.0/24")
    view = View()
    dp.uplink_arp = announcer = Announcer(dp.uplink_arp, "node-2", view)
    announcer.addresses = {pk.ip_int(NODE_IP), pk.ip_int(LB), pk.ip_int(LB_LOCAL)}
    announcer.set_speakers({"node-1", "node-2", "node-3"})
    view.endpoints["node-3"] = False
    announcer.elect()   # node-2 now owns LB_LOCAL, node-1 still LB

    def ask(target: str) -> list:
        return dp.process(bytearray(F.arp_request("172.18.0.1", target, sender_mac="02:00:ac:12:00:01")), uplink, 0.0)

    (reply,) = ask(LB_LOCAL)
    arp = dpkt.ethernet.Ethernet(bytes(reply.frame)).data
    assert (arp.op, arp.sha, arp.spa) == (dpkt.arp.ARP_OP_REPLY, pk.mac_bytes(UPLINK_MAC), _packed(LB_LOCAL))
    assert ask(LB) == []        # node-1's: not answered here, and not a drop either
    assert len(ask(NODE_IP)) == 1


def test_gratuitous_arp_is_a_broadcast_request_and_reply_for_the_ip_from_the_mac():
    mac, ip = pk.mac_bytes(UPLINK_MAC), pk.ip_int(LB)
    frames = [dpkt.ethernet.Ethernet(f) for f in gratuitous_arp(mac, ip)]
    assert [f.data.op for f in frames] == [dpkt.arp.ARP_OP_REQUEST, dpkt.arp.ARP_OP_REPLY]
    for frame in frames:
        assert frame.dst == b"\xff" * 6 and frame.src == mac and frame.type == 0x0806
        assert frame.data.sha == mac and frame.data.spa == frame.data.tpa == _packed(LB)
