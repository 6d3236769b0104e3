"""Benchmark session rules: the TCP-stream cases need root, and the session ends with one comparison table.

Tests record what they measured in `report` (a `Report` kept in the pytest config's stash, so
there is no module-level state); `pytest_terminal_summary` prints it after pytest-benchmark's own
tables: each stream's Gbit/s, podnet's share of the raw forwarder's throughput with offloads on and
off, and the datapath's per-frame costs net of the frame reset the benchmarks need.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import pytest

# podnet's target from the issue: at least this share of the raw two-TAP forwarder's throughput
TARGET_SHARE = 0.70
IS_ROOT = os.geteuid() == 0 and os.path.exists("/dev/net/tun")


@dataclass
class Report:
    """What the session measured, for the summary table."""

    seconds: float = 0.0
    streams: dict[str, dict] = field(default_factory=dict)       # case -> extra_info of its benchmark
    per_frame_ns: dict[str, float] = field(default_factory=dict)  # benchmark name -> mean ns per call


REPORT = pytest.StashKey[Report]()


def pytest_configure(config) -> None:
    config.stash[REPORT] = Report()


@pytest.fixture
def report(request) -> Report:
    return request.config.stash[REPORT]


@pytest.fixture
def needs_root() -> None:
    """Skip unless root with /dev/net/tun and iperf3; PODNET_REQUIRE_ROOT_TESTS=1 makes it an error."""
    missing = []
    if not IS_ROOT:
        missing.append("root and /dev/net/tun")
    if shutil.which("iperf3") is None:
        missing.append("iperf3")
    if missing:
        message = f"needs {', '.join(missing)}"
        if os.environ.get("PODNET_REQUIRE_ROOT_TESTS") == "1":
            pytest.fail(message + " (PODNET_REQUIRE_ROOT_TESTS=1)")
        pytest.skip(message)


def _share(report: Report, podnet: str, raw: str) -> str:
    p, r = report.streams.get(podnet), report.streams.get(raw)
    if not p or not r or not r["gbps"]:
        return "n/a"
    share = p["gbps"] / r["gbps"]
    verdict = "meets" if share >= TARGET_SHARE else "BELOW"
    text = f"{share:5.0%}  ({verdict} the {TARGET_SHARE:.0%} target)"
    if "user_us_per_frame" in p and "user_us_per_frame" in r:
        text += (f"; podnet's extra CPU per frame: user {p['user_us_per_frame'] - r['user_us_per_frame']:+.2f} us,"
                 f" sys {p['sys_us_per_frame'] - r['sys_us_per_frame']:+.2f} us")
    return text


def _stream_lines(report: Report) -> list[str]:
    lines = [f"one TCP stream pod A -> pod B (iperf3, {report.seconds:g} s after 1 s of slow start; "
             "median of the runs)", "",
             f"  {'case':<28}{'Gbit/s':>8}{'fwd CPU':>9}{'frames':>10}{'user us/fr':>12}{'sys us/fr':>11}"
             f"{'retrans':>9}"]
    for case, info in report.streams.items():
        if "forwarder_frames" in info:
            fwd = (f"{info['forwarder_cpu']:>9.0%}{info['forwarder_frames']:>10}"
                   f"{info['user_us_per_frame']:>12.2f}{info['sys_us_per_frame']:>11.2f}")
        else:
            fwd = f"{'-':>9}{'-':>10}{'-':>12}{'-':>11}"
        lines.append(f"  {case:<28}{info['gbps']:>8.2f}{fwd}{info.get('retransmits', 0):>9}")
    lines += ["", "  podnet / raw forwarder",
              f"    offloads on : {_share(report, 'podnet-offloads', 'raw-forwarder-offloads')}",
              f"    offloads off: {_share(report, 'podnet-no-offloads', 'raw-forwarder-no-offloads')}"]
    veth = report.streams.get("kernel-veth")
    if veth and veth["gbps"]:
        parts = [f"{case} {info['gbps'] / veth['gbps']:.0%}" for case, info in report.streams.items()
                 if case != "kernel-veth"]
        lines.append(f"  of kernel veth: {', '.join(parts)}")
    return lines


def _frame_lines(report: Report) -> list[str]:
    ns = report.per_frame_ns
    lines = ["Datapath.process per frame, no I/O (mean ns; 'net' subtracts the per-frame reset of",
             "TTL, checksum and MACs the fast-path benchmark does before each call)", ""]
    for kind in ("tcp-1514", "udp-64"):
        fast, reset = ns.get(f"fast-path[{kind}]"), ns.get(f"frame-reset[{kind}]")
        if fast is not None:
            net = f"net {fast - reset:,.0f}" if reset is not None else ""
            lines.append(f"  {kind:<9} fast path   {fast:>8,.0f}  {net}")
        for name in ("slow-path", "parse_ipv4", "dpkt-parse"):
            if (value := ns.get(f"{name}[{kind}]")) is not None:
                lines.append(f"  {kind:<9} {name:<11} {value:>8,.0f}")
    return lines


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    report = config.stash.get(REPORT, None)
    if report is None or not (report.streams or report.per_frame_ns):
        return
    terminalreporter.section("podnet benchmark summary")
    if report.streams:
        for line in _stream_lines(report):
            terminalreporter.write_line(line)
        terminalreporter.write_line("")
    if report.per_frame_ns:
        for line in _frame_lines(report):
            terminalreporter.write_line(line)
