"""Benchmark session rules: the TCP-stream cases need root, and the session ends with one comparison table
(and, with PODNET_BENCH_REPORT=1 as `make bench` sets it, a written report under bench/results/).

Tests record what they measured in `report` (a `Report` kept in the pytest config's stash, so
there is no module-level state); `pytest_terminal_summary` prints it after pytest-benchmark's own
tables: each stream's Gbit/s, podnet's share of the raw forwarder's throughput with offloads on and
off, the datapath's per-frame costs net of the frame reset the benchmarks need, and per Service
backend what deciding a NEW connection and syncing one endpoint change cost as Services grow, with
a least-squares line through the decide-miss times and the published kernel iptables numbers beside.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest

# bench/report.py: the Report and the writer of bench/results/ (bench/ is on sys.path, as for topologies)
from report import PUBLISHED_IPTABLES_MS, Report, bench_profile, write_run

# podnet's target from the issue: at least this share of the raw two-TAP forwarder's throughput
TARGET_SHARE = 0.70
IS_ROOT = os.geteuid() == 0 and os.path.exists("/dev/net/tun")

REPORT = pytest.StashKey[Report]()

# `make bench` sets this: write bench/results/<UTC timestamp>/ (report.md, results.json, plots) at the end
WRITE_REPORT = os.environ.get("PODNET_BENCH_REPORT") == "1"
RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def pytest_configure(config) -> None:
    profile, _ = bench_profile()
    config.stash[REPORT] = Report(profile=profile)


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
    same = report.streams.get("same-node")
    if same and same["gbps"]:   # bench/test_multinode.py: the same three-node cluster, one run
        parts = [f"{case.split('-', 1)[1]} {report.streams[case]['gbps'] / same['gbps']:.0%}"
                 for case in ("crossnode-direct", "crossnode-vxlan") if case in report.streams]
        lines.append(f"  cross-node / same-node in one cluster: {', '.join(parts)}")
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


# Published kernel numbers, not measured here: kube-proxy iptables mode, first-packet latency p50 in ms
# by number of Services (kubernetes.io/blog/2025/02/28/nftables-kube-proxy/, read off the chart;
# /work/shared/reference/performance.md section 1a).
KERNEL_IPTABLES_P50_MS = {n: v["p50"] for n, v in PUBLISHED_IPTABLES_MS.items()}
LINEAR_R2 = 0.99   # a least-squares line through the sizes explains at least this much: "linear"


def _fit(points: list[tuple[float, float]]) -> tuple[float, float, float] | None:
    """Least-squares line y = a + b x: (a, b, R²); None with fewer than two distinct x."""
    n = len(points)
    if n < 2:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for _, y in points)
    ss_res = sum((y - a - b * x) ** 2 for x, y in points)
    r2 = 1.0 - ss_res / ss_tot if ss_tot else math.nan
    return a, b, r2


def _linear(r2: float) -> str:
    if math.isnan(r2):
        return "flat (the same at every size)"
    return "linear" if r2 >= LINEAR_R2 else "NOT linear"


def _cell(value, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def _service_lines(report: Report) -> list[str]:
    backends = sorted({backend for backend, _ in report.services})
    lines = ["Services: deciding the first packet of a NEW connection (median us per decide; ClusterIP",
             "Services with 5 endpoints each; 'rules' is Decision.cost, the backend's unit of work)", ""]
    for backend in backends:
        rows = sorted((n, row) for (b, n), row in report.services.items() if b == backend)
        lines.append(f"  {backend}")
        lines.append(f"    {'Services':>8}{'decide first':>14}{'decide last':>13}{'decide random':>15}"
                     f"{'decide miss (us)':>18}{'rules examined (miss)':>23}{'us/rule (miss)':>16}")
        for n, row in rows:
            miss, cost = row.get("decide_miss_us"), row.get("cost_miss")
            per_rule = miss / cost if miss is not None and cost else None
            lines.append(f"    {n:>8,}{_cell(row.get('decide_first_us'), ',.1f', 14)}"
                         f"{_cell(row.get('decide_last_us'), ',.1f', 13)}"
                         f"{_cell(row.get('decide_random_us'), ',.1f', 15)}"
                         f"{_cell(miss, ',.1f', 18)}{_cell(cost, ',', 23)}{_cell(per_rule, '.3f', 16)}")
        points = [(n, row["decide_miss_us"]) for n, row in rows if "decide_miss_us" in row]
        fit = _fit(points)
        if fit is not None:
            a, b, r2 = fit
            lines.append(f"    decide miss against Services, least-squares line over {len(points)} sizes "
                         f"(linear: R² >= {LINEAR_R2})")
            lines.append(f"      time : {b * 1000:>9,.1f} us per 1,000 Services (intercept {a:,.1f} us), "
                         f"R² = {r2:.4f}: {_linear(r2)}")
            rule_fit = _fit([(n, row["cost_miss"]) for n, row in rows if "cost_miss" in row])
            if rule_fit is not None:
                lines.append(f"      rules: {rule_fit[1] * 1000:>9,.1f} per 1,000 Services "
                             f"(intercept {rule_fit[0]:,.1f}), R² = {rule_fit[2]:.4f}: {_linear(rule_fit[2])}")
            if backend == "iptables":
                fitted = ", ".join(f"{n:,}: {(a + b * n) / 1000:.3f} ms" for n in KERNEL_IPTABLES_P50_MS)
                lines.append(f"      the time line at {fitted}")
        lines.append("")
    lines += ["  Published numbers for the KERNEL, not measured here: kube-proxy iptables mode, first-packet",
              "  latency p50 (kubernetes.io nftables blog 2025, performance.md 1a; an end-to-end reply time,",
              "  not only the rule walk): " + ", ".join(f"{n:,} Services ~{ms:.3f} ms"
                                                        for n, ms in KERNEL_IPTABLES_P50_MS.items()), ""]

    lines += ["Services: one endpoint change, the sync's wall time (the datapath waits for it; mean ms)", ""]
    for backend in backends:
        rows = sorted((n, row) for (b, n), row in report.services.items() if b == backend)
        lines.append(f"  {backend}")
        lines.append(f"    {'Services':>8}{'initial sync (ms)':>19}{'full sync (ms)':>16}{'partial sync (ms)':>19}"
                     f"{'rules written partial':>23}{'rules written full':>20}{'rules total':>13}"
                     f"{'payload partial':>17}")
        for n, row in rows:
            lines.append(f"    {n:>8,}{_cell(row.get('initial_sync_ms'), ',.1f', 19)}"
                         f"{_cell(row.get('full_sync_ms'), ',.1f', 16)}{_cell(row.get('partial_sync_ms'), ',.1f', 19)}"
                         f"{_cell(row.get('written_partial'), ',', 23)}{_cell(row.get('written_full'), ',', 20)}"
                         f"{_cell(row.get('rules_total'), ',', 13)}{_cell(row.get('payload_partial'), ',', 17)}")
        lines.append("")
    sizes = sorted({n for _, n in report.services})
    if 50000 not in sizes:
        lines.append(f"  (sizes measured: {', '.join(f'{n:,}' for n in sizes)}; "
                     "set PODNET_BENCH_SERVICE_SIZES to choose, e.g. 100,1000,10000,50000)")
    return lines


def _kernel_lines(report: Report) -> list[str]:
    """bench/test_kernel.py: the same kube-proxy rules in the real kernel, beside podnet's iptables backend."""
    version = next((row["iptables"] for row in report.kernel.values() if "iptables" in row), "iptables")
    lines = [f"the kernel as the anchor: the same kube-proxy rules loaded with iptables-restore ({version}); "
             "kernel IPVS is not available on these machines",
             f"  {'Services':>8}  {'rules':>9}  {'kernel restore (s)':>18}  {'legacy restore (s)':>18}  {'podnet full sync (ms)':>21}  "
             f"{'kernel first packet p50/p90/p99 (ms)':>36}  {'podnet decide (us)':>18}"]
    for n, row in sorted(report.kernel.items()):
        podnet = report.services.get(("iptables", n), {})
        fp = row.get("first_packet_ms")
        lines.append(f"  {n:>8,}  {_cell(row.get('rules'), ',.0f', 9)}  {_cell(row.get('restore_s'), ',.3f', 18)}  "
                     f"{_cell(row.get('restore_legacy_s'), ',.3f', 18)}  "
                     f"{_cell(podnet.get('full_sync_ms'), ',.1f', 21)}  "
                     + (f"{fp['p50']:>12.3f}{fp['p90']:>12.3f}{fp['p99']:>12.3f}" if fp else f"{'-':>36}")
                     + f"  {_cell(podnet.get('decide_random_us'), ',.2f', 18)}")
    lines.append("  first packet = connect() time (SYN -> SYN/ACK) to the last Service in KUBE-SERVICES, through a "
                 "router netns (rules loaded with iptables-legacy-restore when installed);\n  podnet's decide us is only the backend's decision, not an end-to-end latency")
    return lines


def _q(values: dict | None) -> str:
    return "/".join(f"{values[k]:.3f}" for k in ("p50", "p90", "p99") if k in values) if values else "-"


def _dataplane_lines(report: Report) -> list[str]:
    """bench/test_dataplane.py and bench/test_churn.py: real traffic through TAPs, per backend."""
    lines: list[str] = []
    if report.dataplane:
        lines += ["", "new connections through TAPs to the last Service (connect() ms p50/p90/p99; connects/s)",
                  f"  {'backend':<10}{'Services':>9}  {'first packet ms':>22}  {'connects/s':>10}  {'failed':>6}"]
        for (backend, n), row in sorted(report.dataplane.items()):
            cps = row.get("connects_per_s")
            lines.append(f"  {backend:<10}{n:>9,}  {_q(row.get('first_packet_ms')):>22}  "
                         f"{(f'{cps:,.0f}' if cps is not None else '-'):>10}  {row.get('failed', '-'):>6}")
    if report.throughput:
        lines += ["", "established flows through a Service (TCP Gbit/s, 64-byte UDP received packets/s)"]
        for (backend, case), row in sorted(report.throughput.items()):
            value = f"{row['gbps']:.2f} Gbit/s" if "gbps" in row else f"{row.get('pps', 0):,.0f} pps"
            lines.append(f"  {backend:<10}{case:<20}{value:>16}")
    if report.socket_lb:
        lines += ["", "same-node Service traffic, eBPF socket-LB analogue"]
        for state, row in sorted(report.socket_lb.items()):
            cells = ", ".join(f"{k} {v:,.3f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in sorted(row.items()) if isinstance(v, (int, float)))
            lines.append(f"  socket-LB {state:<4} {cells}")
    if report.churn:
        lines += ["", "churn: rolling update of a Deployment (failed new connections; probe every 10 ms)"]
        for (backend, variant), row in sorted(report.churn.items()):
            cells = ", ".join(f"{k} {v}" for k, v in sorted(row.items()) if not isinstance(v, (list, tuple)))
            lines.append(f"  {backend:<10}{variant:<12} {cells}")
    return lines


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    report = config.stash.get(REPORT, None)
    if report is None or report.empty():
        return
    terminalreporter.section("podnet benchmark summary")
    if report.streams:
        for line in _stream_lines(report):
            terminalreporter.write_line(line)
        terminalreporter.write_line("")
    if report.per_frame_ns:
        for line in _frame_lines(report):
            terminalreporter.write_line(line)
    if report.services:
        if report.per_frame_ns:
            terminalreporter.write_line("")
        for line in _service_lines(report):
            terminalreporter.write_line(line)
    if report.memory:
        terminalreporter.write_line("")
        terminalreporter.write_line("memory a synced backend holds (tracemalloc, Python heap), per Service with 5 endpoints")
        sizes = sorted({n for _, n in report.memory})
        terminalreporter.write_line(f"  {'backend':<10}" + "".join(f"{n:>14,} svc" for n in sizes))
        for backend in sorted({b for b, _ in report.memory}):
            cells = [report.memory.get((backend, n)) for n in sizes]
            terminalreporter.write_line(f"  {backend:<10}" + "".join(
                f"{(c / n / 1024):>12.1f} KiB" if c is not None else f"{'-':>16}" for c, n in zip(cells, sizes)))
    if report.kernel:
        terminalreporter.write_line("")
        for line in _kernel_lines(report):
            terminalreporter.write_line(line)
    for line in _dataplane_lines(report):
        terminalreporter.write_line(line)
    if WRITE_REPORT:
        path = write_run(report, RESULTS_ROOT)
        terminalreporter.write_line("")
        terminalreporter.write_line(f"report written: {path}  (also {RESULTS_ROOT / 'latest' / 'report.md'})")
