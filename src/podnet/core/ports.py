"""The datapath's ports and what it answers for a frame: send it out of a port, or drop it.

Layer: core, plain data. A port is a device podnet holds the other end of: a pod's TAP, the
uplink on the underlay, Flannel's VXLAN device. `Datapath.add_port` hands out its number, a small
integer; `process` answers a list of `Transmit` and `Drop`, both naming a port. The fast path
(`forward_fast`) answers a bare port number instead, or one of the two negative codes here for a
frame it dropped itself. Re-exported by core.datapath, where these have always been imported from.

Invariants: port numbers are positive, so DROPPED and XDP_DROPPED never name a port; a `Transmit`
refers to the frame's buffer (no copy), so the caller writes it out before reusing the buffer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from .packet import DropReason


class PortKind(enum.Enum):
    POD = "pod"
    UPLINK = "uplink"
    TUNNEL = "tunnel"   # a VXLAN device (flannel.1): frames routed here are encapsulated onto the uplink


@dataclass(slots=True)
class Port:
    id: int
    name: str
    kind: PortKind
    mac: bytes            # the MAC of the device on the other side (the pod's eth0)
    ip: int | None = None
    local_mac: bytes = b""  # podnet's own MAC on this port: the gateway's; the node's on an underlay


class Transmit(NamedTuple):
    port: int
    frame: bytes | bytearray | memoryview
    vnet: bytes | None = None


class Drop(NamedTuple):
    reason: DropReason
    port: int
    detail: str = ""


# what forward_fast answers for a frame it dropped itself (counted): no port has these numbers
DROPPED = -1       # conntrack found the packet INVALID
XDP_DROPPED = -2   # the backend's XDP program dropped it on the uplink
# tuple.__new__(Transmit, (...)) skips the NamedTuple's Python-level __new__ on the per-frame path
_new_tuple = tuple.__new__

__all__ = ["DROPPED", "XDP_DROPPED", "Drop", "Port", "PortKind", "Transmit"]
