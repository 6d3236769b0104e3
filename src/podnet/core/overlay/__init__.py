"""Overlay networking between nodes: VXLAN (RFC 7348) as the Linux vxlan driver carries it for
Flannel's vxlan backend.

Layer: core, sans-IO. Three modules, one job each:

    vxlan    the wire format: a VTEP's encapsulation and decapsulation (bytes in, bytes or a drop out)
    flannel  Flannel's per-node state: leases, and the routes, neighbours and FDB entries flanneld
             derives from them (as data, and as the lines `ip` and `bridge` show)
    mtu      the tunnel MTU (underlay - 50) and what happens to a packet that does not fit
"""

from .flannel import FdbEntry, FlannelNode, Lease, NeighEntry, RouteEntry, device_name
from .mtu import VXLAN_OVERHEAD, MtuVerdict, build_frag_needed, check_mtu, tunnel_mtu
from .vxlan import (
    DEFAULT_VNI,
    FLANNEL_PORT,
    IANA_PORT,
    LINUX_DEFAULT_PORT,
    Decapsulated,
    Peer,
    Vtep,
    VtepStatistics,
    flow_hash,
    source_port,
)

__all__ = [
    "DEFAULT_VNI", "FLANNEL_PORT", "IANA_PORT", "LINUX_DEFAULT_PORT", "VXLAN_OVERHEAD",
    "Decapsulated", "FdbEntry", "FlannelNode", "Lease", "MtuVerdict", "NeighEntry", "Peer", "RouteEntry",
    "Vtep", "VtepStatistics", "build_frag_needed", "check_mtu", "device_name", "flow_hash", "source_port",
    "tunnel_mtu",
]
