"""A cluster node's store logic (podnet.cluster_node) without namespaces: a node with no pods of its own
runs its Lab (datapath, Service backend, sync loop) with no root, against the embedded store.

What is checked: a lease the node cannot read is skipped and counted while every good peer is
programmed (before, one bad VtepMAC or VNI ended the node, and kept it from starting again while the
lease lived); `wait_synced(R)` returns only once both the Services and the EndpointSlices have every
change up to R (before, the newer of the two reflectors' revisions stood for both); a Service,
EndpointSlice or Pod the node cannot read is skipped and counted, a Service rewritten badly keeps
serving its last good version (before, one bad object ended the node).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import trio

from podnet.cluster.endpoints import PodStatus, derive_endpoint_slices
from podnet.cluster.model import Container, Manifests, Node, ObjectMeta, Pod
from podnet.cluster.service import Service, ServicePort
from podnet.cluster.topology import ClusterConfig, node_specs
from podnet.cluster_node import ClusterNode, ClusterNodeLab, lab_config
from podnet.lab import open_lab
from podnet.store import EmbeddedStore
from podnet.store.flannel import LeaseAttrs, acquire_subnet_lease, subnet_key, write_network_config
from podnet.store.objects import encode, key_of, kind_prefix, object_key
from podnet.testing.store import FaultyStore
from podnet.testing.waiting import await_until

SPECS = node_specs(tuple(Node(ObjectMeta(f"node-{i}", "")) for i in (1, 2, 3)), "172.18.0.0/24")


def vxlan_attrs(spec) -> LeaseAttrs:
    return LeaseAttrs.vxlan(spec.ip, spec.vtep_mac, 1)


def put_lease(store, subnet: str, value: dict | str) -> str:
    key = subnet_key(subnet)
    store.put(key, value if isinstance(value, str) else json.dumps(value))
    return key


@contextlib.asynccontextmanager
async def running_node(store, tmp_path):
    """node-1 of a vxlan cluster: its lease, its Lab without pods, its datapath's uplink and tunnel
    ports (no TAP: nothing is sent), and the Service watch."""
    config = ClusterConfig(network="vxlan", prefix="pn-cu-", state_dir=str(tmp_path), persist_ipam=False,
                           min_sync_period_s=0.01)
    spec = SPECS[0]
    write_network_config(store, config.cluster_cidr, VNI=1)
    lease = acquire_subnet_lease(store, vxlan_attrs(spec), now=trio.current_time(), previous_subnet=spec.pod_cidr)
    async with open_lab(Manifests(), lab_config(spec, config, str(lease.subnet)), wait_ready_s=None,
                        lab_class=ClusterNodeLab) as lab:
        node = ClusterNode(store, spec, config, lab, lease, None)
        node.add_uplink_ports()
        yield node



async def test_a_lease_the_node_cannot_read_is_skipped_and_the_good_peers_are_programmed(tmp_path):
    store = EmbeddedStore()
    node2, node3 = SPECS[1], SPECS[2]
    good = put_lease(store, "10.244.2.0/24", vxlan_attrs(node2).to_json())
    bad = {   # each in its own subnet, written before the node starts: its first listing has them
        put_lease(store, "10.244.7.0/24", {"PublicIP": "172.18.0.17", "BackendType": "vxlan",
                                           "BackendData": {"VNI": 1, "VtepMAC": "zz:zz:zz:zz:zz:zz"}}): "VtepMAC",
        put_lease(store, "10.244.8.0/24", {"PublicIP": "172.18.0.18", "BackendType": "vxlan",
                                           "BackendData": {"VNI": True, "VtepMAC": "0e:00:00:00:00:18"}}): "VNI",
        put_lease(store, "10.244.9.0/24", "{not json"): "not JSON",
        put_lease(store, "10.244.10.0/24", {"PublicIP": "172.18.0.20", "BackendData": [1]}): "BackendData",
    }
    try:
        async with running_node(store, tmp_path) as node, trio.open_nursery() as nursery:
            await nursery.start(node.watch_leases)
            assert node.flannel.resolve("10.244.2.7") == (node2.vtep_mac, node2.ip)
            assert node.flannel.show_fdb() == [f"{node2.vtep_mac} dev flannel.1 dst {node2.ip} self permanent"]
            assert sorted(node.peers) == ["10.244.2.0/24"]
            assert sorted(node.bad_leases) == sorted(bad) and node.leases_skipped == 4
            for key, field in bad.items():   # the reason names the field
                assert field in node.bad_leases[key], node.bad_leases[key]

            # while it runs: a bad lease, then a good one - the watch goes on past the bad one
            store.put(subnet_key("10.244.11.0/24"), json.dumps(
                {"PublicIP": "172.18.0.21", "BackendType": "vxlan", "BackendData": {"VNI": 1 << 24,
                                                                                    "VtepMAC": "0e:00:00:00:00:21"}}))
            put_lease(store, "10.244.3.0/24", vxlan_attrs(node3).to_json())
            await await_until(lambda: "10.244.3.0/24" in node.peers, "node-3's lease")
            assert node.flannel.resolve("10.244.3.9") == (node3.vtep_mac, node3.ip)
            assert node.leases_skipped == 5 and "a VNI is 24 bits" in node.bad_leases[subnet_key("10.244.11.0/24")]

            # a good peer's lease rewritten badly: what it programmed stays (flanneld skips the event)
            put_lease(store, "10.244.2.0/24", {"PublicIP": node2.ip, "BackendType": "vxlan",
                                               "BackendData": {"VNI": 1, "VtepMAC": "not-a-mac"}})
            await await_until(lambda: good in node.bad_leases, "the rewritten lease")
            assert node.flannel.resolve("10.244.2.7") == (node2.vtep_mac, node2.ip)
            # and deleted: its entries go, and it is no longer reported as bad
            store.delete(good)
            await await_until(lambda: "10.244.2.0/24" not in node.peers, "the deleted lease")
            assert node.flannel.resolve("10.244.2.7") is None and good not in node.bad_leases
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def _service() -> Service:
    return Service(ObjectMeta("web", "default"), ports=(ServicePort("http", 80, target_port=8080),),
                   selector={"app": "web"}, cluster_ip="10.96.0.10")


def _slice(service: Service):
    pod = Pod(ObjectMeta("web-2", "default", {"app": "web"}), (Container("main", command=("sleep", "1")),),
              node_name="node-2")
    return derive_endpoint_slices([service], [pod], {pod.key: PodStatus("10.244.2.2", True, False, "node-2")})[0]


async def test_wait_synced_waits_for_the_services_and_the_slices_both(tmp_path):
    store = FaultyStore(EmbeddedStore())
    try:
        async with running_node(store, tmp_path) as node, trio.open_nursery() as nursery:
            await nursery.start(node.watch_services)
            # the Service watch is late; the EndpointSlice watch is not
            store.hold(kind_prefix("Service"))
            service = _service()
            store.put(object_key(service), encode(service))
            endpoint_slice = _slice(service)
            revision = store.put(object_key(endpoint_slice), encode(endpoint_slice))
            await await_until(lambda: node.lab.cluster_slices, "the slice")
            with pytest.raises(trio.TooSlowError):   # it can never be synced while the Service is missing
                await node.wait_synced(revision, timeout_s=1.0)
            assert node.lab.manifests.services == ()
            store.release(kind_prefix("Service"))
            await node.wait_synced(revision)
            assert [s.name for s in node.lab.manifests.services] == ["web"]
            assert node.slices_revision >= revision
            # a write elsewhere: both watches are quiet, and a listing confirms the view is that recent
            later = store.put("/registry/minions/node-9", "{}")
            await node.wait_synced(later)
            assert node.slices_revision >= later
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def _bad_service(name: str, port) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.99", "selector": {"app": name}, "ports": [{"port": port}]}}


async def test_a_service_slice_or_pod_the_node_cannot_read_is_skipped_and_counted(tmp_path):
    store = EmbeddedStore()
    web = _service()
    store.put(object_key(web), encode(web))
    store.put(object_key(_slice(web)), encode(_slice(web)))
    bad = {   # in the store before the node starts: its first listing has them
        store_put(store, key_of("Service", "default", "broken"),
                  _bad_service("broken", "eighty")): "spec.ports[0].port",
        store_put(store, "/registry/endpointslices/default/web-zzzzz", "{not json"): "not JSON",
    }
    try:
        async with running_node(store, tmp_path) as node, trio.open_nursery() as nursery:
            await nursery.start(node.watch_services)
            await nursery.start(node.watch_pods)
            await node.wait_synced(store.revision())
            assert [s.name for s in node.lab.manifests.services] == ["web"]
            assert [s.name for s in node.lab.cluster_slices] == [_slice(web).name]
            assert node.objects_skipped == 2 and sorted(node.bad_objects) == sorted(bad)
            for key, field in bad.items():   # the reason names the field
                assert field in node.bad_objects[key], node.bad_objects[key]
            # `podnet stats` on this node says so
            from podnet.cli import format_stats
            from podnet.control import ControlServer
            reply = ControlServer(node.lab, tmp_path / "control.sock", trio.Event()).answer({"op": "stats"})
            assert reply["store"]["objects_skipped"] == 2 and set(reply["store"]["bad_objects"]) == set(bad)
            text = format_stats(reply["stats"], reply["sync"], reply["node"], reply["pid"], reply["store"])
            assert "store: 2 unreadable object values and 0 unreadable subnet leases skipped" in text
            assert all(f"store: {key} unreadable now: " in text for key in bad), text
            assert _backends(node, "10.96.0.10") == ["10.244.2.2:8080"]

            # while it runs: web rewritten badly keeps its last good version and its backends; a
            # Service written after it is served (the watch went on)
            web_key = object_key(web)
            store_put(store, web_key, dict(json.loads(encode(web)), spec={"ports": [{"port": 0}]}))
            api = dataclasses.replace(web, meta=ObjectMeta("api", "default"), cluster_ip="10.96.0.11")
            revision = store.put(object_key(api), encode(api))
            await node.wait_synced(revision)
            assert sorted(s.name for s in node.lab.manifests.services) == ["api", "web"]
            assert node.objects_skipped == 3 and "spec.ports[0].port" in node.bad_objects[web_key]
            assert _backends(node, "10.96.0.10") == ["10.244.2.2:8080"]
            # a pod value it cannot read: skipped and counted, the pod watch goes on
            store.put(key_of("Pod", "default", "mangled"), b'{"kind": "Pod", "metadata": []}')
            await await_until(lambda: node.objects_skipped == 4, "the bad pod")
            assert "metadata: must be an object" in node.bad_objects[key_of("Pod", "default", "mangled")]
            # the bad keys deleted: gone, and no longer reported
            store.delete(web_key)
            store.delete(key_of("Service", "default", "broken"))
            await node.wait_synced(store.delete(key_of("Pod", "default", "mangled")))
            assert [s.name for s in node.lab.manifests.services] == ["api"]
            assert sorted(node.bad_objects) == ["/registry/endpointslices/default/web-zzzzz"]
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def store_put(store, key: str, value: dict | str) -> str:
    store.put(key, value if isinstance(value, str) else json.dumps(value))
    return key


def _backends(node, cluster_ip: str) -> list[str]:
    """What the node's Service backend (iptables) has programmed for `cluster_ip`: its DNATs."""
    dump = node.lab.backend.dump().splitlines()
    chains = {line.split("-j ")[1].split()[0] for line in dump
              if f"-d {cluster_ip}/32" in line and "-j KUBE-SVC-" in line}
    seps = {line.split("-j ")[1].split()[0] for line in dump
            if any(line.startswith(f"-A {chain} ") for chain in chains) and "-j KUBE-SEP-" in line}
    return sorted(line.split("--to-destination ")[1].split()[0] for line in dump
                  if any(line.startswith(f"-A {sep} ") for sep in seps) and "--to-destination" in line)
