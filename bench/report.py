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
FULL_SIZES = (100, 1000, 10000, 50000)   # the Service counts of the issue; all of them is "full"
SCHEMA_VERSION = 1
# the keys results.json always has (bench/README.md documents each)
RESULT_KEYS = ("schema", "written_utc", "machine", "commit", "profile", "service_sizes", "decision_us",
               "decision_us_by_case", "update_ms", "rules_total", "first_packet_ms", "throughput_gbps",
               "streams", "memory_kib_per_service", "fastpath_ns", "kernel", "published", "not_measured")
PLOTS = {"decision": "decision.png", "update": "update.png", "throughput": "throughput.png"}
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
    profile: str = "quick"   # "full" when the Service sizes cover FULL_SIZES (see profile_of)
    # number of Services -> {"restore_s", "rules", "iptables", "first_packet_ms": {"p50", "p90", "p99", ...}}
    # from bench/test_kernel.py: the same rule sets loaded into the real kernel
    kernel: dict[int, dict] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.streams or self.per_frame_ns or self.services or self.memory or self.kernel)


def profile_of(sizes) -> str:
    return "full" if set(FULL_SIZES) <= set(sizes) else "quick"


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
NOT_MEASURED = {
    "first_packet_ms": "first-packet latency on real traffic through TAPs (p50/p90/p99 per backend and "
                       "Service count) is not measured yet (issue 5, item 2)",
    "kernel": "the same rule sets in the real kernel (iptables-restore time, first-packet latency) are "
              "not measured yet (issue 5, item 6); kernel IPVS is not available on these machines",
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
        "first_packet_ms": {},
        "throughput_gbps": {case: round(info["gbps"], 4) for case, info in report.streams.items()},
        "streams": report.streams,
        "memory_kib_per_service": _by_backend({(b, n): round(held / n / 1024, 3)
                                               for (b, n), held in report.memory.items()}),
        "fastpath_ns": fastpath,
        "kernel": _kernel(report),
        "published": PUBLISHED,
        "not_measured": {key: text for key, text in NOT_MEASURED.items() if not (key == "kernel" and report.kernel)},
    }


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
        "first_packet_ms": {str(n): {q: round(r["first_packet_ms"][q], 4) for q in ("p50", "p90", "p99")}
                            for n, r in rows if "first_packet_ms" in r},
        "iptables": next((r["iptables"] for _, r in rows if "iptables" in r), None),
        "first_packet_loader": next((r["first_packet_ms"].get("loader") for _, r in rows if "first_packet_ms" in r),
                                    None),
        "ipvs": KERNEL_IPVS,
    }
    return out


# --- report.md ---------------------------------------------------------------------------------------

def _ordered(backends) -> list[str]:
    """The seed's column order (iptables, IPVS, eBPF), then any backend added later."""
    known = [b for b in BACKEND_TITLES if b in backends]
    return known + sorted(set(backends) - set(known))


def _title(backend: str) -> str:
    return BACKEND_TITLES.get(backend, backend)


def _num(value, fmt: str = ",.1f") -> str:
    return "—" if value is None else format(value, fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _markdown(data: dict, plots: dict[str, str]) -> str:
    m, c = data["machine"], data["commit"]
    dirty = {True: " (working tree dirty: uncommitted changes were measured)", False: " (clean tree)",
             None: ""}[c.get("dirty")]
    lines = [f"# podnet benchmark report — {data['written_utc']}", "",
             f"- **machine**: {m.get('cpu')}, {m.get('cores')} cores, kernel {m.get('kernel')}, "
             f"Python {m.get('python')}",
             f"- **commit**: `{c.get('sha') or 'unknown'}`{dirty}",
             f"- **profile**: {data['profile']} (Service counts measured: "
             f"{', '.join(f'{n:,}' for n in data['service_sizes']) or 'none'})", "",
             "Every number in this report was measured in this one run on this machine, except the columns "
             "and rows marked **published**: those are kube-proxy on a real kernel, from "
             f"{PUBLISHED['source']}, and are printed for scale only. The raw numbers are in "
             "`results.json` beside this file.", "",
             "## How to read", "",
             "podnet's Service backends are Python models of kube-proxy's iptables and IPVS modes and of "
             "Cilium's eBPF maps. **decision** is the median time one backend takes to decide the first "
             "packet (SYN) of a NEW connection to a random Service — what every new connection pays; "
             "established flows skip it. **update** is the wall time of one `sync` after one endpoint of "
             "one Service changed: the datapath waits that long. For iptables, *partial* is kube-proxy's "
             "partial restore, which still rewrites `KUBE-SERVICES` (one rule per Service). The seed "
             "claims iptables is O(N) in both and IPVS/eBPF O(1): look for the iptables line's slope of 1 "
             "on the log-log plot and flat lines for the others. podnet's times are Python's, so compare "
             "*shapes* with the published kernel numbers, not absolute values. Small sizes are averaged "
             "over many calls; sync times from 10,000 Services up are single rounds.", ""]

    backends = _ordered(set(data["decision_us"]) | set(data["update_ms"]))
    if backends:
        lines += ["## Service update: one endpoint change (ms; partial sync / full sync)", ""]
        sizes = sorted({int(n) for b in data["update_ms"].values() for mode in b.values() for n in mode})
        rows = []
        for n in sizes:
            row = [f"{n:,}"]
            for b in backends:
                modes = data["update_ms"].get(b, {})
                row.append(f"{_num(modes.get('partial', {}).get(str(n)))} / {_num(modes.get('full', {}).get(str(n)))}")
            rows.append(row)
        lines += _table(["Service count"] + [f"{_title(b)} update" for b in backends], rows)
        lines += ["Published kernel numbers for one update do not exist in a comparable form: "
                  "performance.md §1c gives end-to-end network-programming latency at 5,000 nodes (KEP-3453: "
                  "p50 ~27 s → ~13 s with partial sync), which includes minSyncPeriod and the API path. "
                  + ("The kernel's own iptables-restore time for these rule sets is in \"The kernel as the "
                     "anchor\" below." if data["kernel"] else
                     "The kernel's own iptables-restore time for these rule sets is not measured in this run "
                     "(`kernel` in results.json is empty)."), ""]
        if "update" in plots:
            lines += [f"![update cost vs Services]({plots['update']})", ""]

        lines += ["## New-connection decision (median µs per decide, a random Service)", ""]
        measured = sorted({int(n) for b in data["decision_us"].values() for n in b})
        rows = []
        for n in sorted(set(measured) | set(PUBLISHED_IPTABLES_MS)):
            pub = PUBLISHED_IPTABLES_MS.get(n)
            row = [f"{n:,}"] + [_num(data["decision_us"].get(b, {}).get(str(n)), ",.2f") for b in backends]
            row.append(f"{pub['p50'] * 1000:,.0f} / {pub['p99'] * 1000:,.0f}" if pub else "—")
            rows.append(row)
        lines += _table(["Service count"] + [f"{_title(b)} (µs)" for b in backends]
                        + ["**published** kernel iptables p50 / p99 (µs, not measured here)"], rows)
        lines += ["The published column is the kernel's end-to-end reply latency to a first packet, "
                  "nftables and IPVS published as flat; podnet's columns are only the backend's decision, not a "
                  "round trip. podnet's own first-packet latency on real traffic through TAPs is not measured "
                  "yet (`first_packet_ms` in results.json is empty).", ""]
        by_case = data["decision_us_by_case"]
        if any("miss" in cases for cases in by_case.values()):
            rows = [[f"{n:,}"] + [_num(by_case.get(b, {}).get("miss", {}).get(str(n)), ",.2f") for b in backends]
                    for n in measured]
            lines += ["Worst case, an address in the Service CIDR that is no Service (every rule walked):", ""]
            lines += _table(["Service count"] + [f"{_title(b)} miss (µs)" for b in backends], rows)
        if "decision" in plots:
            lines += [f"![decision cost vs Services]({plots['decision']})", ""]

    memory = data["memory_kib_per_service"]
    if memory:
        sizes = sorted({int(n) for b in memory.values() for n in b})
        lines += ["## Memory a synced backend holds (KiB per Service with 5 endpoints, Python heap)", ""]
        lines += _table(["Service count"] + [_title(b) for b in _ordered(memory)],
                        [[f"{n:,}"] + [_num(memory[b].get(str(n)), ",.2f") for b in _ordered(memory)] for n in sizes])

    lines += ["## One TCP stream, pod A → pod B (iperf3)", ""]
    if data["streams"]:
        rows = []
        for case, info in data["streams"].items():
            fwd = "forwarder_frames" in info
            rows.append([case, f"{info['gbps']:.2f}",
                         f"{info['forwarder_cpu']:.0%}" if fwd else "—",
                         f"{info['forwarder_frames']:,}" if fwd else "—",
                         f"{info['user_us_per_frame']:.2f}" if fwd else "—",
                         f"{info['sys_us_per_frame']:.2f}" if fwd else "—",
                         f"{info.get('retransmits', 0):,}"])
        lines += _table(["case", "Gbit/s", "fwd CPU", "frames", "user µs/frame", "sys µs/frame", "retrans"], rows)
        if "throughput" in plots:
            lines += [f"![tcp-stream throughput]({plots['throughput']})", ""]
    else:
        lines += ["Not run in this session (the stream cases need root, /dev/net/tun and iperf3).", ""]

    if data["fastpath_ns"]:
        lines += ["## Datapath.process per frame, no I/O (mean ns)", ""]
        names = ("fast-path", "fast-path-net", "slow-path", "parse_ipv4", "dpkt-parse")
        lines += _table(["frame"] + list(names),
                        [[kind] + [_num(v.get(name), ",.0f") for name in names]
                         for kind, v in sorted(data["fastpath_ns"].items())])

    kernel = data["kernel"]
    if kernel:
        sizes = sorted({int(n) for key in ("restore_s", "restore_legacy_s", "first_packet_ms")
                        for n in kernel.get(key, {})})
        ipt = (data["update_ms"].get("iptables") or {}).get("full", {})
        dec = data["decision_us"].get("iptables", {})
        rows = []
        for n in sizes:
            fp = kernel.get("first_packet_ms", {}).get(str(n))
            pub = PUBLISHED_IPTABLES_MS.get(n)
            rows.append([f"{n:,}", _num(kernel.get("rules", {}).get(str(n)), ",.0f"),
                         _num(kernel.get("restore_s", {}).get(str(n)), ",.3f"),
                         _num(kernel.get("restore_legacy_s", {}).get(str(n)), ",.3f"),
                         _num(ipt.get(str(n)), ",.1f"),
                         " / ".join(_num(fp.get(q), ",.3f") for q in ("p50", "p90", "p99")) if fp else "—",
                         _num(dec.get(str(n)), ",.2f"),
                         f"{pub['p50']:.3f} / {pub['p99']:.3f}" if pub else "—"])
        lines += ["## The kernel as the anchor (measured in this run)", ""]
        lines += _table(["Service count", "rules loaded", "kernel iptables-restore (s)",
                         "kernel iptables-legacy-restore (s)", "podnet iptables full sync (ms)",
                         "kernel first packet p50 / p90 / p99 (ms)", "podnet iptables decide (µs)",
                         "**published** kernel p50 / p99 (ms)"], rows)
        lines += [f"The same Services' kube-proxy rules (`jump_rules_restore()` + a full sync payload) loaded "
                  f"with `ip netns exec NS iptables-restore --noflush` ({kernel.get('iptables') or 'iptables'}) "
                  "into a fresh namespace, and with `iptables-legacy-restore` where installed (\"—\" for the "
                  "default one above 1,000 Services: it takes minutes there, run with PODNET_BENCH_FULL=1); "
                  "the first packet is the wall time of `connect()` (SYN → DNAT → SYN/ACK) from a client netns "
                  f"through a router netns holding the rules (loaded with {kernel.get('first_packet_loader')}) to the LAST "
                  "Service in KUBE-SERVICES' order, over veth pairs. podnet's decide µs is only the backend's "
                  "decision in Python, not an end-to-end latency, so it is not comparable with the kernel's "
                  f"round trip; compare shapes. Kernel IPVS: {kernel.get('ipvs')}, so only iptables is anchored.",
                  ""]
    lines += ["## Not measured yet", ""] + [f"- `{key}`: {text}" for key, text in data["not_measured"].items()] + [""]
    if not plots:
        lines += ["(No plots: matplotlib is not installed; `make setup` installs it.)", ""]
    return "\n".join(lines)


# --- plots -------------------------------------------------------------------------------------------

def _plots(data: dict, out_dir: Path) -> dict[str, str]:
    try:
        import matplotlib
    except ImportError:
        return {}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}
    colors = {b: f"C{i}" for i, b in enumerate(_ordered(set(data["decision_us"]) | set(data["update_ms"])))}

    def save(fig, key: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / PLOTS[key], dpi=110)
        plt.close(fig)
        written[key] = PLOTS[key]

    if data["decision_us"]:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for b in _ordered(data["decision_us"]):
            series = data["decision_us"][b]
            xs = sorted(int(n) for n in series)
            ax.plot(xs, [series[str(n)] for n in xs], "o-", color=colors[b], label=f"{_title(b)} (random Service)")
            miss = data["decision_us_by_case"].get(b, {}).get("miss", {})
            if miss:
                xs = sorted(int(n) for n in miss)
                ax.plot(xs, [miss[str(n)] for n in xs], "x:", color=colors[b], alpha=0.7, label=f"{_title(b)} (miss)")
        pub = sorted(PUBLISHED_IPTABLES_MS)
        ax.plot(pub, [PUBLISHED_IPTABLES_MS[n]["p50"] * 1000 for n in pub], "s--", color="grey", mfc="none",
                label="PUBLISHED kernel iptables p50\n(first-packet reply, not measured here)")
        ax.set(xscale="log", yscale="log", xlabel="Services (5 endpoints each)",
               ylabel="µs per new connection (median)", title="New-connection decision cost vs Services")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "decision")

    if data["update_ms"]:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for b in _ordered(data["update_ms"]):
            modes = data["update_ms"][b]
            for mode, style in (("full", "o-"), ("partial", "^--")):
                series = modes.get(mode, {})
                if series:
                    xs = sorted(int(n) for n in series)
                    ax.plot(xs, [series[str(n)] for n in xs], style, color=colors[b], label=f"{_title(b)} {mode} sync")
        ax.set(xscale="log", yscale="log", xlabel="Services (5 endpoints each)",
               ylabel="ms per endpoint change (wall time of sync)", title="Service update cost vs Services")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "update")

    if data["throughput_gbps"]:
        cases = list(data["throughput_gbps"])
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        bars = ax.barh(cases, [data["throughput_gbps"][c] for c in cases],
                       color=["grey" if c.startswith("kernel") else "C1" if c.startswith("raw") else "C0"
                              for c in cases])
        ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=8)
        ax.invert_yaxis()
        ax.margins(x=0.1)   # room for the value labels
        ax.set(xlabel="Gbit/s (median of the iperf3 runs)", title="One TCP stream, pod A → pod B")
        ax.grid(True, axis="x", alpha=0.3)
        save(fig, "throughput")
    return written


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
    plots = _plots(data, out_dir)
    path = out_dir / "report.md"
    path.write_text(_markdown(data, plots))
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
