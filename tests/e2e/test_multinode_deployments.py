"""A Deployment across three nodes (embedded store): its controller runs in the control plane, its
pods spread over the nodes, and a rolling update replaces them all while a client on node-1 keeps
connecting through the Service.

The replicas are Pod objects the control plane writes with spec.nodeName (least-loaded node); each
node's kubelet starts the ones placed on it and reports their status, from which the controller
reads readiness. A rollout deletes old pods' keys: their nodes run the preStop sleep (longer than
kube-proxy's sync) before SIGTERM, so no connection fails, on any node.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import pytest

from podnet.cluster.model import Manifests, Node, ObjectMeta
from podnet.cluster.rollout import POD_TEMPLATE_HASH_LABEL
from podnet.cluster.topology import ClusterConfig
from podnet.cluster_lab import run_cluster
from podnet.linux.netns import netns_exists, popen_in_netns

from .cluster_pods import NODES, placed
from .test_lifecycle import CLIENT, client_pod, deployment, web_service

from podnet.testing.waiting import wait_until

pytestmark = pytest.mark.root




def test_a_deployment_spreads_over_the_nodes_and_rolls_out_without_a_failed_connection(tmp_path):
    manifests = Manifests(nodes=tuple(Node(ObjectMeta(n, "")) for n in NODES),
                          pods=(placed(client_pod(), "node-1"),), services=(web_service(),),
                          deployments=(deployment(4, pre_stop_s=2),))
    config = ClusterConfig(network="vxlan", prefix="pn-md-", state_dir=str(tmp_path / "state"), persist_ipam=False,
                           min_sync_period_s=0.3)
    stop = tmp_path / "stop"
    with run_cluster(manifests, config) as c:
        old = c.deployment_pods("default", "web")
        assert len(old) == 4 and all(p.ready for p in old)
        where = c.call(lambda: {p.name: c.cluster.node_of(p.name).name for p in old})
        # node-1 holds the client: the least-loaded rule gives it one replica, node-2 two, node-3 one
        assert Counter(where.values()) == {"node-1": 1, "node-2": 2, "node-3": 1}
        assert all(p.name.startswith(f"web-{p.pod.meta.labels[POD_TEMPLATE_HASH_LABEL]}-") for p in old)
        cluster_ip = next(s["cluster_ip"] for s in c.services_status() if s["name"] == "web")
        client = popen_in_netns(c.pod("client").netns, [sys.executable, "-c", CLIENT, cluster_ip, str(stop)],
                                stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)
            report = c.rollout("default", "web", env={"VERSION": "2"}, timeout_s=60)
            wait_until(lambda: all(p.removed.is_set() for p in old), "the old pods gone", timeout_s=30)
            time.sleep(0.5)
        finally:
            stop.touch()
            out, _ = client.communicate(timeout=30)
        seen = json.loads(out)
        new = c.deployment_pods("default", "web")
        new_where = c.call(lambda: {p.name: c.cluster.node_of(p.name).name for p in new})

    assert (report.replicas, report.max_surge, report.max_unavailable) == (4, 1, 1)
    assert report.max_pods <= 5 and report.min_available >= 3
    assert report.progress[-1][1] == 'deployment "web" successfully rolled out'
    assert sorted(report.deleted) == sorted(p.name for p in old) and len(report.created) == 4
    assert {p.name for p in new} == set(report.created) and report.new_hash != report.old_hash
    assert all(dict(p.pod.containers[0].env)["VERSION"] == "2" for p in new)
    assert set(new_where.values()) == set(NODES)   # the new pods spread too
    assert all(not netns_exists(p.netns) for p in old)
    # node-1's client reached replicas on the other nodes through the Service, old and new
    remote_old = {name for name, node in where.items() if node != "node-1"}
    remote_new = {name for name, node in new_where.items() if node != "node-1"}
    assert set(seen["ok"]) & remote_old and set(seen["ok"]) & remote_new, seen
    assert sum(seen["ok"].values()) > 50
    # every old pod, on whichever node, kept serving through its preStop sleep: nothing failed
    assert all(p.containers[0].pre_stop_s >= 2.0 and p.containers[0].exit_code == -15 for p in old)
    assert seen["failed"] == {}, seen
