"""Plumb a TAP into a pod's netns the way Calico's CNI plugin plumbs a veth (linux layer, root only).

Job: the CNI ADD/DEL steps for one pod, over netlink (pyroute2):

    move the TAP into the netns, rename it eth0, set its MTU
    disable IPv6 on eth0 (before it goes up: no link-local address, router solicitations or MLD)
    eth0 up, address <ip>/32, lo up
    default via 169.254.1.1 dev eth0 onlink

Bridge-mode nodes (kubenet's cbr0) instead give the pod the node's prefix (`prefixlen=24`) and a
gateway inside it (.1): neighbours are then on-link and the default route needs no onlink flag.

With a /32 the pod has no on-link subnet: every packet goes to the gateway, whose ARP request
podnet's proxy-ARP answers with ee:ee:ee:ee:ee:ee, so all pod traffic reaches the datapath.

Invariants:
- The default route looks exactly like `ip route add default via 169.254.1.1 dev eth0 onlink`
  would make it: RTNH_F_ONLINK and proto boot (iproute2's default, which `ip route` does not print;
  pyroute2 would otherwise say static).
- The TAP fd podnet holds keeps working after the move: the device changes netns, the fd does not.
- The netns must exist: nothing here creates one.
"""

from __future__ import annotations

import ipaddress

from podnet.linux.netns import delete_netns, open_iproute, set_sysctl
from podnet.linux.tap import Tap

DEFAULT_GATEWAY = "169.254.1.1"
POD_IFNAME = "eth0"
# include/uapi/linux/rtnetlink.h
RTNH_F_ONLINK = 4
RTPROT_BOOT = 3


def _link_index(ipr, ifname: str, netns: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no interface {ifname!r} in netns {netns!r}")
    return found[0]


def _disable_ipv6(netns: str, ifname: str) -> None:
    try:
        set_sysctl(netns, f"net/ipv6/conf/{ifname}/disable_ipv6", 1)
    except FileNotFoundError:
        pass  # kernel without IPv6: nothing to disable


def plumb_pod(
    tap: Tap, netns: str, ip: str, *, gateway: str = DEFAULT_GATEWAY, mtu: int = 1500,
    prefixlen: int = 32,
) -> str:
    """Make `tap` the eth0 of `netns` with address `ip`/`prefixlen`; return the pod's MAC."""
    address = str(ipaddress.IPv4Address(ip))
    gateway = str(ipaddress.IPv4Address(gateway))
    on_link = ipaddress.IPv4Address(gateway) in ipaddress.IPv4Network(f"{address}/{prefixlen}", strict=False)
    with open_iproute() as root:
        index = _link_index(root, tap.name, "root")
        root.link("set", index=index, net_ns_fd=netns)
    with open_iproute(netns) as ns:
        # the kernel keeps the ifindex when it is free in the new netns, but need not
        index = _link_index(ns, tap.name, netns)
        ns.link("set", index=index, ifname=POD_IFNAME, mtu=mtu)
        _disable_ipv6(netns, POD_IFNAME)
        ns.link("set", index=index, state="up")
        ns.addr("add", index=index, address=address, prefixlen=prefixlen)
        ns.link("set", index=_link_index(ns, "lo", netns), state="up")
        ns.route(
            "add",
            dst="0.0.0.0/0",
            gateway=gateway,
            oif=index,
            flags=0 if on_link else RTNH_F_ONLINK,
            proto=RTPROT_BOOT,
        )
        link = ns.link("get", index=index)[0]
    return link.get_attr("IFLA_ADDRESS")


def unplumb_pod(netns: str) -> None:
    """CNI DEL: delete the pod's netns. Idempotent.

    The TAP is destroyed with the netns at once, even while podnet still holds its fd (which then
    fails with EBADFD); close the `Tap` as well.
    """
    delete_netns(netns)
