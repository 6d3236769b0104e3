"""From outside a cluster whose nodes are processes: `podnet up --store etcd://` and
`podnet exec --external`.

The parent `podnet up` makes the external client on the underlay; each node is a `podnet node join`
process with its own datapath and its own L2 speaker. A NodePort on node-1 reaches the backends on
node-2 and node-3 through VXLAN, masqueraded to node-1's flannel.1 address, and the LoadBalancer IP
is answered by the one node process the election picks. `podnet down` removes the client too.
"""

from __future__ import annotations

import json
import sys
import time

import pytest


from .clitools import netns_with, podnet
from .cluster_pods import WHO
from .external_cluster import ARP_PROBE, CONNECT, LB_IP, NODE_PORT, metallb_winner

pytestmark = pytest.mark.root

PREFIX = "pn-mq-"




def _cluster_yaml(path) -> str:
    """Three Nodes, a WHO server on node-2 and node-3, a NodePort and a LoadBalancer Service (JSON
    is YAML: the manifests as plain data)."""
    def web(n: int) -> dict:
        container = {"name": "main", "image": "python:3.11-slim", "command": [sys.executable, "-c", WHO],
                     "ports": [{"name": "http", "containerPort": 8080}],
                     "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1}}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"web-{n}", "labels": {"app": "web"}},
                "spec": {"nodeName": f"node-{n}", "terminationGracePeriodSeconds": 1, "containers": [container]}}

    def service(name: str, node_port: int, kind: str, **extra) -> dict:
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                "spec": {"type": kind, "selector": {"app": "web"},
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": node_port}]}, **extra}

    items = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"node-{i}"}} for i in (1, 2, 3)]
    items += [web(2), web(3), service("np", NODE_PORT, "NodePort"),
              service("lb", 30082, "LoadBalancer", status={"loadBalancer": {"ingress": [{"ip": LB_IP}]}})]
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=1))
    return str(path)


def _external(state_dir: str, *argv: str) -> str:
    return podnet(state_dir, "exec", "--external", "--", *argv, timeout=60).stdout


def test_nodeport_and_load_balancer_from_outside_a_cluster_of_node_processes(etcd, state_dir, tmp_path):
    podnet(state_dir, "up", "-d", "-f", _cluster_yaml(tmp_path / "cluster.yaml"), "--store", etcd.endpoint,
           "--network", "vxlan", "--prefix", PREFIX)
    try:
        assert f"{PREFIX}external" in netns_with(PREFIX)
        rows = json.loads(podnet(state_dir, "status", "-o", "json").stdout)
        assert {r["name"]: r["node"] for r in rows} == {"web-2": "node-2", "web-3": "node-3"}
        answers = [line.split() for line in _external(state_dir, sys.executable, "-c", CONNECT, "172.18.0.11",
                                                      str(NODE_PORT), "12", "3").splitlines()]
        assert {name for name, _ in answers} == {"web-2", "web-3"}, answers
        assert {peer for _, peer in answers} == {"10.244.1.0"}   # node-1's flannel.1: MASQUERADE into VXLAN
        # the LoadBalancer IP: one node process answers, the elected one; its uplink MAC is 02:00:<its IP>
        owner = metallb_winner(("node-1", "node-2", "node-3"), LB_IP)
        owner_mac = "02:00:ac:12:00:" + f"{10 + int(owner[-1]):02x}"
        deadline = time.monotonic() + 30
        while True:   # the speakers elect once every node has registered and synced the Service
            seen = json.loads(_external(state_dir, sys.executable, "-c", ARP_PROBE, LB_IP, "172.18.0.1", "1.0"))
            if set(seen) == {owner_mac} or time.monotonic() > deadline:
                break
        assert set(seen) == {owner_mac}, seen
        got = _external(state_dir, sys.executable, "-c", CONNECT, LB_IP, "80", "4", "3").splitlines()
        assert {line.split()[0] for line in got} <= {"web-2", "web-3"} and len(got) == 4, got
    finally:
        podnet(state_dir, "down")
    assert netns_with(PREFIX) == []
