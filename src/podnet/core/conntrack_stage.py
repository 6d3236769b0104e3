"""The datapath's conntrack stage: a NEW flow's Service decision and its confirm with NAT, and
ICMP errors RELATED to a tracked flow.

Layer: core, sans-IO. Called by `Datapath._ipv4` (core/datapath), which keeps the order of the
stages; these functions are what happens inside them, as the kernel does it for a packet conntrack
has no entry for:

    decide    the nat table's hooks (PREROUTING, or OUTPUT for the node's own traffic): the Service
              backend (iptables chains, IPVS or eBPF maps) picks an endpoint - DNAT - and says
              whether to masquerade; with no backend nothing is decided
    refuse    its DROP or REJECT (icmp-port-unreachable and the other codes, or a TCP reset)
    track     after routing, conntrack's confirm: the entry is pinned with its NAT binding -
              MASQUERADE takes the address of the device the packet leaves by
              (nf_nat_masquerade_ipv4), and the source port moves when the reply tuple is already
              taken (nf_nat's get_unique_tuple)
    related   an ICMP error about a tracked, NATed flow is translated like that flow (RELATED)

Invariants: the backend is asked only about a packet conntrack has no entry for - a tracked flow
keeps the NAT it was confirmed with, whatever the backend says later (a trace asks with
effects=False and confirms nothing); the backend that decided a flow is kept on its entry, so it
hears of the flow's state changes and its end even after `Datapath.set_backend`; every refusal is
a counted `Drop` with its `DropReason`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import nat
from . import packet as pk
from .conntrack import Entry, Refusal
from .packet import DropReason
from .ports import Drop, Port, PortKind, Transmit
from .services.base import NO_SERVICE, Decision, Verdict
from .services.packetinfo import CtState, PacketInfo
from .tracing import _Ctx, hostport, tuple_text

if TYPE_CHECKING:
    from .datapath import Datapath

_EPHEMERAL = (1024, 65535)  # the port range MASQUERADE picks from when it must move a source port


def ct_key(frame, info: pk.IPv4Info) -> tuple | None:
    """Conntrack's tuple for a packet: (proto, src, sport, dst, dport); for ICMP queries the echo
    identifier and type << 8 | code. None for a non-first fragment (no ports to track by)."""
    if not info.first_fragment:
        return None
    if info.proto == pk.IPPROTO_ICMP:
        ident = frame[info.l4 + 4] << 8 | frame[info.l4 + 5]
        return (info.proto, info.src, ident, info.dst, info.sport)
    if info.proto in (pk.IPPROTO_TCP, pk.IPPROTO_UDP):
        return (info.proto, info.src, info.sport, info.dst, info.dport)
    return (info.proto, info.src, 0, info.dst, 0)


def decide(dp: Datapath, info: pk.IPv4Info, port: Port, ctx: _Ctx) -> Decision:
    """A NEW flow: the backend decides at its hooks (nothing to decide without one)."""
    backend = dp.backend
    if backend is None:
        return NO_SERVICE
    pkt = PacketInfo(info.src, info.dst, info.proto, info.sport if info.proto != pk.IPPROTO_ICMP else 0,
                     info.dport if info.proto != pk.IPPROTO_ICMP else 0, in_iface=port.name,
                     ct_state=CtState.NEW, length=info.total_length)
    decision = backend.decide(pkt, ctx.now, local_source=info.src in dp.local_addresses, effects=ctx.commit)
    if ctx.commit:
        dp._c.decisions += 1
        dp._c.decision_cost += decision.cost
    target = f"DNAT to {hostport(decision.dnat)}" if decision.dnat else "no service"
    ctx.step(backend.name, f"{decision.verdict.value} {target}"
             + (", masquerade" if decision.masquerade else ""), " ".join(decision.path))
    return decision


def refuse(dp: Datapath, frame, info: pk.IPv4Info, port: Port, decision: Decision,
           ctx: _Ctx) -> list[Transmit | Drop]:
    """The backend's DROP, or its REJECT: a TCP reset or an ICMP error back to the sender, then the drop."""
    if decision.verdict is Verdict.DROP:
        return [dp._drop(ctx, DropReason.SERVICE_DROP, port.id, "service", " ".join(decision.path[-1:]))]
    actions: list[Transmit | Drop] = []
    how = decision.reject_with or "icmp-port-unreachable"
    if how == "tcp-reset" and info.proto == pk.IPPROTO_TCP and not frame[info.l4 + 13] & 0x04:
        ctx.step("reject", "tcp-reset", f"from {pk.ip_str(info.dst)}:{info.dport}")
        if ctx.commit:
            dp._c.resets_sent += 1
        actions.append(dp._emit(ctx, port.id, pk.build_tcp_reset(frame, info, port.local_mac)))
    elif how in pk.REJECT_WITH_CODES:
        actions += dp._icmp_error(frame, info, port, pk.ICMP_DEST_UNREACH, pk.REJECT_WITH_CODES[how], ctx)
    return actions + [dp._drop(ctx, DropReason.SERVICE_REJECT, port.id, "service", how)]


def masquerade_source(dp: Datapath, out: Port) -> int | None:
    """MASQUERADE's address: the outgoing device's own, as nf_nat_masquerade_ipv4 picks it
    (inet_select_addr on the out device): the tunnel's (flannel.1's) for a packet into it,
    else the node's address."""
    if out.kind is PortKind.TUNNEL and dp.internode is not None:
        source = dp.internode.tunnel_address(out)
        if source is not None:
            return source
    return dp.node_ip


def track(dp: Datapath, key: tuple, info: pk.IPv4Info, port: Port, decision: Decision, tcp_flags: int,
          ctx: _Ctx, out: Port) -> Entry | Drop:
    """Pin a NEW flow in conntrack with its NAT (the kernel's confirm after the last hook)."""
    snat = None
    source = masquerade_source(dp, out) if decision.masquerade else None
    if source is not None:
        snat = (source, _source_port(dp, key, decision, source, decision.random_fully))
    elif decision.dnat is not None:
        # nf_nat's get_unique_tuple: when the reply tuple after DNAT is taken (the client reused
        # a source port that an entry still in TIME_WAIT holds towards the same backend through
        # another Service), the kernel moves the source port even without an SNAT rule
        sport = _source_port(dp, key, decision, key[1], False)
        if sport is not None and sport != key[2]:
            snat = (key[1], sport)
            ctx.step("nat", "implicit source port change", f"{key[2]} -> {sport}: the reply tuple was taken")
    made = dp.conntrack.new(key, ctx.now, dnat=decision.dnat, snat=snat, tcp_flags=tcp_flags,
                            length=info.total_length, mark=decision.mark)
    if isinstance(made, Refusal):
        reason = {Refusal.TABLE_FULL: DropReason.CT_TABLE_FULL,
                  Refusal.CLASH: DropReason.CT_CLASH}.get(made, DropReason.CT_INVALID)
        return dp._drop(ctx, reason, port.id, "conntrack", made.name)
    if dp.backend is not None and decision.is_service:
        # the backend that decided hears of the flow's end, even after a switch
        made.backend = (dp.backend, decision)
    ctx.step("conntrack", f"new flow {made.id}", f"reply tuple {tuple_text(made.reply)}")
    return made


def _source_port(dp: Datapath, key: tuple, decision: Decision, src: int, random_fully: bool) -> int | None:
    """The source port a NEW flow from `src` gets: its own unless another entry's tuple already
    holds it for this destination (or --random-fully), else a free one (nf_nat_l4proto_unique_tuple)."""
    proto, _src, sport, dst, dport = key
    if proto not in (pk.IPPROTO_TCP, pk.IPPROTO_UDP):
        return None
    if decision.dnat is not None:
        dst, dport = decision.dnat
    in_use = dp.conntrack.in_use
    if not random_fully and not in_use((proto, dst, dport, src, sport)):
        return sport
    for _ in range(64):
        port = dp._rng.randint(*_EPHEMERAL)
        if not in_use((proto, dst, dport, src, port)):
            return port
    return sport  # give up: the clash check at confirm decides


def related(dp: Datapath, frame, info: pk.IPv4Info, vnet, ctx: _Ctx) -> pk.IPv4Info:
    """An ICMP error about a tracked, NATed flow is translated like that flow (RELATED), so it
    reaches the flow's other end as that end knows it; returns the packet's new header."""
    inner = nat.icmp_error_inner(frame, info.l4)
    hit = dp.conntrack.lookup_related(inner, ctx.now if ctx.commit else None) if inner is not None else None
    if hit is None:
        return info
    entry, direction = hit
    ctx.step("conntrack", f"RELATED to flow {entry.id}", f"{'reply' if direction else 'original'} direction")
    if entry.nat is not None and nat.rewrite_icmp_error(frame, info.l4, entry.nat, direction, vnet):
        parsed = pk.parse_ipv4(frame)
        if isinstance(parsed, pk.IPv4Info):
            return parsed
    return info
