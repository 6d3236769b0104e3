"""A running node: pods from manifests brought up in namespaces, served by the Python datapath.

Layer: lab, the top of the stack (cluster model + core + runtime + linux). `open_lab` is an async
context manager that does, per pod, what the kubelet and a CNI plugin do on a real node:

    IPAM ADD (host-local order, persisted) → netns `pn-<pod>` (the pause container's role)
    → TAP opened with a vnet header, moved in, renamed eth0, /32, default via 169.254.1.1 onlink
    → datapath port + /32 route → each container's command started inside the netns
    → readiness probes → Ready

and on exit, error or cancellation undoes all of it (containers get SIGTERM, then SIGKILL after the
grace period). Everything created is journalled by `linux.resources.Resources` first, so
`podnet clean` can remove what a SIGKILLed lab left behind.

While it runs, pods come and go: `add_pod` does the same CNI ADD for one more pod; `delete_pod`
deletes one gracefully as the API server and the kubelet do (the endpoint goes terminating, the
preStop hook and SIGTERM run - `podnet.lifecycle` - then the endpoint goes and CNI DEL removes the
port, its /32 route, the netns, the TAP and the address). Each Deployment of the manifests gets a
controller (`podnet.deployments`) that creates its pods at start and carries out `rollout` and
`scale`. The supervisors, deletions and controllers all run in the lab's nursery, so leaving
`open_lab` cancels them and the teardown above removes whatever they left.

`image` is accepted and ignored: a container is its command, run on this machine's filesystem
inside the pod's network namespace. `run_lab` is the same for synchronous scripts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from podnet.cluster.endpoints import PodStatus, derive_endpoint_slices
from podnet.cluster.ipalloc import ServiceIPAllocator, allocate_services
from podnet.cluster.manifest import Manifests, load_manifests
from podnet.cluster.model import BUILTIN_NAMESPACES, Container, Pod, PodTemplate
from podnet.core.conntrack import Conntrack
from podnet.core.datapath import Datapath, NodeMode, PortKind
from podnet.core.ipam import DiskStore, MemoryStore, Pool
from podnet.core.packet import ip_int
from podnet.core.services.base import ProxyServicePort, SyncReport
from podnet.core.services.registry import backend_class
from podnet.proxier import proxy_service_ports
from podnet.deployments import DeploymentController, RolloutReport
from podnet.errors import ConfigError
from podnet.lifecycle import supervise, terminate_pod
from podnet.linux import names
from podnet.linux.netns import delete_netns, run_in_netns
from podnet.linux.pod import plumb_pod
from podnet.linux.resources import Entry, ResourceKind, Resources, state_dir_default
from podnet.linux.tap import Tap, open_tap
from podnet.probes import ReadinessTracker
from podnet.runtime.background import run_in_background
from podnet.runtime.ports import FdPort
from podnet.runtime.serve import Node

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabConfig:
    node_name: str = "node-1"
    node_cidr: str = "10.244.0.0/24"
    mode: NodeMode = NodeMode.ROUTED
    prefix: str = names.DEFAULT_PREFIX
    offloads: bool = True
    vnet_hdr: bool = True
    state_dir: str | None = None       # journals, logs, IPAM (default /run/podnet or $PODNET_STATE_DIR)
    persist_ipam: bool = True          # host-local's files under <state_dir>/ipam/<node>
    grace_period_s: float | None = None  # overrides each pod's terminationGracePeriodSeconds
    backend: str = "iptables"          # the Service backend (core.services.registry.BACKENDS)
    cluster_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/12"
    node_ip: str = "172.18.0.2"        # the node's own address inside the datapath: masquerade source
    uplink_cidr: str = "172.18.0.0/24"  # the node's uplink: the node holds node_ip, an external client .1
    uplink: bool = True                # bring up the external-client namespace on the uplink
    pod_mtu: int = 1500                # eth0's MTU in every pod (a VXLAN network gives the tunnel's: 1450)
    min_sync_period_s: float = 1.0     # kube-proxy's --iptables-min-sync-period
    partial_sync: bool = True          # kube-proxy >= 1.28: only changed Services' chains
    conntrack_max: int = 262144        # nf_conntrack_max
    seed: int = 0                      # statistic draws, ClusterIP picks: runs are repeatable
    backend_options: dict = field(default_factory=dict)  # backend-specific: e.g. ebpf lb_map_max, ipvs scheduler


@dataclass(frozen=True)
class ExternalClient:
    """A host outside the cluster on the node's uplink: where NodePort and LoadBalancer traffic
    comes from. Its eth0 is a TAP whose other end the datapath holds, like a pod's."""

    netns: str
    ip: str
    mac: str
    port_id: int


@dataclass
class ContainerState:
    container: Container
    process: subprocess.Popen | None = None
    restarts: int = 0
    exit_code: int | None = None
    readiness: ReadinessTracker | None = None
    log_path: str = ""
    journal: Entry | None = None       # the process's journal entry while it runs
    started: trio.Event = field(default_factory=trio.Event)   # first start attempted (or given up)
    exited: trio.Event = field(default_factory=trio.Event)    # the current process has exited
    pre_stop_s: float | None = None    # how long its preStop hook ran, once it was deleted

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def ready(self) -> bool:
        if not self.running:
            return False
        return self.readiness.ready if self.readiness is not None else True


@dataclass
class PodState:
    pod: Pod
    netns: str
    ip: str
    mac: str
    port_id: int
    tap: Tap
    containers: list[ContainerState] = field(default_factory=list)
    created: float = 0.0                    # creationTimestamp (trio clock)
    ready_since: float | None = None        # when the Ready condition last turned true
    deletion_timestamp: float | None = None  # set by delete: the pod is terminating
    scope: trio.CancelScope | None = None   # its supervisors (containers and probes)
    removed: trio.Event = field(default_factory=trio.Event)   # CNI DEL done, the pod is gone

    @property
    def name(self) -> str:
        return self.pod.meta.name

    @property
    def namespace(self) -> str:
        return self.pod.meta.namespace

    @property
    def key(self) -> str:
        return self.pod.key

    @property
    def ready(self) -> bool:
        return bool(self.containers) and all(c.ready for c in self.containers)

    @property
    def terminating(self) -> bool:
        return self.deletion_timestamp is not None

    def note_readiness(self, now: float) -> None:
        """Keep the Ready condition's lastTransitionTime (minReadySeconds counts from it)."""
        if self.ready and self.ready_since is None:
            self.ready_since = now
        elif not self.ready:
            self.ready_since = None

    @property
    def phase(self) -> str:
        if self.terminating:
            return "Terminating"  # what kubectl shows for a pod with a deletionTimestamp
        codes = [c.exit_code for c in self.containers]
        if all(c.running for c in self.containers):
            return "Running"
        if all(code is not None for code in codes) and self.pod.restart_policy != "Always":
            return "Succeeded" if all(code == 0 for code in codes) else "Failed"
        return "Running" if any(c.running for c in self.containers) else "Pending"

    def status(self, node_name: str) -> dict:
        return {
            "namespace": self.namespace, "name": self.name, "ip": self.ip, "node": node_name,
            "phase": self.phase, "ready": f"{sum(c.ready for c in self.containers)}/{len(self.containers)}",
            "restarts": sum(c.restarts for c in self.containers), "netns": self.netns,
        }


def _pod_netns_key(pod: Pod) -> str:
    # pods of the default namespace keep their bare name (pn-web-1); others are namespaced
    return pod.meta.name if pod.meta.namespace == "default" else f"{pod.meta.namespace}.{pod.meta.name}"


class Lab:
    """One node with its pods. Create it with `open_lab`; the attributes are for reading."""

    def __init__(self, manifests: Manifests, config: LabConfig, resources: Resources) -> None:
        self.config = config
        self.resources = resources
        # the API server's part: ClusterIPs (and node ports) for every Service
        self.manifests = allocate_services(manifests, ServiceIPAllocator(config.service_cidr, seed=config.seed))
        self.datapath = Datapath(mode=config.mode, node_cidr=config.node_cidr, node_ip=config.node_ip,
                                 conntrack=Conntrack(config.conntrack_max), seed=config.seed)
        self.backend = self._make_backend(config.backend)
        self.datapath.set_backend(self.backend)
        self.syncs: list[SyncReport] = []
        self._view: dict[tuple, ProxyServicePort] = {}   # the sync loop's last view, by Service port
        self._endpoints_changed = trio.Event()
        self._synced_generation = -1
        self._generation = 0
        self.node = Node(self.datapath)
        self.state_dir = Path(resources.state_dir)
        self.log_dir = self.state_dir / "logs" / f"{os.getpid()}"
        store = (DiskStore(self.state_dir / "ipam", config.node_name) if config.persist_ipam else MemoryStore())
        self.ipam = Pool(config.node_cidr, name=config.node_name, store=store)
        self.pods: dict[str, PodState] = {}
        self.external: ExternalClient | None = None
        self._taps: list[Tap] = []
        self._stopping = False
        self._nursery: trio.Nursery | None = None
        self._plumbing = trio.Lock()          # CNI ADDs one at a time (IPAM and netlink)
        self._adding: set[str] = set()
        self._state_changed = trio.Event()    # any pod started, exited, changed readiness or went
        # the deployment and ReplicaSet controllers, one per Deployment ("namespace/name")
        self.deployments = {d.key: DeploymentController(self, d) for d in self.manifests.deployments}

    # ---- lookups -----------------------------------------------------------------------------

    def pod(self, name: str, namespace: str | None = None) -> PodState:
        matches = [p for p in self.pods.values()
                   if p.name == name and (namespace is None or p.namespace == namespace)]
        if not matches:
            raise KeyError(f"no pod {name!r}" + (f" in namespace {namespace!r}" if namespace else ""))
        if len(matches) > 1:
            raise KeyError(f"pod {name!r} exists in several namespaces; give one")
        return matches[0]

    def status(self) -> list[dict]:
        return [p.status(self.config.node_name) for p in self.pods.values()]

    def statistics(self):
        return self.datapath.statistics()

    # ---- Services: the EndpointSlice controller and kube-proxy's sync loop ---------------------

    def _pod_snapshot(self) -> tuple[list[Pod], dict[str, PodStatus]]:
        """What the EndpointSlice controller reads: the pods, and what their node reports."""
        status = {key: PodStatus(ip=p.ip, ready=p.ready, terminating=p.terminating, node_name=self.config.node_name)
                  for key, p in self.pods.items()}
        return [p.pod for p in self.pods.values()], status

    def _slices(self, pods: list[Pod], status: dict[str, PodStatus]):
        derived = derive_endpoint_slices(self.manifests.services, pods, status, seed=self.config.seed)
        return derived + tuple(self.manifests.endpoint_slices)

    def _proxy_ports(self, pods: list[Pod], status: dict[str, PodStatus]):
        """kube-proxy's view of every Service port (pure: may run in a worker thread)."""
        return proxy_service_ports(self.manifests.services, self._slices(pods, status), self.config.node_name)

    def _proxy_ports_reusing(self, pods: list[Pod], status: dict[str, PodStatus], previous: dict):
        """`_proxy_ports`, with the previous view's object for every Service port that did not
        change (worker thread). The backends' diff runs in the datapath's thread and skips a port
        it already holds by identity; an equal new object would cost it a field-by-field compare
        per Service (10 ms at 10,000 Services for ebpf, 30 for ipvs). Returns the view, by key."""
        ports: list[ProxyServicePort] = []
        view: dict[tuple, ProxyServicePort] = {}
        for port in self._proxy_ports(pods, status):
            key = (port.namespace, port.name, port.port_name, port.protocol)
            old = previous.get(key)
            if old is not None and old == port:
                port = old
            ports.append(port)
            view[key] = port
        return ports, view

    def endpoint_slices(self):
        """The EndpointSlices the controller derives now, plus those the manifests give."""
        return self._slices(*self._pod_snapshot())

    def sync_services(self, *, full: bool = False) -> SyncReport:
        """Program the backend for the Services as they are now, all in the caller's thread (the
        datapath's): used for a backend switch. The sync loop builds in a worker thread instead."""
        generation, started = self._generation, time.perf_counter()
        ports = self._proxy_ports(*self._pod_snapshot())
        return self._apply(ports, full, generation, started, time.perf_counter())

    async def _sync_in_loop(self, *, full: bool = False) -> SyncReport:
        """kube-proxy builds its view of the Services outside the lock and holds the xt_lock only
        for iptables-restore: here the view is built from a snapshot of the pods in a worker thread,
        and only the backend's sync runs in the datapath's thread, which waits for it."""
        generation, started = self._generation, time.perf_counter()
        snapshot = self._pod_snapshot()
        ports, view = await trio.to_thread.run_sync(self._proxy_ports_reusing, *snapshot, self._view,
                                                    abandon_on_cancel=True)
        report = self._apply(ports, full, generation, started, time.perf_counter())
        self._view = view
        return report

    def _apply(self, ports, full: bool, generation: int, started: float, built: float) -> SyncReport:
        report = self.backend.sync(ports, full=full)
        done = time.perf_counter()
        # like MetalLB's L2 mode, the node answers ARP on its uplink for the LoadBalancer and
        # external IPs it serves, besides its own address
        self.datapath.uplink_arp.addresses = {ip_int(self.config.node_ip)} | {
            ip_int(ip) for p in ports for ip in (*p.load_balancer_ips, *p.external_ips)}
        report = SyncReport(report.full, report.services, report.objects_written, report.objects_total,
                            build_s=built - started, apply_s=done - built, detail=report.detail)
        self.syncs.append(report)
        self._synced_generation = generation
        for failure in report.detail.get("failed", ()):
            # e.g. a full BPF map (E2BIG): that Service is not programmed, the others are
            log.warning("%s sync: %s", self.backend.name, failure)
        log.info("%s sync: %d service ports, %d written, %d total, %.1f ms (datapath held %.1f ms)",
                 "full" if report.full else "partial", report.services, report.objects_written,
                 report.objects_total, 1000 * (done - started), 1000 * (done - built))
        return report

    def _make_backend(self, name: str):
        c = self.config
        options = c.backend_options if name == c.backend else {}
        return backend_class(name)(cluster_cidr=c.cluster_cidr, node_ips=[c.node_ip],
                                   local_addresses=self.datapath.local_addresses,
                                   partial_sync=c.partial_sync, seed=c.seed, **options)

    def set_backend(self, name: str) -> SyncReport:
        """Switch the Service backend on the running node, as an operator switching kube-proxy's
        mode (or replacing it with Cilium) does: the new backend is programmed with every Service
        first, then takes over NEW connections; established ones keep their conntrack NAT."""
        backend = self._make_backend(name)
        previous, self.backend = self.backend, backend
        try:
            report = self.sync_services(full=True)
        except Exception:
            self.backend = previous
            raise
        self.datapath.set_backend(backend)
        log.info("backend switched from %s to %s", previous.name, backend.name)
        return report

    def endpoints_changed(self) -> None:
        """A pod started, exited, changed readiness, began terminating or went: kube-proxy will
        sync, and whoever waits in `wait_state_changed` wakes."""
        self._generation += 1
        self._endpoints_changed.set()
        changed, self._state_changed = self._state_changed, trio.Event()
        changed.set()

    @property
    def generation(self) -> int:
        return self._generation

    async def wait_state_changed(self, generation: int, deadline: float) -> None:
        """Until a pod changes after `generation` (see `generation`), or `deadline`."""
        with trio.move_on_at(deadline):
            while self._generation == generation:
                await self._state_changed.wait()

    async def _proxy_loop(self) -> None:
        """kube-proxy's sync runner (BoundedFrequencyRunner with burstSyncs 2): a change is synced
        at once while the token bucket - 2 tokens, one back every min_sync_period_s - has a token,
        else as soon as one comes back; changes that arrive meanwhile are synced together."""
        period, burst = self.config.min_sync_period_s, 2.0
        tokens, refilled = burst, trio.current_time()
        while True:
            now = trio.current_time()
            tokens = min(burst, tokens + (now - refilled) / period) if period > 0 else burst
            refilled = now
            if tokens < 1:
                await trio.sleep((1 - tokens) * period)
                continue
            tokens -= 1
            self._endpoints_changed = trio.Event()
            await self._sync_in_loop(full=not self.syncs)
            await self._endpoints_changed.wait()

    async def wait_synced(self, timeout_s: float = 30.0) -> None:
        """Until the backend reflects every readiness change seen so far."""
        with trio.fail_after(timeout_s):
            while self._synced_generation != self._generation:
                await trio.sleep(0.02)

    def sync_summary(self) -> dict:
        """kube-proxy's sync metrics, as podnet keeps them: how many syncs of each kind, and how
        long the datapath waited for the last one and at most (sync_proxy_rules_duration_seconds)."""
        full = [r for r in self.syncs if r.full]
        partial = [r for r in self.syncs if not r.full]
        last = self.syncs[-1] if self.syncs else None
        return {"backend": self.backend.name, "full_syncs": len(full), "partial_syncs": len(partial),
                "objects_total": last.objects_total if last else 0,
                "last_sync_ms": round(1000 * (last.build_s + last.apply_s), 3) if last else None,
                "last_wait_ms": round(1000 * last.apply_s, 3) if last else None,
                "max_wait_ms": round(1000 * max((r.apply_s for r in self.syncs), default=0.0), 3),
                "failed": [str(f) for f in (last.detail.get("failed", ()) if last else ())],
                "backend_stats": self.backend.statistics()}

    def conntrack_listing(self) -> list[str]:
        """`conntrack -L` of the node's table, now."""
        return self.datapath.conntrack.listing(trio.current_time())

    def services_status(self) -> list[dict]:
        rows = []
        for svc in self.manifests.services:
            ports = ",".join(f"{p.port}{':' + str(p.node_port) if p.node_port else ''}/{p.protocol}" for p in svc.ports)  # kubectl's PORT(S)
            rows.append({"namespace": svc.namespace, "name": svc.name, "type": svc.type,
                         "cluster_ip": svc.cluster_ip, "ports": ports})
        return rows

    # ---- bring-up ----------------------------------------------------------------------------

    def _plumb(self, pod: Pod) -> PodState:
        """CNI ADD for one pod (blocking netlink work: runs in a worker thread). On failure it
        undoes what it did, and never touches a netns it did not create."""
        key = _pod_netns_key(pod)
        netns = names.netns_name(key, self.config.prefix)
        allocation = self.ipam.allocate(pod.key, "eth0")
        entry, tap = None, None
        try:
            entry = self.resources.create_netns(netns)
            tap = open_tap(names.tap_name(key, self.config.prefix), vnet_hdr=self.config.vnet_hdr,
                           offloads=self.config.offloads)
            if self.config.mode is NodeMode.BRIDGE:
                # cbr0 style: the node prefix on eth0, the bridge's .1 as an on-link gateway
                mac = plumb_pod(tap, netns, str(allocation.ip), gateway=str(allocation.gateway),
                                prefixlen=allocation.prefixlen, mtu=self.config.pod_mtu)
            else:
                mac = plumb_pod(tap, netns, str(allocation.ip), mtu=self.config.pod_mtu)
        except BaseException:
            if tap is not None:
                tap.close()
            if entry is not None:   # made here: removed here (a name in use is not ours)
                delete_netns(netns)
                self.resources.forget(entry)
            self.ipam.release(pod.key, "eth0")
            raise
        self._taps.append(tap)
        return PodState(pod, netns, str(allocation.ip), mac, 0, tap)

    def _plumb_uplink(self) -> tuple[str, str, str]:
        """The uplink: an external-client namespace with the first address of the uplink CIDR and a
        default route via the node's address, on a TAP the datapath holds (blocking: a thread)."""
        netns = names.netns_name("external", self.config.prefix)
        net = ipaddress.IPv4Network(self.config.uplink_cidr)
        if ipaddress.IPv4Address(self.config.node_ip) not in net:
            raise ConfigError(f"LabConfig.node_ip {self.config.node_ip} is not in uplink_cidr {net}")
        client_ip = str(net.network_address + 1)
        self.resources.create_netns(netns)   # a name in use (another lab's client) is refused, left alone
        tap = open_tap(names.tap_name("uplink", self.config.prefix), vnet_hdr=self.config.vnet_hdr,
                       offloads=self.config.offloads)
        self._taps.append(tap)
        mac = plumb_pod(tap, netns, client_ip, gateway=self.config.node_ip, prefixlen=net.prefixlen)
        return netns, client_ip, mac, tap

    async def _add_uplink(self) -> ExternalClient:
        netns, client_ip, mac, tap = await trio.to_thread.run_sync(self._plumb_uplink)
        port_id = self.datapath.add_port("uplink", PortKind.UPLINK, mac, client_ip)
        self.datapath.add_route(self.config.uplink_cidr, port_id)
        self.node.attach(port_id, FdPort(tap.fd, vnet_hdr=tap.vnet_hdr, name="uplink"))
        self.external = ExternalClient(netns, client_ip, mac, port_id)
        return self.external

    async def exec_external(self, argv: Sequence[str], *, timeout_s: float = 60.0,
                            input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run a command on the external client (outside the cluster, on the uplink)."""
        if self.external is None:
            raise ConfigError("LabConfig.uplink: this lab has no uplink")
        return await trio.to_thread.run_sync(exec_in_pod, self.external.netns, list(argv), timeout_s, input)

    async def _add_pod(self, pod: Pod) -> PodState:
        async with self._plumbing:
            state = await trio.to_thread.run_sync(self._plumb, pod)
        state.created = trio.current_time()
        state.port_id = self.datapath.add_port(state.key, PortKind.POD, state.mac, state.ip)
        self.node.attach(state.port_id, FdPort(state.tap.fd, vnet_hdr=state.tap.vnet_hdr, name=state.name))
        self.pods[state.key] = state
        return state

    async def add_pod(self, pod: Pod) -> PodState:
        """Create a pod on the running node: CNI ADD, then its containers and probes, supervised
        in the lab's nursery. Returns once it is plumbed; `wait_pod_ready` waits for Ready."""
        namespaces = BUILTIN_NAMESPACES | {ns.name for ns in self.manifests.namespaces}
        if pod.namespace not in namespaces:
            raise ConfigError(f'Pod "{pod.key}": metadata.namespace: namespace "{pod.namespace}" not found')
        if pod.key in self.pods or pod.key in self._adding:
            raise ConfigError(f'Pod "{pod.key}": metadata.name: already exists')
        if self._nursery is None:
            raise RuntimeError("the lab is not running")
        self._adding.add(pod.key)
        try:
            state = await self._add_pod(pod)
        finally:
            self._adding.discard(pod.key)
        self._start_pod(state)
        self.endpoints_changed()
        return state

    def _start_pod(self, state: PodState) -> None:
        state.containers = [ContainerState(c) for c in state.pod.containers]
        self._nursery.start_soon(self._run_pod, state)

    async def _run_pod(self, state: PodState) -> None:
        with trio.CancelScope() as state.scope:
            async with trio.open_nursery() as nursery:
                for cs in state.containers:
                    nursery.start_soon(supervise, self, state, cs)

    def container_env(self, state: PodState, c: Container) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"HOSTNAME": state.name, "POD_NAME": state.name, "POD_NAMESPACE": state.namespace,
                    "POD_IP": state.ip})
        env.update(dict(c.env))
        return env

    def pod_changed(self, state: PodState) -> None:
        state.note_readiness(trio.current_time())
        self.endpoints_changed()

    # ---- deletion: the kubelet's graceful termination, then CNI DEL ------------------------------

    def begin_delete(self, state: PodState, grace_period_s: float | None = None) -> trio.Event:
        """Set the pod's deletionTimestamp and start terminating it in the background (`kubectl
        delete --wait=false`); returns the event set once it is gone. Deleting twice is harmless."""
        if not state.terminating:
            state.deletion_timestamp = trio.current_time()
            grace = next(g for g in (grace_period_s, self.config.grace_period_s,
                                     state.pod.termination_grace_period_seconds) if g is not None)
            self.endpoints_changed()  # the EndpointSlice controller marks it terminating
            self._nursery.start_soon(self._delete, state, float(grace))
        return state.removed

    async def delete_pod(self, name: str, namespace: str | None = None, *, grace_period_s: float | None = None,
                         wait: bool = True) -> None:
        """Delete a pod gracefully, as `kubectl delete pod` with the kubelet behind it (see
        `podnet.lifecycle`); with `wait`, return once its netns, port and address are gone."""
        removed = self.begin_delete(self.pod(name, namespace), grace_period_s)
        if wait:
            await removed.wait()

    async def _delete(self, state: PodState, grace_s: float) -> None:
        await terminate_pod(self, state, grace_s)
        if state.scope is not None:
            state.scope.cancel()  # probes of exited containers
        # CNI DEL: the port and its /32 route, the TAP, the netns, the address
        await self.node.detach_and_wait(state.port_id)
        self.datapath.remove_port(state.port_id)
        await trio.to_thread.run_sync(self._unplumb, state)
        del self.pods[state.key]
        self.endpoints_changed()
        state.removed.set()

    def _unplumb(self, state: PodState) -> None:
        """CNI DEL's blocking part (a worker thread: destroying a netdev waits for RTNL and RCU)."""
        delete_netns(state.netns)
        state.tap.close()
        self._taps.remove(state.tap)
        self.resources.forget(Entry(ResourceKind.NETNS, state.netns))
        self.ipam.release(state.key, "eth0")

    def _unready(self) -> list[str]:
        waiting = [f"{p.key} ({self._why_not_ready(p)})" for p in self.pods.values()
                   if not p.ready and not p.terminating]
        return waiting + [f"{d.key} ({d.message})" for d in self.deployments.values() if not d.complete]

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until every pod is Ready and every Deployment is rolled out (terminating pods aside)."""
        with trio.move_on_after(timeout_s):
            while self._unready():
                await self.wait_state_changed(self._generation, trio.current_time() + 0.25)
            return
        raise TimeoutError(f"not ready after {timeout_s:.0f} s: {', '.join(self._unready())}")

    async def wait_pod_ready(self, name: str, namespace: str | None = None, timeout_s: float = 30.0) -> PodState:
        state = self.pod(name, namespace)
        with trio.move_on_after(timeout_s):
            while not state.ready:
                await self.wait_state_changed(self._generation, trio.current_time() + 0.25)
            return state
        raise TimeoutError(f"pod {state.key} not ready after {timeout_s:.0f} s: {self._why_not_ready(state)}")

    @staticmethod
    def _why_not_ready(state: PodState) -> str:
        for cs in state.containers:
            if not cs.running:
                return f"container {cs.container.name} not running, exit code {cs.exit_code}; log {cs.log_path}"
            if cs.readiness is not None and not cs.readiness.ready:
                return f"container {cs.container.name} readiness: {cs.readiness.last_message or 'not probed yet'}"
        return "not started" if not state.containers else "?"

    # ---- Deployments -------------------------------------------------------------------------

    def deployment(self, namespace: str, name: str) -> DeploymentController:
        try:
            return self.deployments[f"{namespace}/{name}"]
        except KeyError:
            raise KeyError(f"no deployment {name!r} in namespace {namespace!r}") from None

    async def rollout(self, namespace: str, name: str, *, env: Mapping[str, str] | None = None,
                      container: str | None = None, template: PodTemplate | None = None,
                      timeout_s: float | None = None, on_progress=None) -> RolloutReport:
        """Change a Deployment's pod template (`env`, as `kubectl set env`, or a whole `template`)
        and wait until `kubectl rollout status` would say it rolled out; see `podnet.deployments`."""
        return await self.deployment(namespace, name).rollout(
            env=env, container=container, template=template, timeout_s=timeout_s, on_progress=on_progress)

    async def scale(self, namespace: str, name: str, replicas: int, *,
                    timeout_s: float | None = None) -> RolloutReport:
        """`kubectl scale deployment --replicas`, and wait until it is done."""
        return await self.deployment(namespace, name).scale(replicas, timeout_s=timeout_s)

    # ---- commands inside pods ----------------------------------------------------------------

    async def exec(self, pod: str, argv: Sequence[str], *, namespace: str | None = None,
                   timeout_s: float = 60.0, input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run `argv` inside a pod's network namespace; returns its exit code and output."""
        state = self.pod(pod, namespace)
        return await trio.to_thread.run_sync(exec_in_pod, state.netns, list(argv), timeout_s, input)

    # ---- teardown ----------------------------------------------------------------------------

    def _stop_containers(self) -> None:
        procs = [(s, cs) for s in self.pods.values() for cs in s.containers if cs.running]
        for _, cs in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(cs.process.pid, signal.SIGTERM)
        for state, cs in procs:
            grace = self.config.grace_period_s
            if grace is None:
                grace = float(state.pod.termination_grace_period_seconds)
            try:
                cs.process.wait(timeout=max(grace, 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(cs.process.pid, signal.SIGKILL)
                cs.process.wait()
            cs.exit_code = cs.process.returncode

    def close(self) -> None:
        """Stop containers, remove namespaces and TAPs. Idempotent; used on every exit path."""
        self._stopping = True
        self._stop_containers()
        if self.external is not None:
            delete_netns(self.external.netns)
        for state in self.pods.values():
            delete_netns(state.netns)
            # CNI DEL: a deleted pod's address goes back to the pool (a crash keeps it, see clean)
            self.ipam.release(f"{state.namespace}/{state.name}", "eth0")
        for tap in self._taps:
            with contextlib.suppress(OSError):
                tap.close()
        self._taps.clear()
        self.resources.release_all()


def exec_in_pod(netns: str, argv: list[str], timeout_s: float | None = 60.0, input: bytes | None = None,
                capture: bool = True) -> subprocess.CompletedProcess:
    """Run a command inside a pod's netns and wait for it (blocking)."""
    kwargs: dict = {"timeout": timeout_s, "input": input}
    if capture:
        kwargs["capture_output"] = True
    return run_in_netns(netns, subprocess.run, argv, **kwargs)


@contextlib.asynccontextmanager
async def open_lab(manifests: Manifests | Sequence[str | os.PathLike], config: LabConfig | None = None,
                   *, wait_ready_s: float | None = 30.0, lab_class: type[Lab] = Lab):
    """Bring up every pod of `manifests` on one node; tear everything down on exit.

        async with open_lab(load_manifests(["pods.yaml"])) as lab:
            result = await lab.exec("client", ["curl", "-s", "http://10.244.0.3:8080/"])
    """
    if not isinstance(manifests, Manifests):
        manifests = load_manifests(manifests)
    config = config or LabConfig()
    with Resources(prefix=config.prefix, state_dir=config.state_dir or state_dir_default()) as resources:
        lab = lab_class(manifests, config, resources)   # a cluster's node: podnet.cluster_node
        try:
            async with trio.open_nursery() as nursery:
                lab._nursery = nursery
                await nursery.start(lab.node.serve)
                if config.uplink:
                    await lab._add_uplink()
                for pod in manifests.pods:
                    await lab._add_pod(pod)
                for state in list(lab.pods.values()):
                    lab._start_pod(state)
                nursery.start_soon(lab._proxy_loop)
                for controller in lab.deployments.values():
                    nursery.start_soon(controller.run)
                if wait_ready_s is not None:
                    await lab.wait_ready(wait_ready_s)
                    await lab.wait_synced(wait_ready_s + 2 * config.min_sync_period_s)
                try:
                    yield lab
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            await trio.to_thread.run_sync(lab.close)


class SyncLab:
    """`open_lab` for synchronous scripts: trio runs in a background thread.

        with run_lab(["pods.yaml"]) as lab:
            print(lab.exec("client", ["curl", "-s", "http://10.244.0.3:8080/"]).stdout)
    """

    def __init__(self, lab: Lab, token: trio.lowlevel.TrioToken) -> None:
        self.lab = lab
        self._token = token

    def __getattr__(self, name: str):
        return getattr(self.lab, name)

    def exec(self, pod: str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return trio.from_thread.run(lambda: self.lab.exec(pod, argv, **kw), trio_token=self._token)

    def exec_external(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return trio.from_thread.run(lambda: self.lab.exec_external(argv, **kw), trio_token=self._token)

    def statistics(self):
        return trio.from_thread.run_sync(self.lab.statistics, trio_token=self._token)

    def status(self) -> list[dict]:
        return trio.from_thread.run_sync(self.lab.status, trio_token=self._token)

    def status_services(self) -> list[dict]:
        return trio.from_thread.run_sync(self.lab.services_status, trio_token=self._token)

    def set_backend(self, name: str) -> SyncReport:
        return trio.from_thread.run_sync(self.lab.set_backend, name, trio_token=self._token)

    def conntrack_listing(self) -> list[str]:
        return trio.from_thread.run_sync(self.lab.conntrack_listing, trio_token=self._token)

    def endpoint_slices(self):
        return trio.from_thread.run_sync(self.lab.endpoint_slices, trio_token=self._token)

    def wait_synced(self, timeout_s: float = 30.0) -> None:
        trio.from_thread.run(self.lab.wait_synced, timeout_s, trio_token=self._token)

    def _run(self, fn, *args, **kw):
        return trio.from_thread.run(lambda: fn(*args, **kw), trio_token=self._token)

    def add_pod(self, pod: Pod) -> PodState:
        return self._run(self.lab.add_pod, pod)

    def delete_pod(self, name: str, namespace: str | None = None, **kw) -> None:
        self._run(self.lab.delete_pod, name, namespace, **kw)

    def wait_pod_ready(self, name: str, namespace: str | None = None, timeout_s: float = 30.0) -> PodState:
        return self._run(self.lab.wait_pod_ready, name, namespace, timeout_s)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        self._run(self.lab.wait_ready, timeout_s)

    def rollout(self, namespace: str, name: str, **kw) -> RolloutReport:
        """As `Lab.rollout`; an `on_progress` callback runs in the lab's thread."""
        return self._run(self.lab.rollout, namespace, name, **kw)

    def scale(self, namespace: str, name: str, replicas: int, **kw) -> RolloutReport:
        return self._run(self.lab.scale, namespace, name, replicas, **kw)

    def deployment_pods(self, namespace: str, name: str) -> list[PodState]:
        return trio.from_thread.run_sync(lambda: self.lab.deployment(namespace, name).pods(), trio_token=self._token)

    def sync_summary(self) -> dict:
        return trio.from_thread.run_sync(self.lab.sync_summary, trio_token=self._token)


@contextlib.contextmanager
def run_lab(manifests, config: LabConfig | None = None, *, wait_ready_s: float | None = 30.0) -> Iterator[SyncLab]:
    with run_in_background(lambda: open_lab(manifests, config, wait_ready_s=wait_ready_s), SyncLab,
                           name="podnet-lab") as lab:
        yield lab
