"""Routing between nodes: the uplink on a shared underlay, direct routing, and the VXLAN tunnel.

Layer: core, sans-IO. The datapath stages a frame takes on its way to or from another node, kept
here so that core/datapath.py only calls them at its hooks. A node's uplink is a port on an L2
underlay shared with the other nodes (a bridge); the node owns an address and a MAC there.

    direct (Calico BGP style)   every node routes each other node's pod CIDR via that node's
                                underlay address: `add_route("10.244.2.0/24", uplink, via=node_b)`;
                                frames leave with our uplink MAC as source and the next hop's MAC,
                                resolved by ARP, as destination; no encapsulation, no NAT
    vxlan (Flannel style)       a TUNNEL port (`flannel.1`) holding a `Vtep` and a `FlannelNode`;
                                per remote lease the route `subnet via <subnet>.0 dev flannel.1`, the
                                neighbour `<subnet>.0 -> VtepMAC` and the FDB entry `VtepMAC -> PublicIP`
                                that flanneld programs, walked as the kernel walks them

Egress, after the datapath's routing, conntrack and NAT (`next_hop` before them, `transmit` after):

    route → [tunnel: lease of the route's next hop (neighbour + FDB); MTU = underlay - 50, a DF
             packet over it gets ICMP frag-needed (overlay/mtu.py); bytes past the IPv4 total
             length cut off, as ip_rcv trims them; software GSO and checksums (core/gso.py);
             encapsulation (overlay/vxlan.py); the outer next hop = the underlay route to the
             lease's PublicIP]
          → neighbour: the next hop's MAC from the underlay's NeighborTable (core/neighbor.py):
             REACHABLE/STALE/DELAY/PROBE/PERMANENT send now; otherwise the frame waits (already
             rewritten; only the destination MAC is left to fill) while ARP requests go out, and is
             released by the reply or counted as `neigh_failed` when the entry FAILS
          → transmit on the uplink

GSO over the UDP tunnel (an uplink TAP with TUN_F_UDP_TUNNEL_GSO and a 24-byte vnet header,
linux/tap.py; `set_tunnel_gso`): to a peer whose lease says it takes them (`Lease.tunnel_gso`), a
TCPv4 super-frame is not cut but sent as ONE outer frame - outer lengths the whole frame's, UDP
checksum 0, the IP ID counter moved on by the segment count - with a 24-byte header (gso.
TunnelVnetHeader: gso_type TCPV4|UDP_TUNNEL_IPV4, hdr_len 50 + the inner headers, csum at the
inner TCP checksum, outer_th_offset 34, inner_nh_offset 64); the kernel cuts it only where a
device cannot take it. Received, such a frame's inner frame goes on with a 10-byte header (the
same gso_size, offsets 50 bytes earlier). A frame that would exceed 64 KB outer, or a peer
without the flag (kernel nodes, flanneld), gets the software path, byte for byte as before.

Ingress on the uplink: ARP requests for the node's addresses are answered with the uplink MAC
(and teach us the asker, as arp_process does); ARP replies to us resolve waiting frames; a UDP
datagram to the node's address at the VXLAN port is decapsulated (its virtio-net header's
NEEDS_CSUM / DATA_VALID stand for the kernel's CHECKSUM_PARTIAL / UNNECESSARY, so a partial outer
checksum is not "verified"; a partial inner one moves with the inner frame) and re-enters the
pipeline on the tunnel port; every malformed datagram is a counted drop with the Vtep's reason.
Anything else on the uplink is routed as before (NodePort, LoadBalancer, direct pod traffic). A
masqueraded flow (a NodePort from outside, externalTrafficPolicy Cluster) takes the address of the
device it leaves by, as MASQUERADE does: into the tunnel, flannel.1's (the subnet's .0); on the
uplink, the node's.
Frames the datapath originates back into the tunnel (ICMP errors, echo replies, resets to a remote
pod) are encapsulated to the VTEP their inner destination MAC names (the FDB), like vxlan_xmit.

The cached path. Direct flows are ordinary flow-cache entries (`forward_fast`): the cached rewrite
holds the neighbour's MAC. VXLAN flows are cached too, keyed with the tunnel port as a sixth
element, so `forward_fast` never finds them; `quick` does (from `process_slow`, before the slow
path) and runs the same checks, conntrack, NAT and TTL, then GSO and encapsulation with the
`Peer` the entry holds. Decapsulated frames take the datapath's own fast path on the tunnel port.

Setting a node up (each node its own process and Datapath; its uplink a TAP on the underlay bridge):

    dp = Datapath(node_cidr="10.244.1.0/24", node_ip="192.0.2.1")
    uplink = dp.add_uplink("uplink", "02:00:c0:00:02:01", cidr="192.0.2.0/24")
    dp.add_route("10.244.2.0/24", uplink, via="192.0.2.2")             # direct: one per other node
    tunnel = dp.add_tunnel(Vtep(local_ip="192.0.2.1", mac=own.vtep_mac,   # vxlan: the device, then
                                underlay_mac="02:00:c0:00:02:01", port=4789), FlannelNode(own))
    dp.internode.add_lease(lease_b)                                     # one per other node's lease
    dp.internode.set_neighbor("192.0.2.2", "02:00:c0:00:02:02")        # optional: no ARP for it

`handle_timer` returns the ARP requests the neighbour timers send; `set_neighbor` the frames that
were waiting for that neighbour. In vxlan mode pods want the tunnel's MTU (`FlannelNode.mtu`, 1450
on a 1500 underlay), as Flannel's CNI plugin gives them.

Invariants:
- a cached entry that depends on a neighbour names it (`_VIA`) and is dropped as soon as that
  neighbour stops being usable (FAILED, STALE, deleted) or changes MAC, so the cache never sends
  where the slow path would not; while flows use a neighbour, their last-seen times count as its
  use (the kernel's neigh->used), so it is probed (DELAY, PROBE) rather than left to go STALE;
- neighbour timers run from the datapath's `handle_timer`, which returns the ARP requests to send;
- a trace (`ctx.commit` False) changes nothing here either: no neighbour state, no Vtep counters.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import TYPE_CHECKING, NamedTuple

from . import gso
from . import nat
from . import packet as pk
from .datapath import (
    _BYTES, _CT, _DIR, _ETH, _FAST, _INMAC, _NAT, _PEER, _PKTS, _SEEN, _VIA, _WORDS, DROPPED, Drop, Port, PortKind,
    Transmit, _cacheable, _Ctx, _new_tuple,
)
from .neighbor import NeighborTable, Nud
from .overlay.flannel import FlannelNode, Lease
from .overlay.mtu import MtuVerdict, check_mtu
from .overlay.vxlan import OUTER_HLEN, Peer, Vtep, flow_hash, source_port
from .packet import DropReason
from .services.packetinfo import CtState
from ..errors import ConfigError

if TYPE_CHECKING:
    from .datapath import Datapath

# states in which the kernel sends to the neighbour's known MAC (REACHABLE and PERMANENT, and DELAY
# and PROBE, which keep sending while they re-check); a STALE entry is sent to as well, but only
# after resolve() moved it to DELAY, so cached flows through it are dropped and looked up again
_USABLE = frozenset({Nud.REACHABLE, Nud.PERMANENT, Nud.DELAY, Nud.PROBE})
_NO_MAC = b"\x00" * 6      # the outer destination of an encapsulated frame still waiting for ARP
_CSUM_FLAGS = gso.VIRTIO_NET_HDR_F_NEEDS_CSUM | gso.VIRTIO_NET_HDR_F_DATA_VALID


class _Hop(NamedTuple):
    ip: int                   # the underlay next hop whose MAC the frame needs
    lease: _Remote | None     # the tunnel's peer, or None for a direct route


class _Pending:
    """Frames waiting in the neighbour queue for one next hop: rewritten, except their destination
    MAC. Its length is what the queue's byte limit (unres_qlen_bytes) counts."""

    __slots__ = ("port", "frames", "vnet", "size")

    def __init__(self, port: int, frames: list, vnet) -> None:
        self.port = port
        self.frames = frames
        self.vnet = vnet
        self.size = sum(len(f) for f in frames)

    def __len__(self) -> int:
        return self.size


@dataclasses.dataclass(frozen=True, slots=True)
class _Remote:
    """A remote lease with its addresses as the data path uses them."""

    lease: Lease
    gateway: int        # the subnet's .0: the route's next hop and flannel.1's neighbour entry
    public_ip: int      # the FDB's dst: the outer destination
    vtep_mac: bytes


class Tunnel:
    """flannel.1: the tunnel port, its VTEP, Flannel's state and what each remote lease means."""

    def __init__(self, port: int, vtep: Vtep, flannel: FlannelNode) -> None:
        self.port = port
        self.vtep = vtep
        self.flannel = flannel
        self.by_gateway: dict[int, _Remote] = {}     # flannel.1's permanent neighbours
        self.by_vtep_mac: dict[bytes, _Remote] = {}  # flannel.1's FDB
        self._peers: dict[tuple[int, bytes, bytes, bool], Peer] = {}
        self.udp_tunnel_gso = False   # our uplink takes and sends whole VXLAN super-frames

    def peer(self, remote: _Remote, next_hop_mac: bytes) -> Peer:
        whole = self.udp_tunnel_gso and remote.lease.tunnel_gso
        key = (remote.public_ip, remote.vtep_mac, next_hop_mac, whole)
        peer = self._peers.get(key)
        if peer is None:
            if len(self._peers) > 4 * len(self.by_gateway) + 16:
                self._peers.clear()   # next hops changed MAC often: forget the old ones
            peer = self._peers[key] = self.vtep.peer(remote.public_ip, remote.vtep_mac, next_hop_mac,
                                                     tunnel_gso=whole)
        return peer


class Internode:
    """The underlay uplink of one datapath and, optionally, its VXLAN tunnel (see the module)."""

    def __init__(self, dp: Datapath, underlay: int, mac: bytes, neighbors: NeighborTable) -> None:
        self.dp = dp
        self.underlay = underlay     # the uplink's port id
        self.mac = mac               # the node's MAC on the underlay
        self.neighbors = neighbors
        self.tunnel: Tunnel | None = None
        self._fast_tx = self._fast_tx_bytes = 0   # outer frames the cached VXLAN path sent on the uplink

    @classmethod
    def attach(cls, dp: Datapath, name: str, mac, cidr: str | None, neighbors: NeighborTable | None) -> Internode:
        if dp.internode is not None:
            raise ConfigError(f"uplink {name!r}: the datapath already has an underlay uplink "
                              f"({dp.port(dp.internode.underlay).name!r})")
        if dp.node_ip is None:
            raise ConfigError(f"uplink {name!r}: Datapath node_ip is required (the node's address on the underlay)")
        if cidr is not None:
            try:
                net = ipaddress.IPv4Network(cidr, strict=True)
            except ValueError as exc:
                raise ConfigError(f"uplink {name!r} cidr {cidr!r}: {exc}") from None
            if ipaddress.IPv4Address(dp.node_ip) not in net:
                raise ConfigError(f"uplink {name!r} cidr {cidr!r}: node_ip {pk.ip_str(dp.node_ip)} is not in it")
        port_id = dp.add_port(name, PortKind.UPLINK, mac)   # ConfigError for a bad MAC
        port = dp.port(port_id)
        port.local_mac = port.mac   # the node's own address: there is no single device on the other side
        if cidr is not None:
            dp.add_route(cidr, port_id)   # connected: every destination is its own next hop
        return cls(dp, port_id, port.mac, neighbors if neighbors is not None else NeighborTable(device=name))

    def add_tunnel(self, vtep: Vtep, flannel: FlannelNode) -> int:
        dp = self.dp
        what = f"tunnel {flannel.device!r}"
        if self.tunnel is not None:
            raise ConfigError(f"{what}: the datapath already has {dp.port(self.tunnel.port).name!r}")
        if vtep.local_ip != dp.node_ip:
            raise ConfigError(f"{what}: Vtep local_ip {pk.ip_str(vtep.local_ip)} is not the node_ip "
                              f"{pk.ip_str(dp.node_ip)}")
        if vtep.underlay_mac != self.mac:
            raise ConfigError(f"{what}: Vtep underlay_mac {pk.mac_str(vtep.underlay_mac)} is not the uplink's "
                              f"{pk.mac_str(self.mac)}")
        own = flannel.own
        if pk.ip_int(own.public_ip) != dp.node_ip or pk.mac_bytes(own.vtep_mac) != vtep.mac:
            raise ConfigError(f"{what}: the node's own lease {own.subnet} (PublicIP {own.public_ip}, VtepMAC "
                              f"{own.vtep_mac}) does not match the node_ip and the Vtep's mac")
        if own.subnet != dp.node_cidr:
            raise ConfigError(f"{what}: the node's own lease {own.subnet} is not its node_cidr {dp.node_cidr}")
        port_id = dp.add_port(flannel.device, PortKind.TUNNEL, vtep.mac)
        dp.port(port_id).local_mac = vtep.mac
        self.tunnel = Tunnel(port_id, vtep, flannel)
        for lease in flannel.leases():   # leases the FlannelNode already knew
            self._program(lease)
        return port_id

    def tunnel_address(self, out: Port) -> int | None:
        """The address the tunnel device holds (flannel.1: its lease's network address, /32), for
        `out` the tunnel port; None otherwise. MASQUERADE out of flannel.1 picks it, so a NodePort
        connection sent to another node's pod arrives from <this node's subnet>.0, and its replies
        come back through the tunnel."""
        tunnel = self.tunnel
        if tunnel is None or out.id != tunnel.port:
            return None
        return pk.ip_int(tunnel.flannel.own.gateway)

    def set_tunnel_gso(self, enabled: bool) -> None:
        """Whether the uplink takes whole VXLAN super-frames (its TAP negotiated UDP tunnel GSO):
        then peers whose lease says so are sent one outer frame per TCP super-frame."""
        tunnel = self._tunnel_or_error("udp tunnel gso")
        if tunnel.udp_tunnel_gso != bool(enabled):
            tunnel.udp_tunnel_gso = bool(enabled)
            tunnel._peers.clear()
            self.dp._flush_flows()   # cached flows hold Peers made with the old setting

    def port_removed(self, port_id: int) -> Internode | None:
        """The datapath removed a port; what remains of the inter-node stage."""
        if self.tunnel is not None and port_id == self.tunnel.port:
            self.tunnel = None
        if port_id != self.underlay:
            return self
        if self.tunnel is not None:   # a tunnel without its underlay carries nothing
            tunnel_port, self.tunnel = self.tunnel.port, None
            self.dp.remove_port(tunnel_port)
        return None

    # ---- Flannel leases and static neighbours --------------------------------------------------

    def _tunnel_or_error(self, what: str) -> Tunnel:
        if self.tunnel is None:
            raise ConfigError(f"{what}: the datapath has no tunnel (add_tunnel first)")
        return self.tunnel

    def add_lease(self, lease: Lease) -> bool:
        """Another node's lease appeared or changed: flanneld's AddARP, AddFDB and the route, in that
        order. False when nothing changed (our own lease, another backend, the same lease again)."""
        tunnel = self._tunnel_or_error(f"flannel lease {lease.subnet}")
        old = next((r.lease for r in tunnel.by_gateway.values() if r.lease.subnet == lease.subnet), None)
        if not tunnel.flannel.add_lease(lease):
            return False
        if old is not None:
            self._unprogram(old)
        self._program(lease)
        return True

    def remove_lease(self, subnet: str) -> bool:
        """A lease expired or was deleted: its route, neighbour and FDB entry go."""
        tunnel = self._tunnel_or_error(f"flannel lease {subnet}")
        lease = tunnel.flannel.remove_lease(subnet)
        if lease is None:
            return False
        self._unprogram(lease)
        return True

    def _program(self, lease: Lease) -> None:
        tunnel = self.tunnel
        remote = _Remote(lease, pk.ip_int(lease.gateway), pk.ip_int(lease.public_ip), pk.mac_bytes(lease.vtep_mac))
        tunnel.by_gateway[remote.gateway] = remote
        tunnel.by_vtep_mac[remote.vtep_mac] = remote
        self.dp.add_route(lease.subnet, tunnel.port, via=lease.gateway)   # flushes the flow cache

    def _unprogram(self, lease: Lease) -> None:
        tunnel = self.tunnel
        remote = tunnel.by_gateway.pop(pk.ip_int(lease.gateway), None)
        if remote is not None and tunnel.by_vtep_mac.get(remote.vtep_mac) is remote:
            del tunnel.by_vtep_mac[remote.vtep_mac]
        self.dp.routes.remove(lease.subnet)

    def set_neighbor(self, ip: str | int, mac: str | bytes, now: float = 0.0) -> list[Transmit]:
        """`ip neigh replace IP lladdr MAC nud permanent dev <uplink>`: a peer node's MAC as the store
        tells it. Returns the frames that were waiting for it, to send now."""
        try:
            ip, mac = pk.ip_int(ip), pk.mac_bytes(mac)
        except ValueError as exc:
            raise ConfigError(f"neighbour {ip!r} lladdr {mac!r}: {exc}") from None
        waiting = self.neighbors.set_permanent(ip, mac, now)
        self._revalidate({ip})
        return self._release(waiting, mac, _Ctx(now))

    def delete_neighbor(self, ip: str | int) -> bool:
        ip = pk.ip_int(ip)
        gone = self.neighbors.delete(ip)
        self._revalidate({ip})
        return gone

    # ---- egress: the datapath's hooks ------------------------------------------------------------

    def next_hop(self, frame, info: pk.IPv4Info, port: Port, out: Port, route, dst: int, vnet,
                 ctx: _Ctx) -> _Hop | list | None:
        """Where a routed frame goes next if `out` is the underlay or the tunnel (None otherwise);
        a list of actions when it cannot go there (a counted drop, perhaps with an ICMP error)."""
        if out.id == self.underlay:
            return _Hop(route.via if route.via is not None else dst, None)
        tunnel = self.tunnel
        if tunnel is None or out.id != tunnel.port:
            return None
        dp = self.dp
        gateway = route.via if route.via is not None else dst
        remote = tunnel.by_gateway.get(gateway)
        if remote is None:
            return [dp._drop(ctx, DropReason.TUNNEL_NO_PEER, port.id, "tunnel",
                             f"no lease holds {pk.ip_str(gateway)} on {out.name}")]
        mtu = tunnel.vtep.inner_mtu
        header = gso.VnetHeader.parse(vnet)
        gso_size = header.gso_size if header is not None and header.gso == gso.GSO_TCPV4 else 0
        verdict = check_mtu(frame, mtu, gso_size)
        if verdict is not MtuVerdict.FITS:
            df = "set" if verdict is MtuVerdict.FRAG_NEEDED else "clear"
            ctx.step("mtu", f"{info.total_length} > {mtu}", f"{out.name}, DF {df}")
            if verdict is MtuVerdict.FRAGMENT:
                return [dp._drop(ctx, DropReason.MTU_EXCEEDED, port.id, "mtu", "podnet does not fragment")]
            return dp._icmp_error(frame, info, port, pk.ICMP_DEST_UNREACH, pk.ICMP_FRAG_NEEDED, ctx, mtu) + [
                dp._drop(ctx, DropReason.FRAG_NEEDED, port.id, "mtu", f"mtu {mtu}")]
        outer = self._outer_hop(remote)
        if outer is None:
            return [dp._drop(ctx, DropReason.NO_ROUTE, port.id, "tunnel",
                             f"no underlay route to {remote.lease.public_ip}")]
        ctx.step("tunnel", f"neigh {remote.lease.gateway} lladdr {remote.lease.vtep_mac}",
                 f"fdb {remote.lease.vtep_mac} dst {remote.lease.public_ip} (lease {remote.lease.subnet})")
        return _Hop(outer, remote)

    def _outer_hop(self, remote: _Remote) -> int | None:
        """The underlay next hop towards a remote VTEP: the route to its PublicIP, on the uplink."""
        route = self.dp.routes.lookup(remote.public_ip)
        if route is None or route.port != self.underlay:
            return None
        return route.via if route.via is not None else remote.public_ip

    def transmit(self, frame, info: pk.IPv4Info, port: Port, out: Port, hop: _Hop, entry, direction: int,
                 vnet, ctx: _Ctx) -> list:
        """Send a routed frame (conntrack, NAT and TTL done) to `hop`, directly or through the tunnel."""
        dp = self.dp
        cache = ctx.commit and _cacheable(info)
        if hop.lease is None:
            frame[6:12] = self.mac
            mac, actions = self._resolve(hop.ip, [frame], vnet, ctx, copy=True)
            if mac is None:
                return actions
            eth = mac + self.mac
            frame[0:12] = eth
            ctx.step("forward", f"to {out.name}", f"ttl {info.ttl - 1}, {pk.mac_str(self.mac)} > {pk.mac_str(mac)}")
            if cache:
                dp._install_flow(port.id, info, out.id, eth, ctx.now, entry, direction, via=hop.ip)
            return [dp._emit(ctx, out.id, frame, vnet)]
        if ctx.commit:
            dp._c.tx[out.id] += 1   # flannel.1 sends the (inner) frame, however many segments it becomes
            dp._c.tx_bytes[out.id] += len(frame)
        actions, peer = self._encapsulate([frame], vnet, hop, port, ctx)
        if cache and peer is not None:
            dp._install_flow(port.id, info, out.id, peer._inner_macs, ctx.now, entry, direction, via=hop.ip, peer=peer)
        return actions

    def _encapsulate(self, frames: list, vnet, hop: _Hop, port: Port, ctx: _Ctx) -> tuple[list, Peer | None]:
        """The outer frames for inner `frames` to `hop.lease`, sent or queued for the next hop's MAC;
        the Peer used when they were sent."""
        dp, tunnel = self.dp, self.tunnel
        known = self.neighbors.get(hop.ip)
        guess = known.mac if known is not None and known.mac is not None else _NO_MAC
        peer = tunnel.peer(hop.lease, guess)
        frames = [_trimmed(f) for f in frames]
        whole = None
        if peer.tunnel_gso and len(frames) == 1 and vnet and vnet[1] & ~gso.GSO_ECN == gso.GSO_TCPV4:
            whole = _encapsulate_whole(tunnel.vtep, frames[0], vnet, peer, count=ctx.commit)
        if whole is not None:
            outers, outer_vnet = [whole[0]], whole[1]
            ctx.step("gso", f"whole: {whole[2]} segments", f"gso_size {vnet[4] | vnet[5] << 8}, one outer "
                     "frame (UDP tunnel GSO)")
        else:
            inner = []
            for frame in frames:
                finished = gso.finish(frame, vnet)
                if type(finished) is DropReason:
                    return [dp._drop(ctx, finished, port.id, "tunnel", "virtio-net header")], None
                inner += finished
            if len(inner) > len(frames):
                ctx.step("gso", f"{len(inner)} segments", f"gso_size {gso.VnetHeader.parse(vnet).gso_size}")
            outers, outer_vnet = [], None
            for f in inner:
                outer = tunnel.vtep.encapsulate(f, peer, count=ctx.commit)
                if type(outer) is DropReason:
                    return [dp._drop(ctx, outer, port.id, "tunnel")], None
                outers.append(outer)
        ctx.step("vxlan", f"encap vni {tunnel.vtep.vni}",
                 f"{pk.ip_str(tunnel.vtep.local_ip)}:{outers[0][34] << 8 | outers[0][35]} > "
                 f"{hop.lease.lease.public_ip}:{tunnel.vtep.port}")
        mac, actions = self._resolve(hop.ip, outers, outer_vnet, ctx, copy=False)
        if mac is None:
            return actions, None
        if mac != guess:   # the lookup moved the entry on (a MAC learned since): the outer destination
            peer = tunnel.peer(hop.lease, mac)
            outers = [peer.next_hop_mac + bytes(o[6:]) for o in outers]
        ctx.step("forward", f"to {dp.port(self.underlay).name}",
                 f"{len(outers)} outer frame(s), {pk.mac_str(self.mac)} > {pk.mac_str(mac)}")
        return [dp._emit(ctx, self.underlay, o, outer_vnet) for o in outers], peer

    def _resolve(self, ip: int, frames: list, vnet, ctx: _Ctx, copy: bool) -> tuple[bytes | None, list]:
        """The next hop's MAC, or None and the ARP requests to send, with `frames` queued for it."""
        table = self.neighbors
        if not ctx.commit:   # a trace: what resolve() would do, read-only
            entry = table.get(ip)
            if entry is not None and (entry.state in _USABLE or entry.state is Nud.STALE):
                ctx.step("neigh", f"{pk.ip_str(ip)} lladdr {pk.mac_str(entry.mac)} {entry.state.value}", table.device)
                return entry.mac, []
            if entry is not None and entry.state is Nud.INCOMPLETE:
                ctx.step("neigh", f"{pk.ip_str(ip)} INCOMPLETE", "would queue until the ARP reply")
                return None, []
            ctx.step("neigh", f"{pk.ip_str(ip)} unknown" if entry is None else f"{pk.ip_str(ip)} FAILED",
                     f"would queue and ask who-has {pk.ip_str(ip)}")
            return None, [self._solicit(ip, None, ctx)]
        pending = _Pending(self.underlay, frames, vnet)
        mac, solicits = table.resolve(ip, pending, ctx.now)
        if mac is not None:
            entry = table.get(ip)
            ctx.step("neigh", f"{pk.ip_str(ip)} lladdr {pk.mac_str(mac)} {entry.state.value}", table.device)
            return mac, []
        if copy:   # the caller's buffer is reused as soon as we return
            pending.frames = [bytes(f) for f in frames]
        ctx.step("neigh", f"{pk.ip_str(ip)} INCOMPLETE", f"queued; {len(solicits)} who-has sent")
        return None, [self._solicit(ip, s.mac, ctx) for s in solicits]

    def _solicit(self, ip: int, mac: bytes | None, ctx: _Ctx) -> Transmit:
        request = pk.build_arp_request(self.mac, self.dp.node_ip, ip, mac if mac is not None else pk.BROADCAST_MAC)
        return self.dp._emit(ctx, self.underlay, request)

    def _release(self, waiting: list, mac: bytes, ctx: _Ctx) -> list[Transmit]:
        out = []
        for pending in waiting:
            for frame in pending.frames:
                buf = bytearray(frame)
                buf[0:6] = mac
                out.append(self.dp._emit(ctx, pending.port, buf, pending.vnet))
        return out

    # ---- ingress: ARP and VXLAN on the uplink ----------------------------------------------------

    def arp(self, arp: pk.ArpInfo, port: Port, who: str, ctx: _Ctx) -> list:
        """An ARP packet on the underlay: requests for our addresses are answered with the uplink MAC;
        they and replies to us teach the neighbour table (arp_process), releasing waiting frames;
        the other stations' ARP, which a shared segment floods to everyone, is no business of ours."""
        dp = self.dp
        ours = dp.uplink_arp.addresses
        if arp.op == 1 and arp.tpa in ours:
            ctx.step("arp", "reply", f"{who}: {pk.ip_str(arp.tpa)} is-at {pk.mac_str(self.mac)}")
            if ctx.commit:
                dp._c.arp_replies += 1
            reply = dp._emit(ctx, port.id, pk.build_arp_reply(self.mac, arp.tpa, arp))
            return [reply] + self._learn(arp, False, ctx)
        if arp.op == 2 and arp.tpa in ours:
            return self._learn(arp, True, ctx)
        # on a shared segment other stations ask for each other; like arp_process, no drop to count
        ctx.step("arp", "not for this node", who if arp.op == 1 else f"reply to {pk.ip_str(arp.tpa)}")
        return []

    def _learn(self, arp: pk.ArpInfo, is_reply: bool, ctx: _Ctx) -> list[Transmit]:
        ip, table = arp.spa, self.neighbors
        if not ctx.commit:
            ctx.step("neigh", f"{pk.ip_str(ip)} lladdr {pk.mac_str(arp.sha)}", "learned from an ARP "
                     + ("reply" if is_reply else "request"))
            return []
        before = self._usable_mac(ip)
        waiting = table.arp_seen(ip, arp.sha, ctx.now, is_reply=is_reply)
        entry = table.get(ip)
        ctx.step("neigh", f"{pk.ip_str(ip)} lladdr {pk.mac_str(arp.sha)} {entry.state.value if entry else 'ignored'}",
                 f"{len(waiting)} waiting released" if waiting else "")
        if self._usable_mac(ip) != before:
            self._revalidate({ip})
        return self._release(waiting, arp.sha, ctx)

    def receive(self, frame, port: Port, vnet, ctx: _Ctx, counted: bool) -> list | None:
        """A VXLAN datagram for this node: decapsulated and passed on from the tunnel port; None when
        the frame is not one. `counted`: the slow path already counted the outer frame."""
        tunnel = self.tunnel
        if tunnel is None:
            return None
        valid = vnet is not None and len(vnet) > 0 and bool(vnet[0] & _CSUM_FLAGS)
        got = tunnel.vtep.decapsulate(frame, valid, count=ctx.commit)
        if got is None:
            return None
        dp = self.dp
        c = dp._c
        if ctx.commit and not counted:
            c.rx[port.id] += 1
            c.rx_bytes[port.id] += len(frame)
        if type(got) is DropReason:
            if ctx.commit and not counted:
                c.slow += 1
            return [dp._drop(ctx, got, port.id, "vxlan", f"to {pk.ip_str(dp.node_ip)}:{tunnel.vtep.port}")]
        inner = got.inner
        # the inner frame follows the outer Ethernet, IPv4 (options included), UDP and VXLAN headers
        ivnet = _inner_vnet(vnet, 30 + (frame[14] & 0x0F) * 4) if vnet and vnet[0] & 1 else None
        if ctx.steps is not None:
            ctx.step("vxlan", f"decap vni {got.vni}", f"from {pk.ip_str(got.remote_ip)}:{got.source_port} "
                     f"to {dp.port(tunnel.port).name}")
        if ctx.steps is None:   # the inner frame's own cached flow first
            out = dp.forward_fast(inner, tunnel.port, ctx.now, ivnet)
            if out is not None:
                if not counted:
                    c.fast += 1
                if out == DROPPED:
                    return [Drop(DropReason.CT_INVALID, tunnel.port, "fast path")]
                return [_new_tuple(Transmit, (out, inner, ivnet))]
        elif dp.forward_fast(inner, tunnel.port, ctx.now, ivnet, commit=False) is not None:
            ctx.step("flow", "cached", "the inner frame's established flow: the fast path gives the same result")
        if ctx.commit:
            c.stages["vxlan"] += 1   # decapsulations the slow path saw
            if not counted:
                c.slow += 1
        return self._into_tunnel(dp._slow(inner, tunnel.port, ivnet, ctx), ctx)

    def _into_tunnel(self, actions: list, ctx: _Ctx) -> list:
        """What the datapath sent back out of the tunnel port itself (ICMP errors, echo replies,
        resets to a remote pod): encapsulated to the VTEP the inner destination MAC names."""
        tunnel = self.tunnel
        if tunnel is None or not any(type(a) is Transmit and a.port == tunnel.port for a in actions):
            return actions
        out = []
        for action in actions:
            if type(action) is not Transmit or action.port != tunnel.port:
                out.append(action)
                continue
            remote = tunnel.by_vtep_mac.get(bytes(action.frame[0:6]))
            hop = self._outer_hop(remote) if remote is not None else None
            if hop is None:
                out.append(self.dp._drop(ctx, DropReason.TUNNEL_NO_PEER, tunnel.port, "tunnel",
                                         f"no FDB entry for {pk.mac_str(bytes(action.frame[0:6]))}"))
                continue
            out += self._encapsulate([action.frame], action.vnet, _Hop(hop, remote), self.dp.port(tunnel.port), ctx)[0]
        return out

    # ---- the cached path for VXLAN flows ----------------------------------------------------------

    def quick(self, frame, in_port: int, now: float, vnet) -> list | None:
        """Before the slow path: a VXLAN datagram on the uplink is decapsulated (its inner frame
        takes the fast path when its flow is cached), and a frame of a cached VXLAN flow is
        forwarded and encapsulated. None: the slow path takes the frame."""
        tunnel = self.tunnel
        if tunnel is None:
            return None
        if in_port == self.underlay:
            if frame[0:6] != self.mac:
                return None
            return self.receive(frame, self.dp._ports[in_port], vnet, _Ctx(now), counted=False)
        return self._forward(frame, in_port, now, vnet, tunnel)

    def cached(self, frame, in_port: int) -> bool:
        """Whether `frame` belongs to a cached VXLAN flow (for a trace)."""
        if self.tunnel is None or len(frame) < 38:
            return False
        _dst, ethertype, _v, _l, _f, _t, proto, src, dst, ports = _FAST.unpack_from(frame)
        return ethertype == 0x0800 and (in_port, proto, src, dst, ports, self.tunnel.port) in self.dp._flows

    def _forward(self, frame, in_port: int, now: float, vnet, tunnel: Tunnel) -> list | None:
        """`forward_fast` for a VXLAN flow, then GSO and encapsulation with the cached Peer."""
        n = len(frame)
        if n < 38:
            return None
        dst_mac, ethertype, ver_ihl, tot_len, frag, ttl, proto, src, dst, ports = _FAST.unpack_from(frame)
        if ethertype != 0x0800:
            return None
        dp = self.dp
        flow = dp._flows.get((in_port, proto, src, dst, ports, tunnel.port))
        if (flow is None or ver_ihl != 0x45 or frag & 0x3FFF or ttl <= 1
                or not (40 if proto == 6 else 28) <= tot_len <= n - 14 or dst_mac != flow[_INMAC]
                or sum(_WORDS.unpack_from(frame, 14)) % 0xFFFF):
            return None
        entry = flow[_CT]
        flags = frame[47] if proto == 6 else 0
        if entry is not None and flags & 0x07:
            return None
        gso_size = 0
        if vnet and len(vnet) >= gso.VNET_HDR_LEN and vnet[1]:
            if vnet[1] & ~gso.GSO_ECN != gso.GSO_TCPV4:
                return None   # the slow path counts it
            gso_size = vnet[4] | vnet[5] << 8
        if tot_len > tunnel.vtep.inner_mtu and check_mtu(frame, tunnel.vtep.inner_mtu, gso_size) is not MtuVerdict.FITS:
            return None       # the slow path answers frag-needed
        c = dp._c
        if entry is not None:
            if not dp._ct_steady(entry, flow[_DIR], now, flags, n - 14):
                if dp._ct_update(entry, flow[_DIR], now, flags, n - 14) is CtState.INVALID:
                    c.drops[DropReason.CT_INVALID.value] += 1
                    return [Drop(DropReason.CT_INVALID, in_port, "fast path")]
            if flow[_NAT] is not None:
                nat.apply(frame, 34, flow[_NAT], flow[_DIR], vnet)
        pk.decrement_ttl(frame, ttl)
        flow[_PKTS] += 1
        flow[_BYTES] += n
        flow[_SEEN] = now
        peer = flow[_PEER]
        vtep = tunnel.vtep
        if n > 14 + tot_len:
            frame = frame[:14 + tot_len]   # see _trimmed
        if gso_size and peer.tunnel_gso:
            whole = _encapsulate_whole(vtep, frame, vnet, peer)
            if whole is not None:
                self._fast_tx += 1
                self._fast_tx_bytes += len(whole[0])
                return [_new_tuple(Transmit, (self.underlay, whole[0], whole[1]))]
        # only an offloaded frame (NEEDS_CSUM, GSO) needs finishing; most have an all-zero header
        inner = gso.finish(frame, vnet) if vnet and (vnet[0] & 1 or vnet[1]) else (frame,)
        if type(inner) is DropReason:
            c.drops[inner.value] += 1
            return [Drop(inner, in_port, "fast path")]
        encapsulate = vtep.encapsulate
        out = []
        if gso_size:
            # the segments of one super-frame: one inner flow, so one UDP source port, and
            # checksums segment_tcp4 just completed, so the outer checksum needs no pass over
            # the payload (lco_sum); the bytes are those encapsulate(f, peer) makes
            sport = source_port(flow_hash(inner[0], vtep.hash_seed), vtep.src_port_range)
            lco_sum = gso.lco_sum
            for f in inner:
                outer = encapsulate(f, peer, sport=sport, inner_sum=lco_sum(f))
                self._fast_tx_bytes += len(outer)
                out.append(_new_tuple(Transmit, (self.underlay, outer, None)))
        else:
            for f in inner:
                outer = encapsulate(f, peer)
                if type(outer) is DropReason:   # one frame here; the checks above make this rare
                    c.drops[outer.value] += 1
                    return [Drop(outer, in_port, "fast path")]
                self._fast_tx_bytes += len(outer)
                out.append(_new_tuple(Transmit, (self.underlay, outer, None)))
        self._fast_tx += len(out)
        return out

    # ---- timers and statistics ----------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self.neighbors.next_deadline()

    def handle_timer(self, now: float) -> list[Transmit]:
        """The neighbour table's timers: the ARP requests they send. Flows that use a neighbour count
        as its use first; flows whose neighbour stopped being usable leave the cache."""
        due = self.neighbors.next_deadline()
        if due is None or due > now:
            return []
        flows = self.dp._flows
        for flow in flows.values():
            via = flow[_VIA]
            if via is not None:
                entry = self.neighbors.get(via)
                if entry is not None and flow[_SEEN] > entry.used:
                    entry.used = flow[_SEEN]
        before = {ip: self._usable_mac(ip) for ip in {f[_VIA] for f in flows.values() if f[_VIA] is not None}}
        solicits = self.neighbors.handle_timer(now)
        changed = {ip for ip, mac in before.items() if self._usable_mac(ip) != mac}
        if changed:
            self._revalidate(changed)
        ctx = _Ctx(now)
        return [self._solicit(s.ip, s.mac, ctx) for s in solicits]

    def _usable_mac(self, ip: int) -> bytes | None:
        entry = self.neighbors.get(ip)
        return entry.mac if entry is not None and entry.state in _USABLE else None

    def _revalidate(self, ips: set[int]) -> None:
        """Drop the cached flows whose next hop in `ips` is no longer usable at the MAC they hold."""
        dp = self.dp
        usable = {ip: self._usable_mac(ip) for ip in ips}
        stale = []
        for key, flow in dp._flows.items():
            via = flow[_VIA]
            if via in usable:
                held = flow[_PEER].next_hop_mac if flow[_PEER] is not None else flow[_ETH][0:6]
                if held != usable[via]:
                    stale.append(key)
        for key in stale:
            flow = dp._flows.pop(key)
            dp._retire(key, flow)
            if flow[_CT] is not None:
                keys = dp._ct_flows.get(flow[_CT].id)
                if keys is not None and key in keys:
                    keys.remove(key)

    def statistics(self, drops: dict[str, int], tx, tx_bytes):
        """(NeighborStatistics, VtepStatistics or None); the neighbour queue's drops join `drops`, the
        cached VXLAN path's outer frames the uplink's `tx` and `tx_bytes` counters."""
        tx[self.underlay] += self._fast_tx
        tx_bytes[self.underlay] += self._fast_tx_bytes
        stats = dataclasses.replace(self.neighbors.statistics())
        for reason, count in ((DropReason.NEIGH_FAILED, stats.dropped_unresolved),
                              (DropReason.NEIGH_QUEUE_FULL, stats.dropped_queue_full)):
            if count:
                drops[reason.value] = drops.get(reason.value, 0) + count
        return stats, self.tunnel.vtep.statistics() if self.tunnel is not None else None


_TUNNEL_OUTER = OUTER_HLEN                     # 50: outer Ethernet, IPv4, UDP, VXLAN
_OUTER_TH = pk.ETH_HLEN + 20                   # 34: the outer UDP header
_INNER_NH = OUTER_HLEN + pk.ETH_HLEN           # 64: the inner IPv4 header


def _trimmed(frame):
    """An IPv4 frame without the bytes past its total length (Ethernet padding, or whatever a pod
    wrote after its packet): ip_rcv trims them (pskb_trim_rcsum) before the kernel routes a packet
    into flannel.1, so they are neither carried across the tunnel nor measured against its MTU.
    A copy only when there is something to cut."""
    n = len(frame)
    if n > 34 and frame[12] == 0x08 and frame[13] == 0x00:
        end = pk.ETH_HLEN + (frame[16] << 8 | frame[17])
        if 34 <= end < n:
            return frame[:end]
    return frame


def _encapsulate_whole(vtep: Vtep, frame, vnet, peer: Peer, *, count: bool = True):
    """(outer frame, its 24-byte vnet header, segments) for a TCPv4 super-frame sent whole over the
    tunnel (GSO over UDP tunnels), or None when it must be cut in software: not NEEDS_CSUM, not a
    plain IPv4/TCP frame of its own length, a single segment, or an outer frame over 64 KB."""
    n = len(frame)
    if not vnet[0] & gso.VIRTIO_NET_HDR_F_NEEDS_CSUM or n + _TUNNEL_OUTER > 0xFFFF or n < 54:
        return None
    if frame[12] != 0x08 or frame[13] != 0x00 or frame[14] >> 4 != 4 or frame[23] != pk.IPPROTO_TCP:
        return None
    l4 = pk.ETH_HLEN + (frame[14] & 0x0F) * 4
    if pk.ETH_HLEN + (frame[16] << 8 | frame[17]) != n or l4 + 20 > n:
        return None
    headers = l4 + (frame[l4 + 12] >> 4) * 4
    gso_size = vnet[4] | vnet[5] << 8
    payload = n - headers
    if gso_size <= 0 or payload <= gso_size or headers < l4 + 20:
        return None
    segments = -(-payload // gso_size)
    outer = vtep.encapsulate_gso(frame, peer, segments, headers, count=count)
    header = gso.TunnelVnetHeader(gso.VIRTIO_NET_HDR_F_NEEDS_CSUM, vnet[1] | gso.GSO_UDP_TUNNEL_IPV4,
                                  _TUNNEL_OUTER + headers, gso_size, _TUNNEL_OUTER + l4, 16,
                                  outer_th_offset=_OUTER_TH, inner_nh_offset=_INNER_NH).pack()
    return outer, header, segments


def _inner_vnet(vnet, offset: int) -> bytes | None:
    """The virtio-net header of a decapsulated frame that began `offset` bytes into the outer one
    (50 without outer IP options): a partial checksum that lies in the inner frame (the kernel's
    vxlan with local checksum offload leaves the inner TCP/UDP sum partial) stays partial, `offset`
    bytes earlier; otherwise the inner frame is complete and needs none. A whole super-frame
    (gso_type with a UDP tunnel bit) keeps its inner GSO: the inner type, the same gso_size, hdr_len
    and csum_start `offset` bytes earlier, in a 10-byte header."""
    header = gso.VnetHeader.parse(vnet)
    if header is None or not header.needs_csum or header.csum_start < offset + pk.ETH_HLEN + 20:
        return None
    if header.gso_type & gso.GSO_UDP_TUNNEL:
        return gso.VnetHeader(gso.VIRTIO_NET_HDR_F_NEEDS_CSUM, header.gso_type & ~gso.GSO_UDP_TUNNEL,
                              max(header.hdr_len - offset, 0), header.gso_size, header.csum_start - offset,
                              header.csum_offset).pack()
    return gso.VnetHeader(gso.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso.GSO_NONE, 0, 0, header.csum_start - offset,
                          header.csum_offset).pack()


__all__ = ["Internode", "Tunnel"]
