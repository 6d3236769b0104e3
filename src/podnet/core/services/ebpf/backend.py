"""The eBPF backend: Cilium's kube-proxy replacement, as BPF-map-style tables in userspace.

Layer: core, sans-IO. `EbpfBackend` keeps Cilium's load-balancing maps (lbmaps.py) with their
byte layouts and max_entries, programs them the way cilium-agent does (agent.py: one changed entry
at a time), decides NEW flows the way its BPF programs do (programs.py: two-step lookup, random or
Maglev, ClientIP affinity), and keeps Cilium's own conntrack with its timeouts and GC (ct.py).
`cli.py` prints it as `cilium service list`, `cilium bpf lb list` and `cilium bpf ct list global`.

What the userspace analogue reproduces, and what it cannot
- Hooks. `decide()` is the tc program on the pod's port (bpf_lxc's per-packet service lookup) and,
  for uplink traffic, the NodePort path of bpf_host. `xdp(frame)` is the XDP program on the uplink:
  it sees the raw frame first and can drop it (the CIDR prefilter, loadBalancerSourceRanges);
  every other frame passes on to podnet's pipeline. Real XDP NodePort acceleration also DNATs,
  SNATs and bounces remote-backend traffic with XDP_TX; podnet's datapath owns forwarding and
  conntrack, so here the translation itself is always decided at the tc stage.
- Socket-LB (`socket_lb=True`). Cilium translates a pod's connect()/sendmsg() in the kernel: the
  socket then really talks to the backend, so no packet ever carries the ClusterIP, there is no
  per-packet NAT, no CT_SERVICE entry, and getpeername() is answered from cilium_lb4_reverse_sk.
  A userspace dataplane cannot hook a pod's connect(): the pod's kernel still addresses every
  packet to the ClusterIP, and podnet must still rewrite each one (its conntrack NAT) and
  reverse-NAT the replies. What the analogue keeps is the decision socket-LB takes, once per
  connection: random slot for TCP, the socket cookie's slot for UDP (podnet numbers sockets by
  client address and port), Maglev never used for this east-west traffic, affinity by netns cookie,
  the reverse_sk entry written at connect and removed at close, ExternalIPs not on this node left
  untranslated (the CVE-2020-8554 mitigation), a service without backends refused with
  EHOSTUNREACH, and no CT_SERVICE entry. The per-packet work Cilium saves is not saved here.
  Cilium enables socket-LB by default; podnet defaults to the per-packet tc path
  (Cilium's socketLB.hostNamespaceOnly=true setup for pods), so `decide` shows the tc program.
- Conntrack. podnet's conntrack pins every flow's NAT and reverse-NATs its replies; Cilium's CT
  entries (CT_SERVICE with the backend id, the flow's own entry with rev_nat_index) are written
  beside it with Cilium's lifetimes. podnet tells the backend about a flow only when it is NEW and
  when it is forgotten (`flow_closed`), not per packet, so an entry's lifetime is the one set at
  creation (60 s for a SYN) unless `refresh_flow` is called; a closed TCP flow gets the close
  timeout. `cilium bpf ct list global` therefore shows what Cilium would hold after each flow's
  first packet.
- Hairpin. Cilium SNATs a pod reaching itself through a Service to 169.254.42.1; podnet's NAT can
  only masquerade to the node address, so that is what the pod sees.

Rules this module keeps
- The first sync is full; later ones, with partial_sync, touch only Services whose
  ProxyServicePort changed (and retry ones that failed). Every sync writes only changed entries.
  An unchanged Service is recognised by identity first (the lab hands unchanged ports over as
  the same objects), by equality otherwise.
- A Service that does not fit (a full map: E2BIG; the id space) is reported in the SyncReport
  (`detail["failed"]`), counted (`map_full_errors`), left out — its previous version, if any, stays
  installed — and retried on every later sync; every other Service keeps working.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable

from podnet.errors import ConfigError, LimitExceeded

from ..base import Decision, ServiceBackend, SyncReport
from ..kubeproxy import ProxyServicePort
from ..packetinfo import PacketInfo
from .agent import Agent, service_key
from .ct import CtMap, CtTimeouts
from .lbmaps import LbMapSizes, LbMaps
from .maglev import DEFAULT_HASH_SEED, DEFAULT_TABLE_SIZE, SUPPORTED_TABLE_SIZES, parse_seed
from .maps import LpmTrieMap, MapFull
from .programs import OpenFlow, ProgramConfig, Programs, XdpAction

__all__ = ["EbpfBackend"]


def _ip(text) -> int:
    return text if isinstance(text, int) else int(ipaddress.IPv4Address(text))


def _diff_key(svc: ProxyServicePort) -> str:
    """"ns/name:port/PROTO": one string per Service port (no part may hold '/' or ':'), which the
    garbage collector does not track, unlike the agent's tuple key."""
    return f"{svc.namespace}/{svc.name}:{svc.port_name}/{svc.protocol}"


class EbpfBackend(ServiceBackend):
    """Cilium-style Service load balancing (see the module docstring)."""

    name = "ebpf"

    def __init__(self, *, cluster_cidr: str = "10.244.0.0/16", node_ips: Iterable[str] = (),
                 local_addresses: Iterable[int] = (), partial_sync: bool = True, seed: int = 0,
                 algorithm: str = "random", socket_lb: bool = False,
                 maglev_table_size: int = DEFAULT_TABLE_SIZE, maglev_hash_seed: str = DEFAULT_HASH_SEED,
                 map_sizes: LbMapSizes | None = None, lb_map_max: int | None = None,
                 ct_tcp_max_entries: int = 524288, ct_any_max_entries: int = 262144,
                 ct_timeouts: CtTimeouts = CtTimeouts(), ct_gc_interval_s: float | None = None,
                 no_backend_response: str = "reject", node_port_range: tuple[int, int] = (30000, 32767),
                 prefilter_cidrs: Iterable[str] = ()) -> None:
        if algorithm not in ("random", "maglev"):
            raise ConfigError(f"ebpf backend algorithm {algorithm!r}: must be 'random' or 'maglev' "
                              "(--bpf-lb-algorithm)")
        if no_backend_response not in ("reject", "drop"):
            raise ConfigError(f"ebpf backend no_backend_response {no_backend_response!r}: must be 'reject' or "
                              "'drop' (--service-no-backend-response)")
        if maglev_table_size not in SUPPORTED_TABLE_SIZES:
            raise ConfigError(f"ebpf backend maglev_table_size {maglev_table_size}: must be one of "
                              f"{list(SUPPORTED_TABLE_SIZES)} (--bpf-lb-maglev-table-size)")
        try:
            maglev_seed = parse_seed(maglev_hash_seed)
            net = ipaddress.IPv4Network(cluster_cidr)
            nodes = tuple(_ip(ip) for ip in node_ips)
        except ValueError as exc:
            raise ConfigError(f"ebpf backend: {exc}") from None
        if map_sizes is None:
            map_sizes = LbMapSizes() if lb_map_max is None else LbMapSizes(*(lb_map_max,) * 7)
        self.algorithm = algorithm
        self.socket_lb = socket_lb
        self.partial_sync = partial_sync
        self.maps = LbMaps(map_sizes, maglev_table_size)
        self.ct = CtMap(tcp_max_entries=ct_tcp_max_entries, any_max_entries=ct_any_max_entries,
                        timeouts=ct_timeouts, gc_interval_s=ct_gc_interval_s)
        self.prefilter = LpmTrieMap("cilium_cidr_v4_dyn", 4, 16384)
        self.rng = random.Random(seed)
        self.local_addresses = frozenset(local_addresses)
        config = ProgramConfig(algorithm, maglev_seed.jhash0, self.local_addresses | frozenset(nodes),
                               int(net.network_address), int(net.netmask), tuple(node_port_range),
                               no_backend_response)
        self.programs = Programs(self.maps, self.ct, config, self.rng, self.prefilter)
        self.agent = Agent(self.maps, node_ips=nodes, algorithm=algorithm, maglev_seed=maglev_seed.murmur)
        self._last: dict[str, ProxyServicePort] = {}     # _diff_key -> the version last applied
        self._failed: dict[str, str] = {}                # _diff_key -> why it is not (fully) installed
        self._open: dict[int, OpenFlow] = {}
        self._open_by_key: dict[bytes, int] = {}     # CT key or reverse_sk key -> open flow
        self._opened_at: dict[int, float] = {}
        self._next_gc: float | None = None
        self.syncs = 0
        self.map_full_errors = 0
        self.limit_errors = 0
        self.decisions = 0
        self.last_sync: SyncReport | None = None
        self.prefilter_update(prefilter_cidrs)

    # ---- control plane ----------------------------------------------------------------------------

    def sync(self, services: Iterable[ProxyServicePort], *, full: bool = True) -> SyncReport:
        full = full or not self.partial_sync or self.syncs == 0
        last, retry = self._last, self._failed
        # One pass over the view, in the datapath's thread: an unchanged Service costs a string
        # key, a dict probe and an identity check (equality only for a new but equal object), and
        # leaves nothing the garbage collector tracks behind it; 10,000 live tuple keys would set
        # off young collections mid-sync and bring the next full one (over all of CT) closer.
        view: dict[str, ProxyServicePort] = {}
        todo: dict[str, None] = {}            # changed or failed before, in the view's order
        new = False
        for svc in services:
            name = _diff_key(svc)
            view[name] = svc
            prev = last.get(name)
            if prev is None:
                new = True
                todo[name] = None
            elif full or (prev is not svc and prev != svc) or name in retry:
                todo[name] = None
        # the same keys, or some are gone: only a view with new keys or another size can lack one
        gone = [name for name in last if name not in view] if new or len(view) != len(last) else []
        written = 0
        failed: list[str] = []
        for name in gone:
            written += self.agent.apply(service_key(last[name]), None)
            del last[name]
            self._failed.pop(name, None)
        for name in todo:
            svc = view[name]
            try:
                written += self.agent.apply(service_key(svc), svc)
                self._failed.pop(name, None)
            except LimitExceeded as exc:
                self._failed[name] = str(exc)       # retried on every later sync
                failed.append(str(exc))
                if isinstance(exc, MapFull):
                    self.map_full_errors += 1
                else:
                    self.limit_errors += 1
            last[name] = svc
        self.syncs += 1
        report = SyncReport(full=full, services=len(view), objects_written=written,
                            objects_total=self.maps.control_plane_entries(),
                            detail={"services_examined": len(todo) + len(gone), "failed": failed,
                                    "map_full_errors": self.map_full_errors,
                                    "entries": {m.short: len(m) for m in self.maps.all()}})
        self.last_sync = report
        return report

    @property
    def errors(self) -> list[str]:
        """The Services that are not (fully) installed, with why."""
        return list(self._failed.values())

    def prefilter_update(self, cidrs: Iterable[str]) -> None:
        """`cilium prefilter update --cidr ...`: source CIDRs the XDP program drops."""
        for cidr in cidrs:
            net = ipaddress.IPv4Network(cidr, strict=False)
            self.prefilter.update(net.prefixlen, net.network_address.packed, b"\x01", what=str(net))

    def prefilter_delete(self, cidrs: Iterable[str]) -> None:
        for cidr in cidrs:
            net = ipaddress.IPv4Network(cidr, strict=False)
            self.prefilter.delete(net.prefixlen, net.network_address.packed)

    # ---- datapath ---------------------------------------------------------------------------------

    def decide(self, pkt: PacketInfo, now: float, *, local_source: bool = False,
               effects: bool = True) -> Decision:
        programs = self.programs
        if self.socket_lb and pkt.proto in (6, 17) and programs.is_internal(pkt.src, local_source):
            decision, flow = programs.sock4_connect(pkt, now, local_source, effects)
        else:
            decision, flow = programs.tc_lb4(pkt, now, local_source, effects)
        if effects:
            self.decisions += 1
            if flow is not None:
                ident = id(decision)
                self._open[ident] = flow
                self._opened_at[ident] = now
                for key in self._flow_keys(flow):
                    # the same tuple (or socket) decided again: its entries now belong to this flow
                    older = self._open_by_key.get(key)
                    if older is not None and older != ident:
                        self._forget(older)
                    self._open_by_key[key] = ident
            if self._next_gc is None and (len(self.ct) or self._open):
                self._next_gc = now + self.ct.interval_s
        return decision

    def xdp(self, frame) -> XdpAction:
        """The uplink's XDP program on a raw Ethernet frame: XDP_DROP or XDP_PASS."""
        return self.programs.xdp(frame)

    def refresh_flow(self, decision: Decision, now: float, *, tcp_flags: int = 0, length: int = 0) -> None:
        """One more packet of a decided flow (ct_update_timeout); the datapath does not call it yet."""
        flow = self._open.get(id(decision))
        if flow is not None and flow.decision is decision:
            for tup in flow.ct_keys:
                self.ct.refresh(tup, now, tcp_flags=tcp_flags, length=length)

    def flow_closed(self, decision: Decision, now: float) -> None:
        ident = id(decision)
        flow = self._open.get(ident)
        if flow is None or flow.decision is not decision:
            return
        self._forget(ident)
        for tup in flow.ct_keys:
            self.ct.close(tup, now)
        self.programs.sock_release(flow)

    @staticmethod
    def _flow_keys(flow: OpenFlow) -> list[bytes]:
        return [tup.pack() for tup in flow.ct_keys] + ([flow.reverse_sk] if flow.reverse_sk is not None else [])

    def _forget(self, ident: int) -> OpenFlow | None:
        flow = self._open.pop(ident, None)
        self._opened_at.pop(ident, None)
        if flow is not None:
            for key in self._flow_keys(flow):
                if self._open_by_key.get(key) == ident:
                    del self._open_by_key[key]
        return flow

    def handle_timer(self, now: float) -> None:
        """The agent's CT garbage collection, at Cilium's adaptive interval."""
        if self._next_gc is None or now < self._next_gc:
            return
        for key in self.ct.gc(now):
            ident = self._open_by_key.get(key)
            if ident is not None:
                self._forget(ident)
        # socket-LB flows hold no CT entry: forget any the datapath never reported closed
        horizon = now - self.ct.timeouts.regular_tcp
        for ident in [i for i, t in self._opened_at.items() if t < horizon and not self._open[i].ct_keys]:
            flow = self._forget(ident)
            if flow is not None:
                self.programs.sock_release(flow)
        self._next_gc = now + self.ct.interval_s if (len(self.ct) or self._open) else None

    def next_deadline(self) -> float | None:
        return self._next_gc

    # ---- inspection -------------------------------------------------------------------------------

    def dump(self) -> str:
        """`cilium bpf lb list`."""
        from .cli import bpf_lb_list
        return bpf_lb_list(self)

    def statistics(self) -> dict:
        return {
            "frontends": len(self.agent.by_rev_nat),
            "services_failed": len(self._failed),
            "syncs": self.syncs,
            "map_full_errors": self.map_full_errors,
            "limit_errors": self.limit_errors,
            "decisions": self.decisions,
            "drops": dict(self.programs.drops),
            "xdp": dict(self.programs.xdp_actions),
            "sock_xlate": self.programs.sock_xlate,
            "ct_entries": len(self.ct),
            "ct_gc_runs": self.ct.gc_runs,
            "ct_gc_deleted": self.ct.gc_deleted,
            "ct_gc_interval_s": self.ct.interval_s,
            "open_flows": len(self._open),
            "maps": {m.short: m.statistics() for m in (*self.maps.all(), self.ct.tcp, self.ct.any)},
        }
