"""Port I/O for the serve loop: a file-descriptor port (a TAP) and an in-memory port for tests.

Layer: runtime. A port moves whole frames between a device and the datapath. TAP ports carry a
virtio-net header beside each frame when opened with IFF_VNET_HDR (10 bytes; 24 on an uplink with
UDP tunnel GSO, linux/tap.py); it is read into its own
buffer with readv so the frame buffer can be rewritten in place and written back with writev, no
copy in between (reference/performance.md §3-4).

Invariants: a read never blocks (the fd is non-blocking and `receive_batch` stops at EAGAIN); the
frame handed out is only valid until the next read of the same port, so the loop transmits every
action of a frame before reading the next one. A header of another length than the port's (a
frame from a 24-byte uplink to a 10-byte pod TAP, or back) is cut or zero-padded to the port's:
the first 10 bytes mean the same in both, the tunnel fields are zero unless the gso_type says so.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from dataclasses import dataclass

import trio

VNET_HDR_LEN = 10
ZERO_VNET = bytes(VNET_HDR_LEN)
MAX_FRAME = 65550  # a 64 KiB GSO super-frame plus its Ethernet header


@dataclass
class PortCounters:
    write_errors: int = 0
    short_reads: int = 0


class FdPort:
    """A TAP file descriptor (with or without the virtio-net header).

    `receive` and `send` are closures made once per port, over the fd, the buffers and os.readv /
    os.writev: they run once per frame, and attribute lookups there cost as much as the work.
    Frames moved are counted by the datapath (per port, rx and tx); the port counts what only it
    can see: reads that came back short and writes the kernel refused.
    """

    def __init__(self, fd: int, *, vnet_hdr: bool, name: str = "", vnet_hdr_len: int = VNET_HDR_LEN) -> None:
        self.fd = fd
        self.vnet_hdr = vnet_hdr
        self.vnet_hdr_len = vnet_hdr_len if vnet_hdr else 0
        self.name = name
        self.counters = PortCounters()
        self.receive, self.send = _fd_io(fd, vnet_hdr, self.counters, vnet_hdr_len)

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.fd)


def _fd_io(fd: int, vnet_hdr: bool, counters: PortCounters, vnet_hdr_len: int = VNET_HDR_LEN):
    vnet = bytearray(vnet_hdr_len)
    buf = bytearray(MAX_FRAME)
    view = memoryview(buf)
    iov = (vnet, buf) if vnet_hdr else (buf,)
    hdr = vnet_hdr_len if vnet_hdr else 0
    zero = bytes(hdr)
    vnet_out = vnet if vnet_hdr else None
    readv, writev, write = os.readv, os.writev, os.write

    def receive():
        """One frame as (frame view, vnet header or None), or None when the queue is empty."""
        try:
            n = readv(fd, iov) - hdr
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return None
            raise
        if n <= 0:
            counters.short_reads += 1
            return (view[:0], None)
        return (view[:n], vnet_out)

    def send(frame, vnet) -> None:
        try:
            if hdr:
                if not vnet:
                    vnet = zero
                elif len(vnet) != hdr:   # another port's header size: cut or zero-pad
                    vnet = bytes(vnet[:hdr]).ljust(hdr, b"\x00")
                writev(fd, (vnet, frame))
            else:
                write(fd, frame)
        except OSError:
            # a full TAP queue or a device that went away: the frame is lost, as on a real link
            counters.write_errors += 1

    return receive, send


class MemoryPort:
    """An in-memory port: tests push frames in with `inject` and read what the datapath sent."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.counters = PortCounters()
        self.inbox: deque[tuple[bytearray, bytes | None]] = deque()
        self.sent: list[tuple[bytes, bytes | None]] = []
        self._wakeup = trio.Event()
        self._sent_event = trio.Event()

    def inject(self, frame, vnet: bytes | None = None) -> None:
        self.inbox.append((bytearray(frame), vnet))
        self._wakeup.set()

    async def wait_readable(self) -> None:
        while not self.inbox:
            await self._wakeup.wait()
            self._wakeup = trio.Event()

    def receive(self):
        if not self.inbox:
            return None
        return self.inbox.popleft()

    def send(self, frame, vnet) -> None:
        self.sent.append((bytes(frame), bytes(vnet) if vnet is not None else None))
        self._sent_event.set()

    async def wait_sent(self, count: int) -> list[tuple[bytes, bytes | None]]:
        """Wait until at least `count` frames were sent here; returns them."""
        while len(self.sent) < count:
            await self._sent_event.wait()
            self._sent_event = trio.Event()
        return self.sent[:count]
