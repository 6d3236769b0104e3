"""A cluster of nodes on one machine, in this process: the embedded-store mode.

Layer: lab. `open_cluster` brings up every Node of the manifests as its own node - its own
Datapath, serve loop, pods, Service backend and uplink TAP on a shared underlay bridge - all in this
trio process, sharing one embedded store (`podnet.store.EmbeddedStore`) through which they learn
about each other, as separate processes would through etcd:

    plan      cluster.topology: underlay addresses, every pod placed on a node
    underlay  linux.underlay: netns `<prefix>underlay` with a bridge, journalled here, and the
              external client `<prefix>external` on it (a veth into the bridge, the plan's address,
              no route into the pod network): where NodePort and LoadBalancer traffic comes from
    store     the control plane (podnet.control_plane) publishes the Flannel network config,
              Namespaces, Services (ClusterIPs allocated), Pods (spec.nodeName set) and keeps the
              EndpointSlices from the pods' statuses; it creates and deletes the Deployments'
              pods, spread over the nodes (podnet.cluster_deployments): `rollout`, `scale`
    nodes     podnet.cluster_node, one per Node, brought up together: each leases a subnet,
              registers, runs its pods and programs its datapath from the store

With `ClusterConfig(store="etcd://HOST:PORT")` the same runs against a real etcd; a cluster whose
nodes are separate processes (or hosts) is `podnet up --store etcd://...`, which starts one
`podnet node join` process per Node (podnet.cluster_procs).

    async with open_cluster(load_manifests(["cluster.yaml"]), ClusterConfig(network="direct")) as c:
        web = c.pod("web-2")
        print((await c.exec("client", ["curl", "-s", f"http://{web.ip}:8080/"])).stdout)

`run_cluster` is the same for synchronous scripts (trio in a background thread).

From outside: `exec_external` runs a command on the external client. It reaches a NodePort on any
node's address; a LoadBalancer IP is answered (ARP) by the one node MetalLB's L2 election picks
(podnet.cluster_speaker).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
from collections.abc import Iterator, Sequence

import trio

from podnet.cluster.manifest import load_manifests
from podnet.cluster.model import Manifests
from podnet.cluster.topology import ClusterConfig, ClusterPlan, plan_cluster
from podnet.cluster_node import ClusterNode, open_cluster_node
from podnet.control_plane import ControlPlane, allocated
from podnet.core.services.base import SyncReport
from podnet.deployments import RolloutReport
from podnet.errors import ConfigError
from podnet.lab import Lab, PodState, exec_in_pod
from podnet.linux import names
from podnet.linux.resources import Entry, Resources, state_dir_default
from podnet.linux.underlay import (ExternalHost, Underlay, add_external_host, create_underlay, remove_external_host,
                                   remove_underlay)
from podnet.store import Store, open_store
from podnet.runtime.background import run_in_background


class Cluster:
    """Running nodes. Datapath-level calls without a node (`statistics`, `backend`, `datapath`)
    answer for the first node; `set_backend` switches all. The control socket's per-node ops ask
    `locate_node` for the node they name. `external` is the client outside the cluster."""

    def __init__(self, config: ClusterConfig, plan: ClusterPlan, store: Store, control_plane: ControlPlane,
                 underlay: Underlay, external: ExternalHost | None = None) -> None:
        self.config = config
        self.plan = plan
        self.store = store
        self.control_plane = control_plane
        self.underlay = underlay
        self.nodes: dict[str, ClusterNode] = {}
        self.external = external

    # ---- lookups -----------------------------------------------------------------------------

    def node(self, name: str | None = None) -> ClusterNode:
        if name is None:
            return self.nodes[self.plan.nodes[0].name]
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"no node {name!r} (nodes: {', '.join(self.nodes)})") from None

    def locate_node(self, name: str | None = None) -> Lab:
        """Node `name`'s Lab (default: the first node's), for the control socket's per-node ops."""
        try:
            return self.node(name).lab
        except KeyError as exc:
            raise ConfigError(exc.args[0]) from None

    def pod(self, name: str, namespace: str | None = None) -> PodState:
        found = []
        for node in self.nodes.values():
            try:
                found.append(node.lab.pod(name, namespace))
            except KeyError:
                pass
        if len(found) != 1:
            where = f" in namespace {namespace!r}" if namespace else ""
            raise KeyError(f"no pod {name!r}{where}" if not found else f"pod {name!r} exists in several namespaces")
        return found[0]

    def node_of(self, pod: str, namespace: str | None = None) -> ClusterNode:
        state = self.pod(pod, namespace)
        return next(n for n in self.nodes.values() if n.lab.pods.get(state.key) is state)

    def status(self) -> list[dict]:
        return [row for node in self.nodes.values() for row in node.lab.status()]

    def services_status(self) -> list[dict]:
        return self.node().lab.services_status()

    # ---- the first node's datapath, for the control socket --------------------------------------

    @property
    def datapath(self):
        return self.node().lab.datapath

    @property
    def backend(self):
        return self.node().lab.backend

    def statistics(self, node: str | None = None):
        return self.node(node).lab.statistics()

    def sync_summary(self, node: str | None = None) -> dict:
        return self.node(node).lab.sync_summary()

    def conntrack_listing(self, node: str | None = None) -> list[str]:
        return self.node(node).lab.conntrack_listing()

    def set_backend(self, name: str) -> SyncReport:
        """Switch every node's Service backend; the first node's sync report."""
        reports = [node.lab.set_backend(name) for node in self.nodes.values()]
        return reports[0]

    # ---- commands and waits -------------------------------------------------------------------

    async def exec(self, pod: str, argv: Sequence[str], *, namespace: str | None = None,
                   timeout_s: float = 60.0, input: bytes | None = None) -> subprocess.CompletedProcess:
        state = self.pod(pod, namespace)
        return await trio.to_thread.run_sync(exec_in_pod, state.netns, list(argv), timeout_s, input)

    async def exec_external(self, argv: Sequence[str], *, timeout_s: float = 60.0,
                            input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run `argv` on the external client (outside the cluster, on the underlay)."""
        return await trio.to_thread.run_sync(exec_external, self.external, list(argv), timeout_s, input)

    # ---- Deployments (their controller runs in the control plane) ----------------------------------

    async def rollout(self, namespace: str, name: str, **kw) -> RolloutReport:
        """As `Lab.rollout` (env= or template=, timeout_s=, on_progress=): the control plane's
        controller replaces the pods across the nodes; returns once it is rolled out."""
        return await self.control_plane.deployments.get(namespace, name).rollout(**kw)

    async def scale(self, namespace: str, name: str, replicas: int, *,
                    timeout_s: float | None = None) -> RolloutReport:
        """`kubectl scale deployment --replicas`, and wait until it is done."""
        return await self.control_plane.deployments.get(namespace, name).scale(replicas, timeout_s=timeout_s)

    def deployment_pods(self, namespace: str, name: str) -> list[PodState]:
        """The Deployment's pods the store has now, as their nodes run them (not yet started: left out)."""
        found = []
        for pod in self.control_plane.deployments.get(namespace, name).members:
            try:
                found.append(self.pod(pod, namespace))
            except KeyError:
                pass
        return found

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Every pod Ready, the EndpointSlices saying so, and every node's backend synced to them."""
        deadline = trio.current_time() + timeout_s
        for node in self.nodes.values():
            await node.lab.wait_ready(max(0.1, deadline - trio.current_time()))
        revision = await self.control_plane.wait_ready(max(0.1, deadline - trio.current_time()))
        for node in self.nodes.values():
            await node.wait_synced(revision, max(0.1, deadline - trio.current_time()))


def _store_for(config: ClusterConfig) -> Store:
    return open_store(config.store or "embedded")


def exec_external(external: ExternalHost | None, argv: list[str], timeout_s: float | None = 60.0,
                  input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a command on a cluster's external client and wait for it (blocking)."""
    if external is None:
        raise ConfigError("this cluster has no external client")
    return exec_in_pod(external.netns, argv, timeout_s, input)


def add_external_client(resources: Resources, underlay: Underlay, plan: ClusterPlan, prefix: str
                        ) -> tuple[ExternalHost, Entry]:
    """The plan's external client `<prefix>external` on the underlay, journalled in `resources`
    (blocking netlink work); `remove_external_host` removes it."""
    spec = plan.external
    return add_external_host(underlay, resources, names.netns_name("external", prefix), spec.ip, spec.prefixlen,
                             spec.mac)


@contextlib.asynccontextmanager
async def open_cluster(manifests: Manifests | Sequence[str | os.PathLike], config: ClusterConfig | None = None,
                       *, wait_ready_s: float | None = 60.0):
    """Bring up every Node of `manifests` with its pods, in this process (see the module); tear all
    of it down on exit."""
    if not isinstance(manifests, Manifests):
        manifests = load_manifests(manifests)
    config = config or ClusterConfig()
    config = dataclasses.replace(config, state_dir=config.state_dir or state_dir_default())
    plan = plan_cluster(manifests, config.underlay_cidr, config.cluster_cidr, external_ip=config.external_ip)
    placed = allocated(plan.manifests, config)
    store = _store_for(config)
    try:
        with Resources(prefix=config.prefix, state_dir=config.state_dir) as resources:
            underlay, entry = await trio.to_thread.run_sync(create_underlay, resources)
            external = None
            try:
                external, external_entry = await trio.to_thread.run_sync(
                    add_external_client, resources, underlay, plan, config.prefix)
                control_plane = ControlPlane(store, placed, config)
                await trio.to_thread.run_sync(control_plane.publish)
                cluster = Cluster(config, plan, store, control_plane, underlay, external)
                async with trio.open_nursery() as nursery:
                    await nursery.start(control_plane.run)

                    async def run_node(spec, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
                        async with open_cluster_node(store, spec, config, underlay, wait_ready_s=None) as node:
                            task_status.started(node)
                            await trio.sleep_forever()

                    async def start(spec) -> None:
                        cluster.nodes[spec.name] = await nursery.start(run_node, spec)

                    async with trio.open_nursery() as starting:   # all nodes come up together
                        for spec in plan.nodes:
                            starting.start_soon(start, spec)
                    cluster.nodes = {spec.name: cluster.nodes[spec.name] for spec in plan.nodes}
                    if wait_ready_s is not None:
                        await cluster.wait_ready(wait_ready_s)
                    try:
                        yield cluster
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                if external is not None:
                    await trio.to_thread.run_sync(remove_external_host, resources, external, external_entry)
                await trio.to_thread.run_sync(remove_underlay, resources, underlay, entry)
    finally:
        store.close()


class SyncCluster:
    """`open_cluster` for synchronous scripts; attributes are read from the running cluster."""

    def __init__(self, cluster: Cluster, token: trio.lowlevel.TrioToken) -> None:
        self.cluster = cluster
        self._token = token

    def __getattr__(self, name: str):
        return getattr(self.cluster, name)

    def _run(self, fn, *args, **kw):
        return trio.from_thread.run(lambda: fn(*args, **kw), trio_token=self._token)

    def _sync(self, fn, *args):
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def exec(self, pod: str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return self._run(self.cluster.exec, pod, argv, **kw)

    def exec_external(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return self._run(self.cluster.exec_external, argv, **kw)

    def status(self) -> list[dict]:
        return self._sync(self.cluster.status)

    def statistics(self, node: str | None = None):
        return self._sync(self.cluster.statistics, node)

    def set_backend(self, name: str) -> SyncReport:
        return self._sync(self.cluster.set_backend, name)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        self._run(self.cluster.wait_ready, timeout_s)

    def show(self, node: str | None = None) -> dict[str, list[str]]:
        return self._sync(lambda: self.cluster.node(node).show())

    def rollout(self, namespace: str, name: str, **kw) -> RolloutReport:
        """As `Cluster.rollout`; an `on_progress` callback runs in the cluster's thread."""
        return self._run(self.cluster.rollout, namespace, name, **kw)

    def scale(self, namespace: str, name: str, replicas: int, **kw) -> RolloutReport:
        return self._run(self.cluster.scale, namespace, name, replicas, **kw)

    def deployment_pods(self, namespace: str, name: str) -> list[PodState]:
        return self._sync(self.cluster.deployment_pods, namespace, name)

    def call(self, fn, *args):
        """Run `fn(*args)` in the cluster's thread (for anything that touches a datapath)."""
        return self._sync(fn, *args)


@contextlib.contextmanager
def run_cluster(manifests, config: ClusterConfig | None = None, *, wait_ready_s: float | None = 60.0
                ) -> Iterator[SyncCluster]:
    with run_in_background(lambda: open_cluster(manifests, config, wait_ready_s=wait_ready_s), SyncCluster,
                           name="podnet-cluster") as cluster:
        yield cluster


__all__ = ["Cluster", "ClusterConfig", "SyncCluster", "add_external_client", "exec_external", "open_cluster",
           "run_cluster"]
