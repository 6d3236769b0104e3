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
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from podnet.cluster.endpoints import PodStatus, derive_endpoint_slices
from podnet.cluster.ipalloc import ServiceIPAllocator, allocate_services
from podnet.cluster.manifest import Manifests, load_manifests
from podnet.cluster.model import Container, Pod
from podnet.core.conntrack import Conntrack
from podnet.core.datapath import Datapath, NodeMode, PortKind
from podnet.core.ipam import DiskStore, MemoryStore, Pool
from podnet.core.packet import ip_int
from podnet.core.services.base import SyncReport
from podnet.core.services.registry import backend_class
from podnet.proxier import proxy_service_ports
from podnet.errors import ConfigError
from podnet.linux import names
from podnet.linux.netns import create_netns, delete_netns, popen_in_netns, run_in_netns
from podnet.linux.pod import plumb_pod
from podnet.linux.resources import Resources, state_dir_default
from podnet.linux.tap import Tap, open_tap
from podnet.probes import ReadinessTracker, run_probe
from podnet.runtime.ports import FdPort
from podnet.runtime.serve import Node

log = logging.getLogger(__name__)

_RESTART_BACKOFF_S = (10.0, 20.0, 40.0, 80.0, 160.0, 300.0)  # the kubelet's CrashLoopBackOff steps


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

    @property
    def name(self) -> str:
        return self.pod.meta.name

    @property
    def namespace(self) -> str:
        return self.pod.meta.namespace

    @property
    def ready(self) -> bool:
        return all(c.ready for c in self.containers)

    @property
    def phase(self) -> str:
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

    def endpoint_slices(self):
        """The EndpointSlices the controller derives now, plus those the manifests give."""
        status = {key: PodStatus(ip=p.ip, ready=p.ready, node_name=self.config.node_name)
                  for key, p in self.pods.items()}
        derived = derive_endpoint_slices(self.manifests.services, self.manifests.pods, status, seed=self.config.seed)
        return derived + tuple(self.manifests.endpoint_slices)

    def sync_services(self, *, full: bool = False) -> SyncReport:
        """Program the backend for the Services as they are now. Runs in the datapath's thread,
        so the datapath waits for it, as packets wait for the xt_lock on a real node."""
        generation = self._generation
        started = time.perf_counter()
        ports = proxy_service_ports(self.manifests.services, self.endpoint_slices(), self.config.node_name)
        built = time.perf_counter()
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
        log.info("%s sync: %d service ports, %d written, %d total, %.1f ms", "full" if report.full else "partial",
                 report.services, report.objects_written, report.objects_total, 1000 * (done - started))
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
        self._generation += 1
        self._endpoints_changed.set()

    async def _proxy_loop(self) -> None:
        """kube-proxy's loop: sync at once, then at most every min_sync_period_s after changes."""
        self.sync_services(full=True)
        while True:
            await self._endpoints_changed.wait()
            self._endpoints_changed = trio.Event()
            await trio.sleep(self.config.min_sync_period_s)
            self.sync_services(full=False)

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
        """CNI ADD for one pod (blocking netlink work: runs in a worker thread)."""
        key = _pod_netns_key(pod)
        netns = names.netns_name(key, self.config.prefix)
        allocation = self.ipam.allocate(f"{pod.meta.namespace}/{pod.meta.name}", "eth0")
        self.resources.record_netns(netns)
        create_netns(netns)
        tap = open_tap(names.tap_name(key, self.config.prefix), vnet_hdr=self.config.vnet_hdr,
                       offloads=self.config.offloads)
        self._taps.append(tap)
        if self.config.mode is NodeMode.BRIDGE:
            # cbr0 style: the node prefix on eth0, the bridge's .1 as an on-link gateway
            mac = plumb_pod(tap, netns, str(allocation.ip), gateway=str(allocation.gateway),
                            prefixlen=allocation.prefixlen)
        else:
            mac = plumb_pod(tap, netns, str(allocation.ip))
        return PodState(pod, netns, str(allocation.ip), mac, 0, tap)

    def _plumb_uplink(self) -> tuple[str, str, str]:
        """The uplink: an external-client namespace with the first address of the uplink CIDR and a
        default route via the node's address, on a TAP the datapath holds (blocking: a thread)."""
        netns = names.netns_name("external", self.config.prefix)
        net = ipaddress.IPv4Network(self.config.uplink_cidr)
        if ipaddress.IPv4Address(self.config.node_ip) not in net:
            raise ConfigError(f"LabConfig.node_ip {self.config.node_ip} is not in uplink_cidr {net}")
        client_ip = str(net.network_address + 1)
        self.resources.record_netns(netns)
        create_netns(netns)
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
        state = await trio.to_thread.run_sync(self._plumb, pod)
        state.port_id = self.datapath.add_port(f"{state.namespace}/{state.name}", PortKind.POD, state.mac, state.ip)
        self.node.attach(state.port_id, FdPort(state.tap.fd, vnet_hdr=state.tap.vnet_hdr, name=state.name))
        self.pods[f"{state.namespace}/{state.name}"] = state
        return state

    def _start_container(self, state: PodState, cs: ContainerState) -> None:
        c = cs.container
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cs.log_path = str(self.log_dir / f"{state.namespace}_{state.name}_{c.name}.log")
        env = dict(os.environ)
        env.update({"HOSTNAME": state.name, "POD_NAME": state.name, "POD_NAMESPACE": state.namespace,
                    "POD_IP": state.ip})
        env.update(dict(c.env))
        with open(cs.log_path, "ab") as logf:
            cs.process = popen_in_netns(state.netns, list(c.command) + list(c.args), env=env,
                                        cwd=c.working_dir or None, stdin=subprocess.DEVNULL,
                                        stdout=logf, stderr=subprocess.STDOUT)
        self.resources.record_process(cs.process.pid, name=f"{state.name}/{c.name}")
        cs.exit_code = None
        if c.readiness_probe is not None:
            cs.readiness = ReadinessTracker(c.readiness_probe)

    async def _supervise(self, state: PodState, cs: ContainerState) -> None:
        """Start a container, restart it per restartPolicy, and run its readiness probe."""
        await trio.to_thread.run_sync(self._start_container, state, cs)
        self.endpoints_changed()
        probe = cs.container.readiness_probe
        next_probe = trio.current_time() + (probe.initial_delay_seconds if probe else 0)
        while not self._stopping:
            code = cs.process.poll() if cs.process else None
            if code is not None:
                cs.exit_code = code
                self.endpoints_changed()  # a container that died is not ready
                policy = state.pod.restart_policy
                if policy == "Never" or (policy == "OnFailure" and code == 0):
                    return
                delay = _RESTART_BACKOFF_S[min(cs.restarts, len(_RESTART_BACKOFF_S) - 1)]
                log.warning("%s/%s exited with %s; restarting in %ss", state.name, cs.container.name, code, delay)
                await trio.sleep(delay)
                cs.restarts += 1
                await trio.to_thread.run_sync(self._start_container, state, cs)
                continue
            if probe is not None and cs.readiness is not None and trio.current_time() >= next_probe:
                ok, message = await trio.to_thread.run_sync(run_probe, state.netns, state.ip, cs.container, probe)
                was = state.ready
                cs.readiness.record(ok, message)
                if state.ready != was:
                    self.endpoints_changed()
                # probe fast until ready so a lab comes up quickly, then at periodSeconds
                period = probe.period_seconds if cs.readiness.ready else min(probe.period_seconds, 0.2)
                next_probe = trio.current_time() + period
            await trio.sleep(0.05)

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        with trio.move_on_after(timeout_s):
            while not all(p.ready for p in self.pods.values()):
                await trio.sleep(0.05)
            return
        waiting = [f"{p.namespace}/{p.name} ({self._why_not_ready(p)})" for p in self.pods.values() if not p.ready]
        raise TimeoutError(f"pods not ready after {timeout_s:.0f} s: {', '.join(waiting)}")

    @staticmethod
    def _why_not_ready(state: PodState) -> str:
        for cs in state.containers:
            if not cs.running:
                return f"container {cs.container.name} not running, exit code {cs.exit_code}; log {cs.log_path}"
            if cs.readiness is not None and not cs.readiness.ready:
                return f"container {cs.container.name} readiness: {cs.readiness.last_message or 'not probed yet'}"
        return "?"

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
                   *, wait_ready_s: float | None = 30.0):
    """Bring up every pod of `manifests` on one node; tear everything down on exit.

        async with open_lab(load_manifests(["pods.yaml"])) as lab:
            result = await lab.exec("client", ["curl", "-s", "http://10.244.0.3:8080/"])
    """
    if not isinstance(manifests, Manifests):
        manifests = load_manifests(manifests)
    config = config or LabConfig()
    with Resources(prefix=config.prefix, state_dir=config.state_dir or state_dir_default()) as resources:
        lab = Lab(manifests, config, resources)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(lab.node.serve)
                if config.uplink:
                    await lab._add_uplink()
                for pod in manifests.pods:
                    await lab._add_pod(pod)
                for state in lab.pods.values():
                    for container in state.pod.containers:
                        cs = ContainerState(container)
                        state.containers.append(cs)
                        nursery.start_soon(lab._supervise, state, cs)
                nursery.start_soon(lab._proxy_loop)
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


@contextlib.contextmanager
def run_lab(manifests, config: LabConfig | None = None, *, wait_ready_s: float | None = 30.0) -> Iterator[SyncLab]:
    ready = threading.Event()
    box: dict = {}

    async def main() -> None:
        try:
            async with open_lab(manifests, config, wait_ready_s=wait_ready_s) as lab:
                box["lab"] = SyncLab(lab, trio.lowlevel.current_trio_token())
                box["stop"] = trio.Event()
                ready.set()
                await box["stop"].wait()
        except BaseException as exc:  # reported to the caller's thread below
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), name="podnet-lab", daemon=True)
    thread.start()
    ready.wait()
    if "error" in box:
        thread.join()
        raise box["error"]
    try:
        yield box["lab"]
    finally:
        trio.from_thread.run_sync(box["stop"].set, trio_token=box["lab"]._token)
        thread.join()
        if "error" in box:
            raise box["error"]
