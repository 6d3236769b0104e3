"""`podnet trace`: the first packet of a connection from a pod, through the datapath, and across nodes.

Layer: lab. `trace_from_pod` builds the frame a pod's kernel would send first (a TCP SYN, a UDP
datagram or an ICMP echo request, from its eth0 to the gateway MAC), asks its node's
`Datapath.trace` (which changes nothing: no conntrack entry, no counter, no random draw kept) and
follows every frame that trace would transmit:

- to a pod's TAP: the packet is delivered there, and the walk ends;
- to the uplink of a node in a cluster: the frame goes on, as the underlay bridge would carry it,
  to the node whose uplink MAC it is addressed to, and is traced there (for vxlan, that node sees
  the encapsulated frame and decapsulates it); a frame for no node of ours (an ARP request, the
  external client) leaves the cluster and the walk ends;
- a drop ends the walk with its reason.

It works on a `Lab` (one node) and on a `Cluster` (every node in this process). A node process of
a cluster (`podnet node join`) has only its own datapath: with `peers_elsewhere` a frame out the
uplink to a unicast MAC is said to go on to another node, whose own process could trace it, instead
of looking as if it left the cluster.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from podnet.core.datapath import Datapath, Drop, PortKind, Transmit
from podnet.core.packet import describe, mac_bytes, mac_str
from podnet.core.stats import Trace
from podnet.errors import ConfigError
from podnet.testing import frames

PROTOCOLS = ("tcp", "udp", "icmp")
MAX_HOPS = 8   # node to node; a loop between nodes would otherwise never end
BROADCAST = mac_bytes("ff:ff:ff:ff:ff:ff")


@dataclass
class Hop:
    """One node's part of the walk: where the frame came in, the trace, and where it went."""

    node: str
    trace: Trace
    outputs: list[str] = field(default_factory=list)


def _nodes(target) -> dict[str, Datapath]:
    nodes = getattr(target, "nodes", None)
    if nodes is not None:        # a Cluster: {name: ClusterNode}
        return {name: node.lab.datapath for name, node in nodes.items()}
    return {target.config.node_name: target.datapath}


def _pod_node(target, pod: str, namespace: str | None):
    if getattr(target, "nodes", None) is not None:
        node = target.node_of(pod, namespace)
        return node.name, node.lab.pod(pod, namespace)
    return target.config.node_name, target.pod(pod, namespace)


def first_frame(proto: str, src_ip: str, src_mac: str, dst_ip: str, gateway_mac: str, *,
                sport: int, dport: int) -> bytearray:
    """The first frame of a connection as a pod's kernel sends it to its gateway."""
    if proto == "tcp":
        return frames.tcp(src_ip, dst_ip, sport, dport, flags=0x02, src_mac=src_mac, dst_mac=gateway_mac)
    if proto == "udp":
        return frames.udp(src_ip, dst_ip, sport, dport, payload=b"podnet trace", src_mac=src_mac,
                          dst_mac=gateway_mac)
    if proto == "icmp":
        return frames.icmp_echo(src_ip, dst_ip, ident=sport, src_mac=src_mac, dst_mac=gateway_mac)
    raise ConfigError(f"trace: unknown protocol {proto!r} (one of {', '.join(PROTOCOLS)})")


def trace_from_pod(target, pod: str, dst: str, *, dport: int = 80, proto: str = "tcp", sport: int = 40000,
                   namespace: str | None = None, now: float = 0.0, peers_elsewhere: bool = False) -> list[Hop]:
    """Walk the first packet from `pod` to dst:dport through every node it crosses (with
    `peers_elsewhere`, through this one only: see the module)."""
    try:
        ipaddress.IPv4Address(dst)
    except ValueError:
        raise ConfigError(f"trace: {dst!r} is not an IPv4 address") from None
    if not 0 <= dport <= 65535 or not 0 <= sport <= 65535:
        raise ConfigError(f"trace: ports must be 0-65535 (source {sport}, destination {dport})")
    datapaths = _nodes(target)
    try:
        node, state = _pod_node(target, pod, namespace)
    except (KeyError, StopIteration) as exc:
        raise ConfigError(f"trace: {exc.args[0] if exc.args else 'no pod ' + repr(pod)}") from None
    dp = datapaths[node]
    frame = first_frame(proto, state.ip, state.mac, dst, mac_str(dp.gateway_mac), sport=sport, dport=dport)
    uplinks = {}
    for name, other in datapaths.items():
        internode = getattr(other, "internode", None)
        if internode is not None:
            uplinks[bytes(other.port(internode.underlay).local_mac)] = (name, internode.underlay)
    hops: list[Hop] = []
    pending = [(node, state.port_id, bytes(frame), None)]
    while pending:
        if len(hops) >= MAX_HOPS:
            hops[-1].outputs.append(f"stopped after {MAX_HOPS} nodes (a loop?)")
            break
        node, in_port, frame, vnet = pending.pop(0)
        dp = datapaths[node]
        trace = dp.trace(frame, in_port, now, vnet)
        hop = Hop(node, trace)
        hops.append(hop)
        for action in trace.actions:
            if isinstance(action, Drop):
                hop.outputs.append(f"dropped: {action.reason.value}" + (f" ({action.detail})" if action.detail else ""))
                continue
            if not isinstance(action, Transmit):
                continue
            port = dp.port(action.port)
            out = bytes(action.frame)
            if port.kind is PortKind.POD:
                hop.outputs.append(f"delivered to {port.name} (eth0, {mac_str(port.mac)}): {describe(out)}")
            elif port.kind is PortKind.UPLINK and out[:6] in uplinks and uplinks[out[:6]][0] != node:
                next_node, next_port = uplinks[out[:6]]
                hop.outputs.append(f"out {port.name} to {next_node} ({mac_str(out[:6])})")
                pending.append((next_node, next_port, out, action.vnet))
            elif out[12:14] == b"\x08\x06" and len(out) >= 42:
                target_ip = ".".join(str(b) for b in out[38:42])
                hop.outputs.append(f"ARP who-has {target_ip} out {port.name}: the packet waits in {node}'s "
                                   f"neighbour queue until it is answered")
            elif peers_elsewhere and port.kind is PortKind.UPLINK and out[:6] != BROADCAST:
                hop.outputs.append(f"out {port.name} to {mac_str(out[:6])}: leaves {node} for another node; "
                                   f"the trace stops here, as {node}'s process traces only its own datapath "
                                   "(node processes: podnet up --store)")
            else:
                what = "broadcast" if out[:6] == BROADCAST else mac_str(out[:6])
                hop.outputs.append(f"out {port.name} to {what}: leaves {node}")
    return hops


def format_hops(hops: list[Hop]) -> str:
    lines = []
    for i, hop in enumerate(hops):
        lines.append(f"{hop.node}: {hop.trace.frame}  (in {hop.trace.in_port})")
        lines += [f"  {step}" for step in hop.trace.steps]
        lines += [f"  => {out}" for out in hop.outputs] or ["  => nothing sent"]
        if i + 1 < len(hops):
            lines.append("")
    return "\n".join(lines)


def hops_json(hops: list[Hop]) -> list[dict]:
    return [{"node": h.node, "frame": h.trace.frame, "in_port": h.trace.in_port,
             "steps": [{"stage": s.stage, "decision": s.decision, "detail": s.detail} for s in h.trace.steps],
             "outputs": h.outputs} for h in hops]
