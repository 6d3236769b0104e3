"""bench/report.py, the writer behind `make bench`'s bench/results/<timestamp>/: fed a small hand-made
Report, it writes results.json with the keys bench/README.md documents, report.md with the seed's
tables, and real PNG plots, and points `latest` at the run. No root, no benchmark, well under a second
of work besides importing matplotlib."""

from __future__ import annotations

import importlib.util
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

BENCH_REPORT = Path(__file__).resolve().parent.parent / "bench" / "report.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def writer():
    """bench/report.py loaded under its own name (bench/ is no package, and `report` is too common a name)."""
    spec = importlib.util.spec_from_file_location("podnet_bench_report", BENCH_REPORT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    # report.py renders with its siblings report_md.py and report_plots.py, which import `report`
    sys.path.insert(0, str(BENCH_REPORT.parent))
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        for name in ("report", "report_md", "report_plots"):
            sys.modules.pop(name, None)
        sys.path.remove(str(BENCH_REPORT.parent))


def small_report(writer):
    report = writer.Report(seconds=3, profile="quick")
    for backend, slope in (("iptables", 0.2), ("ipvs", 0.0), ("ebpf", 0.0)):
        for n in (100, 1000):
            report.services[(backend, n)] = {
                "decide_first_us": 10.0, "decide_last_us": 10 + slope * n, "decide_random_us": 10 + slope * n / 2,
                "decide_miss_us": 12 + slope * n, "cost_miss": n + 11, "initial_sync_ms": n * 0.5,
                "rules_total": n * 17, "full_sync_ms": n * 0.4, "partial_sync_ms": n * 0.05 + 1,
                "written_full": n * 17, "written_partial": n + 25}
            report.memory[(backend, n)] = n * 4096
    report.per_frame_ns.update({"fast-path[tcp-1514]": 1856.0, "frame-reset[tcp-1514]": 84.0,
                                "slow-path[tcp-1514]": 13731.0, "parse_ipv4[tcp-1514]": 1208.0})
    report.streams["kernel-veth"] = {"gbps": 23.77, "retransmits": 5}
    report.streams["podnet-offloads"] = {"gbps": 17.23, "retransmits": 0, "forwarder_cpu": 0.77,
                                         "forwarder_frames": 426438, "user_us_per_frame": 5.86,
                                         "sys_us_per_frame": 8.51}
    for backend, slope in (("iptables", 0.001), ("ipvs", 0.0), ("ebpf", 0.0)):
        for n in (100, 1000):
            p50 = 0.3 + slope * n
            report.dataplane[(backend, n)] = {"connects_per_s": 1000 / p50, "connects": 200, "failed": 0,
                                              "first_packet_ms": {"p50": p50, "p90": p50 * 1.5, "p99": p50 * 3,
                                                                  "mean": p50 * 1.2}}
        report.throughput[(backend, "tcp-offloads")] = {"gbps": 12.5}
        report.throughput[(backend, "tcp-no-offloads")] = {"gbps": 1.1}
        report.throughput[(backend, "udp64-offloads")] = {"pps": 61000.0}
        report.throughput[(backend, "udp64-no-offloads")] = {"pps": 59000.0}
        report.churn[(backend, "prestop")] = {"replicas": 100, "attempted": 3000, "failed": 0,
                                              "probe_ms": {"p50": 0.4, "p99": 2.0, "max": 9.0}, "max_gap_ms": 12.0}
        report.churn[(backend, "no-prestop")] = {"replicas": 100, "attempted": 3000,
                                                 "failures": {"refused": 7, "reset": 2, "timeout": 0},
                                                 "probe_ms": {"p50": 0.4, "p99": 2.0, "max": 9.0}, "max_gap_ms": 15.0}
    report.socket_lb["off"] = {"gbps": 10.0, "connects_per_s": 2000.0}
    report.socket_lb["on"] = {"gbps": 10.2, "connects_per_s": 2100.0}
    return report


# the keys bench/README.md ("The written report") promises
DOCUMENTED = {"schema", "written_utc", "machine", "commit", "profile", "service_sizes", "decision_us",
              "decision_us_by_case", "update_ms", "rules_total", "first_packet_ms", "connects_per_s",
              "throughput_gbps", "throughput", "socket_lb", "churn", "streams",
              "memory_kib_per_service", "fastpath_ns", "kernel", "published", "not_measured"}


def test_writes_results_report_and_plots(writer, tmp_path):
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    path = writer.write_run(small_report(writer), tmp_path, written=when,
                            machine={"cpu": "Test CPU", "cores": 2, "kernel": "6.1.0-test", "python": "3.11.2"},
                            commit={"sha": "0" * 40, "short": "0" * 12, "dirty": True})
    run = tmp_path / "20250102T030405Z"
    assert path == run / "report.md"
    assert (tmp_path / "latest").is_symlink() and (tmp_path / "latest").resolve() == run.resolve()

    data = json.loads((run / "results.json").read_text())
    assert set(data) == DOCUMENTED == set(writer.RESULT_KEYS)
    assert data["profile"] == "quick" and data["commit"]["dirty"] is True
    assert set(data["machine"]) >= {"cpu", "cores", "kernel", "python"}
    assert data["decision_us"]["iptables"] == {"100": 20.0, "1000": 110.0}
    assert data["update_ms"]["ipvs"]["full"]["1000"] == 400.0
    assert data["update_ms"]["iptables"]["partial"]["100"] == 6.0
    assert data["memory_kib_per_service"]["ebpf"]["100"] == 4.0
    assert data["throughput_gbps"] == {"iptables": 12.5, "ipvs": 12.5, "ebpf": 12.5}
    assert data["throughput"]["ipvs"]["udp64-no-offloads"] == {"pps": 59000.0}
    assert data["streams"]["podnet-offloads"]["gbps"] == 17.23
    assert data["fastpath_ns"]["tcp-1514"]["fast-path-net"] == 1772.0
    assert data["first_packet_ms"]["iptables"]["1000"] == {"p50": 1.3, "p90": 1.95, "p99": 3.9, "mean": 1.56}
    assert data["connects_per_s"]["ipvs"]["100"] == 3333.3
    assert data["churn"]["ebpf"]["no-prestop"]["failures"]["refused"] == 7
    assert data["socket_lb"]["on"]["gbps"] == 10.2
    assert data["kernel"] == {} and set(data["not_measured"]) == {"kernel"}
    assert data["published"]["iptables_first_packet_ms"]["30000"]["p50"] == 0.272

    md = path.read_text()
    assert "Test CPU" in md and "0" * 40 in md and "quick" in md
    assert "| Service count | iptables update | IPVS update | eBPF update |" in md
    assert "| Service count | iptables (µs) | IPVS (µs) | eBPF (µs) | **published** kernel iptables" in md
    assert "| 1,000 | 51.0 / 400.0 |" in md     # partial / full
    assert "| 1,000 | 17,000 | 17,000 | 17,000 |" in md   # objects held after the sync
    assert "| 30,000 | — | — | — | 272 / 714 |" in md
    assert "| podnet-offloads | 17.23 | 77% |" in md
    assert "| 1,000 | 1.300 / 1.950 / 3.900 | 0.300 / 0.450 / 0.900 | 0.300 / 0.450 / 0.900 | — | — |" in md
    assert "- iptables: p50 0.400 ms at 100 Services, 1.300 ms at 1,000 (3.2×)" in md
    assert "| podnet IPVS | 12.50 | 1.10 | 61.0 | 59.0 |" in md
    assert "| iptables | no-prestop | 100 | 3,000 | 9 (refused 7, reset 2) | 0.4 / 2.0 / 9.0 | 15.0 |" in md
    assert "| on | — | 2,100 | — | 10.20 | — |" in md
    assert "How to read" in md and "## Not measured in this run" in md
    for png in writer.PLOTS.values():
        assert f"]({png})" in md
        assert (run / png).read_bytes()[:8] == PNG_MAGIC


def test_second_run_moves_latest_and_empty_sections_are_said(writer, tmp_path):
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    machine, commit = {"cpu": "x", "cores": 1, "kernel": "k", "python": "p"}, {"sha": None, "dirty": None}
    writer.write_run(small_report(writer), tmp_path, written=when, machine=machine, commit=commit)
    only_fastpath = writer.Report(per_frame_ns={"fast-path[udp-64]": 1500.0})
    path = writer.write_run(only_fastpath, tmp_path, written=when, machine=machine, commit=commit)
    assert path.parent.name == "20250102T030405Z-2" and (tmp_path / "latest").resolve() == path.parent.resolve()
    md = path.read_text()
    assert "Not run in this session" in md and not (path.parent / "throughput.png").exists()
    assert "New connections through TAPs" not in md and "Churn" not in md
    assert json.loads((path.parent / "results.json").read_text())["decision_us"] == {}


def test_kernel_anchor_goes_into_results_and_report(writer, tmp_path):
    report = small_report(writer)
    report.kernel[1000] = {"restore_s": 0.25, "restore_legacy_s": 0.1, "rules": 17000, "iptables": "iptables-restore v1.8.9 (nf_tables)",
                           "first_packet_ms": {"p50": 0.05, "p90": 0.08, "p99": 0.2, "mean": 0.06}}
    machine, commit = {"cpu": "x", "cores": 1, "kernel": "k", "python": "p"}, {"sha": None, "dirty": None}
    path = writer.write_report(report, tmp_path, machine=machine, commit=commit)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["kernel"]["restore_s"] == {"1000": 0.25} and data["kernel"]["rules"] == {"1000": 17000}
    assert data["kernel"]["first_packet_ms"]["1000"] == {"p50": 0.05, "p90": 0.08, "p99": 0.2, "mean": 0.06}
    assert data["kernel"]["ipvs"] == "not available on these machines"
    assert "kernel" not in data["not_measured"]
    md = path.read_text()
    assert "## The kernel as the anchor" in md and "| 1,000 | 17,000 | 0.250 | 0.100 | 400.0 | 0.050 / 0.080 / 0.200 |" in md
    assert "not an end-to-end latency" in md and "not available on these machines" in md
