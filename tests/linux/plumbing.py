"""Kernel plumbing for the root tests that wire podnet to real devices (tests, linux layer, root only).

Job: the namespaces, bridges, veth pairs, TAPs and Flannel-style vxlan devices that the kernel
interop tests stand podnet between, made with podnet's own linux helpers wherever one does the job
(`create_underlay` and `open_uplink` for a bridge and the TAPs on it, `add_veth_host` for a
namespace on that bridge, `plumb_pod` for a pod's eth0, podnet.testing.kernel_flannel for a vxlan
device as flanneld makes one), and the few steps those do not cover.

Invariants:
- Every name carries the test's prefix (`lab.name`), and every namespace, and every link that
  does not go with one of them, is journalled in the `Plumbing`'s `Resources` before it exists:
  whatever happens in the test, the `with` block's exit (or `podnet clean`, after a SIGKILL)
  removes it.
- On exit the fds the test holds (TAPs, sockets) are closed first, then the journal is released:
  links, then namespaces (which take the devices inside them along).
- No namespace speaks IPv6 unless asked (`ipv6=True`): no router solicitations or MLD reports
  among the frames a test reads.
- Nothing here sends a frame; nothing is created outside the test's namespaces except a pod's TAP,
  for the moment `plumb_pod` takes to move it into the pod's namespace.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable
from typing import TypeVar

from podnet.core.overlay import FlannelNode
from podnet.linux.names import tap_name
from podnet.linux.netns import open_iproute
from podnet.linux.pod import plumb_pod
from podnet.linux.resources import Resources
from podnet.linux.tap import Tap, open_tap
from podnet.linux.underlay import Underlay, add_veth_host, create_underlay, open_uplink
from podnet.testing.kernel_flannel import RTNH_F_ONLINK, RTPROT_BOOT, create_flannel_device

__all__ = ["RTNH_F_ONLINK", "RTPROT_BOOT", "Plumbing", "add_address", "add_route", "link_mac", "read_frames",
           "set_up"]

C = TypeVar("C", bound=contextlib.AbstractContextManager)


class Plumbing:
    """One test's kernel devices: made through its methods, all gone when the `with` block ends."""

    def __init__(self, lab) -> None:
        self.lab = lab
        self.resources = Resources(prefix=lab.prefix, state_dir=lab.state_dir)
        self._held = contextlib.ExitStack()

    def __enter__(self) -> Plumbing:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._held.close()
        finally:
            self.resources.release_all()

    def hold(self, thing: C) -> C:
        """Close `thing` (a Tap, a socket) when the plumbing goes, before its namespaces do."""
        return self._held.enter_context(thing)

    # ---- namespaces ---------------------------------------------------------------------------

    def add_netns(self, what: str, *, ipv6: bool = False) -> str:
        """A journalled namespace named `<prefix><what><n>`; its name."""
        name = self.lab.name(what)
        self.resources.create_netns(name, ipv6=ipv6)
        return name

    def add_bridge(self, what: str) -> Underlay:
        """A namespace holding one up bridge (podnet's underlay: `br0`, no STP, IPv6 off)."""
        underlay, _ = create_underlay(self.resources, self.lab.name(what))
        return underlay

    def add_bridge_host(self, bridge: Underlay, what: str, ifname: str = "eth0") -> str:
        """A namespace whose veth `ifname` (up, no address) is a port of `bridge`; its name."""
        name = self.lab.name(what)
        add_veth_host(bridge, self.resources, name, ifname=ifname)
        return name

    # ---- links --------------------------------------------------------------------------------

    def open_bridge_tap(self, bridge: Underlay, what: str, **open_tap_kw) -> Tap:
        """A TAP inside `bridge`'s namespace, a port of the bridge and up; `open_tap`'s options."""
        return self.hold(open_uplink(bridge, what, prefix=self.lab.prefix, **open_tap_kw))

    def open_pod(self, what: str, ip: str, *, mtu: int = 1500) -> tuple[str, Tap]:
        """A pod as podnet's lab makes one: a namespace whose eth0 is a TAP whose fd we hold
        (`plumb_pod`: ip/32, default via 169.254.1.1 onlink). (netns, tap)."""
        ns = self.add_netns(what)
        tap = self.hold(open_tap(tap_name(ns, prefix=self.lab.prefix), mtu=mtu))
        plumb_pod(tap, ns, ip, mtu=mtu)
        return ns, tap

    def add_veth(self, ns: str, what: str, peer_ns: str, peer_what: str) -> tuple[str, str]:
        """A veth pair, one end in `ns`, the other in `peer_ns`, both down; (name, peer name)."""
        name, peer = self.lab.name(what), self.lab.name(peer_what)
        self.resources.record_link(name, netns=ns)
        self.resources.record_link(peer, netns=peer_ns)
        with open_iproute(ns) as ipr:
            ipr.link("add", ifname=name, kind="veth", peer=peer)
            if peer_ns != ns:
                ipr.link("set", index=_index(ipr, peer), net_ns_fd=peer_ns)
        return name, peer

    def add_flannel_vxlan(self, ns: str, node: FlannelNode, link: str, *, port: int | None) -> None:
        """`node.device` in `ns` over `link`, journalled, as flanneld makes flannel.1, with the
        neighbour, FDB entry and route of each remote lease `node` knows
        (podnet.testing.kernel_flannel); `port=None` leaves out the port (the kernel's 8472)."""
        self.resources.record_link(node.device, netns=ns)
        create_flannel_device(ns, node, link, port=port)


# ---- addresses and routes ------------------------------------------------------------------------

def _index(ipr, ifname: str) -> int:
    return ipr.link_lookup(ifname=ifname)[0]


def set_up(ns: str, ifname: str) -> None:
    """`ip link set ifname up` in `ns`."""
    with open_iproute(ns) as ipr:
        ipr.link("set", index=_index(ipr, ifname), state="up")


def add_address(ns: str, ifname: str, ip: str, prefixlen: int) -> None:
    """`ip addr add ip/prefixlen dev ifname` and `ip link set ifname up` in `ns`."""
    with open_iproute(ns) as ipr:
        index = _index(ipr, ifname)
        ipr.addr("add", index=index, address=ip, prefixlen=prefixlen)
        ipr.link("set", index=index, state="up")


def add_route(ns: str, dst: str, gateway: str, ifname: str, **route_kw) -> None:
    """`ip route add dst via gateway dev ifname` in `ns`; `route_kw` are more of pyroute2's route
    attributes (`proto=RTPROT_BOOT` for what ip(8) makes, `flags=RTNH_F_ONLINK`)."""
    with open_iproute(ns) as ipr:
        ipr.route("add", dst=dst, gateway=gateway, oif=_index(ipr, ifname), **route_kw)


def link_mac(ns: str, ifname: str) -> str:
    """The MAC address of `ifname` in `ns`, as ip(8) prints it."""
    with open_iproute(ns) as ipr:
        return ipr.link("get", index=_index(ipr, ifname))[0].get_attr("IFLA_ADDRESS")


# ---- reading what a TAP hands up -----------------------------------------------------------------

def read_frames(tap: Tap, count: int, keep: Callable[[bytes], bool],
                timeout_s: float = 5.0) -> list[tuple[bytes, bytes]]:
    """Up to `count` frames that `keep` accepts, read from `tap` within `timeout_s`, each as
    (vnet header, frame); fewer if the time runs out. A read can hand up a 64 KB GSO super-frame."""
    got: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and (left := deadline - time.monotonic()) > 0:
        if not select.select([tap.fd], [], [], left)[0]:
            break
        while True:
            try:
                data = os.read(tap.fd, 70000)
            except BlockingIOError:
                break
            header, frame = data[:tap.header_len], data[tap.header_len:]
            if keep(frame):
                got.append((header, frame))
    return got
