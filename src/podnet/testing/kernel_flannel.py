"""A kernel node's VXLAN device, set up as flanneld sets up flannel.1 (testing helpers, root only).

Public: tests (podnet's and users' own) that put a real Linux vxlan device across from podnet's
VTEP make it with these, so the kernel node is what a Flannel node is, not a guess at one.
`FlannelNode` (core/overlay/flannel) says what flanneld derives from the leases; this module applies
it to a namespace through netlink, as flanneld's vxlan backend does through vishvananda/netlink:

- `create_flannel_device` is newVXLANDevice: kind vxlan, the lease's VNI, `local` = the lease's
  public IP, `dev` = the node's external interface, nolearning, the lease's VtepMAC, MTU = the
  external interface's MTU - 50 (`FlannelNode.mtu`); the lease's network address as a /32 on it, up.
  flanneld sets no UDP checksum, TTL, DF or source port range, so the kernel's defaults hold, and
  sets the UDP port only when configured (`port=None`: the kernel's 8472, flanneld's default).
- `program_like_flanneld` is handleSubnetEvents for the remote leases `node` knows, per lease in
  flanneld's order: AddARP (`ip neigh replace <gw> lladdr <VtepMAC> nud permanent`), AddFDB
  (`bridge fdb replace <VtepMAC> dst <PublicIP> self permanent`), then RouteReplace
  (`ip route replace <subnet> via <gw> dev flannel.1 onlink`). The library's route messages carry
  `proto boot` (RTPROT_BOOT) unless told otherwise, and so do these; `ip route show` leaves it out.

Layer: above podnet.linux (it drives netlink through linux/netns); nothing in core, runtime or linux
imports it, and `import podnet.testing` does not load it (podnet.testing.frames needs no pyroute2).

Invariants:
- Every entry is written with replace semantics, so programming again after `node.add_lease` adds
  the new lease's entries and leaves the others as they were, as flanneld's *Replace calls do.
- `create_flannel_device` leaves no device behind when a step after the link's creation fails.
- Nothing here sends a frame.
"""

from __future__ import annotations

import contextlib
import socket

from podnet.core.overlay import FlannelNode
from podnet.linux.netns import open_iproute

# include/uapi/linux: neighbour states and flags, route flags and protocols
NUD_PERMANENT, NTF_SELF, RTNH_F_ONLINK, RTPROT_BOOT = 0x80, 0x02, 4, 3


def _index(ipr, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no interface {ifname!r}")
    return found[0]


def create_flannel_device(netns: str, node: FlannelNode, link: str, *, port: int | None = None) -> None:
    """`node.device` in `netns` over its interface `link`, as flanneld makes flannel.1, holding the
    neighbour, FDB and route entries of the remote leases `node` knows. The caller removes the
    device (or its namespace, which takes it along)."""
    own = node.own
    with open_iproute(netns) as ipr:
        spec = dict(ifname=node.device, kind="vxlan", vxlan_id=own.vni, vxlan_local=own.public_ip,
                    vxlan_link=_index(ipr, link), vxlan_learning=0, address=own.vtep_mac, mtu=node.mtu)
        if port is not None:
            spec["vxlan_port"] = port
        ipr.link("add", **spec)
        try:
            index = _index(ipr, node.device)
            ipr.addr("add", index=index, address=own.gateway, prefixlen=32)
            ipr.link("set", index=index, state="up")
            _program(ipr, node, index)
        except BaseException:
            with contextlib.suppress(Exception):
                ipr.link("del", index=_index(ipr, node.device))
            raise


def program_like_flanneld(netns: str, node: FlannelNode) -> None:
    """The neighbour, FDB entry and route of every remote lease `node` knows, on `node.device` in
    `netns` (made by `create_flannel_device`); again after `node.add_lease`, the new lease's too."""
    with open_iproute(netns) as ipr:
        _program(ipr, node, _index(ipr, node.device))


def _program(ipr, node: FlannelNode, index: int) -> None:
    for neigh, fdb, route in zip(node.neighbours(), node.fdb(), node.routes(), strict=True):
        ipr.neigh("replace", dst=neigh.ip, lladdr=neigh.lladdr, ifindex=index, state=NUD_PERMANENT)
        ipr.neigh("replace", family=socket.AF_BRIDGE, lladdr=fdb.lladdr, dst=fdb.dst, ifindex=index,
                  state=NUD_PERMANENT, flags=NTF_SELF)
        ipr.route("replace", dst=route.dst, gateway=route.via, oif=index, flags=RTNH_F_ONLINK,
                  proto=RTPROT_BOOT)


__all__ = ["NUD_PERMANENT", "NTF_SELF", "RTNH_F_ONLINK", "RTPROT_BOOT", "create_flannel_device",
           "program_like_flanneld"]
