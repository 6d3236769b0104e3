"""One node of a multi-node cluster: a Lab programmed from the cluster store, on a shared underlay.

Layer: lab. `open_cluster_node` does on one node what flanneld, the kubelet and kube-proxy do there,
against the store (`podnet.store`: embedded in this process, or etcd shared by node processes):

    flanneld    read the network config; lease a subnet (acquire_subnet_lease: a restarted node gets
                its old subnet back, the lease is found by its PublicIP); keep it renewed, through
                store outages; watch every other node's lease and program the datapath from it -
                direct (host-gw): the route `<subnet> via <PublicIP>` on the uplink; vxlan: the
                tunnel port's neighbour, FDB entry and route (core/internode), with pods on the
                tunnel's MTU (1450); a lease it cannot read is logged, counted and skipped
    kubelet     register the Node under a lease with a heartbeat (store.nodes); run the pods the
                store places on this node (spec.nodeName): a Lab with this node's name, pod CIDR
                and underlay address; report each pod's IP, readiness and termination as its
                status; start pods placed here later and delete the ones whose key goes, watching
                from the very listing the Lab's pods came from (nothing in between is missed)
    kube-proxy  watch Services and EndpointSlices - every endpoint in the cluster, `is_local` for
                this node's own - and sync the Lab's Service backend from them

The uplink is a TAP inside the underlay namespace (linux/underlay), enslaved to its bridge; the
datapath owns the node's underlay address and MAC (`Datapath.add_uplink`). A node's state lives
under `<state_dir>/nodes/<node>/`: its journal, its IPAM files and its logs. A node process that
was killed left a journal there: the next start releases what it lists (its pods' namespaces and
containers) before anything else, and IPAM gives every pod its address back (host-local's files
survive a crash), so pods come back with the same addresses.

Invariants:
- Only this node's pods are in its Lab; every other pod is reached through routes the leases made.
- Pod status in the store is written by the pod's node alone, only when it changes, and never
  re-creates the key of a pod that was deleted. It is the status alone (compare-and-swap on the
  key's mod_revision): labels or a spec someone else wrote meanwhile are never written back.
- One object the node cannot read (a Namespace, Pod, Service or EndpointSlice: `ObjectView`; a
  lease) never stops it: it is logged with its key and the field, counted (`objects_skipped`,
  `leases_skipped`) and skipped, the key keeping its last good version, as kube-proxy keeps the
  last object its informer delivered (the API server never delivers an invalid one).
- `slices_revision` is a revision the Service view has every change up to: `wait_synced(R)`
  returns only once both the Services and the EndpointSlices are there.
- Leaving (cancellation, an error) deregisters the node, then tears the Lab down. The subnet lease
  stays, as flanneld leaves it, for the node's next start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import ipaddress
import logging
import os
import re
from pathlib import Path

import trio

from podnet.cluster.endpoints import PodStatus
from podnet.cluster.model import BUILTIN_NAMESPACES, Manifests
from podnet.cluster.service import EndpointSlice
from podnet.cluster.topology import ClusterConfig, NodeSpec
from podnet.cluster_speaker import L2Speaker
from podnet.core.datapath import NodeMode
from podnet.core.overlay import FlannelNode, Lease, Vtep
from podnet.core.overlay.mtu import tunnel_mtu
from podnet.errors import ConfigError
from podnet.lab import Lab, LabConfig, open_lab
from podnet.linux.resources import Resources, process_matches
from podnet.linux.tap import Tap
from podnet.linux.underlay import Underlay, open_uplink
from podnet.runtime.ports import FdPort
from podnet.store import (Event, EventType, KeyValue, RevisionConflict, Store,
                          StoreUnavailable)
from podnet.store.flannel import (LeaseAttrs, SubnetLease, acquire_subnet_lease, keep_subnet_lease,
                                  parse_lease, parse_subnet_key, read_network_config, renew_subnet_lease,
                                  SUBNETS_PREFIX)
from podnet.store.informer import Reflector, back_off
from podnet.store.nodes import keep_node_registered
from podnet.store.objects import (ObjectView, key_of, kind_prefix, object_key, parse_key,
                                  update_pod_status)

log = logging.getLogger(__name__)

_JOURNAL = re.compile(r"podnet-(\d+)-(\d+)\.json$")
_STATUS_RETRIES = 10      # compare-and-swap tries for one pod status write
_CATCH_UP_POLL_S = 0.05   # wait_synced: how often a lagging Service view is checked against a listing


def node_state_dir(state_dir: str, node: str) -> str:
    return str(Path(state_dir) / "nodes" / node)


def release_dead_journals(state_dir: str) -> list[str]:
    """Release what killed processes journalled in `state_dir` (a node's own directory): their
    pods' namespaces, containers and links. Unlike `podnet clean`, nothing else is swept: other
    nodes' namespaces carry the same prefix. Returns the journals released."""
    released = []
    for path in sorted(glob.glob(os.path.join(state_dir, "podnet-*.json"))):
        match = _JOURNAL.search(path)
        if match is None or process_matches(int(match[1]), int(match[2])):
            continue
        try:
            report = Resources.adopt(path).release_all()
        except (OSError, ValueError, KeyError) as exc:
            log.warning("journal %s of a dead process: %s", path, exc)
            continue
        for error in report.errors:
            log.warning("releasing %s: %s", path, error)
        released.append(path)
    return released


class ClusterNodeLab(Lab):
    """A Lab whose Services and EndpointSlices are the cluster's (kept by `ClusterNode` from the
    store) rather than derived from its own pods."""

    def __init__(self, manifests, config, resources) -> None:
        super().__init__(manifests, config, resources)
        self.cluster_slices: tuple[EndpointSlice, ...] = ()
        self.store_health = None   # set by its ClusterNode: what it skipped from the store (`podnet stats`)

    def _slices(self, pods, status):
        return self.cluster_slices


class ClusterNode:
    """A running node of a cluster (see the module). `lab` is its Lab; `lease` its subnet lease.
    `pods` is the kubelet's pod source: the Reflector whose listing the Lab's first pods came from
    (None: a fresh one, whose first listing starts the pods the Lab lacks)."""

    def __init__(self, store: Store, spec: NodeSpec, config: ClusterConfig, lab: ClusterNodeLab,
                 lease: SubnetLease, underlay: Underlay | None, *, pods: Reflector | None = None,
                 views: dict[str, ObjectView] | None = None) -> None:
        self.store = store
        self.spec = spec
        self.config = config
        self.lab = lab
        self.lease = lease
        self.underlay = underlay
        self.uplink_port: int | None = None
        self.tunnel_port: int | None = None
        self.peers: dict[str, SubnetLease] = {}       # other nodes' leases, by subnet
        self.bad_leases: dict[str, str] = {}          # lease keys not programmed now, and why
        self.leases_skipped = 0                       # lease events skipped as unreadable, in all
        # the decoded objects of each kind the node reads (see objects_skipped), by kind
        self.views = views if views is not None else object_views(spec.name)
        lab.store_health = self.store_health
        self.slices_revision = 0                      # the store revision the Service view is at
        self._tap: Tap | None = None
        self._starting: set[str] = set()
        self._pods = pods if pods is not None else Reflector(store, kind_prefix("Pod"))
        self._services_changed = trio.Event()
        self._wanted_revision = 0                     # wait_synced asks the view to be this recent

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def subnet(self) -> str:
        return str(self.lease.subnet)

    @property
    def datapath(self):
        return self.lab.datapath

    @property
    def bad_objects(self) -> dict[str, str]:
        """The keys of Namespaces, Pods, Services and EndpointSlices whose value now cannot be
        read, and why (the key's last good version, if any, is what the node uses)."""
        return {key: why for view in self.views.values() for key, why in view.bad.items()}

    @property
    def objects_skipped(self) -> int:
        """Object values skipped as unreadable, in all (each key and revision once)."""
        return sum(view.skipped for view in self.views.values())

    def store_health(self) -> dict:
        """What this node could not read from the store, for `podnet stats`: the values it skipped
        in all, and the keys unreadable now with why."""
        return {"objects_skipped": self.objects_skipped, "bad_objects": self.bad_objects,
                "leases_skipped": self.leases_skipped, "bad_leases": dict(self.bad_leases)}

    @property
    def flannel(self) -> FlannelNode | None:
        internode = self.datapath.internode
        return internode.tunnel.flannel if internode is not None and internode.tunnel is not None else None

    # ---- the uplink and the peers -------------------------------------------------------------

    async def attach_uplink(self) -> None:
        c, spec = self.config, self.spec
        want_gso = c.network == "vxlan" and c.udp_tunnel_gso
        self._tap = await trio.to_thread.run_sync(lambda: open_uplink(
            self.underlay, f"uplink:{spec.name}", prefix=c.prefix, vnet_hdr=c.vnet_hdr, offloads=c.offloads,
            mtu=c.underlay_mtu, udp_tunnel_gso=want_gso))
        self.add_uplink_ports(tunnel_gso=self._tap.udp_tunnel_gso)
        if c.network == "vxlan":
            await self._publish_tunnel_gso(self._tap.udp_tunnel_gso)
        self.lab.node.attach(self.uplink_port, FdPort(self._tap.fd, vnet_hdr=self._tap.vnet_hdr, name="uplink",
                                                      vnet_hdr_len=self._tap.vnet_hdr_len))

    def add_uplink_ports(self, *, tunnel_gso: bool = False) -> None:
        """The datapath's side of the uplink (no I/O): its port with the node's underlay address
        and MAC, and in vxlan mode the flannel.1 tunnel port holding this node's own lease."""
        c, spec, dp = self.config, self.spec, self.lab.datapath
        self.uplink_port = dp.add_uplink("uplink", spec.uplink_mac, cidr=c.underlay_cidr)
        if c.network == "vxlan":
            own = Lease(self.subnet, spec.ip, spec.vtep_mac, c.vni)
            vtep = Vtep(local_ip=spec.ip, mac=spec.vtep_mac, underlay_mac=spec.uplink_mac, vni=c.vni,
                        port=c.vxlan_port, underlay_mtu=c.underlay_mtu)
            self.tunnel_port = dp.add_tunnel(vtep, FlannelNode(own, network=c.cluster_cidr,
                                                                underlay_mtu=c.underlay_mtu))
            dp.internode.set_tunnel_gso(tunnel_gso)

    async def _publish_tunnel_gso(self, enabled: bool) -> None:
        """The lease was acquired before the uplink opened: say in it (BackendData's
        PodnetTunnelGSO) whether the uplink takes whole VXLAN super-frames, if it does not yet."""
        if self.lease.attrs.tunnel_gso == enabled:
            return
        attrs = _lease_attrs(self.spec, self.config, tunnel_gso=enabled)
        now = trio.current_time()
        self.lease = await trio.to_thread.run_sync(lambda: renew_subnet_lease(
            self.store, dataclasses.replace(self.lease, attrs=attrs), now=now))
        log.info("node %s: lease %s republished, PodnetTunnelGSO %s", self.name, self.subnet, enabled)

    async def detach_uplink(self) -> None:
        if self._tap is None:
            return
        if self.uplink_port is not None:
            await self.lab.node.detach_and_wait(self.uplink_port)
        self._tap.close()
        self._tap = None

    def _lease_event(self, kind: EventType, kv: KeyValue) -> None:
        """flanneld's handleSubnetEvents, for one lease of another node. A lease that cannot be
        programmed (its JSON, PublicIP, VtepMAC or VNI is bad) is logged with its key and the field,
        counted and skipped, as flanneld skips a lease it cannot decode: one bad key must not end
        the node, nor keep it from starting again while the lease lives (24 h). What an earlier
        good lease of that subnet programmed stays, as in flanneld."""
        dp, c = self.lab.datapath, self.config
        if kind is EventType.PUT:
            try:
                lease = parse_lease(kv)
            except ConfigError as exc:
                self._skip_lease(kv.key, str(exc))
                return
            if str(lease.subnet) == self.subnet or lease.attrs.public_ip == self.spec.ip:
                return
            subnet = str(lease.subnet)
            try:
                if c.network == "direct":
                    # host-gw: the other node's pod CIDR via its address on the underlay
                    dp.add_route(subnet, self.uplink_port, via=lease.attrs.public_ip)
                elif lease.attrs.backend_type == "vxlan" and lease.attrs.vtep_mac:
                    dp.internode.add_lease(Lease(subnet, lease.attrs.public_ip, lease.attrs.vtep_mac,
                                                 lease.attrs.vni or c.vni, tunnel_gso=lease.attrs.tunnel_gso))
                else:
                    log.warning("node %s: lease %s has backend %r, not vxlan: ignored", self.name, subnet,
                                lease.attrs.backend_type)
                    return
            except ConfigError as exc:   # overlay.Lease: a bad VtepMAC or VNI
                self._skip_lease(kv.key, str(exc))
                return
            self.bad_leases.pop(kv.key, None)
            self.peers[subnet] = lease
            log.info("node %s: lease %s via %s", self.name, subnet, lease.attrs.public_ip)
        else:
            self.bad_leases.pop(kv.key, None)
            subnet_net = parse_subnet_key(kv.key)
            subnet = str(subnet_net) if subnet_net is not None else None
            if subnet is None or self.peers.pop(subnet, None) is None:
                return
            if c.network == "direct":
                dp.routes.remove(subnet)
            else:
                dp.internode.remove_lease(subnet)
            log.info("node %s: lease %s gone", self.name, subnet)

    def _skip_lease(self, key: str, why: str) -> None:
        self.leases_skipped += 1
        self.bad_leases[key] = why
        log.warning("node %s: lease %s skipped: %s", self.name, key, why)

    # ---- watching the store -------------------------------------------------------------------

    async def watch_leases(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        reflector = Reflector(self.store, SUBNETS_PREFIX)
        for event in await trio.to_thread.run_sync(reflector.relist):
            self._lease_event(event.type, event.kv)
        task_status.started()
        async for event in reflector.aevents():
            self._lease_event(event.type, event.kv)

    async def watch_services(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """kube-proxy's informers: Services and EndpointSlices, the whole cluster's. The view is at
        the lower of the two reflectors' revisions: it has every change up to there (a quiet
        reflector is moved on by comparing it with a listing when `wait_synced` asks for more)."""
        services = Reflector(self.store, kind_prefix("Service"))
        slices = Reflector(self.store, kind_prefix("EndpointSlice"))
        dirty = False

        def apply() -> None:
            # a value that cannot be read is skipped, its key keeping its last good version: one
            # bad Service or EndpointSlice must not stop the node, nor take a Service away
            lab, views = self.lab, self.views
            lab.manifests = dataclasses.replace(lab.manifests, services=tuple(
                stored.obj for stored in views["Service"].sync(services.cache.values())))
            lab.cluster_slices = tuple(stored.obj for stored in views["EndpointSlice"].sync(slices.cache.values()))
            self.slices_revision = min(services.revision, slices.revision)
            lab.endpoints_changed()

        async def follow(reflector: Reflector) -> None:
            nonlocal dirty
            async for _ in reflector.aevents():
                dirty = True
                self._services_changed.set()

        async def catch_up() -> None:
            for reflector in (services, slices):
                if reflector.revision < self._wanted_revision:
                    try:
                        await reflector.acatch_up()
                    except StoreUnavailable as exc:   # wait_synced asks again
                        log.info("node %s: %s: %s", self.name, reflector.prefix, exc)

        for reflector in (services, slices):
            await trio.to_thread.run_sync(reflector.relist)
        apply()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, services)
            nursery.start_soon(follow, slices)
            task_status.started()
            while True:
                await self._services_changed.wait()
                self._services_changed = trio.Event()
                if self.slices_revision < self._wanted_revision:
                    await catch_up()
                if dirty:
                    dirty = False
                    apply()
                else:   # nothing new to apply: the view is the caches, now confirmed further
                    self.slices_revision = min(services.revision, slices.revision)

    async def watch_pods(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The kubelet's pod source: pods placed here later are started, pods whose key goes are
        deleted gracefully (the status writes of this node come back as PUTs of known pods). It
        goes on from the listing the Lab's pods came from, so a pod placed here or deleted while
        the Lab was starting is an event here too; a fresh reflector's first listing (all PUTs)
        starts the pods the Lab lacks."""
        task_status.started()
        async for event in self._pods.aevents():
            self._pod_event(event)

    def _pod_event(self, event: Event) -> None:
        lab, view = self.lab, self.views["Pod"]
        if event.type is EventType.PUT:
            stored = view.put(event.kv)   # an unreadable value: the pod's last good version, or None
            pod = stored.obj if stored is not None else None
            if pod is not None and pod.node_name == self.name and pod.key not in lab.pods \
                    and pod.key not in self._starting:
                self._starting.add(pod.key)
                lab._nursery.start_soon(self._start_pod, pod)
            return
        view.delete(event.key)
        try:
            _, namespace, name = parse_key(event.key)
        except ValueError:
            return
        state = lab.pods.get(f"{namespace}/{name}")
        if state is not None:
            lab.begin_delete(state)

    async def _start_pod(self, pod) -> None:
        try:
            await self._learn_namespace(pod.namespace)
            state = await self.lab.add_pod(pod)
        except (ConfigError, StoreUnavailable) as exc:
            log.warning("node %s: pod %s not started: %s (it is tried again when its key is written "
                        "again)", self.name, pod.key, exc)
            return
        finally:
            self._starting.discard(pod.key)
        if object_key(pod) not in self._pods.cache:   # its key went while it was being started
            self.lab.begin_delete(state)

    async def _learn_namespace(self, namespace: str) -> None:
        """The Namespaces were read when the node started; one created since is read from the
        store when a pod in it arrives (the API server admits no pod into a Namespace that does not
        exist, so it is there by then). Still missing, or unreadable (skipped and counted): add_pod
        refuses the pod, naming it."""
        lab = self.lab
        if namespace in BUILTIN_NAMESPACES or any(ns.name == namespace for ns in lab.manifests.namespaces):
            return
        kv = await trio.to_thread.run_sync(self.store.get, key_of("Namespace", "", namespace))
        if kv is None or any(ns.name == namespace for ns in lab.manifests.namespaces):
            return
        if (stored := self.views["Namespace"].put(kv)) is None:
            return
        lab.manifests = dataclasses.replace(lab.manifests, namespaces=(*lab.manifests.namespaces, stored.obj))
        log.info("node %s: namespace %s", self.name, namespace)

    async def publish_status(self) -> None:
        """The kubelet's status manager: each pod's IP, readiness and termination, written when
        they change; a pod that left the node has its key deleted. Only the status is written, as
        the kubelet writes the pods/status subresource (`update_pod_status`: read the key, replace
        its status, compare-and-swap on its mod_revision, read again on a conflict): labels or a
        spec someone changed meanwhile stay. A status never re-creates a key deleted meanwhile:
        that pod's DELETE reaches watch_pods, which deletes it (the kubelet's status patch of a
        deleted pod fails as NotFound). An unreachable store is waited out; a status that lost
        every compare-and-swap is tried again at the next change, or within 10 s."""
        written: dict[str, PodStatus] = {}
        lab = self.lab
        failures = 0
        while True:
            generation = lab.generation
            current = {object_key(p.pod): (p.pod, PodStatus(p.ip, p.ready, p.terminating, self.name))
                       for p in list(lab.pods.values())}
            changes = [(key, status) for key, (_, status) in current.items() if written.get(key) != status]
            gone = [key for key in written if key not in current]
            if changes or gone:
                try:
                    settled = await trio.to_thread.run_sync(self._write_status, changes, gone)
                except StoreUnavailable as exc:
                    failures = await back_off(f"node {self.name}: pod status", exc, failures, then="writing")
                    continue
                failures = 0
                for key in gone:
                    del written[key]
                written.update((key, current[key][1]) for key in settled)
            await lab.wait_state_changed(generation, trio.current_time() + 10.0)

    def _write_status(self, changes: list[tuple[str, PodStatus]], gone: list[str]) -> set[str]:
        """publish_status's writes (blocking: a worker thread); the keys whose status is settled:
        written, there already, or not to be written (the key is gone, or holds no Pod)."""
        store, settled = self.store, set()
        for key, status in changes:
            try:
                update_pod_status(store, key, status, retries=_STATUS_RETRIES)
            except RevisionConflict as exc:
                log.info("node %s: status of %s: %s; writing it again later", self.name, key, exc)
                continue
            except ConfigError as exc:   # the key holds no Pod: the pod's next status tries again
                log.warning("node %s: status of %s not written: %s", self.name, key, exc)
            settled.add(key)
        for key in gone:
            store.delete(key)
        return settled

    async def wait_synced(self, revision: int, timeout_s: float = 30.0) -> None:
        """Until this node's Service view has every Service and EndpointSlice change up to the
        store's `revision`, and its backend synced it."""
        with trio.fail_after(timeout_s):
            while self.slices_revision < revision:
                self._wanted_revision = max(self._wanted_revision, revision)
                self._services_changed.set()
                await trio.sleep(_CATCH_UP_POLL_S)
        await self.lab.wait_synced(timeout_s)

    # ---- inspection ------------------------------------------------------------------------------

    def show(self) -> dict[str, list[str]]:
        """The node's routes to other nodes, and in vxlan mode its flannel.1 neighbours and FDB, as
        `ip route`, `ip neigh` and `bridge fdb` print them; the uplink's neighbours."""
        out: dict[str, list[str]] = {}
        flannel = self.flannel
        if flannel is not None:
            out["ip route show dev flannel.1"] = flannel.show_routes()
            out["ip neigh show dev flannel.1"] = flannel.show_neighbours()
            out["bridge fdb show dev flannel.1"] = flannel.show_fdb()
        else:
            out["ip route"] = [f"{subnet} via {lease.attrs.public_ip} dev uplink"
                               for subnet, lease in sorted(self.peers.items(), key=lambda i: ipaddress.IPv4Network(i[0]))]
        internode = self.datapath.internode
        if internode is not None:
            out["ip neigh show dev uplink"] = internode.neighbors.show()
        return out


def lab_config(spec: NodeSpec, config: ClusterConfig, subnet: str) -> LabConfig:
    state_dir = node_state_dir(config.state_dir, spec.name) if config.state_dir else None
    mtu = tunnel_mtu(config.underlay_mtu) if config.network == "vxlan" else config.underlay_mtu
    return LabConfig(node_name=spec.name, node_cidr=subnet, mode=NodeMode.ROUTED, prefix=config.prefix,
                     offloads=config.offloads, vnet_hdr=config.vnet_hdr, state_dir=state_dir,
                     persist_ipam=config.persist_ipam,
                     grace_period_s=config.grace_period_s, backend=config.backend,
                     cluster_cidr=config.cluster_cidr, service_cidr=config.service_cidr, node_ip=spec.ip,
                     uplink_cidr=config.underlay_cidr, uplink=False, pod_mtu=mtu,
                     min_sync_period_s=config.min_sync_period_s, seed=config.seed,
                     backend_options=dict(config.backend_options))


async def _wait_network_config(store: Store, timeout_s: float):
    with trio.move_on_after(timeout_s):
        while True:
            try:
                return await trio.to_thread.run_sync(read_network_config, store)
            except ConfigError:
                await trio.sleep(0.1)   # the control plane has not written it yet
    raise TimeoutError(f"no Flannel network config in the store after {timeout_s:.0f} s")


def _lease_attrs(spec: NodeSpec, config: ClusterConfig, *, tunnel_gso: bool = False) -> LeaseAttrs:
    if config.network == "vxlan":
        return LeaseAttrs.vxlan(spec.ip, spec.vtep_mac, config.vni, tunnel_gso=tunnel_gso)
    return LeaseAttrs(spec.ip, config.flannel_backend)


@contextlib.asynccontextmanager
async def open_cluster_node(store: Store, spec: NodeSpec, config: ClusterConfig, underlay: Underlay, *,
                            wait_ready_s: float | None = 60.0):
    """Bring node `spec` up from the store (see the module); leave the cluster on exit."""
    if config.state_dir is None:
        from podnet.linux.resources import state_dir_default
        config = dataclasses.replace(config, state_dir=state_dir_default())
    own_dir = node_state_dir(config.state_dir, spec.name)
    await trio.to_thread.run_sync(release_dead_journals, own_dir)
    network = await _wait_network_config(store, wait_ready_s or 60.0)
    if str(network.network) != config.cluster_cidr:
        raise ConfigError(f"node {spec.name}: the store's network is {network.network}, not {config.cluster_cidr}")
    now = trio.current_time()
    lease = await trio.to_thread.run_sync(lambda: acquire_subnet_lease(
        store, _lease_attrs(spec, config), now=now, previous_subnet=spec.pod_cidr))
    subnet = str(lease.subnet)
    log.info("node %s: subnet %s, underlay %s", spec.name, subnet, spec.ip)

    pod_source = Reflector(store, kind_prefix("Pod"))   # watch_pods goes on from this listing
    views = object_views(spec.name)   # an unreadable object is skipped (logged, counted), not fatal

    def read_objects():
        namespaces = tuple(o.obj for o in views["Namespace"].sync(store.list(kind_prefix("Namespace"))))
        pod_source.relist()
        pods = tuple(o.obj for o in views["Pod"].sync(pod_source.cache.values()) if o.obj.node_name == spec.name)
        services = tuple(o.obj for o in views["Service"].sync(store.list(kind_prefix("Service"))))
        return Manifests(namespaces=namespaces, pods=pods, services=services)

    manifests = await trio.to_thread.run_sync(read_objects)
    async with open_lab(manifests, lab_config(spec, config, subnet), wait_ready_s=None,
                        lab_class=ClusterNodeLab) as lab:
        node = ClusterNode(store, spec, config, lab, lease, underlay, pods=pod_source, views=views)
        speaker = L2Speaker(store, node)   # MetalLB's L2 mode: answers ARP only for the IPs it wins
        try:
            await node.attach_uplink()
            async with trio.open_nursery() as nursery:
                await nursery.start(speaker.run)
                await nursery.start(node.watch_leases)
                await nursery.start(node.watch_services)
                await nursery.start(node.watch_pods)
                nursery.start_soon(node.publish_status)
                nursery.start_soon(_keep_lease, store, node)
                await nursery.start(lambda task_status: keep_node_registered(
                    store, spec.node_object(subnet), ttl_s=config.node_lease_ttl_s,
                    interval_s=config.heartbeat_s, task_status=task_status))
                if wait_ready_s is not None:
                    await lab.wait_ready(wait_ready_s)
                try:
                    yield node
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            await node.detach_uplink()


def object_views(node: str) -> dict[str, ObjectView]:
    """A node's views of the kinds it reads, by kind (see ClusterNode.views)."""
    return {kind: ObjectView(kind, f"node {node}") for kind in ("Namespace", "Pod", "Service", "EndpointSlice")}


async def _keep_lease(store: Store, node: ClusterNode) -> None:
    """flanneld's lease renewal; losing the lease ends the node, as it ends flanneld."""
    def renewed(lease: SubnetLease) -> None:
        node.lease = lease
    await keep_subnet_lease(store, node.lease, on_renew=renewed)


__all__ = ["ClusterNode", "ClusterNodeLab", "lab_config", "node_state_dir", "open_cluster_node",
           "release_dead_journals"]
