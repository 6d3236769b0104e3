"""A cluster node converges on what the store says, whatever the store does meanwhile.

Two nodes in one process on the embedded store, wrapped in a FaultyStore (podnet.testing.store) so
that the test chooses where things go wrong:

- a malformed peer lease (bad VtepMAC) is in the store before the nodes start, and another is
  written while they run: both nodes start, skip it, count it, and reach each other's pods;
- a malformed Namespace, Service and EndpointSlice are in the store before the nodes start (right
  after the control plane published): both nodes and the control plane start, skip and count them;
- a pod is labelled (as `kubectl label` would) between its node's read of the key and its status
  write: the write loses the compare-and-swap, reads again, and writes the status alone - the
  label stays;
- between node-1 listing its pods and watching them, a pod is placed on node-1 and one of its pods
  is deleted: the first is started, the second stopped, and its key is never written back;
- every watch of the cluster breaks, as when etcd restarts, then every watch finds its history
  compacted: each node keeps its subnet lease and goes on, and a pod placed afterwards starts and
  is reached across the nodes;
- a Namespace is created after the nodes started, then a pod in it: the pod's node reads the
  Namespace from the store and starts the pod (it was refused, for good, before).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time

import pytest

from podnet.cluster.model import Manifests, Namespace, Node, ObjectMeta
from podnet.cluster.topology import ClusterConfig
from podnet.store import CompactedError, EmbeddedStore, StoreUnavailable
from podnet.store.flannel import subnet_key
from podnet.store.objects import encode, key_of, kind_prefix, object_key
from podnet.testing.store import FaultyStore

from .cluster_pods import ASK, WHO, placed
from .pods import pod

from podnet.testing.waiting import wait_until

pytestmark = pytest.mark.root

BAD_LEASE = {"PublicIP": "172.18.0.99", "BackendType": "vxlan",
             "BackendData": {"VNI": 1, "VtepMAC": "zz:zz:zz:zz:zz:zz"}}


def _who(name: str, node: str):
    return placed(pod(name, [sys.executable, "-c", WHO], port=8080), node)



def _wait(predicate, what: str, timeout_s: float = 60.0):
    return wait_until(predicate, what, timeout_s, interval_s=0.1)


def _ask(c, target_ip: str) -> str:
    done = c.exec("client", [sys.executable, "-c", ASK, target_ip, "8080", "1"], timeout_s=30)
    return done.stdout.decode().strip() or f"no answer: {done.stderr.decode(errors='replace')[-300:]}"


BAD_OBJECTS = {   # key -> value, and what the error names
    key_of("Namespace", "", "broken"): ('{"apiVersion": "v1", "kind": "Namespace", "metadata": []}', "metadata"),
    key_of("Service", "default", "broken"): (json.dumps({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "broken", "namespace": "default"},
        "spec": {"selector": {"app": "who"}, "ports": [{"port": "eighty"}]}}), "spec.ports[0].port"),
    "/registry/endpointslices/default/broken-zzzzz": ("{not json", "not JSON"),
}


class Injector:
    """node-1 starts after node-2 is up (its subnet's create waits for node-2's registration), so
    the first pod listing after that is node-1's: right after it, a pod is placed on node-1 and
    one of node-1's pods is deleted. Writes to the deleted pod's key afterwards are recorded.
    Right after the control plane published (its last call is `revision`), BAD_OBJECTS are
    written. The first time node-1 reads the placed pod's key to write its status, the pod is
    labelled right after the read."""

    def __init__(self, store: FaultyStore, late, doomed) -> None:
        self.store, self.late, self.doomed_key = store, late, object_key(doomed)
        self.node1_subnet_key = subnet_key("10.244.1.0/24")
        self.gate_passed = threading.Event()
        self.injected_at = 0
        self.writes_to_doomed: list[str] = []
        self.bad_written = False
        self.labelled_at = 0
        store.before("create", self.wait_for_node2)
        store.after("list", self.inject)
        store.after("revision", self.write_bad_objects)
        store.after("get", self.label_late)
        for op in ("put", "create", "update"):
            store.after(op, self.record)

    def write_bad_objects(self, call) -> None:
        if not self.bad_written:
            self.bad_written = True
            for key, (value, _) in BAD_OBJECTS.items():
                self.store.inner.put(key, value)

    def label_late(self, call) -> None:
        if call.key == object_key(self.late) and call.result is not None and not self.labelled_at \
                and threading.current_thread() is not threading.main_thread():   # the node's, not the test's
            manifest = json.loads(call.result.value)
            manifest["metadata"]["labels"]["tier"] = "front"
            self.labelled_at = self.store.inner.put(call.key, json.dumps(manifest))

    def wait_for_node2(self, call) -> None:
        if call.key == self.node1_subnet_key and not self.gate_passed.is_set():
            deadline = time.monotonic() + 60
            while self.store.inner.get(key_of("Node", "", "node-2")) is None:
                if time.monotonic() > deadline:
                    raise AssertionError("node-2 never registered")
                time.sleep(0.02)
            self.gate_passed.set()

    def inject(self, call) -> None:
        if call.key == kind_prefix("Pod") and self.gate_passed.is_set() and not self.injected_at:
            inner = self.store.inner
            inner.put(object_key(self.late), encode(self.late))
            self.injected_at = inner.delete(self.doomed_key)

    def record(self, call) -> None:
        if call.key == self.doomed_key and self.injected_at:
            self.writes_to_doomed.append(call.op)


def test_a_node_converges_through_bad_leases_missed_pods_and_broken_watches(tmp_path, monkeypatch):
    import podnet.cluster_lab
    from podnet.cluster_lab import run_cluster

    client = placed(pod("client", ["sleep", "infinity"]), "node-1")
    doomed = placed(pod("doomed", ["sleep", "infinity"]), "node-1")
    web2 = _who("web-2", "node-2")
    late = _who("late", "node-1")
    manifests = Manifests(nodes=tuple(Node(ObjectMeta(n, "")) for n in ("node-1", "node-2")),
                          pods=(client, doomed, web2))
    store = FaultyStore(EmbeddedStore())
    bad_key = subnet_key("10.244.9.0/24")
    store.inner.put(bad_key, json.dumps(BAD_LEASE))
    injector = Injector(store, late, doomed)
    monkeypatch.setattr(podnet.cluster_lab, "_store_for", lambda config: store)
    config = ClusterConfig(network="vxlan", prefix="pn-cv-", state_dir=str(tmp_path / "state"),
                           min_sync_period_s=0.2, grace_period_s=1)

    with run_cluster(manifests, config, wait_ready_s=None) as c:
        node1, node2 = c.cluster.node("node-1"), c.cluster.node("node-2")
        assert injector.injected_at, "the writes were not injected after node-1's pod listing"

        # the pod placed in the window runs on node-1; the one deleted in the window is stopped
        late_state = _wait(lambda: c.call(lambda: next(
            (p for p in node1.lab.pods.values() if p.name == "late" and p.ready), None)),
            "the pod placed on node-1 between its listing and its watch to start")
        _wait(lambda: c.call(lambda: "default/doomed" not in node1.lab.pods),
              "the pod deleted between node-1's listing and its watch to stop")
        assert store.get(object_key(doomed)) is None and injector.writes_to_doomed == []
        assert json.loads(store.get(object_key(late)).value)["status"]["podIP"] == late_state.ip

        # the label written between node-1's read and its status write stays, beside the status
        assert injector.labelled_at, "node-1 never read the placed pod's key to write its status"
        stored = json.loads(store.get(object_key(late)).value)
        assert stored["metadata"]["labels"] == {"app": "late", "tier": "front"}
        _wait(lambda: json.loads(store.get(object_key(late)).value)["status"]["conditions"][0]["status"] == "True",
              "the placed pod's Ready status")
        assert json.loads(store.get(object_key(late)).value)["metadata"]["labels"]["tier"] == "front"

        # the malformed Namespace, Service and EndpointSlice: skipped and counted by both nodes
        assert injector.bad_written
        for node in (node1, node2):
            bad = c.call(lambda: node.bad_objects)
            assert sorted(bad) == sorted(BAD_OBJECTS) and c.call(lambda: node.objects_skipped) == 3, bad
            for key, (_, field) in BAD_OBJECTS.items():
                assert field in bad[key], bad[key]
        control_plane = c.cluster.control_plane
        assert list(c.call(lambda: control_plane.bad_objects)) == [key_of("Service", "default", "broken")]

        # the malformed lease: skipped and counted by both nodes, who reach each other
        for node in (node1, node2):
            assert c.call(lambda: (list(node.bad_leases), node.leases_skipped)) == ([bad_key], 1)
            assert "VtepMAC" in node.bad_leases[bad_key]
        assert sorted(node1.peers) == ["10.244.2.0/24"] and sorted(node2.peers) == ["10.244.1.0/24"]
        web2_ip = c.pod("web-2").ip
        _wait(lambda: c.call(lambda: c.cluster.pod("web-2").ready), "web-2 ready")
        assert _ask(c, web2_ip) == f"web-2 {c.pod('client').ip}"
        assert _ask(c, late_state.ip) == f"late {c.pod('client').ip}"

        # another malformed lease while they run: skipped, and the nodes go on
        store.put(subnet_key("10.244.10.0/24"), json.dumps(dict(BAD_LEASE, BackendData={"VNI": True,
                                                                                     "VtepMAC": "0e:00:00:00:00:0a"})))
        _wait(lambda: c.call(lambda: node1.leases_skipped == 2 and node2.leases_skipped == 2), "the second bad lease")
        assert "VNI" in node1.bad_leases[subnet_key("10.244.10.0/24")]

        # etcd restarts: every watch breaks; then every watch finds its history compacted
        lease_keys = [subnet_key("10.244.1.0/24"), subnet_key("10.244.2.0/24")]
        leases = {key: store.get(key).mod_revision for key in lease_keys}
        assert all(store.open_watches(key) == 1 for key in lease_keys)
        for error in (StoreUnavailable("etcd restarted"), None):
            if error is None:
                store.compact(store.revision())
                error = CompactedError("watch", 1, store.revision())
            open_before = {key: store.open_watches(key) for key in set(store.watches_opened)}
            assert sum(store.fail_watches(key, error) for key in open_before) == sum(open_before.values())
            _wait(lambda: all(store.open_watches(key) >= n for key, n in open_before.items()),
                  "every watch opened again")
        assert all(store.watches_opened.count(key) == 3 for key in lease_keys)
        assert {key: store.get(key).mod_revision for key in lease_keys} == leases   # the leases are intact
        assert all(c.call(lambda: node.lease.key) in lease_keys for node in (node1, node2))

        # and the cluster goes on: a pod placed on node-2 now starts and is reached from node-1
        after = _who("after", "node-2")
        store.put(object_key(after), encode(after))
        state = _wait(lambda: c.call(lambda: next(
            (p for p in node2.lab.pods.values() if p.name == "after" and p.ready), None)), "the pod placed after")
        assert _ask(c, state.ip) == f"after {c.pod('client').ip}"
        assert _ask(c, web2_ip) == f"web-2 {c.pod('client').ip}"

        # a Namespace created after the nodes started, then a pod in it: the node learns the Namespace
        namespace = Namespace(ObjectMeta("later", ""))
        store.put(object_key(namespace), encode(namespace))
        in_later = _who("in-later", "node-2")
        in_later = dataclasses.replace(in_later, meta=dataclasses.replace(in_later.meta, namespace="later"))
        store.put(object_key(in_later), encode(in_later))
        state = _wait(lambda: c.call(lambda: node2.lab.pods.get("later/in-later")), "the pod in the later Namespace")
        _wait(lambda: c.call(lambda: state.ready), "the pod in the later Namespace to be ready")
        assert _ask(c, state.ip) == f"in-later {c.pod('client').ip}"


def test_the_nodes_outlive_an_etcd_restart(tmp_path):
    """A real etcd stopped for two seconds and started again on its data dir and port: every node
    keeps its subnet lease and its process, traffic between the nodes goes on, and a pod placed
    afterwards is started (the watches were opened again)."""
    import os

    from podnet.cluster_lab import run_cluster
    from podnet.store.etcd_server import ETCD_BINARY, run_etcd
    from podnet.testing.store import EtcdRestarter

    from .cluster_pods import cluster

    if not os.access(ETCD_BINARY, os.X_OK):
        pytest.fail(f"{ETCD_BINARY} is missing (Debian's etcd-server; `make setup` installs it)")
    with run_etcd() as server, EtcdRestarter(server) as etcd:
        config = ClusterConfig(network="vxlan", store=server.endpoint, prefix="pn-ce-", state_dir=str(tmp_path / "state"),
                               node_lease_ttl_s=4, min_sync_period_s=0.2, grace_period_s=1)
        with run_cluster(cluster(web_replicas_on=("node-2",)), config) as c:
            names = ("node-1", "node-2", "node-3")
            leases = {n: c.call(lambda: (c.cluster.node(n).lease.key, c.cluster.node(n).lease.attrs)) for n in names}
            web2 = c.pod("web-2").ip
            assert _ask(c, web2) == f"web-2 {c.pod('client').ip}"
            etcd.restart(down_s=2.0)
            c.wait_ready(60)   # every node registered again, its pods ready and its Service view synced
            assert {n: c.call(lambda: (c.cluster.node(n).lease.key, c.cluster.node(n).lease.attrs))
                    for n in names} == leases
            assert _ask(c, web2) == f"web-2 {c.pod('client').ip}"
            after = _who("after", "node-3")
            c.cluster.store.put(object_key(after), encode(after))
            state = _wait(lambda: c.call(lambda: next(
                (p for p in c.cluster.node("node-3").lab.pods.values() if p.name == "after" and p.ready), None)),
                "the pod placed after the restart")
            assert _ask(c, state.ip) == f"after {c.pod('client').ip}"
