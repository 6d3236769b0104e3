"""The benchmark session's record (`Report`) and the files `make bench` writes from it.

`write_run(report, root)` makes `root/<UTC timestamp>/` with `results.json`, `report.md` and PNG
plots, and points `root/latest` at it; `write_report(report, out_dir)` writes the files into a
directory you give it (tests/test_bench_report.py calls it with a hand-made Report). The schema
of results.json is documented in bench/README.md ("The written report"). Only numbers from the
`Report` of this one run go in, beside the published kernel numbers of performance.md §1a,
which are labelled as published everywhere they appear.

This module imports no podnet code and no pytest, so it can be loaded on its own.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = Path(__file__).resolve().parent / "results"
FULL_SIZES = (100, 1000, 10000, 50000)   # the Service counts of the issue: the full profile
QUICK_SIZES = (100, 1000, 10000)          # the quick profile, `make bench`'s default (under 10 minutes on 2 cores)
SCHEMA_VERSION = 2   # 2: per-backend first_packet_ms / throughput_gbps, connects_per_s, throughput, socket_lb, churn
# the keys results.json always has (bench/README.md documents each)
RESULT_KEYS = ("schema", "written_utc", "machine", "commit", "profile", "service_sizes", "decision_us",
               "decision_us_by_case", "update_ms", "rules_total", "first_packet_ms", "connects_per_s",
               "throughput_gbps", "throughput", "socket_lb", "churn", "streams", "memory_kib_per_service",
               "fastpath_ns", "kernel", "published", "not_measured")
PLOTS = {"decision": "decision.png", "update": "update.png", "first_packet": "first_packet.png",
         "throughput": "throughput.png", "churn": "churn.png"}
BACKEND_TITLES = {"iptables": "iptables", "ipvs": "IPVS", "ebpf": "eBPF"}


@dataclass
class Report:
    """What the session measured, for the summary table and the written report."""

    seconds: float = 0.0
    streams: dict[str, dict] = field(default_factory=dict)       # case -> extra_info of its benchmark
    per_frame_ns: dict[str, float] = field(default_factory=dict)  # benchmark name -> mean ns per call
    # (backend, number of Services) -> decide_<case>_us, cost_<case>, <mode>_sync_ms, written_<mode>, ...
    services: dict[tuple[str, int], dict] = field(default_factory=dict)
    memory: dict[tuple[str, int], int] = field(default_factory=dict)   # (backend, Services) -> bytes held
    profile: str = "quick"   # "quick", "full" or "custom" (see bench_profile)
    # number of Services -> {"restore_s", "rules", "iptables", "first_packet_ms": {"p50", "p90", "p99", ...}}
    # from bench/test_kernel.py: the same rule sets loaded into the real kernel
    kernel: dict[int, dict] = field(default_factory=dict)
    # (backend, number of Services) -> {"connects_per_s", "first_packet_ms": {"p50", "p90", "p99", "mean"},
    # "connects", "failed", ...}: new TCP connections from a client pod to a Service through TAPs
    # (bench/test_dataplane.py)
    dataplane: dict[tuple[str, int], dict] = field(default_factory=dict)
    # (backend, case) -> extra_info: established-flow throughput through a Service, e.g.
    # ("iptables", "tcp-offloads") -> {"gbps", ...}, ("ipvs", "udp64-no-offloads") -> {"pps", ...}
    throughput: dict[tuple[str, str], dict] = field(default_factory=dict)
    # "on" / "off" -> the eBPF backend's socket-LB analogue for same-node Service traffic
    socket_lb: dict[str, dict] = field(default_factory=dict)
    # (backend, "prestop" | "no-prestop") -> a rolling update of a 100-replica Deployment
    # (bench/test_churn.py): probe stall, failed connections, ...
    churn: dict[tuple[str, str], dict] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.streams or self.per_frame_ns or self.services or self.memory or self.kernel
                    or self.dataplane or self.throughput or self.socket_lb or self.churn)


def profile_of(sizes) -> str:
    return "full" if set(FULL_SIZES) <= set(sizes) else "quick"


def bench_profile(environ=os.environ) -> tuple[str, tuple[int, ...]]:
    """The run's profile and Service counts: `quick` (QUICK_SIZES) unless PODNET_BENCH_FULL=1
    (`make bench FULL=1`: FULL_SIZES, and the kernel group's slow sizes); PODNET_BENCH_SERVICE_SIZES,
    comma-separated, overrides the sizes of either (the profile is then `custom`, or `full` if they
    cover FULL_SIZES)."""
    full = environ.get("PODNET_BENCH_FULL") == "1"
    given = environ.get("PODNET_BENCH_SERVICE_SIZES", "").strip()
    if given:
        try:
            sizes = tuple(sorted({int(n) for n in given.split(",") if n.strip()}))
        except ValueError:
            raise ValueError(f"PODNET_BENCH_SERVICE_SIZES={given!r}: expected comma-separated integers") from None
        if not sizes or min(sizes) < 1:
            raise ValueError(f"PODNET_BENCH_SERVICE_SIZES={given!r}: expected positive integers")
        return ("full" if set(FULL_SIZES) <= set(sizes) else "custom"), sizes
    return ("full", FULL_SIZES) if full else ("quick", QUICK_SIZES)


# Published kernel numbers, NOT measured here: kube-proxy iptables mode, latency of the reply to the
# first packet of a connection, in ms, by number of Services (kubernetes.io/blog/2025/02/28/
# nftables-kube-proxy/, read off the chart; /work/shared/reference/performance.md section 1a).
PUBLISHED_IPTABLES_MS = {
    5000: {"p01": 0.015, "p50": 0.047, "p90": 0.120, "p99": 0.152},
    10000: {"p01": 0.011, "p50": 0.062, "p90": 0.189, "p99": 0.257},
    30000: {"p01": 0.040, "p50": 0.272, "p90": 0.493, "p99": 0.714},
}
PUBLISHED = {
    "label": "published, not measured here",
    "source": "kubernetes.io/blog/2025/02/28/nftables-kube-proxy/ (chart read off its SVG); "
              "reference/performance.md section 1a",
    "what": "real kernel, kube-proxy iptables mode: latency of the reply to the first packet of a "
            "connection (end to end, not only the rule walk), ms, by number of Services",
    "iptables_first_packet_ms": {str(n): v for n, v in PUBLISHED_IPTABLES_MS.items()},
    "nftables_ipvs": "flat in the number of Services; nftables p99 at 30,000 Services is below "
                     "iptables p01 (~0.040 ms); IPVS about the same as nftables",
}
# results.json key -> why it is empty, for each group that did not run in this session
NOT_MEASURED = {
    "first_packet_ms": "the dataplane group (bench/test_dataplane.py: new connections through TAPs to a "
                       "Service, per backend) did not run: it needs root, /dev/net/tun",
    "throughput": "the dataplane throughput group (one TCP stream and 64-byte UDP through a Service, per "
                  "backend) did not run: it needs root, /dev/net/tun and iperf3",
    "socket_lb": "the socket-lb group (eBPF socket-LB analogue on and off) did not run",
    "churn": "the churn group (bench/test_churn.py: rolling update of a Deployment) did not run",
    "kernel": "the kernel group (bench/test_kernel.py: the same rules in the real kernel) did not run; "
              "kernel IPVS is not available on these machines",
}


# --- what the run was --------------------------------------------------------------------------------

def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "os": platform.system(),
            "python": platform.python_version(), "hostname": platform.node()}


def commit_info(repo: Path = REPO) -> dict:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": head, "short": head[:12] if head else None,
            "dirty": None if status is None else bool(status)}


# --- results.json ------------------------------------------------------------------------------------

def _by_backend(pairs: dict[tuple[str, int], float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for (backend, n), value in sorted(pairs.items()):
        out.setdefault(backend, {})[str(n)] = value
    return out


def results(report: Report, machine: dict, commit: dict, written: datetime) -> dict:
    rows = report.services
    decision_by_case: dict[str, dict[str, dict[str, float]]] = {}
    for (backend, n), row in sorted(rows.items()):
        for key, value in row.items():
            if key.startswith("decide_") and key.endswith("_us"):
                case = key[len("decide_"):-len("_us")]
                decision_by_case.setdefault(backend, {}).setdefault(case, {})[str(n)] = round(value, 4)
    update: dict[str, dict[str, dict[str, float]]] = {}
    for (backend, n), row in sorted(rows.items()):
        for mode, key in (("full", "full_sync_ms"), ("partial", "partial_sync_ms"), ("initial", "initial_sync_ms")):
            if key in row:
                update.setdefault(backend, {}).setdefault(mode, {})[str(n)] = round(row[key], 4)
    fastpath: dict[str, dict[str, float]] = {}
    for name, ns in report.per_frame_ns.items():
        bench, _, kind = name.partition("[")
        fastpath.setdefault(kind.rstrip("]") or "-", {})[bench] = round(ns, 1)
    for kind, values in fastpath.items():
        if "fast-path" in values and "frame-reset" in values:
            values["fast-path-net"] = round(values["fast-path"] - values["frame-reset"], 1)
    return {
        "schema": SCHEMA_VERSION,
        "written_utc": written.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine,
        "commit": commit,
        "profile": report.profile,
        "service_sizes": sorted({n for _, n in rows} | {n for _, n in report.memory}),
        "decision_us": _by_backend({k: round(r["decide_random_us"], 4) for k, r in rows.items()
                                    if "decide_random_us" in r}),
        "decision_us_by_case": decision_by_case,
        "update_ms": update,
        "rules_total": _by_backend({k: r["rules_total"] for k, r in rows.items() if "rules_total" in r}),
        "first_packet_ms": {b: {n: _quantiles(row["first_packet_ms"]) for n, row in sizes.items()}
                            for b, sizes in _nested(report.dataplane, "first_packet_ms").items()},
        "connects_per_s": {b: {n: round(row["connects_per_s"], 1) for n, row in sizes.items()}
                           for b, sizes in _nested(report.dataplane, "connects_per_s").items()},
        # the issue's {backend: value}: one TCP stream through a Service, offloads on
        "throughput_gbps": {b: round(cases["tcp-offloads"]["gbps"], 4)
                            for b, cases in _nested(report.throughput).items()
                            if "gbps" in cases.get("tcp-offloads", {})},
        "throughput": {b: dict(sorted(cases.items())) for b, cases in _nested(report.throughput).items()},
        "socket_lb": dict(sorted(report.socket_lb.items())),
        "churn": {b: dict(sorted(variants.items())) for b, variants in _nested(report.churn).items()},
        "streams": report.streams,
        "memory_kib_per_service": _by_backend({(b, n): round(held / n / 1024, 3)
                                               for (b, n), held in report.memory.items()}),
        "fastpath_ns": fastpath,
        "kernel": _kernel(report),
        "published": PUBLISHED,
        "not_measured": {key: text for key, text in NOT_MEASURED.items() if not _ran(report, key)},
    }


def _ran(report: Report, key: str) -> bool:
    return bool({"first_packet_ms": report.dataplane, "throughput": report.throughput,
                 "socket_lb": report.socket_lb, "churn": report.churn, "kernel": report.kernel}[key])


def _nested(pairs: dict[tuple, dict], needs: str | None = None) -> dict[str, dict[str, dict]]:
    """{(backend, key): row} -> {backend: {str(key): row}}, keeping rows that have `needs`."""
    out: dict[str, dict[str, dict]] = {}
    for (backend, key), row in sorted(pairs.items(), key=lambda kv: (kv[0][0], str(kv[0][1]).zfill(12))):
        if needs is None or needs in row:
            out.setdefault(backend, {})[str(key)] = row
    return out


def _quantiles(values: dict) -> dict:
    return {q: round(values[q], 4) for q in ("p50", "p90", "p99", "mean") if q in values}


KERNEL_IPVS = "not available on these machines"


def _kernel(report: Report) -> dict:
    """results.json's "kernel": {} when bench/test_kernel.py did not run."""
    if not report.kernel:
        return {}
    rows = sorted(report.kernel.items())
    out: dict = {
        "restore_s": {str(n): round(r["restore_s"], 4) for n, r in rows if "restore_s" in r},
        "restore_legacy_s": {str(n): round(r["restore_legacy_s"], 4) for n, r in rows if "restore_legacy_s" in r},
        "rules": {str(n): r["rules"] for n, r in rows if "rules" in r},
        "first_packet_ms": {str(n): _quantiles(r["first_packet_ms"]) for n, r in rows if "first_packet_ms" in r},
        "throughput_gbps": {str(n): round(r["throughput_gbps"], 4) for n, r in rows if "throughput_gbps" in r},
        "udp64_pps": {str(n): round(r["udp64_pps"]) for n, r in rows if "udp64_pps" in r},
        "connects_per_s": {str(n): round(r["connects_per_s"], 1) for n, r in rows if "connects_per_s" in r},
        "iptables": next((r["iptables"] for _, r in rows if "iptables" in r), None),
        "first_packet_loader": next((r["first_packet_ms"].get("loader") for _, r in rows if "first_packet_ms" in r),
                                    None),
        "ipvs": KERNEL_IPVS,
    }
    return out


# --- shared by report_md.py and report_plots.py ---------------------------------------------------------

def ordered(backends) -> list[str]:
    """The seed's column order (iptables, IPVS, eBPF), then any backend added later."""
    known = [b for b in BACKEND_TITLES if b in backends]
    return known + sorted(set(backends) - set(known))


def title(backend: str) -> str:
    return BACKEND_TITLES.get(backend, backend)


# --- writing -----------------------------------------------------------------------------------------

def write_report(report: Report, out_dir: Path, *, machine: dict | None = None, commit: dict | None = None,
                 written: datetime | None = None) -> Path:
    """Write results.json, report.md and the PNG plots into out_dir (made if missing); return report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = results(report, machine if machine is not None else machine_info(),
                   commit if commit is not None else commit_info(),
                   written or datetime.now(timezone.utc))
    (out_dir / "results.json").write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    from report_md import markdown      # bench/ is on sys.path (pytest's rootdir conftest, or the caller)
    from report_plots import plots as draw
    plots = draw(data, out_dir)
    path = out_dir / "report.md"
    path.write_text(markdown(data, plots))
    return path


def write_run(report: Report, root: Path = DEFAULT_ROOT, **kwargs) -> Path:
    """Write the report into root/<UTC timestamp>/ and point root/latest at it; return report.md."""
    root = Path(root)
    now = kwargs.pop("written", None) or datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    out_dir, k = root / stamp, 1
    while out_dir.exists():
        k += 1
        out_dir = root / f"{stamp}-{k}"
    path = write_report(report, out_dir, written=now, **kwargs)
    link, tmp = root / "latest", root / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(out_dir.name)
    os.replace(tmp, link)
    return path
