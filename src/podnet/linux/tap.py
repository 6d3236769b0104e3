"""TAP devices: podnet's end of a pod's eth0 (linux layer, root only).

Job: open a TAP (`IFF_TAP | IFF_NO_PI`, with `IFF_VNET_HDR` by default), make its fd non-blocking,
and ask the kernel for the largest set of offloads it accepts.

With `IFF_VNET_HDR` every read and write starts with a 10-byte `struct virtio_net_hdr`
(include/uapi/linux/virtio_net.h, little-endian):

    off size field        meaning
    0   u8   flags        1 NEEDS_CSUM: the L4 checksum is unfinished (CHECKSUM_PARTIAL)
    1   u8   gso_type     0 NONE, 1 TCPV4, 4 TCPV6, 5 UDP_L4; 0x80 ECN
    2   le16 hdr_len      Ethernet + IP + L4 header bytes (not reliable; recompute)
    4   le16 gso_size     MSS of each segment of a super-frame
    6   le16 csum_start   where checksumming starts, counted from the Ethernet header
    8   le16 csum_offset  where the checksum field lies after csum_start (TCP 16, UDP 6)

GSO over UDP tunnels (`udp_tunnel_gso=True`, Linux 6.18+): with TUN_F_UDP_TUNNEL_GSO and a vnet
header of 24 bytes (TUNSETVNETHDRSZ) every read and write starts with a `struct
virtio_net_hdr_v1_hash_tunnel` instead (core/gso.py `TunnelVnetHeader`): the 10 bytes above, then
num_buffers(2), hash_value(4), hash_report(2), padding(2), outer_th_offset(2), inner_nh_offset(2).
A whole VXLAN super-frame (gso_type = inner type | 0x20) then crosses the TAP in one write or read;
`Tap.vnet_hdr_len` says which header size the device uses.

Why offloads matter: `TUNSETOFFLOAD` says what the kernel may hand *up* to us. With TUN_F_CSUM it
skips the L4 checksum (NEEDS_CSUM, the field holds the pseudo-header sum), and with TSO4/TSO6 it
hands up TCP super-frames of up to 64 KB instead of MTU-sized segments: one read per 40-odd
segments, which is what lets a Python datapath move TCP at useful speed. With `TUNSETOFFLOAD(0)`
and a vnet header the kernel hands up fully checksummed MTU-size frames with an all-zero header.
Writes may carry GSO/NEEDS_CSUM whatever this setting is. See reference/performance.md §3.

Invariants:
- The device is not persistent: it disappears when its fd is closed, or with the netns it was
  moved into (the fd then fails with EBADFD).
- `IFF_TUN_EXCL`: opening never attaches to an existing device of the same name.
- Offloads are only requested with a vnet header; without one the kernel could hand up frames with
  unfinished checksums and no way to say so.
- An unknown offload bit makes the kernel return EINVAL, so offloads are probed from the largest
  set down, and `Tap.offloads` records the set the kernel accepted.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass, field

import pytun

# include/uapi/linux/if_tun.h
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
TUN_F_UDP_TUNNEL_GSO = 0x080        # Linux 6.18: GSO over UDP tunnels (needs TSO4/TSO6/USO too)
TUN_F_UDP_TUNNEL_GSO_CSUM = 0x100   # ... with the outer UDP checksum (podnet sends 0: not asked)
TUNSETVNETHDRSZ = 0x400454D8        # _IOW('T', 216, int)

IFF_TAP = pytun.IFF_TAP
IFF_NO_PI = pytun.IFF_NO_PI
IFF_VNET_HDR = pytun.IFF_VNET_HDR
IFF_TUN_EXCL = pytun.IFF_TUN_EXCL

VIRTIO_NET_HDR_LEN = 10
VIRTIO_NET_HDR_TUNNEL_LEN = 24      # struct virtio_net_hdr_v1_hash_tunnel

# Tried in order; TSO only counts together with CSUM (drivers/net/tun.c set_offload()).
OFFLOAD_PROBE_ORDER = (
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
    TUN_F_CSUM | TUN_F_TSO4,
    TUN_F_CSUM,
    0,
)


@dataclass
class Tap:
    """An open TAP device.

    `name` is the name it was created with in the root netns (`plumb_pod` later renames it eth0
    inside the pod's netns). `mac` is the device's own address: once plumbed, the pod's eth0 MAC.
    `fd` is non-blocking; each read/write is one frame, after a vnet header when `vnet_hdr`.
    """

    name: str
    fd: int
    vnet_hdr: bool
    offloads: int
    mac: str
    vnet_hdr_len: int = VIRTIO_NET_HDR_LEN   # 24 when UDP tunnel GSO was negotiated
    _device: pytun.TunTapDevice | None = field(default=None, repr=False, compare=False)

    @property
    def header_len(self) -> int:
        """Bytes of vnet header before each frame (0 without IFF_VNET_HDR)."""
        return self.vnet_hdr_len if self.vnet_hdr else 0

    @property
    def udp_tunnel_gso(self) -> bool:
        """Whether whole VXLAN super-frames cross this TAP (TUN_F_UDP_TUNNEL_GSO, 24-byte header)."""
        return bool(self.offloads & TUN_F_UDP_TUNNEL_GSO)

    @property
    def closed(self) -> bool:
        return self._device is None

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Close the fd (the kernel removes the device if it still exists). Idempotent."""
        device, self._device = self._device, None
        if device is not None:
            device.close()

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def set_offload(fd: int, flags: int) -> None:
    """TUNSETOFFLOAD(flags) on a TAP fd; OSError(EINVAL) for a set the kernel does not know."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def probe_offloads(fd: int, candidates: tuple[int, ...] = OFFLOAD_PROBE_ORDER) -> int:
    """Set the first offload set in `candidates` the kernel accepts, and return it."""
    for flags in candidates:
        try:
            set_offload(fd, flags)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            continue
        return flags
    raise OSError(errno.EINVAL, f"TUNSETOFFLOAD refused every candidate {candidates}")


def enable_udp_tunnel_gso(fd: int, accepted: int) -> bool:
    """Add TUN_F_UDP_TUNNEL_GSO to the offloads `accepted` and switch the vnet header to 24 bytes.
    False, and the device as it was, when the kernel knows neither (before 6.18: EINVAL)."""
    if not accepted & (TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6):
        return False   # set_offload takes the tunnel bit only beside TSO/USO
    try:
        set_offload(fd, accepted | TUN_F_UDP_TUNNEL_GSO)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    try:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VIRTIO_NET_HDR_TUNNEL_LEN))
    except OSError:
        set_offload(fd, accepted)
        raise
    return True


def open_tap(name: str, *, vnet_hdr: bool = True, offloads: bool = True, mtu: int = 1500,
             udp_tunnel_gso: bool = False) -> Tap:
    """Create TAP `name` in the caller's netns and return it with its fd non-blocking.

    `offloads=True` asks for CSUM|TSO4|TSO6 and falls back (CSUM|TSO4, CSUM, 0) on EINVAL;
    `offloads=False`, or no vnet header, sets TUNSETOFFLOAD(0). `udp_tunnel_gso=True` (with
    offloads) also asks for TUN_F_UDP_TUNNEL_GSO and a 24-byte vnet header, kept only when the
    kernel accepts both (`Tap.udp_tunnel_gso`, `Tap.vnet_hdr_len`).
    """
    flags = IFF_TAP | IFF_NO_PI | IFF_TUN_EXCL | (IFF_VNET_HDR if vnet_hdr else 0)
    device = pytun.TunTapDevice(name=name, flags=flags)
    try:
        fd = device.fileno()
        if offloads and vnet_hdr:
            accepted = probe_offloads(fd)
            if udp_tunnel_gso and enable_udp_tunnel_gso(fd, accepted):
                accepted |= TUN_F_UDP_TUNNEL_GSO
        else:
            set_offload(fd, 0)
            accepted = 0
        device.mtu = mtu
        os.set_blocking(fd, False)
        mac = device.hwaddr.hex(":")
        return Tap(
            name=device.name,
            fd=fd,
            vnet_hdr=vnet_hdr,
            offloads=accepted,
            mac=mac,
            vnet_hdr_len=VIRTIO_NET_HDR_TUNNEL_LEN if accepted & TUN_F_UDP_TUNNEL_GSO else VIRTIO_NET_HDR_LEN,
            _device=device,
        )
    except BaseException:
        device.close()
        raise
