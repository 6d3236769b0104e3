"""Cluster objects in the store (podnet.store.objects): keys, JSON round trips, both stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from podnet.cluster.endpoints import PodStatus
from podnet.cluster.manifest import load_manifests, parse_manifests
from podnet.cluster.model import Node, ObjectMeta
from podnet.errors import ConfigError
from podnet.store import EventType, KeyExists
from podnet.store.objects import (RESOURCES, apply_objects, create_object, decode, encode,
                                  get_object, key_of, kind_prefix, list_objects, object_key,
                                  parse_key, put_object, to_manifest)

ROOT = Path(__file__).resolve().parents[2]

EVERY_FIELD = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: web}, annotations: {owner: me}}
---
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: z1}}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.2}, {type: Hostname, address: a}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-a
  restartPolicy: OnFailure
  terminationGracePeriodSeconds: 3
  containers:
    - name: server
      image: python:3.12
      command: [python3, -m, http.server]
      args: ["8080"]
      workingDir: /tmp
      env: [{name: A, value: "1"}, {name: B}]
      ports: [{name: http, containerPort: 8080}, {containerPort: 53, protocol: UDP}]
      readinessProbe:
        httpGet: {port: http, path: /ready, host: 127.0.0.1, scheme: HTTP}
        initialDelaySeconds: 1
        periodSeconds: 2
        timeoutSeconds: 3
        successThreshold: 1
        failureThreshold: 5
    - name: side
      command: [sleep, infinity]
      readinessProbe: {exec: {command: ["true"]}}
    - name: tcp
      command: [nc, -l, "9000"]
      ports: [{containerPort: 9000}]
      readinessProbe: {tcpSocket: {port: 9000}}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, selector: {app: web}, publishNotReadyAddresses: true}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  ports:
    - {name: http, port: 80, targetPort: http, nodePort: 30080, appProtocol: http}
    - {name: dns, port: 53, protocol: UDP, targetPort: 53}
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: shop}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  allocateLoadBalancerNodePorts: false
  loadBalancerSourceRanges: [203.0.113.0/24]
  externalIPs: [192.0.2.10]
  ports: [{port: 443, targetPort: 8443}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.20}]}}
---
apiVersion: v1
kind: Service
metadata: {name: plain}
spec: {ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-abcde, namespace: shop, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
endpoints:
  - addresses: [10.244.1.2]
    conditions: {ready: false, serving: true, terminating: true}
    nodeName: node-a
    zone: z1
    targetRef: {kind: Pod, namespace: shop, name: web-1}
  - addresses: [10.244.2.2]
ports: [{name: "", port: 8443, protocol: TCP, appProtocol: https}]
"""


def _load(path: Path, neighbours: list[Path]):
    """The file's objects; a file whose namespace another file declares is read with it."""
    try:
        return load_manifests([path])
    except ConfigError:
        for other in neighbours:
            try:
                both = load_manifests([other, path])
            except ConfigError:
                continue
            mine = {o.object_key for o in load_manifests([other]).objects()}
            return [o for o in both.objects() if o.object_key not in mine]
        raise


def manifest_sets():
    """Every valid manifest file in tests/ and examples/ (new ones join by themselves)."""
    yield "every-field", list(parse_manifests(EVERY_FIELD, "every-field").objects())
    files = sorted(p for p in [*(ROOT / "tests").rglob("*.yaml"), *(ROOT / "examples").rglob(
        "*.yaml")] if not p.name.startswith("bad-"))
    for path in files:
        neighbours = [p for p in files if p.parent == path.parent and p != path]
        try:
            objects = _load(path, neighbours)
        except ConfigError:
            continue  # not a manifest podnet reads alone (e.g. deliberately broken)
        yield str(path.relative_to(ROOT)), list(getattr(objects, "objects", lambda: objects)())


def stored_objects():
    return [pytest.param(obj, id=f"{where}:{obj.KIND}/{obj.object_key[1]}/{obj.name}")
            for where, objects in manifest_sets() for obj in objects if obj.KIND in RESOURCES]


@pytest.mark.parametrize("obj", stored_objects())
def test_every_manifest_object_round_trips(obj):
    from podnet.store import KeyValue
    value = encode(obj)
    stored = decode(KeyValue(object_key(obj), value, 2, 3, 1))
    assert stored.obj == obj
    assert (stored.key, stored.mod_revision, stored.create_revision) == (object_key(obj), 3, 2)
    manifest = json.loads(value)
    assert manifest["kind"] == obj.KIND and manifest["metadata"]["name"] == obj.name


def test_the_api_servers_keys():
    manifests = parse_manifests(EVERY_FIELD)
    keys = sorted(object_key(obj) for obj in manifests.objects())
    assert keys == [
        "/registry/endpointslices/shop/lb-abcde",
        "/registry/minions/node-a",  # nodes: the API server's historical resource name
        "/registry/namespaces/shop",
        "/registry/pods/shop/web-1",
        "/registry/services/specs/default/plain",  # services: under specs/
        "/registry/services/specs/shop/headless",
        "/registry/services/specs/shop/lb",
        "/registry/services/specs/shop/web",
    ]
    assert parse_key("/registry/pods/shop/web-1") == ("Pod", "shop", "web-1")
    assert parse_key("/registry/minions/node-a") == ("Node", "", "node-a")
    assert kind_prefix("Service", "shop") == "/registry/services/specs/shop/"
    with pytest.raises(ValueError):
        parse_key("/registry/pods/only-namespace")
    with pytest.raises(ValueError):
        kind_prefix("Node", "default")


def test_pod_status_round_trips_as_the_api_server_shows_it():
    pod = next(o for o in parse_manifests(EVERY_FIELD).objects() if o.KIND == "Pod")
    from podnet.store import KeyValue
    for status in (PodStatus("10.244.1.2", ready=True, node_name="node-a", zone="z1"),
                   PodStatus(None), PodStatus("10.244.1.3", terminating=True)):
        stored = decode(KeyValue(object_key(pod), encode(pod, status), 2, 2, 1))
        assert (stored.obj, stored.status) == (pod, status)
    shown = to_manifest(pod, PodStatus("10.244.1.2", ready=True))["status"]
    assert shown["podIP"] == "10.244.1.2" and shown["podIPs"] == [{"ip": "10.244.1.2"}]
    assert {"type": "Ready", "status": "True"} in shown["conditions"]


def test_a_value_that_is_not_an_object_names_the_key():
    from podnet.store import KeyValue
    with pytest.raises(ConfigError, match="/registry/pods/x/y"):
        decode(KeyValue("/registry/pods/x/y", b"{not json", 2, 2, 1))
    with pytest.raises(ConfigError, match="/registry/pods/x/y"):
        decode(KeyValue("/registry/pods/x/y", b'{"kind": "Pod"}', 2, 2, 1))


def test_objects_in_both_stores(h):
    manifests = parse_manifests(EVERY_FIELD)
    watch = h.store.watch("/registry/", prefix=True)
    revision = apply_objects(h.store, manifests)
    assert revision == h.store.revision() == 1 + len(list(manifests.objects()))
    assert apply_objects(h.store, manifests) == revision  # unchanged: nothing written
    services, listed_at = list_objects(h.store, "Service", "shop")
    assert [s.obj.name for s in services] == ["headless", "lb", "web"]
    assert listed_at == revision
    assert get_object(h.store, "Pod", "shop", "web-1").obj == next(
        o for o in manifests.objects() if o.KIND == "Pod")
    assert get_object(h.store, "Pod", "shop", "nope") is None
    node = Node(ObjectMeta("node-b", ""), pod_cidr="10.244.2.0/24")
    create_object(h.store, node)
    with pytest.raises(KeyExists):
        create_object(h.store, node)
    put_object(h.store, node)
    assert [kv.key for kv in h.store.list(kind_prefix("Node"))] == [
        key_of("Node", "", "node-a"), key_of("Node", "", "node-b")]
    events = [h.next_event(watch) for _ in range(revision - 1 + 2)]
    assert all(e.type is EventType.PUT for e in events)
    watch.close()


# --- what a reader does with a bad value -------------------------------------------------------

WRONG_TYPES = (None, 1, -1, 1.5, True, "x", "", [], [1], {}, {"a": 1}, [{}], "10.0.0.1", 70000)


def _paths(data, path=()):
    yield path
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _paths(value, (*path, i))


def _set(data, path, value):
    if not path:
        return value
    inner = data
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = value
    return data


def test_any_field_of_any_type_decodes_or_is_a_config_error_naming_the_key():
    """etcd holds whatever was written: every field of every stored kind (a Pod with its status)
    replaced by a value of every JSON type decodes, or raises ConfigError naming the key - never
    AttributeError or TypeError (a list as metadata, a number as kind or as status.conditions
    were), which a reader would not expect and which would end a node."""
    import copy
    from podnet.store import KeyValue
    objects = list(parse_manifests(EVERY_FIELD).objects())
    pod = next(o for o in objects if o.KIND == "Pod")
    cases = [(obj, None) for obj in objects] + [(pod, PodStatus("10.244.1.2", True, True, "node-a", "z1"))]
    tried = 0
    for obj, status in cases:
        manifest = json.loads(encode(obj, status))
        for path in list(_paths(manifest)):
            for value in WRONG_TYPES:
                data = _set(copy.deepcopy(manifest), path, value)
                kv = KeyValue(object_key(obj), json.dumps(data).encode(), 2, 2, 1)
                tried += 1
                try:
                    stored = decode(kv)
                except ConfigError as exc:
                    assert str(exc).startswith(object_key(obj)), exc
                    continue
                assert stored.obj.object_key == obj.object_key
                if stored.status is not None:   # what a node reads back is well typed
                    assert stored.status.ip is None or isinstance(stored.status.ip, str)
                    assert isinstance(stored.status.terminating, bool)
    assert tried > 1000


@pytest.mark.parametrize("field, value, message", [
    ("podIP", 5, "status.podIP: must be a string"),
    ("podIP", "10.244.1.300", "status.podIP: not an IP address"),
    ("conditions", 7, "status.conditions: must be a list"),
    ("terminating", "yes", "status.terminating: must be a boolean"),
    ("nodeName", ["node-a"], "status.nodeName: must be a string"),
])
def test_a_bad_pod_status_names_its_field(field, value, message):
    from podnet.store import KeyValue
    pod = next(o for o in parse_manifests(EVERY_FIELD).objects() if o.KIND == "Pod")
    data = json.loads(encode(pod, PodStatus("10.244.1.2", True)))
    data["status"][field] = value
    with pytest.raises(ConfigError, match=f"^/registry/pods/shop/web-1: {message}"):
        decode(KeyValue(object_key(pod), json.dumps(data).encode(), 2, 2, 1))


def test_an_object_at_another_objects_key_is_refused():
    """The API server writes each object at its own key; one written elsewhere (etcdctl) is not
    the object its key names: a Namespace under a Service's key would otherwise be served as one."""
    from podnet.cluster.model import Namespace
    from podnet.store import KeyValue
    service = next(o for o in parse_manifests(EVERY_FIELD).objects() if o.KIND == "Service" and o.name == "web")
    elsewhere = [("/registry/services/specs/shop/other", encode(service),
                  'holds Service "shop/web", not the Service "shop/other" its key names'),
                 (object_key(service), encode(Namespace(ObjectMeta("shop", ""))), 'holds Namespace "shop"')]
    for key, value, message in elsewhere:
        with pytest.raises(ConfigError, match=f"^{key}: {message}"):
            decode(KeyValue(key, value, 2, 2, 1))


def _service_kv(key_revision: int, port):
    from podnet.store import KeyValue
    data = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": port}]}}
    return KeyValue("/registry/services/specs/shop/web", json.dumps(data).encode(), 2, key_revision, 1)


def test_an_object_view_skips_a_bad_value_once_and_keeps_the_last_good_one(caplog):
    from podnet.store.objects import ObjectView
    view = ObjectView("Service", "node node-1")
    key = "/registry/services/specs/shop/web"
    # first seen bad: absent, reported with the key and the field
    assert view.sync([_service_kv(2, "eighty")]) == [] and view.skipped == 1
    assert "spec.ports[0].port" in view.bad[key]
    assert any(key in r.getMessage() and "treated as absent" in r.getMessage() for r in caplog.records)
    assert view.sync([_service_kv(2, "eighty")]) == [] and view.skipped == 1   # the same revision: once
    good = view.sync([_service_kv(3, 80)])
    assert [s.obj.ports[0].port for s in good] == [80] and view.bad == {}
    # a good object rewritten badly: its last good version stays
    caplog.clear()
    kept = view.sync([_service_kv(4, 0)])
    assert kept == good and view.skipped == 2 and key in view.bad
    assert any("keeping its last good version (revision 3)" in r.getMessage() for r in caplog.records)
    assert view.put(_service_kv(4, 0)) is good[0] and view.skipped == 2
    # deleted: gone, and no longer reported
    assert view.sync([]) == [] and view.bad == {} and view.objects == {}


def test_update_pod_status_writes_the_status_alone(h):
    """The node's status write (the pods/status subresource): a spec and labels someone changed
    between the node's read and its write stay; the write lost the compare-and-swap and read again."""
    from podnet.store.objects import update_pod_status
    from podnet.testing.store import FaultyStore
    store = FaultyStore(h.store)
    pod = next(o for o in parse_manifests(EVERY_FIELD).objects() if o.KIND == "Pod")
    key = object_key(pod)
    store.put(key, encode(pod, PodStatus(None)))
    relabelled = json.loads(encode(pod))
    relabelled["metadata"]["labels"]["tier"] = "front"   # `kubectl label pod`, as it lands in etcd
    raced = []

    def relabel_between_read_and_write(call):
        if call.key == key and not raced:
            raced.append(store.inner.put(key, json.dumps(relabelled)))

    store.after("get", relabel_between_read_and_write)
    status = PodStatus("10.244.1.2", ready=True, node_name="node-a")
    revision = update_pod_status(store, key, status)
    assert raced and revision > raced[0]
    stored = decode(store.get(key))
    assert stored.status == status and stored.obj.meta.labels == {"app": "web", "tier": "front"}
    assert update_pod_status(store, key, status) == revision   # unchanged: not written again
    store.delete(key)
    assert update_pod_status(store, key, status) is None and store.get(key) is None   # never re-created
    store.put(key, b"{not json")
    with pytest.raises(ConfigError, match=f"^{key}: not JSON"):
        update_pod_status(store, key, status)
