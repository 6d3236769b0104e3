"""The cluster's control plane on the store: what the API server and kube-controller-manager do.

Layer: lab (store + cluster model; no namespaces, no datapath). `ControlPlane.publish` writes the
cluster as the API server would hold it after `kubectl apply`:

    /coreos.com/network/config      Flannel's network config: the cluster CIDR and the backend
                                    (vxlan, or host-gw for direct routing)
    /registry/namespaces/...        the Namespaces
    /registry/services/specs/...    every Service with its ClusterIP (and node ports) allocated
    /registry/pods/...              every Pod with spec.nodeName set (placed by cluster.topology)
    /registry/endpointslices/...    the EndpointSlices the manifests give (Services without selector)

Objects of those kinds the store holds and the manifests do not are deleted (a store reused from an
earlier run). Pods keep the status their node wrote when their spec is unchanged.

`ControlPlane.run` is the EndpointSlice controller of the cluster: it watches pods (with the status
each node agent reports: IP, Ready, terminating, node), Nodes and Services, and writes the derived
EndpointSlices whenever they change - for every Service, endpoints on every node, each with its
nodeName, so each node's kube-proxy knows which are local. It also does the node lifecycle
controller's part: the pods of a node whose registration is gone (its lease ran out: the process
died) are not ready, as MarkPodsNotReady makes them once a node stops renewing its lease. Beside
it run the Deployments' controllers (`deployments`, podnet.cluster_deployments): they create each
replica as a Pod placed on a node and delete pods' keys, reading readiness from the nodes' statuses.

Invariants:
- Derivation reads one consistent view (the reflectors' caches) and the slices written are exactly
  `derive_endpoint_slices` of it; unchanged slices are not written again, so nodes see only real
  changes; slices the controller made that no longer exist are deleted.
- `ready_revision` is the store revision of the slices derived while every pod was Ready on a
  registered node and every Deployment had exactly its replicas of its current template (0
  otherwise): once a node's slice watch has reached it and the node synced, Service traffic
  reaches every backend.
- One bad object never stops it: a Service or Pod value it cannot read is logged with its key and
  field, counted (`objects_skipped`) and skipped, the key keeping its last good version (so its
  slices stay as they were); an EndpointSlice it cannot read is not known to be its own, so it is
  left alone. A store it cannot reach (etcd restarting) is waited out with a backoff, and the
  derivation is done again from the caches and a fresh listing of the slices.
"""

from __future__ import annotations

import json
import logging

import trio

from podnet.cluster.endpoints import MANAGED_BY_LABEL, PodStatus, derive_endpoint_slices
from podnet.cluster.ipalloc import ServiceIPAllocator, allocate_services
from podnet.cluster.model import Manifests, Pod
from podnet.cluster.topology import ClusterConfig
from podnet.cluster_deployments import Deployments
from podnet.errors import ConfigError
from podnet.store import Store, StoreUnavailable
from podnet.store.flannel import write_network_config
from podnet.store.informer import Reflector, back_off
from podnet.store.objects import ObjectView, decode, encode, kind_prefix, object_key, parse_key

log = logging.getLogger(__name__)

_SETTLE_S = 0.02    # changes that arrive together are derived together


def allocated(manifests: Manifests, config: ClusterConfig) -> Manifests:
    """The API server's part: ClusterIPs and node ports for every Service."""
    return allocate_services(manifests, ServiceIPAllocator(config.service_cidr, seed=config.seed))


def _spec_json(value: bytes) -> dict | None:
    """The stored Pod without its status; None for a value that is no JSON object."""
    try:
        data = json.loads(value)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    data.pop("status", None)
    return data


def _managed(kv) -> bool | None:
    """Whether a stored EndpointSlice is the controller's (its managed-by label); None: unreadable."""
    try:
        labels = json.loads(kv.value).get("metadata", {}).get("labels", {})
        return MANAGED_BY_LABEL in labels
    except (ValueError, AttributeError, TypeError):
        return None


class ControlPlane:
    """Publishes `manifests` (placed and allocated) into `store`, then keeps its EndpointSlices."""

    def __init__(self, store: Store, manifests: Manifests, config: ClusterConfig) -> None:
        self.store = store
        self.manifests = manifests
        self.config = config
        self.ready_revision = 0
        self.slices_written = 0
        self.reconcile_failures = 0   # derivations the store broke off (tried again after a backoff)
        # the Services and Pods derivation reads: an unreadable value is skipped (logged, counted),
        # the key keeping its last good version, as on the nodes
        self.views = {kind: ObjectView(kind, "control plane") for kind in ("Pod", "Service")}
        # the deployment and ReplicaSet controllers and the scheduler, for the manifests' Deployments
        self.deployments = Deployments(store, manifests.deployments, [n.name for n in manifests.nodes],
                                       seed=config.seed)
        self._changed = trio.Event()

    @property
    def bad_objects(self) -> dict[str, str]:
        """The keys of Services and Pods whose value now cannot be read, and why."""
        return {key: why for view in self.views.values() for key, why in view.bad.items()}

    @property
    def objects_skipped(self) -> int:
        return sum(view.skipped for view in self.views.values())

    # ---- the API server's part --------------------------------------------------------------

    def publish(self) -> int:
        """Write the cluster into the store (blocking: store calls); the revision afterwards."""
        store, m, c = self.store, self.manifests, self.config
        backend = {"Port": c.vxlan_port, "VNI": c.vni} if c.network == "vxlan" else {}
        current = write_network_config(store, c.cluster_cidr, backend_type=c.flannel_backend, **backend)
        if str(current.network) != c.cluster_cidr or current.backend_type != c.flannel_backend:
            # a store left by another cluster: this one's network replaces it (its leases go too)
            from podnet.store.flannel import CONFIG_KEY, SUBNETS_PREFIX
            store.delete_prefix(SUBNETS_PREFIX)
            store.delete(CONFIG_KEY)
            write_network_config(store, c.cluster_cidr, backend_type=c.flannel_backend, **backend)
        wanted = {object_key(obj): obj for obj in (*m.namespaces, *m.services, *m.pods, *m.endpoint_slices)}
        for kind in ("Pod", "Service", "EndpointSlice"):
            for kv in store.list(kind_prefix(kind)):
                if kv.key in wanted:
                    continue
                if kind == "EndpointSlice" and (managed := _managed(kv)) is not False:
                    if managed is None:   # not known to be the controller's: not deleted
                        log.warning("control plane: %s is unreadable; left alone", kv.key)
                    continue
                store.delete(kv.key)
        for key, obj in wanted.items():
            value = encode(obj)
            kv = store.get(key)
            if kv is None:
                store.put(key, value)
            elif isinstance(obj, Pod):
                if _spec_json(kv.value) != json.loads(value):   # (an unreadable one too)
                    store.put(key, value)   # a changed spec: its old status does not apply
            elif kv.value != value:
                store.put(key, value)
        return store.revision()

    # ---- kube-controller-manager's part -------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Derive and write EndpointSlices until cancelled; started once the first set is written."""
        reflectors = {kind: Reflector(self.store, kind_prefix(kind)) for kind in ("Pod", "Node", "Service")}
        for reflector in reflectors.values():
            await trio.to_thread.run_sync(reflector.relist)
        await self._reconcile_until_done(reflectors)
        async with trio.open_nursery() as nursery:
            for reflector in reflectors.values():
                nursery.start_soon(self._follow, reflector)
            if self.deployments:
                nursery.start_soon(self.deployments.run, lambda: self._deployment_snapshot(reflectors))
            task_status.started()
            while True:
                await self._changed.wait()
                await trio.sleep(_SETTLE_S)
                self._changed = trio.Event()
                await self._reconcile_until_done(reflectors)

    async def _reconcile_until_done(self, reflectors: dict[str, Reflector]) -> None:
        """Derive and write the slices; a store that cannot be reached (etcd restarting) is waited
        out with the reflectors' backoff and the derivation done again, as the endpoint slice
        controller requeues a Service whose sync failed. Nothing is assumed of the try that
        failed: each try derives from the caches as they are then (their watches resume from
        the last revision they saw, or relist) and compares with a fresh listing of the slices,
        so what a broken-off try wrote or not is found there."""
        failures = 0
        while True:
            try:
                await trio.to_thread.run_sync(self._reconcile, self._snapshot(reflectors))
                return
            except StoreUnavailable as exc:
                self.reconcile_failures += 1
                failures = await back_off("control plane: endpoint slices", exc, failures, then="deriving")

    async def _follow(self, reflector: Reflector) -> None:
        async for _ in reflector.aevents():
            self._changed.set()
            self.deployments.changed()

    @staticmethod
    def _deployment_snapshot(reflectors: dict[str, Reflector]) -> tuple[list, int, set[str]]:
        """What the Deployments' controllers read: the pods, the revision they are at, the
        registered nodes (trio's thread)."""
        pods = reflectors["Pod"]
        nodes = {parse_key(kv.key)[2] for kv in reflectors["Node"].cache.values() if _is_registry_key(kv.key)}
        return list(pods.cache.values()), pods.revision, nodes

    @staticmethod
    def _snapshot(reflectors: dict[str, Reflector]) -> dict[str, list]:
        """The caches as they are now (taken in trio's thread, which the reflectors update)."""
        return {kind: list(r.cache.values()) for kind, r in reflectors.items()}

    def _view(self, caches: dict[str, list]):
        """Services, pods and their status from the caches (worker thread: only here are the
        views changed). A node is registered while its key exists: the name is the key's, as the
        node lifecycle controller reads only the lease, never the Node object's fields."""
        services = [stored.obj for stored in self.views["Service"].sync(caches["Service"])]
        pods, status = [], {}
        nodes = {parse_key(kv.key)[2] for kv in caches["Node"] if _is_registry_key(kv.key)}
        for stored in self.views["Pod"].sync(caches["Pod"]):
            pods.append(stored.obj)
            reported = stored.status
            if reported is None or reported.ip is None:
                continue
            node = reported.node_name or stored.obj.node_name
            if node not in nodes:   # the node lifecycle controller: no lease, no ready pods
                reported = PodStatus(reported.ip, False, reported.terminating, node, reported.zone)
            status[stored.obj.key] = reported
        return services, pods, status

    def _reconcile(self, caches: dict[str, list]) -> None:
        services, pods, status = self._view(caches)
        slices = derive_endpoint_slices(services, pods, status, seed=self.config.seed)
        store = self.store
        wanted = {object_key(s): encode(s) for s in slices}
        existing = {kv.key: kv for kv in store.list(kind_prefix("EndpointSlice"))}
        written = False
        # the revision of the slices as they stand: what a node's slice watch must have reached
        revision = max((kv.mod_revision for kv in existing.values()), default=0)
        for key, value in wanted.items():
            if (kv := existing.get(key)) is None or kv.value != value:
                revision = store.put(key, value)
                written = True
        for key, kv in existing.items():
            if key not in wanted and _managed(kv):   # (unreadable: not known to be ours, left alone)
                revision = store.delete(key) or revision
                written = True
        if written:
            self.slices_written += 1
        all_ready = bool(pods) and all(status.get(p.key) is not None and status[p.key].ready for p in pods) \
            and self.deployments.settled(pods)
        # (no slices at all: nothing for the nodes to wait for, yet ready)
        self.ready_revision = max(revision, 1) if all_ready else 0

    async def wait_ready(self, timeout_s: float) -> int:
        """Until every pod is Ready and the slices say so, and every Deployment rolled out; the
        store revision that has them."""
        with trio.move_on_after(timeout_s):
            while not self.ready_revision or self.deployments.unfinished():
                await trio.sleep(0.05)
            return self.ready_revision
        raise TimeoutError(f"the cluster's pods were not all ready after {timeout_s:.0f} s: "
                           f"{', '.join(self.unready() + self.deployments.unfinished()) or '?'}")

    def unready(self) -> list[str]:
        """The pods not ready, for error messages: each with its node and why."""
        try:
            listing = self.store.list(kind_prefix("Pod"))
        except StoreUnavailable as exc:
            return [f"(the store cannot be read: {exc})"]
        out = []
        for kv in listing:
            try:
                stored = decode(kv)
            except ConfigError as exc:
                out.append(f"{kv.key} (unreadable: {exc})")
                continue
            if stored.status is None or not stored.status.ready:
                out.append(f"{stored.obj.key} on {stored.obj.node_name} "
                           f"({'no status yet' if stored.status is None else 'not ready'})")
        return out


def pods_from_store(store: Store, prefix: str) -> list[dict]:
    """`podnet status` rows for every pod of the cluster, as the store has them (its node reports
    IP and readiness; a pod whose node is not registered shows NodeLost, as kubectl shows Unknown)."""
    from podnet.linux import names
    nodes = {parse_key(kv.key)[2] for kv in store.list(kind_prefix("Node")) if _is_registry_key(kv.key)}
    rows = []
    for kv in store.list(kind_prefix("Pod")):
        try:
            stored = decode(kv)
        except ConfigError as exc:   # shown, not dropped: `podnet status` must not hide it
            log.warning("%s", exc)
            rows.append(_unreadable_row(kv.key, prefix))
            continue
        pod, status = stored.obj, stored.status
        phase = "Pending" if status is None or status.ip is None else "Running"
        if status is not None and status.terminating:
            phase = "Terminating"
        if pod.node_name not in nodes:
            phase = "NodeLost"
        key = pod.name if pod.namespace == "default" else f"{pod.namespace}.{pod.name}"
        ready = status is not None and status.ready and pod.node_name in nodes
        rows.append({"namespace": pod.namespace, "name": pod.name, "ip": status.ip if status else None,
                     "node": pod.node_name, "phase": phase, "ready": f"{int(ready)}/1" if len(pod.containers) == 1
                     else f"{len(pod.containers) if ready else 0}/{len(pod.containers)}",
                     "restarts": 0, "netns": names.netns_name(key, prefix)})
    return rows


def _unreadable_row(key: str, prefix: str) -> dict:
    from podnet.linux import names
    _, namespace, name = parse_key(key) if _is_registry_key(key) else ("Pod", "?", key)
    netns_key = name if namespace == "default" else f"{namespace}.{name}"
    return {"namespace": namespace, "name": name, "ip": None, "node": None, "phase": "Unreadable",
            "ready": "0/?", "restarts": 0, "netns": names.netns_name(netns_key, prefix)}


def _is_registry_key(key: str) -> bool:
    try:
        parse_key(key)
    except ValueError:
        return False
    return True


__all__ = ["ControlPlane", "allocated", "pods_from_store"]
