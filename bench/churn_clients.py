"""The churn benchmark's two clients, run inside the client pod's netns by `test_churn.py`.

    probe HOST PORT INTERVAL_MS   a UDP datagram every INTERVAL_MS on a fixed schedule (a late slot is
                                  sent at once, missed ones are not bunched up), to an echo server;
                                  each answer's round trip is timed
    load HOST PORT RATE           new TCP connections at RATE per second, opened on a fixed schedule
                                  whatever the earlier ones are doing (open loop), each sending one
                                  line and reading the answer (the serving pod's name); 2 s to
                                  connect and 2 s to answer

Both run until their stdin closes, then print one JSON line and exit: time stamps are
time.monotonic() (CLOCK_MONOTONIC, the same clock in every process), so the caller can cut out the
window it measured.

    probe → {"interval_ms", "samples": [[sent_at, rtt_ms or null], ...], "arrivals": [t, ...],
             "max_send_lag_ms"}
    load  → {"rate", "results": [[started_at, kind, pod name or null], ...]}   kind: ok, refused,
             reset, timeout, unreachable, closed (the connection ended with no answer) or an errno name
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import select
import socket
import struct
import sys
import time

WAIT_FOR_LATE_S = 1.0   # after stdin closes, how long late probe answers are still taken


def probe(host: str, port: int, interval_ms: float) -> dict:
    interval = interval_ms / 1000
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    sock.setblocking(False)
    stdin = sys.stdin.fileno()
    sent: list[float] = []
    rtt: dict[int, float] = {}
    arrivals: list[float] = []
    max_lag = 0.0
    next_send = time.monotonic()
    stop_at = None
    watch = [sock, stdin]
    while True:
        now = time.monotonic()
        if stop_at is not None and now >= stop_at:
            break
        wake = stop_at if stop_at is not None else next_send
        readable, _, _ = select.select(watch, [], [], max(0.0, wake - now))
        now = time.monotonic()
        if stdin in readable and not os.read(stdin, 4096):
            watch.remove(stdin)
            stop_at = now + WAIT_FOR_LATE_S
        if sock in readable:
            while True:
                try:
                    data = sock.recv(64)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                seq = struct.unpack("!I", data[:4])[0]
                if seq < len(sent) and seq not in rtt:
                    rtt[seq] = now - sent[seq]
                    arrivals.append(now)
        if stop_at is None and now >= next_send:
            max_lag = max(max_lag, now - next_send)
            try:
                sock.send(struct.pack("!I", len(sent)))
            except OSError:
                pass        # e.g. an ICMP error reported on the socket: the probe is lost
            sent.append(now)
            next_send += interval
            if next_send < now:          # we were late by more than a slot: do not bunch up
                next_send = now + interval
    return {"interval_ms": interval_ms, "max_send_lag_ms": round(max_lag * 1000, 3), "arrivals": arrivals,
            "samples": [[t, round(rtt[i] * 1000, 4) if i in rtt else None] for i, t in enumerate(sent)]}


async def _one(host: str, port: int, results: list) -> None:
    started = time.monotonic()
    name = None
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
        writer.write(b"hi\n")
        data = await asyncio.wait_for(reader.read(128), 2.0)
        name = data.decode().strip() or None
        kind = "ok" if name else "closed"
    except ConnectionRefusedError:
        kind = "refused"
    except (ConnectionResetError, BrokenPipeError):
        kind = "reset"
    except (asyncio.TimeoutError, TimeoutError):
        kind = "timeout"
    except OSError as exc:
        kind = ("unreachable" if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
                else errno.errorcode.get(exc.errno, "other"))
    finally:
        if writer is not None:
            writer.close()
    results.append([started, kind, name])


async def load(host: str, port: int, rate: float) -> dict:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            loop.remove_reader(sys.stdin.fileno())
            stopped.set()
    loop.add_reader(sys.stdin.fileno(), on_stdin)
    results: list = []
    tasks: set[asyncio.Task] = set()
    start = time.monotonic()
    i = 0
    while not stopped.is_set():
        task = asyncio.ensure_future(_one(host, port, results))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stopped.wait(), delay)
            except asyncio.TimeoutError:
                pass
    if tasks:
        await asyncio.wait(tasks, timeout=5)
    return {"rate": rate, "results": sorted(results)}


def main(argv: list[str]) -> int:
    mode, host, port, value = argv[0], argv[1], int(argv[2]), float(argv[3])
    out = probe(host, port, value) if mode == "probe" else asyncio.run(load(host, port, value))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
