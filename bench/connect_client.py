"""New TCP connections to one address, timed: the client of the first-packet benchmarks.

Layer: bench. Started inside a client namespace (`topologies.connect_burst`, with
`popen_in_netns`), by test_dataplane.py through podnet and by test_kernel.py through the kernel's
rules, so both are measured by the same program. Prints one JSON line and exits.

Two phases, one after the other:

    latency   `--count` connections, one at a time. Each is a blocking connect() with a 5 s timeout,
              timed with perf_counter around the call alone: SYN out, the SYN/ACK back (the
              first packet's full round trip through the Service's NAT), nothing else. Then
              close() with SO_LINGER 0, which sends an RST, so neither side keeps TIME_WAIT and
              the source ports never run out. `--warmup` untimed connections first (ARP, caches).
    rate      for `--seconds`, `--concurrency` connections in flight at all times (non-blocking
              connect, epoll): each one that completes is closed the same way and replaced at once.
              connects_per_s = completed / elapsed. A connect pending for more than 3 s counts as
              failed; those still pending at the end are left out (counted as `abandoned`).

    python bench/connect_client.py 10.96.0.10 80 --count 200 --seconds 3 --concurrency 4
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import socket
import struct
import sys
import time

LINGER_RST = struct.pack("ii", 1, 0)
RATE_TIMEOUT_S = 3.0


def _socket(blocking: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    s.setblocking(blocking)
    return s


def latency(ip: str, port: int, count: int) -> tuple[list[float], dict[str, int], float]:
    times, errors = [], {}
    started = time.perf_counter()
    for _ in range(count):
        s = _socket(True)
        s.settimeout(5.0)
        try:
            t0 = time.perf_counter()
            s.connect((ip, port))
            times.append(time.perf_counter() - t0)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
        finally:
            s.close()
    return times, errors, time.perf_counter() - started


def rate(ip: str, port: int, seconds: float, concurrency: int) -> dict:
    ep = select.epoll()
    pending: dict[int, tuple[socket.socket, float]] = {}
    done = failed = 0
    errors: dict[str, int] = {}

    def start() -> None:
        s = _socket(False)
        code = s.connect_ex((ip, port))
        if code not in (0, errno.EINPROGRESS):
            errors[errno.errorcode.get(code, str(code))] = errors.get(errno.errorcode.get(code, str(code)), 0) + 1
            s.close()
            return
        pending[s.fileno()] = (s, time.perf_counter())
        ep.register(s.fileno(), select.EPOLLOUT)

    started = time.perf_counter()
    end = started + seconds
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        while len(pending) < concurrency:
            before = len(pending)
            start()
            if len(pending) == before:   # the connect failed at once: count it, do not spin
                failed += 1
                break
        for fd, _ in ep.poll(min(0.1, end - now)):
            s, _t0 = pending.pop(fd)
            ep.unregister(fd)
            code = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code == 0:
                done += 1
            else:
                failed += 1
                name = errno.errorcode.get(code, str(code))
                errors[name] = errors.get(name, 0) + 1
            s.close()
        now = time.perf_counter()
        for fd, (s, t0) in list(pending.items()):
            if now - t0 > RATE_TIMEOUT_S:
                pending.pop(fd)
                ep.unregister(fd)
                s.close()
                failed += 1
                errors["timeout"] = errors.get("timeout", 0) + 1
    elapsed = time.perf_counter() - started
    abandoned = len(pending)
    for s, _ in pending.values():
        s.close()
    ep.close()
    return {"connects": done, "failed": failed, "abandoned": abandoned, "seconds": elapsed,
            "concurrency": concurrency, "connects_per_s": done / elapsed if elapsed else 0.0, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ip")
    parser.add_argument("port", type=int)
    parser.add_argument("--count", type=int, default=200, help="timed connections, one at a time")
    parser.add_argument("--warmup", type=int, default=5, help="untimed connections first")
    parser.add_argument("--seconds", type=float, default=0.0, help="length of the rate phase (0: none)")
    parser.add_argument("--concurrency", type=int, default=4, help="connections in flight in the rate phase")
    args = parser.parse_args(argv)
    latency(args.ip, args.port, args.warmup)
    times, errors, wall = latency(args.ip, args.port, args.count)
    out = {"times_s": times, "failed": sum(errors.values()), "errors": errors, "wall_s": wall,
           "pid": os.getpid()}
    if args.seconds > 0:
        out["rate"] = rate(args.ip, args.port, args.seconds, args.concurrency)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
