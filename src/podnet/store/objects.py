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

Differences from Kubernetes: the API server stores core kinds as protobuf (a `k8s\\0` prefix);
JSON is its `--storage-media-type=application/json`, readable with etcdctl. No resourceVersion,
uid or timestamps are written: the key's mod_revision is the resourceVersion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from podnet.cluster.endpoints import PodStatus
from podnet.cluster.manifest import parse_manifests
from podnet.cluster.model import (BUILTIN_NAMESPACES, ClusterObject, Container, ExecAction,
                                  HTTPGetAction, Manifests, Namespace, Node, Pod, Probe,
                                  TCPSocketAction)
from podnet.cluster.service import EndpointSlice, Service
from podnet.errors import ConfigError

from .base import KeyValue, Store

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
    items = [data]
    namespace = (data.get("metadata") or {}).get("namespace")
    if RESOURCES.get(data.get("kind"), ("", "", False))[2] and isinstance(namespace, str) \
            and namespace not in BUILTIN_NAMESPACES:  # an object is decoded alone: its namespace
        items.insert(0, {"apiVersion": "v1", "kind": "Namespace",  # is declared beside it
                         "metadata": {"name": namespace}})
    manifests = parse_manifests(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
                                source)
    return next(obj for obj in manifests.objects() if obj.KIND == data.get("kind"))


def _parse_pod_status(data: Any) -> PodStatus | None:
    if not isinstance(data, dict):
        return None
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in data.get("conditions", ()) if isinstance(c, dict))
    return PodStatus(ip=data.get("podIP"), ready=ready,
                     terminating=bool(data.get("terminating", False)),
                     node_name=data.get("nodeName"), zone=data.get("zone"))


def decode(kv: KeyValue) -> StoredObject:
    """The object stored at `kv`; ConfigError naming the key if its value is not one."""
    try:
        data = json.loads(kv.value)
    except ValueError as exc:
        raise ConfigError(f"{kv.key}: not JSON: {exc}") from None
    obj = from_manifest(data, kv.key)
    status = _parse_pod_status(data.get("status")) if isinstance(obj, Pod) else None
    return StoredObject(obj, kv.key, kv.mod_revision, kv.create_revision, kv.lease, status)


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
