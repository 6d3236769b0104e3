"""The control plane's EndpointSlice controller (podnet.control_plane) against the embedded store,
with faults where the tests put them (podnet.testing.store.FaultyStore). No root: no node runs;
the tests write what nodes write (registrations, pod status).

What is checked: a store that cannot be reached while a derivation runs is waited out and the
derivation done again once it is back (before, StoreUnavailable ended the controller); a Service or
Pod it cannot read is skipped and counted, and a Service rewritten badly keeps its slices (before,
one bad object ended the controller); `podnet status` shows an unreadable pod rather than failing.
"""

from __future__ import annotations

import json

import trio

from podnet.cluster.endpoints import PodStatus
from podnet.cluster.model import Container, Manifests, Node, ObjectMeta, Pod
from podnet.cluster.service import Service, ServicePort
from podnet.cluster.topology import ClusterConfig
from podnet.control_plane import ControlPlane, allocated, pods_from_store
from podnet.store import EmbeddedStore, StoreUnavailable
from podnet.store.objects import decode, encode, key_of, kind_prefix, object_key, update_pod_status
from podnet.testing.store import FaultyStore
from podnet.testing.waiting import await_until

CONFIG = ClusterConfig(network="vxlan", prefix="pn-cp-")
IPS = {"web-1": ("10.244.1.2", "node-1"), "web-2": ("10.244.2.2", "node-2")}


def _pod(name: str) -> Pod:
    return Pod(ObjectMeta(name, "default", {"app": "web"}), (Container("main", command=("sleep", "1")),),
               node_name=IPS[name][1])


def _manifests() -> Manifests:
    web = Service(ObjectMeta("web", "default"), ports=(ServicePort("http", 80, target_port=8080),),
                  selector={"app": "web"})
    return allocated(Manifests(services=(web,), pods=(_pod("web-1"), _pod("web-2"))), CONFIG)


def _endpoints(store) -> dict[str, bool]:
    """Every endpoint address in the stored EndpointSlices, and whether it is ready."""
    return {address: endpoint.ready for kv in store.list(kind_prefix("EndpointSlice"))
            for endpoint in decode(kv).obj.endpoints for address in endpoint.addresses}


def _report(store, name: str, ready: bool) -> int:
    """What node agents write: the pod's status (the node is registered by `_register`)."""
    ip, node = IPS[name]
    return update_pod_status(store, key_of("Pod", "default", name), PodStatus(ip, ready, False, node))


def _register(store) -> None:
    for name in ("node-1", "node-2"):
        node = Node(ObjectMeta(name, ""))
        store.put(object_key(node), encode(node))



async def test_the_controller_waits_out_a_store_it_cannot_reach_and_derives_again():
    store = FaultyStore(EmbeddedStore())
    control_plane = ControlPlane(store, _manifests(), CONFIG)
    control_plane.publish()
    _register(store)
    for name in IPS:
        _report(store, name, ready=True)
    down: list[tuple[str, str]] = []   # while etcd is away: the calls refused

    def unreachable(call) -> None:   # etcd restarting: every call fails until it is back
        if down:
            down.append((call.op, call.key))
            raise StoreUnavailable("etcd: connection refused")

    for op in ("get", "list", "put", "create", "update", "delete", "watch"):
        store.before(op, unreachable)
    slices = kind_prefix("EndpointSlice")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control_plane.run)
            assert _endpoints(store) == {"10.244.1.2": True, "10.244.2.2": True}
            watched = (kind_prefix("Pod"), kind_prefix("Node"), kind_prefix("Service"))
            await await_until(lambda: all(store.open_watches(prefix) for prefix in watched), "the controller's watches")
            # web-2 goes unready, and etcd goes away as the controller starts deriving from it
            down.append(("down", ""))
            _report(store.inner, "web-2", ready=False)
            await await_until(lambda: down.count(("list", slices)) >= 1, "a derivation failing while etcd is away")
            for prefix in watched:   # and the watches break
                assert store.fail_watches(prefix, StoreUnavailable("etcd: connection reset")) == 1
            await await_until(lambda: down.count(("list", slices)) >= 3, "derivations tried again while etcd is away")
            assert _endpoints(store.inner) == {"10.244.1.2": True, "10.244.2.2": True}   # nothing written meanwhile
            down.clear()   # etcd is back: the next try derives the change; nothing else triggers it
            await await_until(lambda: _endpoints(store) == {"10.244.1.2": True, "10.244.2.2": False},
                         "the slices derived once etcd is back")
            assert control_plane.reconcile_failures >= 3
            # and the controller goes on deriving
            _report(store, "web-2", ready=True)
            await await_until(lambda: _endpoints(store) == {"10.244.1.2": True, "10.244.2.2": True}, "the next change")
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def _bad_service(name: str, port) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
                       "spec": {"clusterIP": "10.96.0.99", "selector": {"app": "web"}, "ports": [{"port": port}]}})


async def test_a_service_or_pod_the_controller_cannot_read_is_skipped_and_counted():
    store = EmbeddedStore()
    control_plane = ControlPlane(store, _manifests(), CONFIG)
    control_plane.publish()
    _register(store)
    for name in IPS:
        _report(store, name, ready=True)
    broken = key_of("Service", "default", "broken")
    store.put(broken, _bad_service("broken", "eighty"))   # there before the controller starts
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control_plane.run)
            assert _endpoints(store) == {"10.244.1.2": True, "10.244.2.2": True}
            assert control_plane.objects_skipped == 1
            assert "spec.ports[0].port" in control_plane.bad_objects[broken]
            slices = {kv.key: kv.mod_revision for kv in store.list(kind_prefix("EndpointSlice"))}
            assert [decode(store.get(k)).obj.service_name for k in slices] == ["web"]

            # web rewritten badly: its last good version stays, and so do its slices
            web = key_of("Service", "default", "web")
            store.put(web, _bad_service("web", 0))
            await await_until(lambda: control_plane.objects_skipped == 2, "the bad rewrite of web")
            assert "spec.ports[0].port" in control_plane.bad_objects[web]
            # a pod value it cannot read (web-2 rewritten by hand): skipped; its last good status counts
            web2 = key_of("Pod", "default", "web-2")
            store.put(web2, b'{"kind": "Pod", "metadata": {"name": "web-2"}, "status": 5}')
            await await_until(lambda: control_plane.objects_skipped == 3, "the bad pod")
            assert "web-2" in control_plane.bad_objects[web2]
            # then a real change: derived, with the last good versions of web and web-2
            _report(store, "web-1", ready=False)
            await await_until(lambda: _endpoints(store) == {"10.244.1.2": False, "10.244.2.2": True}, "web-1 unready")
            assert {kv.key for kv in store.list(kind_prefix("EndpointSlice"))} == slices.keys()

            # what `podnet status` and wait_ready's error show: the unreadable pod, named
            rows = {row["name"]: row for row in pods_from_store(store, CONFIG.prefix)}
            assert rows["web-2"]["phase"] == "Unreadable" and rows["web-1"]["phase"] == "Running"
            assert any(line.startswith(f"{web2} (unreadable: ") for line in control_plane.unready())
            nursery.cancel_scope.cancel()
    finally:
        store.close()
