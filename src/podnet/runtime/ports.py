"""Port I/O for the serve loop: a file-descriptor port (a TAP) and an in-memory port for tests.

Layer: runtime. A port moves whole frames between a device and the datapath. TAP ports carry a
10-byte virtio-net header beside each frame when opened with IFF_VNET_HDR; it is read into its own
buffer with readv so the frame buffer can be rewritten in place and written back with writev, no
copy in between (reference/performance.md §3-4).

Invariants: a read never blocks (the fd is non-blocking and `receive_batch` stops at EAGAIN); the
frame handed out is only valid until the next read of the same port, so the loop transmits every
action of a frame before reading the next one.
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
    read_frames: int = 0
    written_frames: int = 0
    write_errors: int = 0
    short_reads: int = 0


class FdPort:
    """A TAP file descriptor (with or without the virtio-net header)."""

    def __init__(self, fd: int, *, vnet_hdr: bool, name: str = "") -> None:
        self.fd = fd
        self.vnet_hdr = vnet_hdr
        self.name = name
        self.counters = PortCounters()
        self._vnet = bytearray(VNET_HDR_LEN)
        self._buf = bytearray(MAX_FRAME)
        self._view = memoryview(self._buf)
        # everything receive() needs per frame, decided once
        self._iov = (self._vnet, self._buf) if vnet_hdr else (self._buf,)
        self._hdr = VNET_HDR_LEN if vnet_hdr else 0
        self._vnet_out = self._vnet if vnet_hdr else None
        self._readv = os.readv
        self._writev = os.writev

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.fd)

    def receive(self):
        """One frame as (frame view, vnet header or None), or None when the queue is empty."""
        try:
            n = self._readv(self.fd, self._iov)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return None
            raise
        n -= self._hdr
        if n <= 0:
            self.counters.short_reads += 1
            return (self._view[:0], None)
        self.counters.read_frames += 1
        return (self._view[:n], self._vnet_out)

    def send(self, frame, vnet) -> None:
        try:
            if self._hdr:
                self._writev(self.fd, (vnet or ZERO_VNET, frame))
            else:
                os.write(self.fd, frame)
        except OSError:
            # a full TAP queue or a device that went away: the frame is lost, as on a real link
            self.counters.write_errors += 1
        else:
            self.counters.written_frames += 1


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
        self.counters.read_frames += 1
        return self.inbox.popleft()

    def send(self, frame, vnet) -> None:
        self.sent.append((bytes(frame), bytes(vnet) if vnet is not None else None))
        self.counters.written_frames += 1
        self._sent_event.set()

    async def wait_sent(self, count: int) -> list[tuple[bytes, bytes | None]]:
        """Wait until at least `count` frames were sent here; returns them."""
        while len(self.sent) < count:
            await self._sent_event.wait()
            self._sent_event = trio.Event()
        return self.sent[:count]
