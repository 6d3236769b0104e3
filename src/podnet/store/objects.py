"""Cluster objects in the store: Kubernetes' key layout and the JSON of podnet's model objects.

Layer: store. Keys are the API server's etcd keys (k8s.io/kubernetes pkg/kubeapiserver,
SpecialDefaultResourcePrefixes): `/registry/<resource>/<namespace>/<name>`, and
`/registry/<resource>/<name>` for cluster-scoped kinds, where the resource is the plural except
for two kept from Kubernetes' early days - nodes live under `minions`, Services under
`services/specs`:

    /registry/namespaces/demo                 /registry/minions/node-a
    /registry/pods/demo/web-1                 /registry/services/specs/demo/web
    /registry/endpointslices/demo/web-x7k2p

Values are the object as a manifest, in JSON (what `kubectl get -o json` would show, minus the
server-set metadata): apiVersion, kind, metadata, spec... Decoding goes through
`podnet.cluster.manifest.parse_manifests`, the same parser and checks as `podnet up -f`, so an
object read from the store equals the one that was written (the round trip is tested on every
manifest in tests/ and examples/). A Pod may carry what its node reports (`PodStatus`) under
`status`: podIP, podIPs and the Ready condition as the API server has them; terminating (the API
server's metadata.deletionTimestamp), zone (a node label in Kubernetes) and nodeName (when the
node reports one) as podnet's own status fields.

The store holds whatever was written to it (etcdctl writes behind the API server's back), so a
reader must survive a bad value: `decode` raises a ConfigError naming the key and the field for
anything that is not the object its key names; `ObjectView` keeps a kind's decoded objects and
skips such a value (logged, counted, the key's last good version kept). A node writes a pod's
status alone (`update_pod_status`, the pods/status subresource: compare-and-swap on the key's
mod_revision), never the spec someone else may have changed.

Differences from Kubernetes: the API server stores core kinds as protobuf (a `k8s\\0` prefix);
JSON is its `--storage-media-type=application/json`, readable with etcdctl. No resourceVersion,
uid or timestamps are written: the key's mod_revision is the resourceVersion.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable

from podnet.cluster.endpoints import PodStatus
from podnet.cluster.manifest import parse_manifests
from podnet.cluster.model import (BUILTIN_NAMESPACES, ClusterObject, Container, ExecAction,
                                  HTTPGetAction, Manifests, Namespace, Node, Pod, Probe,
                                  TCPSocketAction)
from podnet.cluster.service import EndpointSlice, Service
from podnet.errors import ConfigError

from .base import KeyValue, RevisionConflict, Store

log = logging.getLogger(__name__)

REGISTRY = "/registry"
# kind -> (resource as the API server names it in etcd, apiVersion, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "Namespace": ("namespaces", "v1", False),
    "Node": ("minions", "v1", False),
    "Pod": ("pods", "v1", True),
    "Service": ("services/specs", "v1", True),
    "EndpointSlice": ("endpointslices", "discovery.k8s.io/v1", True),
}


# --- keys ---------------------------------------------------------------------------------------


def kind_prefix(kind: str, namespace: str | None = None) -> str:
    """`/registry/pods/` (every namespace) or `/registry/pods/demo/`."""
    resource, _, namespaced = _resource(kind)
    if namespace is not None and not namespaced:
        raise ValueError(f"{kind} is cluster-scoped: it has no namespace")
    return f"{REGISTRY}/{resource}/" + (f"{namespace}/" if namespace is not None else "")


def key_of(kind: str, namespace: str, name: str) -> str:
    resource, _, namespaced = _resource(kind)
    return f"{REGISTRY}/{resource}/{namespace}/{name}" if namespaced \
        else f"{REGISTRY}/{resource}/{name}"


def object_key(obj: ClusterObject) -> str:
    return key_of(*obj.object_key)


def parse_key(key: str) -> tuple[str, str, str]:
    """(kind, namespace, name) of a registry key; ValueError for anything else."""
    for kind, (resource, _, namespaced) in RESOURCES.items():
        head = f"{REGISTRY}/{resource}/"
        if key.startswith(head):
            rest = key[len(head):].split("/")
            if namespaced and len(rest) == 2 and all(rest):
                return kind, rest[0], rest[1]
            if not namespaced and len(rest) == 1 and rest[0]:
                return kind, "", rest[0]
    raise ValueError(f"{key!r} is not a registry key of {', '.join(RESOURCES)}")


def _resource(kind: str) -> tuple[str, str, bool]:
    if kind not in RESOURCES:
        raise ValueError(f"unknown kind {kind!r} (stored kinds: {', '.join(RESOURCES)})")
    return RESOURCES[kind]


# --- encoding -----------------------------------------------------------------------------------


def _drop_none(mapping: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in mapping.items() if value is not None}


def _meta(obj: ClusterObject) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": obj.meta.name}
    if RESOURCES[obj.KIND][2]:
        meta["namespace"] = obj.meta.namespace
    if obj.meta.labels:
        meta["labels"] = dict(obj.meta.labels)
    if obj.meta.annotations:
        meta["annotations"] = dict(obj.meta.annotations)
    return meta


def _http_get(action: HTTPGetAction) -> dict[str, Any]:
    return _drop_none({"port": action.port, "path": action.path, "host": action.host,
                       "scheme": action.scheme})


def _handler(handler: Any) -> dict[str, Any]:
    if isinstance(handler, ExecAction):
        return {"exec": {"command": list(handler.command)}}
    if isinstance(handler, HTTPGetAction):
        return {"httpGet": _http_get(handler)}
    if isinstance(handler, TCPSocketAction):
        return {"tcpSocket": {"port": handler.port}}
    if type(handler).__name__ == "SleepAction":  # preStop sleep, where the model has it
        return {"sleep": {"seconds": handler.seconds}}
    raise ValueError(f"cannot store a {type(handler).__name__} handler")


def _probe(probe: Probe) -> dict[str, Any]:
    return {**_handler(probe.handler), "initialDelaySeconds": probe.initial_delay_seconds,
            "periodSeconds": probe.period_seconds, "timeoutSeconds": probe.timeout_seconds,
            "successThreshold": probe.success_threshold,
            "failureThreshold": probe.failure_threshold}


def _container(container: Container) -> dict[str, Any]:
    data: dict[str, Any] = {"name": container.name}
    if container.image is not None:
        data["image"] = container.image
    data["command"] = list(container.command)
    if container.args:
        data["args"] = list(container.args)
    if container.working_dir is not None:
        data["workingDir"] = container.working_dir
    if container.ports:
        data["ports"] = [_drop_none({"name": port.name, "containerPort": port.container_port,
                                     "protocol": port.protocol}) for port in container.ports]
    if container.env:
        data["env"] = [{"name": name, "value": value} for name, value in container.env]
    if container.readiness_probe is not None:
        data["readinessProbe"] = _probe(container.readiness_probe)
    lifecycle = getattr(container, "lifecycle", None)
    if lifecycle is not None and lifecycle.pre_stop is not None:
        data["lifecycle"] = {"preStop": _handler(lifecycle.pre_stop)}
    return data


def _pod_status(status: PodStatus) -> dict[str, Any]:
    data: dict[str, Any] = {"phase": "Running" if status.ip else "Pending"}
    if status.ip is not None:
        data["podIP"] = status.ip
        data["podIPs"] = [{"ip": status.ip}]
    data["conditions"] = [{"type": "Ready", "status": "True" if status.ready else "False"}]
    if status.terminating:
        data["terminating"] = True
    if status.node_name is not None:
        data["nodeName"] = status.node_name
    if status.zone is not None:
        data["zone"] = status.zone
    return data


def _body(obj: ClusterObject) -> dict[str, Any]:
    if isinstance(obj, Namespace):
        return {}
    if isinstance(obj, Node):
        body: dict[str, Any] = {"spec": _drop_none({"podCIDR": obj.pod_cidr})}
        if obj.addresses:
            body["status"] = {"addresses": [{"type": a.type, "address": a.address}
                                            for a in obj.addresses]}
        return body
    if isinstance(obj, Pod):
        return {"spec": _drop_none({
            "nodeName": obj.node_name, "restartPolicy": obj.restart_policy,
            "terminationGracePeriodSeconds": obj.termination_grace_period_seconds,
            "containers": [_container(container) for container in obj.containers]})}
    if isinstance(obj, Service):
        return _service(obj)
    if isinstance(obj, EndpointSlice):
        return _endpoint_slice(obj)
    raise ValueError(f"cannot store a {type(obj).__name__}")


def _service(service: Service) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": service.type}
    if service.selector is not None:
        spec["selector"] = dict(service.selector)
    if service.cluster_ip is not None:
        spec["clusterIP"] = service.cluster_ip
    spec["ports"] = [_drop_none({"name": port.name or None, "port": port.port,
                                 "protocol": port.protocol, "targetPort": port.target_port,
                                 "nodePort": port.node_port, "appProtocol": port.app_protocol})
                     for port in service.ports]
    spec["sessionAffinity"] = service.session_affinity
    if service.session_affinity == "ClientIP":
        spec["sessionAffinityConfig"] = {
            "clientIP": {"timeoutSeconds": service.session_affinity_timeout_s}}
    if service.type != "ClusterIP" or service.external_ips:  # where the API server allows it
        spec["externalTrafficPolicy"] = service.external_traffic_policy
    spec["internalTrafficPolicy"] = service.internal_traffic_policy
    if service.external_ips:
        spec["externalIPs"] = list(service.external_ips)
    if service.load_balancer_source_ranges:
        spec["loadBalancerSourceRanges"] = list(service.load_balancer_source_ranges)
    if service.health_check_node_port is not None:
        spec["healthCheckNodePort"] = service.health_check_node_port
    if service.type == "LoadBalancer":
        spec["allocateLoadBalancerNodePorts"] = service.allocate_load_balancer_node_ports
    spec["publishNotReadyAddresses"] = service.publish_not_ready_addresses
    body: dict[str, Any] = {"spec": spec}
    if service.load_balancer_ingress:
        body["status"] = {"loadBalancer": {"ingress": [{"ip": ip}
                                                       for ip in service.load_balancer_ingress]}}
    return body


def _endpoint_slice(endpoint_slice: EndpointSlice) -> dict[str, Any]:
    endpoints = []
    for endpoint in endpoint_slice.endpoints:
        data: dict[str, Any] = {"addresses": list(endpoint.addresses), "conditions": {
            "ready": endpoint.ready, "serving": endpoint.serving,
            "terminating": endpoint.terminating}}
        if endpoint.node_name is not None:
            data["nodeName"] = endpoint.node_name
        if endpoint.zone is not None:
            data["zone"] = endpoint.zone
        if (ref := endpoint.target_ref) is not None:
            data["targetRef"] = {"kind": ref.kind, "namespace": ref.namespace, "name": ref.name}
        endpoints.append(data)
    return {"addressType": endpoint_slice.address_type, "endpoints": endpoints,
            "ports": [_drop_none({"name": port.name, "port": port.port, "protocol": port.protocol,
                                  "appProtocol": port.app_protocol})
                      for port in endpoint_slice.ports]}


def to_manifest(obj: ClusterObject, status: PodStatus | None = None) -> dict[str, Any]:
    """The object as a Kubernetes manifest (a JSON-able dict); a Pod may carry its status."""
    _, api_version, _ = _resource(obj.KIND)
    manifest = {"apiVersion": api_version, "kind": obj.KIND, "metadata": _meta(obj),
                **_body(obj)}
    if status is not None:
        if not isinstance(obj, Pod):
            raise ValueError(f"only a Pod has a PodStatus, not a {obj.KIND}")
        manifest["status"] = _pod_status(status)
    return manifest


def encode(obj: ClusterObject, status: PodStatus | None = None) -> bytes:
    return json.dumps(to_manifest(obj, status), separators=(",", ":")).encode("utf-8")


# --- decoding -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredObject:
    """An object read from the store, with its key's revisions (mod_revision = resourceVersion)
    and, for a Pod, the status its node reported."""

    obj: ClusterObject
    key: str
    mod_revision: int
    create_revision: int
    lease: int = 0
    status: PodStatus | None = None


def from_manifest(data: dict[str, Any], source: str = "<store>") -> ClusterObject:
    """Parse one manifest dict with podnet's manifest parser (its checks and defaults)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: not a Kubernetes object: {data!r:.60}")
    kind, metadata = data.get("kind"), data.get("metadata")
    if not isinstance(kind, str):
        raise ConfigError(f"{source}: kind: must be a string, got {kind!r:.40}")
    if metadata is not None and not isinstance(metadata, dict):
        raise ConfigError(f"{source}: metadata: must be an object, got {metadata!r:.40}")
    items = [data]
    namespace = (metadata or {}).get("namespace")
    if RESOURCES.get(kind, ("", "", False))[2] and isinstance(namespace, str) \
            and namespace not in BUILTIN_NAMESPACES:  # an object is decoded alone: its namespace
        items.insert(0, {"apiVersion": "v1", "kind": "Namespace",  # is declared beside it
                         "metadata": {"name": namespace}})
    manifests = parse_manifests(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
                                source)
    return next(obj for obj in manifests.objects() if obj.KIND == data.get("kind"))


def _parse_pod_status(data: Any, source: str) -> PodStatus | None:
    """The status a node wrote (see `_pod_status`); ConfigError naming the field it cannot read."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: status: must be an object, got {data!r:.40}")

    def text(name: str) -> str | None:
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{source}: status.{name}: must be a string, got {value!r:.40}")
        return value

    ip = text("podIP")
    if ip is not None:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ConfigError(f"{source}: status.podIP: not an IP address: {ip!r:.40}") from None
    conditions = data.get("conditions") or []
    if not isinstance(conditions, list) or not all(isinstance(c, dict) for c in conditions):
        raise ConfigError(f"{source}: status.conditions: must be a list of objects, got {conditions!r:.40}")
    terminating = data.get("terminating", False)
    if not isinstance(terminating, bool):
        raise ConfigError(f"{source}: status.terminating: must be a boolean, got {terminating!r:.40}")
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return PodStatus(ip=ip, ready=ready, terminating=terminating, node_name=text("nodeName"),
                     zone=text("zone"))


def decode(kv: KeyValue) -> StoredObject:
    """The object stored at `kv`; ConfigError naming the key and the field if its value is not
    one, or is another object than the one its key names (the API server writes each object at
    its own key; anyone with etcdctl can write anything anywhere)."""
    try:
        data = json.loads(kv.value)
    except ValueError as exc:
        raise ConfigError(f"{kv.key}: not JSON: {exc}") from None
    obj = from_manifest(data, kv.key)
    try:
        named = parse_key(kv.key)
    except ValueError:
        named = None   # not a registry key (a test's own): nothing to compare
    if named is not None and named != obj.object_key:
        def show(kind: str, namespace: str, name: str) -> str:
            return f'{kind} "{namespace}/{name}"' if namespace else f'{kind} "{name}"'
        raise ConfigError(f"{kv.key}: holds {show(*obj.object_key)}, not the {show(*named)} its "
                          "key names")
    status = _parse_pod_status(data.get("status"), kv.key) if isinstance(obj, Pod) else None
    return StoredObject(obj, kv.key, kv.mod_revision, kv.create_revision, kv.lease, status)


class ObjectView:
    """The decoded objects of one kind, kept beside a listing or a Reflector's cache (what an
    informer's indexer holds): each key is decoded once per mod_revision.

    A value that is not a valid object (`decode` raises) is skipped: logged once with its key and
    the field that is wrong, counted in `skipped`, listed in `bad` until the key is written well or
    deleted. The key keeps its last good version, if the view had one: Kubernetes' API server
    validates every write, so a kube-proxy never sees an invalid object and goes on serving the
    last one its informer delivered; a typo written into etcd behind the API server's back must
    not take a running Service's traffic away either. A key first seen bad is absent. A key that
    is deleted takes its object with it."""

    def __init__(self, kind: str, owner: str) -> None:
        self.kind, self.owner = kind, owner   # owner: who logs ("node node-1", "control plane")
        self.objects: dict[str, StoredObject] = {}   # key -> its last good version
        self.bad: dict[str, str] = {}                 # keys whose value now is unreadable, and why
        self.skipped = 0                              # values skipped, each key and revision once
        self._seen: dict[str, int] = {}               # key -> the mod_revision last read

    def put(self, kv: KeyValue) -> StoredObject | None:
        """Read `kv` (a listing's key, or a PUT); the key's object now - `kv`'s, or if `kv` is
        not readable the last good one (None: there is none)."""
        if self._seen.get(kv.key) == kv.mod_revision:
            return self.objects.get(kv.key)
        self._seen[kv.key] = kv.mod_revision
        try:
            stored = decode(kv)
        except ConfigError as exc:
            self.skipped += 1
            self.bad[kv.key] = str(exc)
            kept = self.objects.get(kv.key)
            log.warning("%s: %s at revision %d skipped: %s; %s", self.owner, self.kind, kv.mod_revision,
                        exc, f"keeping its last good version (revision {kept.mod_revision})"
                        if kept is not None else "treated as absent")
            return kept
        self.bad.pop(kv.key, None)
        self.objects[kv.key] = stored
        return stored

    def delete(self, key: str) -> None:
        self._seen.pop(key, None)
        self.objects.pop(key, None)
        self.bad.pop(key, None)

    def sync(self, kvs: Iterable[KeyValue]) -> list[StoredObject]:
        """Bring the view to every key of the kind (a listing, a cache's values); its objects,
        in the order of `kvs`."""
        kvs = list(kvs)
        for kv in kvs:
            self.put(kv)
        if len(self._seen) > len(kvs):
            present = {kv.key for kv in kvs}
            for key in [key for key in self._seen if key not in present]:
                self.delete(key)
        return [stored for kv in kvs if (stored := self.objects.get(kv.key)) is not None]


# --- reads and writes ---------------------------------------------------------------------------


def put_object(store: Store, obj: ClusterObject, *, status: PodStatus | None = None,
               lease: int = 0) -> int:
    return store.put(object_key(obj), encode(obj, status), lease=lease)


def create_object(store: Store, obj: ClusterObject, *, status: PodStatus | None = None,
                  lease: int = 0) -> int:
    """Create only if absent (KeyExists otherwise), as the API server's create does."""
    return store.create(object_key(obj), encode(obj, status), lease=lease)


def get_object(store: Store, kind: str, namespace: str, name: str) -> StoredObject | None:
    kv = store.get(key_of(kind, namespace, name))
    return decode(kv) if kv is not None else None


def list_objects(store: Store, kind: str,
                 namespace: str | None = None) -> tuple[list[StoredObject], int]:
    """Every stored object of a kind (in one namespace), and the revision to watch from + 1."""
    listing = store.list(kind_prefix(kind, namespace))
    return [decode(kv) for kv in listing], listing.revision


def update_pod_status(store: Store, key: str, status: PodStatus, *, retries: int = 10) -> int | None:
    """The kubelet's status write, as the pods/status subresource takes it: read the Pod at `key`,
    replace its `status` and nothing else (spec and metadata stay as stored, whoever changed them
    last), and write it back only if the key still has the mod_revision read; a conflict reads
    again, up to `retries` times. Returns the revision written (the key's mod_revision if it had
    this status already), or None if the key is gone: a deleted pod is never re-created.
    ConfigError if the stored value is no Pod object; RevisionConflict after `retries` conflicts."""
    wanted = _pod_status(status)
    conflict: RevisionConflict | None = None
    for _ in range(retries):
        kv = store.get(key)
        if kv is None:
            return None
        try:
            data = json.loads(kv.value)
        except ValueError as exc:
            raise ConfigError(f"{key}: not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("kind") != "Pod":
            raise ConfigError(f"{key}: not a Pod object: {kv.value!r:.60}")
        if data.get("status") == wanted:
            return kv.mod_revision
        data["status"] = wanted
        value = json.dumps(data, separators=(",", ":")).encode("utf-8")
        try:
            return store.update(key, value, mod_revision=kv.mod_revision, lease=kv.lease)
        except RevisionConflict as exc:   # written meanwhile (its spec, or the control plane)
            conflict = exc
    assert conflict is not None
    raise conflict


def delete_object(store: Store, obj: ClusterObject) -> int | None:
    return store.delete(object_key(obj))


def apply_objects(store: Store, objects: Iterable[ClusterObject] | Manifests) -> int:
    """Write each object whose stored JSON differs (as `kubectl apply` leaves unchanged objects
    alone, so watchers see only real changes); the store's revision afterwards."""
    items = objects.objects() if isinstance(objects, Manifests) else objects
    for obj in items:
        key, value = object_key(obj), encode(obj)
        current = store.get(key)
        if current is None or current.value != value:
            store.put(key, value)
    return store.revision()
