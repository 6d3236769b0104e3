"""What one frame costs in core: `Datapath.process` on an established flow, on a new flow, and parsing.

Group "fastpath", no I/O, no root. Two frames from pod A to pod B, both valid IPv4 with TTL 64:
a 1514-byte TCP segment (an MTU-sized data frame) and a 64-byte UDP datagram (the smallest
Ethernet frame). Each is held the way `FdPort.receive` hands it to the datapath: a memoryview of a
receive buffer, with a 10-byte virtio-net header beside it.

    fast-path[K]    process() on a flow already in the flow cache: the per-frame cost of an
                    established connection. process() rewrites the frame in place (TTL - 1,
                    header checksum, both MACs), so each call first restores the first 26 bytes
                    from a pristine copy; otherwise the next call would see a frame addressed to
                    pod B, not to the gateway, and take the slow path.
    frame-reset[K]  that restore alone, to subtract: fast-path minus frame-reset is the cost of
                    the process() call itself (the session summary prints it as "net").
    slow-path[K]    process() on a flow not in the cache: the full stage pipeline plus installing
                    the flow (the first packet of a connection). Before each call `handle_timer`
                    runs 100 s later on the clock, which expires the flow the previous call
                    installed (idle timeout 30 s), and the frame is restored outside the timing.
    parse_ipv4[K]   podnet's fixed-offset IPv4 parse and validation (the slow path's parser).
    dpkt-parse[K]   dpkt.ethernet.Ethernet(frame), the full decode podnet avoids on the hot path.

Each test asserts the datapath did what is being timed (a Transmit to pod B on the expected
path), so a change that sends these frames elsewhere cannot make the numbers look good.
"""

from __future__ import annotations

import itertools

import dpkt
import pytest

from podnet.core.datapath import Datapath, PortKind, Transmit
from podnet.core.packet import IPv4Info, parse_ipv4
from podnet.testing import frames

A_IP, B_IP = "10.244.0.2", "10.244.0.3"
# every byte process() may rewrite on a forwarded frame lies in [0, 26): MACs, TTL, header checksum
REWRITTEN = 26
VNET = bytearray(10)  # TUNSETOFFLOAD(0): an all-zero virtio-net header
FRAMES = {
    "tcp-1514": frames.tcp(A_IP, B_IP, 40000, 5201, payload=bytes(1460)),
    "udp-64": frames.udp(A_IP, B_IP, 40000, 5201, payload=bytes(22)),
}
MAX_FRAME = 65550

pytestmark = pytest.mark.benchmark(group="fastpath")


def _datapath() -> tuple[Datapath, int, int]:
    dp = Datapath()
    a = dp.add_port("pod-a", PortKind.POD, frames.POD_MAC_A, A_IP)
    b = dp.add_port("pod-b", PortKind.POD, frames.POD_MAC_B, B_IP)
    return dp, a, b


def _establish(dp: Datapath, a: int, b: int, kind: str) -> int:
    """Make the flow what an established connection's flow is in conntrack (ASSURED): a TCP
    handshake, or a UDP exchange that lasts past the 2 s after which conntrack calls it a stream.
    Returns how many frames that took."""
    if kind.startswith("tcp"):
        dp.process(frames.tcp(A_IP, B_IP, 40000, 5201, flags=dpkt.tcp.TH_SYN), a, 0.0)
        dp.process(frames.tcp(B_IP, A_IP, 5201, 40000, flags=dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK,
                              src_mac=frames.POD_MAC_B), b, 0.1)
    else:
        dp.process(frames.udp(A_IP, B_IP, 40000, 5201), a, 0.0)
        dp.process(frames.udp(B_IP, A_IP, 5201, 40000, src_mac=frames.POD_MAC_B), b, 0.1)
    return 2


def _received(kind: str) -> memoryview:
    """The frame as FdPort.receive hands it out: a view of the first n bytes of its receive buffer."""
    frame = FRAMES[kind]
    buf = bytearray(MAX_FRAME)
    buf[:len(frame)] = frame
    return memoryview(buf)[:len(frame)]


def _record(report, benchmark, name: str) -> None:
    report.per_frame_ns[name] = benchmark.stats.stats.mean * 1e9


@pytest.mark.parametrize("kind", list(FRAMES))
def test_fast_path(benchmark, report, kind):
    dp, a, b = _datapath()
    frame, pristine = _received(kind), bytes(FRAMES[kind][:REWRITTEN])
    assert len(frame) == int(kind.split("-")[1])  # the size the name promises
    process = dp.process
    setup = _establish(dp, a, b, kind)
    process(frame, a, 3.0, VNET)  # completes the handshake (or makes the UDP flow a stream): ASSURED

    def forward_one():
        frame[0:REWRITTEN] = pristine
        return process(frame, a, 4.0, VNET)

    actions = benchmark(forward_one)
    assert [(type(x), x.port) for x in actions] == [(Transmit, b)]
    stats = dp.statistics()
    assert stats.slow_path_packets == setup and stats.fast_path_packets >= 1 and stats.dropped == 0
    assert frames.decode(frame).data.ttl == 63
    _record(report, benchmark, f"fast-path[{kind}]")


@pytest.mark.parametrize("kind", list(FRAMES))
def test_frame_reset(benchmark, report, kind):
    frame, pristine = _received(kind), bytes(FRAMES[kind][:REWRITTEN])

    def reset_only():
        frame[0:REWRITTEN] = pristine

    benchmark(reset_only)
    _record(report, benchmark, f"frame-reset[{kind}]")


@pytest.mark.parametrize("kind", list(FRAMES))
def test_slow_path(benchmark, report, kind):
    dp, a, b = _datapath()
    frame, pristine = _received(kind), bytes(FRAMES[kind][:REWRITTEN])
    clock = itertools.count(100.0, 100.0)  # far past the 30 s idle timeout at every step

    def new_flow():
        now = next(clock)
        dp.handle_timer(now)  # expires the flow the previous call installed
        frame[0:REWRITTEN] = pristine
        return (frame, a, now, VNET), {}

    rounds = 2000
    actions = benchmark.pedantic(dp.process, setup=new_flow, rounds=rounds, warmup_rounds=100)
    assert [(type(x), x.port) for x in actions] == [(Transmit, b)]
    stats = dp.statistics()
    assert stats.fast_path_packets == 0 and stats.slow_path_packets == stats.flows_installed == rounds + 100
    _record(report, benchmark, f"slow-path[{kind}]")


@pytest.mark.parametrize("kind", list(FRAMES))
def test_parse_ipv4(benchmark, report, kind):
    frame = _received(kind)
    info = benchmark(parse_ipv4, frame)
    assert isinstance(info, IPv4Info) and info.dport == 5201
    _record(report, benchmark, f"parse_ipv4[{kind}]")


@pytest.mark.parametrize("kind", list(FRAMES))
def test_dpkt_parse(benchmark, report, kind):
    raw = bytes(FRAMES[kind])
    eth = benchmark(dpkt.ethernet.Ethernet, raw)
    assert eth.data.data.dport == 5201
    _record(report, benchmark, f"dpkt-parse[{kind}]")
