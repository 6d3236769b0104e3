"""The agent side of the eBPF backend: Services in, BPF map entries out, one changed entry at a time.

Layer: core, sans-IO. Plays the part of cilium-agent's service manager and lbmap writer
(pkg/service, pkg/maps/lbmap, pkg/loadbalancer/reconciler): every ProxyServicePort becomes its
frontends (ClusterIP; NodePort on 0.0.0.0 and on each node IP; each externalIP; each LoadBalancer
IP), each frontend gets a service id (= rev_nat_index) and its master, slot, reverse-NAT,
affinity-match, source-range and Maglev entries; each backend address gets a backend id.

Rules this module keeps
- A sync diffs: it writes an entry only when its packed bytes change and deletes only what is gone,
  so one endpoint change writes O(1) entries whatever the number of Services. `objects_written`
  counts those map updates and deletes (a Maglev table swap counts as one, as the agent replaces
  the inner map of cilium_lb4_maglev with one update).
- Slots stay where they are: a surviving backend keeps its slot, a removed one's slot takes the
  last slot's backend, new ones are appended (Cilium 1.16+ rewrites slots in sorted order instead,
  which can move every slot after a removed one).
- Backends: ready endpoints are ACTIVE and fill the slots; when none is ready, serving terminating
  ones fill them (kube-proxy's and Cilium's fallback). Other terminating endpoints stay in
  cilium_lb4_backends_v3 as TERMINATING but in no slot, so open flows still find them (graceful
  termination). A backend entry is shared by every frontend using the address and freed with the
  last one.
- eTP=Local on an external frontend: the EXT-scope entry lists local backends only and carries
  EXT_LOCAL_SCOPE | TWO_SCOPES; an INT-scope twin ("/i", its own id) lists what in-cluster
  clients may use. iTP=Local: in-cluster entries list local backends and carry INT_LOCAL_SCOPE.
- A Service is installed all or nothing: if a map is full (MapFull, E2BIG) or the id space is
  exhausted, every entry and id already written for it is put back and LimitExceeded is raised.
- A frontend (address, port, protocol, scope) belongs to the first Service that claims it; another
  Service asking for the same one does not get it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

from podnet.errors import LimitExceeded

from ..kubeproxy import ProxyEndpoint, ProxyServicePort
from . import lbmaps as lb
from .lbmaps import BackendState, LbMaps, SCOPE_EXT, SCOPE_INT, ServiceFlags
from .maglev import MaglevBackend, backend_hash_string, lookup_table

__all__ = ["Agent", "Frontend", "InstalledFrontend", "service_key"]

MAX_SERVICE_ID = 65535
MAX_BACKEND_ID = 0xFFFFFFFF - 1


def service_key(svc: ProxyServicePort) -> tuple[str, str, str, str]:
    return (svc.namespace, svc.name, svc.port_name, svc.protocol)


def _ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


@dataclass(frozen=True)
class BackendRef:
    address: int
    port: int
    proto: int
    state: BackendState
    is_local: bool

    @property
    def addr_key(self) -> tuple[int, int, int]:
        return (self.address, self.port, self.proto)


@dataclass(frozen=True)
class Frontend:
    """One lb4_services_v2 frontend of a Service port, with what it should hold."""

    address: int
    port: int
    proto: int
    scope: int
    flags: ServiceFlags
    active: tuple[BackendRef, ...]          # in the slots
    standby: tuple[BackendRef, ...] = ()    # terminating: backend map only
    affinity_timeout: int = 0
    source_ranges: tuple[ipaddress.IPv4Network, ...] = ()
    service: str = ""                        # ns/name:port, for messages

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (self.address, self.port, self.proto, self.scope)

    def text(self) -> str:
        return lb.Lb4Key(self.address, self.port, 0, self.proto, self.scope).frontend_text()


@dataclass
class InstalledFrontend:
    frontend: Frontend
    rev_nat: int
    slots: list[int] = field(default_factory=list)        # backend id per slot (slot i+1)
    backend_ids: set[int] = field(default_factory=set)    # every backend id this frontend references
    maglev_ids: tuple[int, ...] | None = None


class _Txn:
    """What one Service's installation changed, so that a failure can put everything back."""

    def __init__(self) -> None:
        self.undo: list[Callable[[], None]] = []
        self.writes = 0

    def rollback(self) -> None:
        for step in reversed(self.undo):
            step()


class Agent:
    """Programs LbMaps from ProxyServicePorts (see the module docstring for its rules)."""

    def __init__(self, maps: LbMaps, *, node_ips: tuple[int, ...], algorithm: str, maglev_seed: int) -> None:
        self.maps = maps
        self.node_ips = node_ips
        self.algorithm = algorithm
        self.maglev_seed = maglev_seed
        self.installed: dict[tuple, dict[tuple, InstalledFrontend]] = {}   # service key -> frontend key -> state
        self.by_rev_nat: dict[int, InstalledFrontend] = {}
        self._fe_ids: dict[tuple, int] = {}
        self._fe_owner: dict[tuple, tuple] = {}       # frontend key -> the Service that holds it
        self._used_fe_ids: set[int] = set()
        self._next_fe_id = 1
        self._backend_ids: dict[tuple[int, int, int], int] = {}
        self._backend_addr: dict[int, tuple[int, int, int]] = {}
        self._backend_refs: dict[int, int] = {}
        self._backend_state: dict[int, tuple[BackendState, bool]] = {}
        self._next_backend_id = 1

    # ---- desired state --------------------------------------------------------------------------

    def frontends(self, svc: ProxyServicePort) -> list[Frontend]:
        """Every frontend `svc` needs, with the backends each one lists."""
        proto = lb.PROTO_NUMBERS[svc.protocol]
        if ipaddress.ip_address(svc.cluster_ip).version != 4:
            return []

        def refs(endpoints: list[ProxyEndpoint]) -> tuple[tuple[BackendRef, ...], tuple[BackendRef, ...]]:
            ready = [e for e in endpoints if e.ready]
            fallback = [] if ready else [e for e in endpoints if e.serving and e.terminating]
            active = ready or fallback
            standby = [e for e in endpoints if e.terminating and e not in active]
            make = lambda e, state: BackendRef(_ip(e.ip), e.port, proto, state, e.is_local)  # noqa: E731
            return (tuple(make(e, BackendState.ACTIVE if e.ready else BackendState.TERMINATING) for e in active),
                    tuple(make(e, BackendState.TERMINATING) for e in standby))

        all_eps = list(svc.endpoints)
        local_eps = [e for e in all_eps if e.is_local]
        cluster = refs(all_eps)
        local = refs(local_eps)
        internal = local if svc.internal_policy_local else cluster
        ext_local = svc.external_policy_local and svc.externally_accessible
        base = ServiceFlags(0)
        if svc.affinity_timeout_s:
            base |= ServiceFlags.AFFINITY
        int_flags = ServiceFlags.INT_LOCAL_SCOPE if svc.internal_policy_local else ServiceFlags(0)
        timeout = svc.affinity_timeout_s or 0
        name = svc.service_port_name
        out = [Frontend(_ip(svc.cluster_ip), svc.port, proto, SCOPE_EXT, base | int_flags, *internal,
                        affinity_timeout=timeout, service=name)]
        ranges = tuple(ipaddress.IPv4Network(c) for c in svc.source_ranges
                       if ipaddress.ip_network(c).version == 4)
        external: list[tuple[int, int, ServiceFlags, tuple]] = []
        if svc.node_port is not None:
            external.append((0, svc.node_port, ServiceFlags.NODEPORT, ()))
            for node_ip in self.node_ips:
                external.append((node_ip, svc.node_port, ServiceFlags.NODEPORT | ServiceFlags.ROUTABLE, ()))
        for ip in svc.external_ips:
            if ipaddress.ip_address(ip).version == 4:
                external.append((_ip(ip), svc.port, ServiceFlags.EXTERNAL_IP | ServiceFlags.ROUTABLE, ()))
        for ip in svc.load_balancer_ips:
            if ipaddress.ip_address(ip).version == 4:
                flags = ServiceFlags.LOADBALANCER | ServiceFlags.ROUTABLE
                external.append((_ip(ip), svc.port, flags | (ServiceFlags.SOURCE_RANGE if ranges else 0), ranges))
        ext_backends = local if ext_local else cluster
        two_scopes = ext_backends != internal
        for address, port, flags, src_ranges in external:
            flags |= base
            if ext_local:
                flags |= ServiceFlags.EXT_LOCAL_SCOPE
            if two_scopes:
                flags |= ServiceFlags.TWO_SCOPES
            out.append(Frontend(address, port, proto, SCOPE_EXT, flags, *ext_backends, affinity_timeout=timeout,
                                source_ranges=src_ranges, service=name))
            if two_scopes:
                out.append(Frontend(address, port, proto, SCOPE_INT, (flags & ~ServiceFlags.EXT_LOCAL_SCOPE
                                                                      & ~ServiceFlags.TWO_SCOPES) | int_flags,
                                    *internal, affinity_timeout=timeout, source_ranges=src_ranges, service=name))
        return out

    # ---- applying -------------------------------------------------------------------------------

    def apply(self, key: tuple, svc: ProxyServicePort | None) -> int:
        """Make the maps hold exactly `svc`'s frontends (None: remove the Service). Returns the
        entries written; raises LimitExceeded with everything put back."""
        txn = _Txn()
        current = self.installed.get(key, {})
        # a frontend another Service already holds stays with it (first come, first served)
        wanted = {fe.key: fe for fe in (self.frontends(svc) if svc is not None else ())
                  if self._fe_owner.get(fe.key, key) == key}
        new_state: dict[tuple, InstalledFrontend] = {}
        try:
            for fe_key in [k for k in current if k not in wanted]:
                self._remove_frontend(current[fe_key], txn)
            for fe_key, fe in wanted.items():
                new_state[fe_key] = self._upsert_frontend(fe, current.get(fe_key), key, txn)
        except LimitExceeded:
            txn.rollback()
            raise
        for fe_key, inst in current.items():
            if fe_key not in new_state:
                self.by_rev_nat.pop(inst.rev_nat, None)
        for inst in new_state.values():
            self.by_rev_nat[inst.rev_nat] = inst
        if new_state:
            self.installed[key] = new_state
        else:
            self.installed.pop(key, None)
        return txn.writes

    # map writes that remember how to undo themselves
    def _put(self, m, key: bytes, value, txn: _Txn, what: str) -> None:
        old = m.peek(key)
        if old is not None and old == value:
            return
        m.update(key, value, what=what)
        txn.writes += 1
        txn.undo.append((lambda: m.update(key, old)) if old is not None else (lambda: m.delete(key)))

    def _del(self, m, key: bytes, txn: _Txn) -> None:
        old = m.peek(key)
        if old is None:
            return
        m.delete(key)
        txn.writes += 1
        txn.undo.append(lambda: m.update(key, old))

    def _alloc_fe_id(self, fe: Frontend, owner: tuple, txn: _Txn) -> int:
        if len(self._used_fe_ids) >= MAX_SERVICE_ID:
            raise LimitExceeded(f"service ID space exhausted ({MAX_SERVICE_ID} ids): cannot add {fe.text()}")
        candidate = self._next_fe_id
        while candidate in self._used_fe_ids:
            candidate = candidate % MAX_SERVICE_ID + 1
        previous_next = self._next_fe_id
        self._fe_ids[fe.key] = candidate
        self._fe_owner[fe.key] = owner
        self._used_fe_ids.add(candidate)
        self._next_fe_id = candidate % MAX_SERVICE_ID + 1

        def undo() -> None:
            self._fe_ids.pop(fe.key, None)
            self._fe_owner.pop(fe.key, None)
            self._used_fe_ids.discard(candidate)
            self._next_fe_id = previous_next
        txn.undo.append(undo)
        return candidate

    def _free_fe_id(self, fe: Frontend, txn: _Txn) -> None:
        old = self._fe_ids.pop(fe.key)
        owner = self._fe_owner.pop(fe.key)
        self._used_fe_ids.discard(old)

        def undo() -> None:
            self._fe_ids[fe.key] = old
            self._fe_owner[fe.key] = owner
            self._used_fe_ids.add(old)
        txn.undo.append(undo)

    def _acquire_backend(self, ref: BackendRef, txn: _Txn) -> int:
        backend_id = self._backend_ids.get(ref.addr_key)
        if backend_id is None:
            if len(self._backend_ids) >= MAX_BACKEND_ID:
                raise LimitExceeded("backend ID space exhausted")
            backend_id = self._next_backend_id
            while backend_id in self._backend_refs:
                backend_id = backend_id % MAX_BACKEND_ID + 1
            previous_next = self._next_backend_id
            self._backend_ids[ref.addr_key] = backend_id
            self._backend_addr[backend_id] = ref.addr_key
            self._backend_refs[backend_id] = 0
            self._next_backend_id = backend_id % MAX_BACKEND_ID + 1

            def undo_new(k=ref.addr_key, i=backend_id) -> None:
                self._backend_ids.pop(k, None)
                self._backend_addr.pop(i, None)
                self._backend_refs.pop(i, None)
                self._backend_state.pop(i, None)
                self._next_backend_id = previous_next
            txn.undo.append(undo_new)
        self._backend_refs[backend_id] += 1
        txn.undo.append(lambda i=backend_id: self._backend_refs.__setitem__(i, self._backend_refs[i] - 1)
                        if i in self._backend_refs else None)
        return backend_id

    def _write_backend(self, backend_id: int, ref: BackendRef, txn: _Txn) -> None:
        value = lb.Lb4Backend(ref.address, ref.port, ref.proto, ref.state).pack()
        self._put(self.maps.backends, lb.pack_backend_key(backend_id), value, txn,
                  f"backend {lb.addr_text(ref.address)}:{ref.port}")
        old_state = self._backend_state.get(backend_id)
        if old_state is None and ref.is_local:
            self.maps.lxc[ref.address] = self.maps.lxc.get(ref.address, 0) + 1
            txn.undo.append(lambda a=ref.address: self._lxc_release(a))
        self._backend_state[backend_id] = (ref.state, ref.is_local)
        txn.undo.append(lambda i=backend_id, s=old_state: self._backend_state.__setitem__(i, s) if s is not None
                        else self._backend_state.pop(i, None))

    def _lxc_release(self, address: int) -> None:
        left = self.maps.lxc.get(address, 0) - 1
        if left > 0:
            self.maps.lxc[address] = left
        else:
            self.maps.lxc.pop(address, None)

    def _release_backend(self, backend_id: int, txn: _Txn) -> None:
        self._backend_refs[backend_id] -= 1
        txn.undo.append(lambda: self._backend_refs.__setitem__(backend_id, self._backend_refs[backend_id] + 1))
        if self._backend_refs[backend_id] > 0:
            return
        addr_key = self._backend_addr.pop(backend_id)
        state = self._backend_state.pop(backend_id, None)
        del self._backend_ids[addr_key]
        del self._backend_refs[backend_id]
        self._del(self.maps.backends, lb.pack_backend_key(backend_id), txn)
        if state is not None and state[1]:
            self._lxc_release(addr_key[0])

        def undo() -> None:
            self._backend_ids[addr_key] = backend_id
            self._backend_addr[backend_id] = addr_key
            self._backend_refs[backend_id] = 0
            if state is not None:
                self._backend_state[backend_id] = state
                if state[1]:
                    self.maps.lxc[addr_key[0]] = self.maps.lxc.get(addr_key[0], 0) + 1
        txn.undo.append(undo)

    def _upsert_frontend(self, fe: Frontend, prev: InstalledFrontend | None, owner: tuple,
                         txn: _Txn) -> InstalledFrontend:
        maps = self.maps
        rev_nat = prev.rev_nat if prev is not None else self._alloc_fe_id(fe, owner, txn)
        old = prev.frontend if prev is not None else None
        old_slots = prev.slots if prev is not None else []
        old_ids = prev.backend_ids if prev is not None else set()
        what = f"{fe.text()} ({fe.service})" if fe.service else fe.text()
        # the master entry first: a full services map refuses a new Service right here
        master = lb.Lb4Service(fe.affinity_timeout, len(fe.active), rev_nat, int(fe.flags)).pack()
        self._put(maps.services, lb.pack_lb4_key(fe.address, fe.port, 0, fe.proto, fe.scope), master, txn, what)
        self._put(maps.reverse_nat, lb.pack_revnat_key(rev_nat),
                  lb.Lb4ReverseNat(fe.address, fe.port).pack(), txn, what)
        # backends: an id for everything this frontend references, an entry when new or changed
        wanted: dict[int, BackendRef] = {}
        for ref in fe.active + fe.standby:
            existing = self._backend_ids.get(ref.addr_key)
            backend_id = existing if existing is not None and existing in old_ids else self._acquire_backend(ref, txn)
            wanted[backend_id] = ref
            if self._backend_state.get(backend_id) != (ref.state, ref.is_local):
                self._write_backend(backend_id, ref, txn)
        active_ids = [self._backend_ids[r.addr_key] for r in fe.active]
        slots = _keep_slots(old_slots, active_ids)
        for i, backend_id in enumerate(slots, start=1):
            self._put(maps.services, lb.pack_lb4_key(fe.address, fe.port, i, fe.proto, fe.scope),
                      lb.Lb4Service(backend_id, 0, rev_nat, int(fe.flags)).pack(), txn, f"{what} slot {i}")
        for i in range(len(slots) + 1, len(old_slots) + 1):
            self._del(maps.services, lb.pack_lb4_key(fe.address, fe.port, i, fe.proto, fe.scope), txn)
        # affinity match: one entry per (active backend, service) with ClientIP affinity
        old_match = set(old_slots) if old is not None and old.flags & ServiceFlags.AFFINITY else set()
        new_match = set(slots) if fe.flags & ServiceFlags.AFFINITY else set()
        for b in old_match - new_match:
            self._del(maps.affinity_match, lb.pack_affinity_match(b, rev_nat), txn)
        for b in new_match - old_match:
            self._put(maps.affinity_match, lb.pack_affinity_match(b, rev_nat), b"\x01", txn, f"{what} affinity")
        old_ranges = set(old.source_ranges) if old is not None else set()
        if old_ranges != set(fe.source_ranges):
            self._sync_ranges(rev_nat, old_ranges, set(fe.source_ranges), txn)
        maglev_ids = prev.maglev_ids if prev is not None else None
        if self.algorithm == "maglev":
            ids = tuple(sorted(slots))
            if ids != maglev_ids:
                self._write_maglev(rev_nat, fe, slots, txn)
                maglev_ids = ids
        for backend_id in old_ids - set(wanted):
            self._release_backend(backend_id, txn)
        return InstalledFrontend(fe, rev_nat, slots, set(wanted), maglev_ids)

    def _sync_ranges(self, rev_nat: int, old: set, new: set, txn: _Txn) -> None:
        m = self.maps.source_range
        for net in old - new:
            data = lb.pack_source_range(rev_nat, int(net.network_address))
            if m.delete(32 + net.prefixlen, data):
                txn.writes += 1
                txn.undo.append(lambda d=data, p=32 + net.prefixlen: m.update(p, d, b"\x01"))
        for net in new - old:
            data = lb.pack_source_range(rev_nat, int(net.network_address))
            m.update(32 + net.prefixlen, data, b"\x01", what=f"source range {net} of service {rev_nat}")
            txn.writes += 1
            txn.undo.append(lambda d=data, p=32 + net.prefixlen: m.delete(p, d))

    def _write_maglev(self, rev_nat: int, fe: Frontend, slots: list[int], txn: _Txn) -> None:
        key = lb.pack_revnat_key(rev_nat)
        if not slots:
            self._del(self.maps.maglev, key, txn)
            return
        by_id = {self._backend_ids[r.addr_key]: r for r in fe.active}
        backends = [MaglevBackend(b, backend_hash_string(lb.addr_text(by_id[b].address), by_id[b].port,
                                                         lb.PROTO_NAMES[by_id[b].proto], fe.scope == SCOPE_INT))
                    for b in slots]
        table = lookup_table(backends, self.maps.maglev_table_size, self.maglev_seed)
        self._put(self.maps.maglev, key, table, txn, f"maglev table of {fe.text()}")

    def _remove_frontend(self, inst: InstalledFrontend, txn: _Txn) -> None:
        fe, rev_nat, maps = inst.frontend, inst.rev_nat, self.maps
        for i in range(len(inst.slots), -1, -1):
            self._del(maps.services, lb.pack_lb4_key(fe.address, fe.port, i, fe.proto, fe.scope), txn)
        self._del(maps.reverse_nat, lb.pack_revnat_key(rev_nat), txn)
        if fe.flags & ServiceFlags.AFFINITY:
            for b in inst.slots:
                self._del(maps.affinity_match, lb.pack_affinity_match(b, rev_nat), txn)
        self._sync_ranges(rev_nat, set(fe.source_ranges), set(), txn)
        self._del(maps.maglev, lb.pack_revnat_key(rev_nat), txn)
        for backend_id in inst.backend_ids:
            self._release_backend(backend_id, txn)
        self._free_fe_id(fe, txn)


def _keep_slots(old: list[int], active: list[int]) -> list[int]:
    """New slot order: survivors keep their slot, the last survivor fills each hole, newcomers
    are appended in `active` order."""
    present = set(active)
    slots = list(old)
    i = 0
    while True:
        while slots and slots[-1] not in present:
            slots.pop()
        if i >= len(slots):
            break
        if slots[i] not in present:
            slots[i] = slots.pop()
        i += 1
    have = set(slots)
    return slots + [b for b in active if b not in have]
