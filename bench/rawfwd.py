"""The raw yardstick: a blind two-TAP forwarder, the least work a Python TAP dataplane can do.

Layer: bench (a process of its own, started by `topologies.raw_tap_pair`). It inherits two TAP
file descriptors opened with IFF_VNET_HDR, waits on both with epoll, and for every frame does
exactly this: `readv` the 10-byte virtio-net header and the frame into preallocated buffers,
overwrite the Ethernet destination with the other pod's MAC (so that pod's kernel accepts the
frame), `writev` header and frame to the other TAP. No parsing, no TTL, no flow table, no
checksum: whatever podnet does beyond this is podnet's cost. This is the forwarder of
reference/performance.md §4, with the vnet header passed through unchanged.

It runs until SIGTERM, then prints one JSON line with its frame counters to stdout. A "ready"
JSON line is printed once the loop is about to start.

    python bench/rawfwd.py --fd-a 5 --mac-a 02:..:0a --fd-b 6 --mac-b 02:..:0b
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys

VNET_HDR_LEN = 10
MAX_FRAME = 65550  # a 64 KiB GSO super-frame plus its Ethernet header


class _Stop(Exception):
    pass


def _stop(signum, frame) -> None:
    raise _Stop


def forward(fd_a: int, mac_a: bytes, fd_b: int, mac_b: bytes, counters: dict[str, int]) -> None:
    """Move frames between the two TAPs until SIGTERM: A's frames go to B, B's to A."""
    hdr = bytearray(VNET_HDR_LEN)
    buf = bytearray(MAX_FRAME)
    view = memoryview(buf)
    # where a frame read from fd goes, and the destination MAC it gets on the way
    route = {fd_a: (fd_b, mac_b), fd_b: (fd_a, mac_a)}
    readv, writev = os.readv, os.writev
    epoll = select.epoll()
    for fd in route:
        epoll.register(fd, select.EPOLLIN)
    frames = dropped = 0
    try:
        while True:
            for fd, _events in epoll.poll():
                out, mac = route[fd]
                while True:
                    try:
                        n = readv(fd, (hdr, buf)) - VNET_HDR_LEN
                    except BlockingIOError:
                        break
                    buf[0:6] = mac
                    try:
                        writev(out, (hdr, view[:n]))
                    except OSError:
                        dropped += 1  # a full TAP queue: lost, as on a real link
                    frames += 1
    finally:
        counters["frames"] = frames
        counters["write_errors"] = dropped
        epoll.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fd-a", type=int, required=True)
    parser.add_argument("--mac-a", required=True, help="the MAC of the pod behind fd A")
    parser.add_argument("--fd-b", type=int, required=True)
    parser.add_argument("--mac-b", required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    counters: dict[str, int] = {}
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    try:
        forward(args.fd_a, bytes.fromhex(args.mac_a.replace(":", "")),
                args.fd_b, bytes.fromhex(args.mac_b.replace(":", "")), counters)
    except _Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the report short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(json.dumps(counters), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
