"""The per-node pipeline: frames in, actions out.

Layer: core, sans-IO. `process(frame, in_port, now)` returns what to do with one frame — a list of
`Transmit` and `Drop` — and never touches a device, a socket or a clock; the runtime does the I/O
and passes `now` (monotonic seconds). Expiry happens only in `handle_timer(now)`, and
`next_deadline()` says when that is due.

A frame's way through the slow path, one named stage after another (each stage counts the frames
it saw — the fast path counts per flow instead — and `trace()` records each decision):

    port → eth (length, ethertype) → [bridge: learn, switch L2 frames] → arp (proxy-ARP gateway)
         → [vxlan: decapsulated, on again from the tunnel port] → ipv4 (ip_rcv's checks)
         → rpf (a pod may only send from its own address) → conntrack (the flow's entry; an ICMP
           error RELATED to one) → <backend> (no entry: the Service decision, DNAT or refusal)
         → route (longest prefix match, after DNAT) → local (ICMP echo from the gateway) | ttl
         → [tunnel, mtu] → conntrack (a NEW flow confirmed with its NAT) → nat → [neigh, vxlan]
         → forward

Other nodes (the bracketed stages on an underlay uplink: ARP neighbours, direct routes, Flannel's
VXLAN tunnel) are core/internode's, called from hooks here; Internode.quick caches VXLAN flows.
What happens inside the conntrack and Service stages is core/conntrack_stage's; this module keeps
their order. The rest lives beside it too: ports and the actions on them (core/ports), the
per-frame context that makes `trace()` run the same code as `process()` (core/tracing), the
flow cache's layout (core/flowcache), and statistics and traces (core/stats).

A frame the slow path forwards installs a flow-cache entry keyed by (in_port, protocol, addresses,
ports); core/flowcache gives the entry's layout. Later frames of that flow take the fast path: the
same validation, a dict probe, a TTL decrement and a 12-byte MAC rewrite. The cache is flushed
whenever ports or routes change, so it never answers differently from the slow path. Per-flow
counters are kept on the entry and folded into the totals when the entry goes, so the fast path
pays for one counter update, not five.

Invariants:
- Wire input never raises: every bad frame is a `Drop` with a `DropReason`, counted.
- `frame` is a mutable buffer (bytearray or writable memoryview) and is rewritten in place; a
  `Transmit` may refer to it, so the caller writes it out before reusing the buffer.
- A virtio-net header (`vnet`) passes through unchanged: forwarding changes only the TTL and the
  MACs, neither of which a partial checksum covers (NAT updates the seed). Frames podnet
  originates carry `vnet=None`; frames into a VXLAN tunnel are finished first (core/gso).
"""

from __future__ import annotations

import enum
import ipaddress
import random
import struct
from collections import Counter
from dataclasses import dataclass, field

from . import conntrack_stage
from . import nat
from . import packet as pk
from .conntrack import REPEAT, Conntrack, Entry
from .flowcache import (  # the layout; core/internode imports it from here too
    _BYTES, _CT, _DIR, _ETH, _FLOW_SWEEP_INTERVAL_S, _INMAC, _NAT, _OUT, _PEER, _PKTS, _SEEN, _VIA, _cacheable,
)
from .l2 import GATEWAY_IP, GATEWAY_MAC, LearningBridge, ProxyArp
from .packet import DropReason
from .ports import DROPPED, XDP_DROPPED, Drop, Port, PortKind, Transmit, _new_tuple
from .routing import Route, RouteTable
from .services.base import NO_SERVICE, ServiceBackend, Verdict
from .services.packetinfo import CtState
from .stats import DatapathStatistics, PortStatistics, Trace, TraceStep
from .tracing import _Ctx, describe_rewrite, hostport
from ..errors import ConfigError

# dst MAC, ethertype, then IPv4 ver_ihl, tot_len, frag, ttl, proto, src, dst and the L4 ports —
# everything the fast path checks, read in one call. Defined here, not imported: CPython 3.11
# compiles `name.method(...)` on a name bound by an import as LOAD_ATTR and a call (a bound method
# made on every frame, ~40 ns each here) instead of LOAD_METHOD
_FAST = struct.Struct("!6s6xHBxHxxHBBxxIII")
_WORDS = struct.Struct("!5I")  # the IPv4 header as 32-bit words (2**32 == 1 modulo 0xffff, like 2**16)


class NodeMode(enum.Enum):
    ROUTED = "routed"   # Calico style: /32 pods, proxy-ARP gateway 169.254.1.1
    BRIDGE = "bridge"   # kubenet cbr0 style: pods share the node /24 behind a learning bridge


@dataclass
class _Counters:
    rx: Counter = field(default_factory=Counter)        # port -> packets (slow path, retired flows)
    rx_bytes: Counter = field(default_factory=Counter)
    tx: Counter = field(default_factory=Counter)
    tx_bytes: Counter = field(default_factory=Counter)
    drops: Counter = field(default_factory=Counter)
    stages: Counter = field(default_factory=Counter)
    fast: int = 0            # fast-path packets of flows already retired
    slow: int = 0
    flows_installed: int = 0
    flow_table_full: int = 0
    arp_replies: int = 0
    icmp_sent: int = 0
    decisions: int = 0        # NEW flows the Service backend decided
    decision_cost: int = 0    # rules walked / lookups made for them, in the backend's unit
    resets_sent: int = 0


class Datapath:
    """One node's dataplane. Ports are small integers handed out by `add_port`."""

    def __init__(self, *, mode: NodeMode = NodeMode.ROUTED, node_cidr: str = "10.244.0.0/24",
                 gateway_ip: str | None = None, gateway_mac: str = GATEWAY_MAC,
                 flow_idle_timeout_s: float = 30.0, max_flows: int = 65536,
                 node_ip: str | None = None, backend: ServiceBackend | None = None,
                 conntrack: Conntrack | None = None, seed: int = 0) -> None:
        self.mode = mode
        self.node_cidr = node_cidr
        try:
            ipaddress.IPv4Network(node_cidr, strict=True)
        except ValueError as exc:
            raise ConfigError(f"Datapath node_cidr {node_cidr!r}: {exc}") from None
        if gateway_ip is None:
            # routed: the link-local gateway every pod routes to; bridge: the bridge's .1 in the node CIDR
            gateway_ip = GATEWAY_IP if mode is NodeMode.ROUTED else pk.ip_str(pk.ip_int(node_cidr.split("/")[0]) + 1)
        self.gateway_ip = pk.ip_int(gateway_ip)
        self.gateway_mac = pk.mac_bytes(gateway_mac)
        self.flow_idle_timeout_s = flow_idle_timeout_s
        self.max_flows = max_flows
        self.routes = RouteTable()
        self.arp = ProxyArp(self.gateway_mac, {self.gateway_ip})
        self.bridge = LearningBridge() if mode is NodeMode.BRIDGE else None
        self._ports: dict[int, Port] = {}
        self._flows: dict[tuple, list] = {}
        self._next_sweep: float | None = None
        self._c = _Counters()
        self._next_port = 1
        try:
            self.routes.add(f"{pk.ip_str(self.gateway_ip)}/32", 0, kind="local")
            self.routes.add(node_cidr, 0, kind="unreachable")  # the node's own block: no pod, no route
        except ValueError as exc:
            raise ConfigError(f"Datapath node_cidr {node_cidr!r}: {exc}") from None
        # the node's own address: masquerade source, answers pings; traffic to it never leaves
        self.node_ip = pk.ip_int(node_ip) if node_ip else None
        if self.node_ip is not None:
            self.routes.add(f"{node_ip}/32", 0, kind="local")
        self.uplink_arp = ProxyArp(self.gateway_mac, {self.node_ip} if self.node_ip is not None else set())
        self.backend = backend
        self._xdp = None
        self._xdp_ports: set[int] = set()
        self.conntrack = conntrack if conntrack is not None else Conntrack()
        self.conntrack.on_destroy = self._ct_destroyed
        self._ct_steady = self.conntrack.update_steady
        self._ct_flows: dict[int, list[tuple]] = {}   # conntrack entry id -> flow-cache keys
        self._rng = random.Random(seed)
        self.internode = None   # core.internode.Internode: the underlay and the tunnel, once add_uplink made one
        # any change to the table, also one made directly on `routes`, empties the flow cache
        self.routes.on_change = self._flush_flows

    @property
    def local_addresses(self) -> frozenset[int]:
        return frozenset(a for a in (self.gateway_ip, self.node_ip) if a is not None)

    def set_backend(self, backend: ServiceBackend | None) -> None:
        """Switch the Service backend. Established flows keep their conntrack NAT, as on a node
        whose kube-proxy changed mode; only NEW flows ask the new backend."""
        self.backend = backend
        if backend is not None and hasattr(backend, "track_tcp_states"):
            # this datapath reports every TCP state change of a service flow (_ct_update), so a
            # backend that keeps its own connection states (IPVS) can follow them
            backend.track_tcp_states = True
        self._update_xdp()

    def _update_xdp(self) -> None:
        """A backend with an XDP program (the eBPF one) sees every raw frame of the uplink first."""
        self._xdp = getattr(self.backend, "xdp", None)
        self._xdp_ports = {p.id for p in self._ports.values() if p.kind is PortKind.UPLINK} if self._xdp else set()

    # ---- configuration -----------------------------------------------------------------------

    def add_port(self, name: str, kind: PortKind, mac: str | bytes, ip: str | None = None) -> int:
        try:
            port = Port(self._next_port, name, kind, pk.mac_bytes(mac), pk.ip_int(ip) if ip else None,
                        self.gateway_mac)
        except ValueError as exc:
            raise ConfigError(f"port {name!r}: mac {mac!r} / ip {ip!r}: {exc}") from None
        self._next_port += 1
        self._ports[port.id] = port
        if kind is PortKind.POD and port.ip is not None:
            self.routes.add(f"{pk.ip_str(port.ip)}/32", port.id)
        if self.bridge is not None and kind is PortKind.POD:
            self.bridge.add_port(port.id)
        self._flush_flows()
        self._update_xdp()
        return port.id

    def remove_port(self, port_id: int) -> None:
        if self._ports.pop(port_id, None) is None:
            return
        self.routes.remove_port(port_id)
        if self.bridge is not None:
            self.bridge.remove_port(port_id)
        if self.internode is not None:
            self.internode = self.internode.port_removed(port_id)
        self._flush_flows()
        self._update_xdp()

    def add_uplink(self, name: str, mac: str | bytes, *, cidr: str | None = None, neighbors=None) -> int:
        """The uplink on an underlay shared with other nodes, `mac` the node's own there: see
        core/internode (`self.internode` holds the neighbours, leases and static entries)."""
        from .internode import Internode   # internode builds on this module
        self.internode = Internode.attach(self, name, mac, cidr, neighbors)
        return self.internode.underlay

    def add_tunnel(self, vtep, flannel) -> int:
        """Flannel's VXLAN device (core.overlay Vtep and FlannelNode) on the uplink: a TUNNEL port."""
        if self.internode is None:
            raise ConfigError(f"tunnel {flannel.device!r}: the datapath has no underlay uplink (add_uplink first)")
        return self.internode.add_tunnel(vtep, flannel)

    def add_route(self, cidr: str, port_id: int, via: str | None = None) -> Route:
        try:
            route = self.routes.add(cidr, port_id, via)
        except ValueError as exc:
            raise ConfigError(f"route {cidr!r} via {via!r}: {exc}") from None
        self._flush_flows()
        return route

    def port(self, port_id: int) -> Port:
        return self._ports[port_id]

    def ports(self) -> list[Port]:
        return list(self._ports.values())

    # ---- the packet path ---------------------------------------------------------------------

    def process(self, frame, in_port: int, now: float, vnet: bytes | None = None) -> list[Transmit | Drop]:
        if type(frame) is bytes:
            frame = bytearray(frame)
        out = self.forward_fast(frame, in_port, now, vnet)
        if out is not None:
            if out == DROPPED:
                return [Drop(DropReason.CT_INVALID, in_port, "fast path")]
            if out == XDP_DROPPED:
                return [Drop(DropReason.XDP_DROP, in_port, "xdp")]
            # tuple.__new__ skips the NamedTuple's Python-level __new__ on the per-frame path
            return [_new_tuple(Transmit, (out, frame, vnet))]
        return self.process_slow(frame, in_port, now, vnet)

    def forward_fast(self, frame, in_port: int, now: float, vnet=None, commit: bool = True) -> int | None:
        """The fast path alone: rewrite `frame` for its cached flow and return the output port;
        DROPPED when conntrack refused the packet (counted); None, frame untouched, when it needs
        `process_slow`. `process` is exactly this, then `process_slow` on None; the runtime calls
        the two itself so an established frame costs no action list. With commit=False (a trace)
        it only answers whether the fast path would take the frame, changing nothing.

        The checks are the slow path's: a cached flow is TCP or UDP with a 20-byte IP header, not a
        fragment, TTL left to decrement, its L4 header inside the total length (20 + 20 or 20 + 8),
        addressed to podnet's MAC on the port (the gateway's, or the node's on an underlay), a valid
        IPv4 header checksum (a correct header's 32-bit words sum to 0 modulo 0xffff). TCP segments
        with SYN, FIN or RST always take the slow path: they move conntrack's state machine, and the
        trace should show it."""
        if self._xdp_ports and in_port in self._xdp_ports and commit:
            # XDP runs on the raw frame before anything else; it either drops it here or lets it
            # through to the stack (fast or slow path), which does not run it again
            if self._xdp(frame) == "XDP_DROP":
                self._c.drops[DropReason.XDP_DROP.value] += 1
                return XDP_DROPPED
        n = len(frame)
        if n < 38:
            return None
        dst_mac, ethertype, ver_ihl, tot_len, frag, ttl, proto, src, dst, ports = _FAST.unpack_from(frame)
        if ethertype != 0x0800:
            return None
        flow = self._flows.get((in_port, proto, src, dst, ports))
        if (flow is None or ver_ihl != 0x45 or frag & 0x3FFF or ttl <= 1
                or not (40 if proto == 6 else 28) <= tot_len <= n - 14 or dst_mac != flow[_INMAC]
                or sum(_WORDS.unpack_from(frame, 14)) % 0xFFFF):
            return None
        entry = flow[_CT]
        flags = frame[47] if proto == 6 else 0
        if entry is not None and flags & 0x07:
            return None
        if not commit:
            return flow[_OUT]
        if entry is not None:
            if not self._ct_steady(entry, flow[_DIR], now, flags, n - 14):
                if self._ct_update(entry, flow[_DIR], now, flags, n - 14) is CtState.INVALID:
                    self._c.drops[DropReason.CT_INVALID.value] += 1
                    return DROPPED
            if flow[_NAT] is not None:
                nat.apply(frame, 34, flow[_NAT], flow[_DIR], vnet)
        pk.decrement_ttl(frame, ttl)
        frame[0:12] = flow[_ETH]
        flow[_PKTS] += 1
        flow[_BYTES] += n
        flow[_SEEN] = now
        return flow[_OUT]

    def process_slow(self, frame, in_port: int, now: float, vnet: bytes | None = None) -> list[Transmit | Drop]:
        """The slow path, for a frame `forward_fast` declined; VXLAN flows' cached path comes first
        (core/internode: encapsulation makes a new buffer, which forward_fast cannot return)."""
        if self.internode is not None:
            got = self.internode.quick(frame, in_port, now, vnet)
            if got is not None:
                return got
        return self._slow(frame, in_port, vnet, _Ctx(now))

    def trace(self, frame, in_port: int, now: float, vnet: bytes | None = None) -> Trace:
        """Every decision the slow path would make for `frame`, without changing any state."""
        frame = bytearray(frame)
        description = pk.describe(frame)
        ctx = _Ctx(now, commit=False, steps=[])
        if self._xdp_ports and in_port in self._xdp_ports:
            action = self._xdp(frame)
            verdict = str(getattr(action, "value", action))
            ctx.step("xdp", verdict, f"{self.backend.name} program on the uplink")
            if verdict == "XDP_DROP":
                port = self._ports.get(in_port)
                return Trace(description, port.name if port else str(in_port), tuple(ctx.steps),
                             (Drop(DropReason.XDP_DROP, in_port, "xdp"),))
        if self.forward_fast(frame, in_port, now, vnet, commit=False) is not None or (
                self.internode is not None and self.internode.cached(frame, in_port)):
            ctx.step("flow", "cached", "an established flow: the fast path gives the same result")
        actions = self._slow(frame, in_port, vnet, ctx)
        port = self._ports.get(in_port)
        return Trace(description, port.name if port else str(in_port), tuple(ctx.steps), tuple(actions))

    def _slow(self, frame, in_port: int, vnet, ctx: _Ctx) -> list[Transmit | Drop]:
        c = self._c
        port = self._ports.get(in_port)
        if port is None:
            return [self._drop(ctx, DropReason.UNKNOWN_PORT, in_port, "eth", f"no port {in_port}")]
        if ctx.commit:
            c.slow += 1
            c.rx[in_port] += 1
            c.rx_bytes[in_port] += len(frame)
            c.stages["eth"] += 1
        if len(frame) < pk.ETH_HLEN:
            return [self._drop(ctx, DropReason.FRAME_TOO_SHORT, in_port, "eth", f"{len(frame)} bytes")]
        ethertype = frame[12] << 8 | frame[13]
        dst_mac = bytes(frame[0:6])
        ctx.step("eth", f"ethertype 0x{ethertype:04x}", f"{pk.mac_str(bytes(frame[6:12]))} > {pk.mac_str(dst_mac)}")
        if self.bridge is not None and port.kind is PortKind.POD:
            if ctx.commit:
                self.bridge.learn(bytes(frame[6:12]), in_port, ctx.now)
            ctx.step("bridge", "learn", f"{pk.mac_str(bytes(frame[6:12]))} on {port.name}")
        if ethertype == pk.ETH_P_ARP:
            return self._arp(frame, port, dst_mac, vnet, ctx)
        if ethertype == 0x8100:
            return [self._drop(ctx, DropReason.VLAN_TAGGED, in_port, "eth")]
        if ethertype != pk.ETH_P_IP:
            return [self._drop(ctx, DropReason.UNSUPPORTED_ETHERTYPE, in_port, "eth", f"0x{ethertype:04x}")]
        if dst_mac != port.local_mac:
            if self.bridge is not None and port.kind is PortKind.POD:
                return self._switch(frame, port, dst_mac, vnet, ctx)
            return [self._drop(ctx, DropReason.NOT_FOR_GATEWAY, in_port, "eth", pk.mac_str(dst_mac))]
        if self.internode is not None and in_port == self.internode.underlay:
            got = self.internode.receive(frame, port, vnet, ctx, counted=True)   # VXLAN for us: decapsulated
            if got is not None:
                return got
        return self._ipv4(frame, port, vnet, ctx)

    def _arp(self, frame, port: Port, dst_mac: bytes, vnet, ctx: _Ctx) -> list[Transmit | Drop]:
        if ctx.commit:
            self._c.stages["arp"] += 1
        arp = pk.parse_arp(frame)
        if isinstance(arp, DropReason):
            return [self._drop(ctx, arp, port.id, "arp")]
        who = f"who-has {pk.ip_str(arp.tpa)} tell {pk.ip_str(arp.spa)}"
        if self.internode is not None and port.id == self.internode.underlay:
            return self.internode.arp(arp, port, who, ctx)   # and learn the neighbour it came from
        # pods ask for the gateway; the uplink's neighbours ask for the node's own address
        responder = self.arp if port.kind is PortKind.POD else self.uplink_arp
        if responder.answers(arp):
            ctx.step("arp", "reply", f"{who}: {pk.ip_str(arp.tpa)} is-at {pk.mac_str(responder.mac)}")
            if ctx.commit:
                self._c.arp_replies += 1
            return [self._emit(ctx, port.id, pk.build_arp_reply(responder.mac, arp.tpa, arp))]
        if self.bridge is not None and port.kind is PortKind.POD and dst_mac != self.gateway_mac:
            return self._switch(frame, port, dst_mac, vnet, ctx)
        return [self._drop(ctx, DropReason.ARP_NOT_PROXIED, port.id, "arp", who)]

    def _switch(self, frame, port: Port, dst_mac: bytes, vnet, ctx: _Ctx) -> list[Transmit | Drop]:
        """Bridge mode: an L2 frame between pods, forwarded by the learning bridge unchanged."""
        assert self.bridge is not None
        if ctx.commit:
            self._c.stages["bridge"] += 1
        known = not dst_mac[0] & 1 and self.bridge.lookup(dst_mac, ctx.now) is not None
        outs = self.bridge.output_ports(dst_mac, port.id, ctx.now, count=ctx.commit)
        if not outs:
            return [self._drop(ctx, DropReason.BRIDGE_SAME_PORT, port.id, "bridge", pk.mac_str(dst_mac))]
        names = ", ".join(self._ports[o].name for o in outs if o in self._ports)
        ctx.step("bridge", "forward" if known else "flood", f"to {names}")
        return [self._emit(ctx, o, frame, vnet) for o in outs]

    def _ipv4(self, frame, port: Port, vnet, ctx: _Ctx) -> list[Transmit | Drop]:
        if ctx.commit:
            self._c.stages["ipv4"] += 1
        info = pk.parse_ipv4(frame)
        if isinstance(info, DropReason):
            return [self._drop(ctx, info, port.id, "ipv4")]
        ctx.step("ipv4", "valid", f"{pk.ip_str(info.src)} > {pk.ip_str(info.dst)} proto {info.proto} ttl {info.ttl}")
        if port.kind is PortKind.POD and info.src != port.ip:
            return [self._drop(ctx, DropReason.SOURCE_SPOOFED, port.id, "rpf",
                               f"{pk.ip_str(info.src)} is not {port.name}'s address")]
        if info.proto == pk.IPPROTO_ICMP and info.sport >> 8 not in pk.ICMP_QUERY_TYPES:
            # an ICMP error is never a flow of its own: translated like the flow it is about
            info = conntrack_stage.related(self, frame, info, vnet, ctx)
            key = None
        else:
            # a later fragment has no ports: it is forwarded as it is (podnet does not reassemble)
            key = conntrack_stage.ct_key(frame, info)
        tcp_flags = frame[info.l4 + 13] if info.proto == pk.IPPROTO_TCP and info.first_fragment else 0
        entry: Entry | None = None
        direction = 0
        hit = None
        if key is not None:
            # a trace must not expire anything: it only treats an overdue entry as gone
            hit = self.conntrack.lookup(key, ctx.now if ctx.commit else None)
            if hit is not None and not ctx.commit and hit[0].deadline <= ctx.now:
                hit = None
        if hit is not None:
            entry, direction = hit
            if ctx.commit:
                state = self._ct_update(entry, direction, ctx.now, tcp_flags, info.total_length)
                if state is REPEAT:   # a SYN reopened a closed flow: it is a new connection
                    entry, hit = None, None
                elif state is CtState.INVALID:
                    return [self._drop(ctx, DropReason.CT_INVALID, port.id, "conntrack", f"flow {entry.id}")]
            if entry is not None:
                ctx.step("conntrack", f"{'reply' if direction else 'original'} direction of flow {entry.id}",
                         f"{entry.state.name if entry.state is not None else ''} nat {'yes' if entry.nat else 'no'}")
        decision = NO_SERVICE
        if entry is None and key is not None:
            decision = conntrack_stage.decide(self, info, port, ctx)
            if decision.verdict is not Verdict.ACCEPT:
                return conntrack_stage.refuse(self, frame, info, port, decision, ctx)
        # where the packet goes after DNAT (new flows) or the flow's pinned NAT (tracked ones)
        dst = info.dst
        if entry is not None and entry.nat is not None:
            rewrite = entry.nat.rewrites[direction]
            dst = rewrite.dst if rewrite.dst is not None else dst
        elif decision.dnat is not None:
            dst = decision.dnat[0]
        route = self.routes.lookup(dst)
        if route is None or route.kind == "unreachable":
            why = "no route" if route is None else f"unreachable route {route}"
            ctx.step("route", why, pk.ip_str(dst))
            code = pk.ICMP_NET_UNREACH if route is None else pk.ICMP_HOST_UNREACH
            return self._icmp_error(frame, info, port, pk.ICMP_DEST_UNREACH, code, ctx) + [
                self._drop(ctx, DropReason.NO_ROUTE, port.id, "route", pk.ip_str(dst))]
        ctx.step("route", "match", str(route))
        if route.kind == "local":
            return self._local(frame, info, port, ctx)
        if info.ttl <= 1:
            return self._icmp_error(frame, info, port, pk.ICMP_TIME_EXCEEDED, pk.ICMP_EXC_TTL, ctx) + [
                self._drop(ctx, DropReason.TTL_EXCEEDED, port.id, "ttl")]
        out = self._ports.get(route.port)
        if out is None:
            return [self._drop(ctx, DropReason.UNKNOWN_PORT, port.id, "route", f"route to port {route.port}")]
        hop = None
        if out.kind is not PortKind.POD and self.internode is not None:
            # to another node: its next hop (and the tunnel's MTU) before conntrack, as ip_forward checks
            hop = self.internode.next_hop(frame, info, port, out, route, dst, vnet, ctx)
            if type(hop) is list:
                return hop
        if entry is None and key is not None and ctx.commit:
            made = conntrack_stage.track(self, key, info, port, decision, tcp_flags, ctx, out)
            if isinstance(made, Drop):
                return [made]
            entry = made
        binding = entry.nat if entry is not None else None
        if binding is not None:
            nat.apply(frame, info.l4, binding, direction, vnet)
            r = binding.rewrites[direction]
            ctx.step("nat", "reply: un-NAT" if direction else "NAT", describe_rewrite(r))
        elif not ctx.commit and (decision.dnat is not None or decision.masquerade):
            ctx.step("nat", "would NAT", f"dnat {hostport(decision.dnat)} masquerade {decision.masquerade}")
            # the trace's own copy, rewritten as the first packet would be (a masqueraded source keeps
            # its port, as when it is free), so the frames a trace transmits are what the wire would carry
            dst, dport = decision.dnat if decision.dnat is not None else (None, None)
            src = conntrack_stage.masquerade_source(self, out) if decision.masquerade else None
            nat.rewrite(frame, info.l4, info.proto, src=src, dst=dst, dport=dport, vnet=vnet)
        pk.decrement_ttl(frame, info.ttl)
        if hop is not None:   # the neighbour's MAC, or the VXLAN encapsulation
            return self.internode.transmit(frame, info, port, out, hop, entry, direction, vnet, ctx)
        eth = out.mac + out.local_mac
        frame[0:12] = eth
        ctx.step("forward", f"to {out.name}", f"ttl {info.ttl - 1}, {pk.mac_str(out.local_mac)} > {pk.mac_str(out.mac)}")
        if ctx.commit and _cacheable(info):
            self._install_flow(port.id, info, out.id, eth, ctx.now, entry, direction)
        return [self._emit(ctx, out.id, frame, vnet)]

    # ---- conntrack's callbacks (the stage itself: core/conntrack_stage) -------------------------

    def _ct_update(self, entry: Entry, direction: int, now: float, tcp_flags: int, length: int) -> CtState:
        """conntrack's update, and when a service flow's TCP state moves, the backend that decided
        it hears of it (IPVS keeps its own per-connection states: active and inactive counts)."""
        before = entry._tcp if isinstance(entry.backend, tuple) else None
        state = self.conntrack.update(entry, direction, now, tcp_flags=tcp_flags, length=length)
        if before is not None and entry._tcp != before and entry.state is not None:
            backend, decision = entry.backend
            notify = getattr(backend, "flow_state", None)
            if notify is not None:
                notify(decision, now, entry.state)
        return state

    def _ct_destroyed(self, entry: Entry) -> None:
        """Conntrack forgot a flow: its flow-cache entries go, and its backend hears of it."""
        for key in self._ct_flows.pop(entry.id, ()):
            flow = self._flows.pop(key, None)
            if flow is not None:
                self._retire(key, flow)
        if isinstance(entry.backend, tuple):
            backend, decision = entry.backend
            backend.flow_closed(decision, entry.deadline)

    def _local(self, frame, info: pk.IPv4Info, port: Port, ctx: _Ctx) -> list[Transmit | Drop]:
        """Addressed to the node itself: the gateway answers pings and nothing else."""
        if info.proto == pk.IPPROTO_ICMP and info.sport >> 8 == pk.ICMP_ECHO and not info.is_fragment:
            if not pk.icmp_checksum_ok(frame, info):
                # icmp_rcv() drops it (csum_error) without an answer
                return [self._drop(ctx, DropReason.ICMP_BAD_CHECKSUM, port.id, "local")]
            ctx.step("local", "echo reply", f"from {pk.ip_str(info.dst)}")
            if ctx.commit:
                self._c.icmp_sent += 1
            return [self._emit(ctx, port.id, pk.build_icmp_echo_reply(frame, info, port.local_mac))]
        actions: list[Transmit | Drop] = []
        if info.proto == pk.IPPROTO_UDP:
            actions += self._icmp_error(frame, info, port, pk.ICMP_DEST_UNREACH, pk.ICMP_PORT_UNREACH, ctx)
        return actions + [self._drop(ctx, DropReason.LOCAL_NOT_SERVED, port.id, "local",
                                     f"proto {info.proto} to {pk.ip_str(info.dst)}")]

    def _icmp_error(self, frame, info: pk.IPv4Info, port: Port, icmp_type: int, code: int,
                    ctx: _Ctx, rest_of_header: int = 0) -> list[Transmit]:
        if not pk.should_send_icmp_error(frame, info):
            return []
        ctx.step("icmp", f"type {icmp_type} code {code}", f"to {pk.ip_str(info.src)}")
        if ctx.commit:
            self._c.icmp_sent += 1
        # to a pod from the gateway address, which every pod can route back to; to another node
        # (or outside) from the node's own address, as the kernel picks the outgoing link's
        source = self.gateway_ip if port.kind is PortKind.POD or self.node_ip is None else self.node_ip
        error = pk.build_icmp_error(frame, info, icmp_type, code, port.local_mac, source, rest_of_header)
        return [self._emit(ctx, port.id, error)]

    def _emit(self, ctx: _Ctx, port_id: int, frame, vnet: bytes | None = None) -> Transmit:
        if ctx.commit:
            self._c.tx[port_id] += 1
            self._c.tx_bytes[port_id] += len(frame)
        return Transmit(port_id, frame, vnet)

    def _drop(self, ctx: _Ctx, reason: DropReason, port_id: int, stage: str, detail: str = "") -> Drop:
        ctx.step(stage, f"drop {reason.value}", detail)
        if ctx.commit:
            self._c.drops[reason.value] += 1
        return Drop(reason, port_id, detail)

    # ---- the flow cache ----------------------------------------------------------------------

    def _install_flow(self, in_port: int, info: pk.IPv4Info, out_port: int, eth: bytes, now: float,
                      entry: Entry | None = None, direction: int = 0, via: int | None = None, peer=None) -> None:
        ports = info.sport << 16 | info.dport
        key = (in_port, info.proto, info.src, info.dst, ports)
        if peer is not None:
            # a VXLAN flow: keyed with the tunnel port as well, so forward_fast (5-tuples) never finds
            # it; Internode.quick does, and encapsulates
            key += (out_port,)
        if key in self._flows:
            return
        if len(self._flows) >= self.max_flows:
            self._c.flow_table_full += 1
            return
        # the slow path already counted this frame; the entry counts from the next one
        self._flows[key] = [out_port, eth, 0, 0, now, entry, direction, entry.nat if entry is not None else None,
                            self._ports[in_port].local_mac, via, peer]
        if entry is not None:
            self._ct_flows.setdefault(entry.id, []).append(key)
        self._c.flows_installed += 1
        if self._next_sweep is None:
            self._next_sweep = now + _FLOW_SWEEP_INTERVAL_S

    def _retire(self, key: tuple, flow: list) -> None:
        c = self._c
        c.fast += flow[_PKTS]
        c.rx[key[0]] += flow[_PKTS]
        c.rx_bytes[key[0]] += flow[_BYTES]
        c.tx[flow[_OUT]] += flow[_PKTS]
        c.tx_bytes[flow[_OUT]] += flow[_BYTES]

    def _flush_flows(self) -> None:
        for key, flow in self._flows.items():
            self._retire(key, flow)
        self._flows.clear()
        self._ct_flows.clear()
        self._next_sweep = None

    def flows(self) -> list[tuple[tuple, list]]:
        return list(self._flows.items())

    # ---- timers ------------------------------------------------------------------------------

    def handle_timer(self, now: float) -> list[Transmit]:
        """Expire what is due; returns frames to send (the underlay's ARP requests), usually none."""
        if self._next_sweep is not None and now >= self._next_sweep:
            if self.bridge is not None:
                # fast-path frames skip the bridge: refresh the stations they came from, so a pod
                # whose traffic is all cached is not aged out of the FDB and then flooded to
                for key, flow in self._flows.items():
                    port = self._ports.get(key[0])
                    if port is not None and port.kind is PortKind.POD:
                        self.bridge.learn(port.mac, port.id, flow[_SEEN])
            idle = [k for k, f in self._flows.items() if now - f[_SEEN] >= self.flow_idle_timeout_s]
            for key in idle:
                flow = self._flows.pop(key)
                self._retire(key, flow)
                if flow[_CT] is not None:
                    keys = self._ct_flows.get(flow[_CT].id)
                    if keys is not None and key in keys:
                        keys.remove(key)
            self._next_sweep = now + _FLOW_SWEEP_INTERVAL_S if self._flows else None
        if self.bridge is not None:
            self.bridge.expire(now)
        due = self.conntrack.next_deadline()
        if due is not None and due <= now:
            self.conntrack.handle_timer(now)
        if self.backend is not None:
            deadline = self.backend.next_deadline()
            if deadline is not None and deadline <= now:
                self.backend.handle_timer(now)
        return self.internode.handle_timer(now) if self.internode is not None else []

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self._next_sweep, self.bridge.next_deadline() if self.bridge else None,
                                 self.conntrack.next_deadline(),
                                 self.backend.next_deadline() if self.backend is not None else None,
                                 self.internode.next_deadline() if self.internode is not None else None)
                     if d is not None]
        return min(deadlines) if deadlines else None

    # ---- statistics --------------------------------------------------------------------------

    def statistics(self) -> DatapathStatistics:
        c = self._c
        rx, rx_bytes, tx, tx_bytes = Counter(c.rx), Counter(c.rx_bytes), Counter(c.tx), Counter(c.tx_bytes)
        fast = c.fast
        for key, flow in self._flows.items():
            fast += flow[_PKTS]
            rx[key[0]] += flow[_PKTS]
            rx_bytes[key[0]] += flow[_BYTES]
            tx[flow[_OUT]] += flow[_PKTS]
            tx_bytes[flow[_OUT]] += flow[_BYTES]
        drops, neighbors, tunnel = dict(c.drops), None, None
        if self.internode is not None:
            neighbors, tunnel = self.internode.statistics(drops, tx, tx_bytes)
        ports = tuple(PortStatistics(p.name, p.kind.value, rx[p.id], rx_bytes[p.id], tx[p.id], tx_bytes[p.id])
                      for p in self._ports.values())
        return DatapathStatistics(ports, drops, dict(c.stages), fast, c.slow, len(self._flows),
                                  c.flows_installed, c.flow_table_full, c.arp_replies, c.icmp_sent,
                                  c.decisions, c.decision_cost, c.resets_sent, len(self.conntrack),
                                  neighbors, tunnel)


__all__ = ["DROPPED", "XDP_DROPPED", "Datapath", "DatapathStatistics", "Drop", "NodeMode", "Port", "PortKind",
           "PortStatistics", "Trace", "TraceStep", "Transmit"]
