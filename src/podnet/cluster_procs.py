"""A cluster whose nodes are separate processes, sharing an etcd: `podnet up --store etcd://...`.

Layer: lab. `open_cluster_processes` does what `open_cluster` does, except that each Node is a
`podnet node join` process of its own (its own trio loop, datapath, pods and uplink TAP), so nodes
use separate cores and one can be killed and started again:

    this process   the underlay namespace and the external client on it (journalled), the control
                   plane (podnet.control_plane: publish, then the EndpointSlice controller and the
                   Deployments' controller: `rollout`, `scale`), one child per Node
    node process   `python -m podnet.cli node join --store etcd://... --node NAME --node-ip IP ...`,
                   started in a session of its own, its log at <state_dir>/nodes/<node>/node.log

Every child is journalled by pid (and start time) as soon as it exists, and ended only by its pid:
SIGTERM and a wait (the node deregisters and tears its pods down), SIGKILL after `stop_timeout_s`.
`kill_node` SIGKILLs one, as a crash would: its pods' namespaces, containers and IPAM files stay;
`start_node` runs it again, and its first act is to release what the killed one journalled; its
subnet lease and IPAM files give its pods the same addresses. On exit the cluster's keys are
removed from the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import trio

from podnet.cluster.manifest import load_manifests
from podnet.cluster.model import Manifests
from podnet.cluster.topology import ClusterConfig, ClusterPlan, NodeSpec, plan_cluster
from podnet.cluster_lab import add_external_client, exec_external
from podnet.cluster_node import node_state_dir, release_dead_journals
from podnet.control import RemoteNode, socket_path
from podnet.control_plane import ControlPlane, allocated, pods_from_store
from podnet.deployments import RolloutReport
from podnet.errors import ConfigError
from podnet.linux.resources import Entry, Resources, state_dir_default
from podnet.linux.underlay import ExternalHost, Underlay, create_underlay, remove_external_host, remove_underlay
from podnet.store import Store, open_store
from podnet.store.flannel import FLANNEL_PREFIX
from podnet.store.objects import REGISTRY
from podnet.runtime.background import run_in_background

log = logging.getLogger(__name__)


def join_argv(spec: NodeSpec, config: ClusterConfig, underlay: Underlay) -> list[str]:
    """The `podnet node join` command line for one node of this cluster."""
    argv = [sys.executable, "-m", "podnet.cli", "--state-dir", config.state_dir, "node", "join",
            "--store", config.store, "--node", spec.name, "--node-ip", spec.ip, "--network", config.network,
            "--backend", config.backend, "--prefix", config.prefix, "--underlay", underlay.netns,
            "--underlay-cidr", config.underlay_cidr, "--cluster-cidr", config.cluster_cidr,
            "--service-cidr", config.service_cidr, "--vxlan-port", str(config.vxlan_port),
            "--node-lease-ttl", str(config.node_lease_ttl_s), "--min-sync-period", str(config.min_sync_period_s)]
    if spec.pod_cidr:
        argv += ["--pod-cidr", spec.pod_cidr]
    if not config.offloads:
        argv.append("--no-offloads")
    if not config.udp_tunnel_gso:
        argv.append("--no-tunnel-gso")
    if config.grace_period_s is not None:
        argv += ["--grace-period", str(config.grace_period_s)]
    return argv


@dataclasses.dataclass
class NodeProcess:
    spec: NodeSpec
    process: subprocess.Popen
    entry: Entry
    log_path: str

    @property
    def pid(self) -> int:
        return self.process.pid


class ClusterProcesses:
    """The node processes of a running cluster, and what the control plane knows of them."""

    def __init__(self, config: ClusterConfig, plan: ClusterPlan, store: Store, control_plane: ControlPlane,
                 underlay: Underlay, resources: Resources, external: ExternalHost | None = None) -> None:
        self.config = config
        self.plan = plan
        self.store = store
        self.control_plane = control_plane
        self.underlay = underlay
        self.resources = resources
        self.nodes: dict[str, NodeProcess] = {}
        self.external = external   # the client outside the cluster, on the underlay
        self._lock = threading.Lock()

    # ---- processes ------------------------------------------------------------------------------

    def start_node(self, name: str) -> int:
        """Start node `name`'s process (it must not be running); its pid."""
        spec = self.plan.node(name)
        with self._lock:
            if (running := self.nodes.get(name)) is not None and running.process.poll() is None:
                raise ConfigError(f"node {name}: already running (pid {running.pid})")
            directory = Path(node_state_dir(self.config.state_dir, name))
            directory.mkdir(parents=True, exist_ok=True)
            log_path = str(directory / "node.log")
            with open(log_path, "ab") as out:
                process = subprocess.Popen(join_argv(spec, self.config, self.underlay), stdin=subprocess.DEVNULL,
                                           stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                entry = self.resources.record_process(process.pid, f"node {name}")
            except ProcessLookupError:   # it died at once: its log says why
                process.wait()
                raise ConfigError(f"node {name} exited at once: {self.log_tail(name, log_path)}") from None
            self.nodes[name] = NodeProcess(spec, process, entry, log_path)
            return process.pid

    def kill_node(self, name: str, signum: int = signal.SIGKILL, timeout_s: float = 30.0) -> int:
        """Signal node `name`'s process by its pid (SIGKILL: a crash) and reap it; its exit status."""
        node = self.nodes[name]
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.pid, signum)
        code = node.process.wait(timeout=timeout_s)
        self.resources.forget(node.entry)
        return code

    def stop_all(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every running node process by pid, wait, SIGKILL the ones still there."""
        running = [n for n in self.nodes.values() if n.process.poll() is None]
        for node in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, signal.SIGTERM)
        for node in running:
            try:
                node.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("node %s (pid %d) did not stop in %.0f s: SIGKILL", node.spec.name, node.pid, timeout_s)
                os.kill(node.pid, signal.SIGKILL)
                node.process.wait()
        for node in self.nodes.values():
            self.resources.forget(node.entry)
        # a node killed and not started again left its pods behind, journalled in its directory
        for name in self.nodes:
            release_dead_journals(node_state_dir(self.config.state_dir, name))

    def log_tail(self, name: str, path: str | None = None, size: int = 3000) -> str:
        path = path or self.nodes[name].log_path
        try:
            return Path(path).read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        for name, node in self.nodes.items():
            if node.process.poll() is not None:
                raise ConfigError(f"node {name} (pid {node.pid}) exited with {node.process.returncode}; "
                                  f"its log ends with:\n{self.log_tail(name)}")

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Every pod Ready on a registered node and the EndpointSlices written; then the nodes'
        min_sync_period_s for their kube-proxy to sync them."""
        with trio.move_on_after(timeout_s):
            while not self.control_plane.ready_revision:
                self.check_alive()
                await trio.sleep(0.1)
            await trio.sleep(self.config.min_sync_period_s + 0.2)
            return
        raise TimeoutError(f"cluster not ready after {timeout_s:.0f} s: {', '.join(self.control_plane.unready())}")

    async def exec_external(self, argv: Sequence[str], *, timeout_s: float = 60.0,
                            input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run `argv` on the external client (outside the cluster, on the underlay)."""
        return await trio.to_thread.run_sync(exec_external, self.external, list(argv), timeout_s, input)

    async def rollout(self, namespace: str, name: str, **kw) -> RolloutReport:
        """As `Cluster.rollout`: the control plane, in this process, replaces the pods."""
        return await self.control_plane.deployments.get(namespace, name).rollout(**kw)

    async def scale(self, namespace: str, name: str, replicas: int, *,
                    timeout_s: float | None = None) -> RolloutReport:
        return await self.control_plane.deployments.get(namespace, name).scale(replicas, timeout_s=timeout_s)

    # ---- what the control socket answers ------------------------------------------------------------

    def status(self) -> list[dict]:
        return pods_from_store(self.store, self.config.prefix)

    def services_status(self) -> list[dict]:
        from podnet.store.objects import ObjectView, kind_prefix
        rows = []
        # a Service that cannot be read is logged and left out, never the whole listing
        for stored in ObjectView("Service", "podnet status").sync(self.store.list(kind_prefix("Service"))):
            svc = stored.obj
            ports = ",".join(f"{p.port}{':' + str(p.node_port) if p.node_port else ''}/{p.protocol}" for p in svc.ports)
            rows.append({"namespace": svc.namespace, "name": svc.name, "type": svc.type,
                         "cluster_ip": svc.cluster_ip, "ports": ports})
        return rows

    def locate_node(self, name: str | None = None) -> RemoteNode:
        """Where node `name`'s process (default: the first node's) answers control requests: its
        own control socket, in its node directory. A node whose process is gone is an error."""
        name = name or self.plan.nodes[0].name
        node = self.nodes.get(name)
        if node is None:
            try:
                self.plan.node(name)
            except KeyError as exc:   # the error lists the nodes
                raise ConfigError(exc.args[0]) from None
            raise ConfigError(f"node {name} has no process (it did not start)")
        code = node.process.poll()
        if code is not None:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
            raise ConfigError(f"node {name} is down: its process (pid {node.pid}) {how} (its log: {node.log_path})")
        return RemoteNode(name, node.pid, socket_path(node_state_dir(self.config.state_dir, name)))

    def node_of_pod(self, pod: str, namespace: str | None = None) -> str:
        """The node the store places `pod` on (a blocking store read)."""
        rows = [r for r in self.status() if r["name"] == pod and namespace in (None, r["namespace"])]
        if len(rows) != 1:
            where = f" in namespace {namespace!r}" if namespace else ""
            raise ConfigError(f"trace: no pod {pod!r}{where}" if not rows else
                              f"trace: pod {pod!r} exists in several namespaces; give one")
        return rows[0]["node"]

    def __getattr__(self, name: str):
        if name in ("datapath", "backend", "statistics", "sync_summary", "conntrack_listing", "set_backend"):
            raise ConfigError(f"{name}: each node of this cluster is a process of its own, with its own datapath "
                              "and control socket (`locate_node`); the control plane has none")
        raise AttributeError(name)


def _forget_cluster(store: Store) -> None:
    for prefix in (f"{REGISTRY}/", f"{FLANNEL_PREFIX}/"):
        store.delete_prefix(prefix)


@contextlib.asynccontextmanager
async def open_cluster_processes(manifests: Manifests | Sequence[str | os.PathLike], config: ClusterConfig, *,
                                 wait_ready_s: float | None = 60.0):
    """The cluster of `manifests` with one `podnet node join` process per Node (see the module)."""
    if not isinstance(manifests, Manifests):
        manifests = load_manifests(manifests)
    if not config.store or not config.store.startswith(("etcd://", "http://", "https://")):
        raise ConfigError("--store: node processes share the cluster's state through etcd: give etcd://HOST:PORT")
    config = dataclasses.replace(config, state_dir=config.state_dir or state_dir_default())
    plan = plan_cluster(manifests, config.underlay_cidr, config.cluster_cidr, external_ip=config.external_ip)
    placed = allocated(plan.manifests, config)
    store = open_store(config.store)
    try:
        with Resources(prefix=config.prefix, state_dir=config.state_dir) as resources:
            underlay, entry = await trio.to_thread.run_sync(create_underlay, resources)
            procs = external = None
            try:
                external, external_entry = await trio.to_thread.run_sync(
                    add_external_client, resources, underlay, plan, config.prefix)
                control_plane = ControlPlane(store, placed, config)
                await trio.to_thread.run_sync(control_plane.publish)
                async with trio.open_nursery() as nursery:
                    await nursery.start(control_plane.run)
                    procs = ClusterProcesses(config, plan, store, control_plane, underlay, resources, external)
                    try:
                        for spec in plan.nodes:
                            procs.start_node(spec.name)
                        if wait_ready_s is not None:
                            await procs.wait_ready(wait_ready_s)
                        yield procs
                    finally:
                        with trio.CancelScope(shield=True):
                            await trio.to_thread.run_sync(procs.stop_all)
                        nursery.cancel_scope.cancel()
            finally:
                if external is not None:
                    await trio.to_thread.run_sync(remove_external_host, resources, external, external_entry)
                await trio.to_thread.run_sync(remove_underlay, resources, underlay, entry)
                with contextlib.suppress(Exception):
                    await trio.to_thread.run_sync(_forget_cluster, store)
    finally:
        store.close()


class SyncClusterProcesses:
    """`open_cluster_processes` for synchronous code (tests): trio runs in a background thread."""

    def __init__(self, procs: ClusterProcesses, token: trio.lowlevel.TrioToken) -> None:
        self.procs = procs
        self._token = token

    def __getattr__(self, name: str):
        return getattr(self.procs, name)

    def status(self) -> list[dict]:
        return trio.from_thread.run_sync(self.procs.status, trio_token=self._token)

    def pod(self, name: str) -> dict:
        return next(row for row in self.status() if row["name"] == name)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        trio.from_thread.run(self.procs.wait_ready, timeout_s, trio_token=self._token)

    def exec(self, pod: str, argv: Sequence[str], *, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        from podnet.lab import exec_in_pod
        return exec_in_pod(self.pod(pod)["netns"], list(argv), timeout_s)

    def exec_external(self, argv: Sequence[str], *, timeout_s: float = 60.0,
                      input: bytes | None = None) -> subprocess.CompletedProcess:
        return exec_external(self.procs.external, list(argv), timeout_s, input)

    def rollout(self, namespace: str, name: str, **kw) -> RolloutReport:
        return trio.from_thread.run(lambda: self.procs.rollout(namespace, name, **kw), trio_token=self._token)

    def scale(self, namespace: str, name: str, replicas: int, **kw) -> RolloutReport:
        return trio.from_thread.run(lambda: self.procs.scale(namespace, name, replicas, **kw), trio_token=self._token)

    def deployment_pods(self, namespace: str, name: str) -> list[dict]:
        """`status` rows of the Deployment's pods the store has now."""
        members = trio.from_thread.run_sync(
            lambda: set(self.procs.control_plane.deployments.get(namespace, name).members), trio_token=self._token)
        return [row for row in self.status() if row["namespace"] == namespace and row["name"] in members]


@contextlib.contextmanager
def run_cluster_processes(manifests, config: ClusterConfig, *, wait_ready_s: float | None = 60.0
                          ) -> Iterator[SyncClusterProcesses]:
    with run_in_background(lambda: open_cluster_processes(manifests, config, wait_ready_s=wait_ready_s),
                           SyncClusterProcesses, name="podnet-cluster-procs") as procs:
        yield procs


__all__ = ["ClusterProcesses", "SyncClusterProcesses", "join_argv", "open_cluster_processes",
           "run_cluster_processes"]
