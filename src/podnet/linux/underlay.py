"""The underlay between nodes on one machine: a namespace with a Linux bridge (linux layer, root only).

Job: what the machines' network is in a real cluster. `create_underlay` makes a netns
`<prefix>underlay` holding a bridge `br0`; each node's uplink is a TAP opened inside that netns
(`open_uplink`) and enslaved to the bridge, so the bridge switches the nodes' frames between their
TAPs, whose other ends the node processes hold. A node's underlay address and MAC belong to its
datapath (core/internode answers ARP for it): nothing in the namespace has an IP address, and
nothing leaves it - the machine's own interfaces never see pod or node traffic.

    node-1 datapath ══fd══ TAP ─┐
    node-2 datapath ══fd══ TAP ─┼─ br0          (netns <prefix>underlay)
    node-3 datapath ══fd══ TAP ─┘   └─ veth ── a kernel node, the cluster's external client

`capture_underlay` records every frame the bridge sees with an AF_PACKET socket into a pcap file
(tshark reads it; `-d udp.port==4789,vxlan` decodes the overlay).

Invariants:
- The netns is journalled before it exists; the bridge and the TAPs inside it need no entry: they
  go with the netns, and a TAP also with its fd.
- A TAP's fd keeps working whatever happens to other nodes: a node process that dies takes its
  TAP (and so its bridge port) with it, and the others' ports are untouched.
- IPv6 is off in the namespace: no router solicitations or MLD reports on the underlay.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass

from podnet.linux import names
from podnet.linux.netns import delete_netns, netns_exists, open_iproute, run_in_netns
from podnet.linux.resources import Entry, Resources
from podnet.linux.tap import Tap, open_tap

BRIDGE = "br0"
UNDERLAY_SUFFIX = "underlay"
_ETH_P_ALL = 0x0003
_SOL_PACKET, _PACKET_ADD_MEMBERSHIP, _PACKET_MR_PROMISC = 263, 1, 1   # linux/if_packet.h


@dataclass(frozen=True)
class Underlay:
    """The shared segment: its netns and bridge."""

    netns: str
    bridge: str = BRIDGE


def underlay_netns(prefix: str = names.DEFAULT_PREFIX) -> str:
    return names.netns_name(UNDERLAY_SUFFIX, prefix)


def create_underlay(resources: Resources, netns: str | None = None) -> tuple[Underlay, Entry]:
    """Make the underlay namespace and its bridge (blocking netlink work). On failure nothing stays."""
    netns = netns or underlay_netns(resources.prefix)
    entry = resources.create_netns(netns, ipv6=False)
    try:
        with open_iproute(netns) as ipr:
            ipr.link("add", ifname=BRIDGE, kind="bridge", br_stp_state=0, br_forward_delay=0)
            index = ipr.link_lookup(ifname=BRIDGE)[0]
            ipr.link("set", index=index, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    except BaseException:
        delete_netns(netns)
        resources.forget(entry)
        raise
    return Underlay(netns), entry


def remove_underlay(resources: Resources, underlay: Underlay, entry: Entry) -> None:
    delete_netns(underlay.netns)
    resources.forget(entry)


def attach_underlay(netns: str) -> Underlay:
    """The underlay another process made (a node joining a cluster); LookupError if it is not there."""
    if not netns_exists(netns):
        raise LookupError(f"underlay netns {netns!r} does not exist (`podnet up` makes it)")
    return Underlay(netns)


def open_uplink(underlay: Underlay, key: str, *, prefix: str = names.DEFAULT_PREFIX, vnet_hdr: bool = True,
                offloads: bool = True, mtu: int = 1500, udp_tunnel_gso: bool = False) -> Tap:
    """A TAP inside the underlay, enslaved to its bridge and up: a node's uplink. `key` names it
    (a stable `<prefix>t<hash>` name, e.g. for "uplink:node-2"). `udp_tunnel_gso`: ask for GSO over
    UDP tunnels (linux/tap.py; kept only if the kernel has it)."""
    name = names.tap_name(key, prefix)
    tap = run_in_netns(underlay.netns, open_tap, name, vnet_hdr=vnet_hdr, offloads=offloads, mtu=mtu,
                       udp_tunnel_gso=udp_tunnel_gso)
    try:
        with open_iproute(underlay.netns) as ipr:
            index = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=index, master=ipr.link_lookup(ifname=underlay.bridge)[0])
            ipr.link("set", index=index, state="up")
    except BaseException:
        tap.close()
        raise
    return tap


def add_veth_host(underlay: Underlay, resources: Resources, netns: str, *, ifname: str = "eth0") -> Entry:
    """A namespace `netns` (made here, journalled) with a veth `ifname` into the underlay bridge,
    up and without an address: the caller gives it one (a kernel node, an external client)."""
    entry = resources.create_netns(netns, ipv6=False)
    try:
        peer = names.link_name(netns, kind=names.KIND_VETH, prefix=resources.prefix)
        with open_iproute(netns) as ipr:
            ipr.link("add", ifname=ifname, kind="veth", peer=peer)
            ipr.link("set", index=ipr.link_lookup(ifname=peer)[0], net_ns_fd=underlay.netns)
            for name in (ifname, "lo"):
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        with open_iproute(underlay.netns) as ipr:
            index = ipr.link_lookup(ifname=peer)[0]
            ipr.link("set", index=index, master=ipr.link_lookup(ifname=underlay.bridge)[0])
            ipr.link("set", index=index, state="up")
    except BaseException:
        delete_netns(netns)
        resources.forget(entry)
        raise
    return entry


@dataclass(frozen=True)
class ExternalHost:
    """A host outside the cluster on the underlay segment (`add_external_host`)."""

    netns: str
    ip: str
    mac: str


def add_external_host(underlay: Underlay, resources: Resources, netns: str, ip: str, prefixlen: int,
                      mac: str) -> tuple[ExternalHost, Entry]:
    """A client outside the cluster on the underlay segment (`add_veth_host`, then `ip link set eth0
    address MAC` and `ip addr add IP/PREFIXLEN dev eth0`): it reaches the nodes' addresses and the
    LoadBalancer IPs a node answers ARP for on-link, and has no route into the pod network, as a
    host on the nodes' L2 segment has none. On failure nothing stays."""
    entry = add_veth_host(underlay, resources, netns)
    try:
        with open_iproute(netns) as ipr:
            index = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=index, address=mac)
            ipr.addr("add", index=index, address=ip, prefixlen=prefixlen)
    except BaseException:
        remove_external_host(resources, ExternalHost(netns, ip, mac), entry)
        raise
    return ExternalHost(netns, ip, mac), entry


def remove_external_host(resources: Resources, host: ExternalHost, entry: Entry) -> None:
    delete_netns(host.netns)   # its veth goes with it, and so does the peer in the bridge
    resources.forget(entry)


class UnderlayCapture:
    """Every frame the underlay's bridge sees, written to a pcap file (Ethernet link type) until
    `stop()`. Outgoing and incoming copies of a frame on the bridge are one frame: the socket is
    bound to the bridge device only, which sees each frame once."""

    def __init__(self, underlay: Underlay, path: str, *, snaplen: int = 65535) -> None:
        self.path = path
        self.frames = 0
        self._stop = threading.Event()
        self._sock = run_in_netns(underlay.netns, self._open, underlay.bridge)
        self._file = open(path, "wb")
        # pcap global header: magic, v2.4, GMT offset 0, accuracy 0, snaplen, LINKTYPE_ETHERNET
        self._file.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, 1))
        self._snaplen = snaplen
        self._thread = threading.Thread(target=self._run, name="underlay-capture", daemon=True)
        self._thread.start()

    @staticmethod
    def _open(ifname: str) -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        sock.bind((ifname, 0))
        # a bridge passes frames between its ports without its own device seeing them, unless the
        # device is promiscuous (br_handle_frame_finish then also delivers a copy locally)
        index = socket.if_nametoindex(ifname)
        sock.setsockopt(_SOL_PACKET, _PACKET_ADD_MEMBERSHIP, struct.pack("iHH8s", index, _PACKET_MR_PROMISC, 0, b""))
        sock.settimeout(0.1)
        return sock

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self._sock.recv(1 << 18)   # GSO super-frames pass a bridge whole
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            now = time.time()
            seconds = int(now)
            kept = frame[:self._snaplen]
            self._file.write(struct.pack("<IIII", seconds, int((now - seconds) * 1e6), len(kept), len(frame)))
            self._file.write(kept)
            self.frames += 1

    def stop(self) -> int:
        """Stop capturing; the number of frames written."""
        self._stop.set()
        self._thread.join()
        self._sock.close()
        self._file.close()
        return self.frames

    def __enter__(self) -> UnderlayCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            self.stop()


__all__ = ["BRIDGE", "ExternalHost", "Underlay", "UnderlayCapture", "add_external_host", "add_veth_host",
           "attach_underlay", "create_underlay", "open_uplink", "remove_external_host", "remove_underlay",
           "underlay_netns"]
