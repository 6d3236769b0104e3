"""A Deployment in a cluster of node processes sharing a real etcd (`podnet up --store etcd://`).

The Deployment's controller runs in the control plane (this test's process); the node processes
start the Pod objects it places on them and report their status through etcd. Its 3 replicas spread
over the 3 nodes and the Service on node-1 answers from each; scaled to 1, the two deleted pods'
nodes tear them down and the Service answers from the one left.
"""

from __future__ import annotations

import os
import sys

import pytest

from podnet.cluster.model import Manifests, Node, ObjectMeta
from podnet.cluster.topology import ClusterConfig
from podnet.cluster_procs import run_cluster_processes

from .cluster_pods import NODES, placed
from .test_lifecycle import client_pod, deployment, web_service

from podnet.testing.waiting import wait_until

pytestmark = pytest.mark.root

# N connections to host:80, one request each; prints each answer (the pod's name)
ASK = """
import socket, sys
for _ in range(int(sys.argv[2])):
    with socket.create_connection((sys.argv[1], 80), timeout=5) as s:
        s.sendall(b"hi\\n")
        print(s.recv(128).decode().strip(), flush=True)
"""


def _answers(c, cluster_ip: str, n: int = 30, *, strict: bool = True) -> set[str] | None:
    """The pods that answered n connections; not `strict`: None if one failed (no preStop delay
    here, so kube-proxy may still send one to a pod that just exited)."""
    done = c.exec("client", [sys.executable, "-c", ASK, cluster_ip, str(n)])
    if done.returncode != 0 and not strict:
        return None
    assert done.returncode == 0, done.stderr.decode()
    return {line for line in done.stdout.decode().split("\n") if line}






def test_a_deployment_spreads_over_node_processes_and_scales_down(etcd, tmp_path):
    manifests = Manifests(nodes=tuple(Node(ObjectMeta(n, "")) for n in NODES),
                          pods=(placed(client_pod(), "node-1"),), services=(web_service(),),
                          deployments=(deployment(3, pre_stop_s=None, grace=1),))
    config = ClusterConfig(network="vxlan", store=etcd.endpoint, prefix="pn-ed-",
                           state_dir=str(tmp_path / "state"), min_sync_period_s=0.2, grace_period_s=1)
    with run_cluster_processes(manifests, config) as c:
        rows = c.deployment_pods("default", "web")
        assert len(rows) == 3 and all(r["ready"] == "1/1" and r["phase"] == "Running" for r in rows)
        assert {r["node"] for r in rows} == set(NODES)   # one replica on each node
        cluster_ip = next(s["cluster_ip"] for s in c.services_status() if s["name"] == "web")
        assert _answers(c, cluster_ip) == {r["name"] for r in rows}

        report = c.scale("default", "web", 1, timeout_s=30)
        assert len(report.deleted) == 2 and report.progress[-1][1] == 'deployment "web" successfully rolled out'
        (kept,) = c.deployment_pods("default", "web")
        assert kept["name"] not in report.deleted
        gone = [r for r in rows if r["name"] in report.deleted]
        wait_until(lambda: not any(os.path.exists(f"/run/netns/{r['netns']}") for r in gone),
              "the deleted pods' nodes to tear them down")
        wait_until(lambda: _answers(c, cluster_ip, 10, strict=False) == {kept["name"]}, "the Service to answer from the one left")
        assert {r["name"] for r in c.status()} == {"client", kept["name"]}
