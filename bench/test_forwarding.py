"""One TCP stream pod → pod: podnet against a raw two-TAP Python forwarder and a kernel veth pair.

Group "tcp-stream", five cases in one run (see topologies.py for the wiring):

    kernel-veth                 the kernel alone: what the machine can do
    raw-forwarder-offloads      rawfwd.py, TAPs with CSUM|TSO (64 KB super-frames)
    podnet-offloads             podnet_node.py, the same TAP offloads
    raw-forwarder-no-offloads   rawfwd.py, TUNSETOFFLOAD(0): 1514-byte frames
    podnet-no-offloads          podnet_node.py, the same

Each case sets up its topology, runs `iperf3 -c … -O 1 -t PODNET_BENCH_SECONDS -J` in the client
namespace and takes the receiver's `end.sum_received.bits_per_second`. pytest-benchmark's own time
column is only the iperf3 run's duration; the number to read is `extra_info["gbps"]`, which
the session summary (conftest.py) tabulates with podnet's share of the raw forwarder.

Nothing here asserts a speed (bench/ reports, it does not judge), but every case asserts that data
really moved and that the TAPs got the offloads the case is named after, so a broken setup cannot
report a number.

Knobs (environment): PODNET_BENCH_SECONDS (default 3), PODNET_BENCH_ROUNDS (iperf3 runs per case,
default 2; the median is reported), PODNET_BENCH_PROFILE=DIR (cProfile each podnet node into DIR).
"""

from __future__ import annotations

import os
import statistics
import time
from functools import partial

import pytest

from topologies import (cpu_times, iperf3_stream, new_token, open_resources, podnet_pair,
                        raw_tap_pair, veth_pair)

SECONDS = float(os.environ.get("PODNET_BENCH_SECONDS", "3"))
ROUNDS = int(os.environ.get("PODNET_BENCH_ROUNDS", "2"))
PROFILE_DIR = os.environ.get("PODNET_BENCH_PROFILE")


def _podnet(res, token, *, offloads: bool):
    profile = None
    if PROFILE_DIR:
        os.makedirs(PROFILE_DIR, exist_ok=True)
        profile = os.path.join(PROFILE_DIR, f"podnet-{'offloads' if offloads else 'no-offloads'}.prof")
    return podnet_pair(res, token, offloads=offloads, profile=profile)


# case -> (topology, TAP offloads expected: True, False, or None for no TAP)
CASES = {
    "kernel-veth": (veth_pair, None),
    "raw-forwarder-offloads": (partial(raw_tap_pair, offloads=True), True),
    "podnet-offloads": (partial(_podnet, offloads=True), True),
    "raw-forwarder-no-offloads": (partial(raw_tap_pair, offloads=False), False),
    "podnet-no-offloads": (partial(_podnet, offloads=False), False),
}


@pytest.mark.root
@pytest.mark.benchmark(group="tcp-stream")
@pytest.mark.parametrize("case", list(CASES))
def test_tcp_stream(benchmark, case, report, needs_root):
    topology, offloads = CASES[case]
    runs: list[dict] = []
    with open_resources() as res:
        with topology(res, new_token()) as pair:
            def stream() -> None:
                (user0, sys0), t0 = cpu_times(pair.forwarder_pid), time.monotonic()
                result = iperf3_stream(pair, SECONDS)
                (user1, sys1), wall = cpu_times(pair.forwarder_pid), time.monotonic() - t0
                received = result["end"]["sum_received"]
                runs.append({"gbps": received["bits_per_second"] / 1e9, "bytes": received["bytes"],
                             "retransmits": result["end"]["sum_sent"].get("retransmits", 0),
                             "user_s": user1 - user0, "sys_s": sys1 - sys0, "wall_s": wall})

            benchmark.pedantic(stream, rounds=ROUNDS, iterations=1, warmup_rounds=0)
        info = pair.info  # what the forwarder reported when it stopped

    assert runs and all(r["bytes"] > 0 for r in runs), f"iperf3 moved no data: {runs}"
    if offloads is not None:
        assert bool(info.get("tap_offloads")) is offloads, f"TAP offloads {info.get('tap_offloads')}, expected {offloads}"
    extra = {
        "gbps": statistics.median(r["gbps"] for r in runs),
        "gbps_runs": [round(r["gbps"], 3) for r in runs],
        "bytes": sum(r["bytes"] for r in runs),
        "retransmits": sum(r["retransmits"] for r in runs),
        "seconds": SECONDS,
    }
    if pair.forwarder_pid is not None:
        frames = info.get("frames")
        assert frames, f"the forwarder reported no frames: {info}"
        user, system = sum(r["user_s"] for r in runs), sum(r["sys_s"] for r in runs)
        extra.update({
            # CPU of the forwarder process while iperf3 ran, and per frame it moved (both directions;
            # the frames of set-up and teardown are few enough to ignore)
            "forwarder_cpu": (user + system) / sum(r["wall_s"] for r in runs),
            "forwarder_frames": frames,
            "user_us_per_frame": user / frames * 1e6,
            "sys_us_per_frame": system / frames * 1e6,
            "tap_offloads": info.get("tap_offloads"),
        })
        for key in ("write_errors", "fast_path_packets", "slow_path_packets", "dropped", "drops"):
            if key in info:
                extra[key] = info[key]
    benchmark.extra_info.update(extra)
    report.seconds = SECONDS
    report.streams[case] = extra
