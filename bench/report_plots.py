"""The PNG plots of `make bench` (matplotlib, Agg), from the results.json data (bench/report.py builds it)."""

from __future__ import annotations

from pathlib import Path

from report import PLOTS, PUBLISHED_IPTABLES_MS, ordered as _ordered, title as _title


def plots(data: dict, out_dir: Path) -> dict[str, str]:
    try:
        import matplotlib
    except ImportError:
        return {}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}
    colors = {b: f"C{i}" for i, b in enumerate(_ordered(set(data["decision_us"]) | set(data["update_ms"])
                                                        | set(data["first_packet_ms"])))}

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

    if data["first_packet_ms"]:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        fp = data["first_packet_ms"]
        for b in _ordered(fp):
            xs = sorted(int(n) for n in fp[b])
            color = colors.get(b, "C5")
            ax.plot(xs, [fp[b][str(n)]["p50"] for n in xs], "o-", color=color, label=f"podnet {_title(b)} p50")
            ax.plot(xs, [fp[b][str(n)].get("p99") for n in xs], "v:", color=color, alpha=0.6, label=f"podnet {_title(b)} p99")
        kernel = (data["kernel"] or {}).get("first_packet_ms", {})
        if kernel:
            xs = sorted(int(n) for n in kernel)
            ax.plot(xs, [kernel[str(n)]["p50"] for n in xs], "D-", color="black", label="kernel iptables p50 (this run)")
        pub = sorted(PUBLISHED_IPTABLES_MS)
        ax.plot(pub, [PUBLISHED_IPTABLES_MS[n]["p50"] for n in pub], "s--", color="grey", mfc="none",
                label="PUBLISHED kernel iptables p50\n(not measured here)")
        ax.set(xscale="log", yscale="log", xlabel="Services (5 endpoints each)",
               ylabel="ms from connect() to SYN/ACK",
               title="First-packet latency of a new connection to a Service, through TAPs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        save(fig, "first_packet")

    thr = data["throughput"]
    if thr or data["streams"]:
        fig, (tcp, udp) = plt.subplots(1, 2, figsize=(10, 4.6))
        labels, on, off, kpps_on, kpps_off = [], [], [], [], []
        for b in _ordered(thr):
            labels.append(f"podnet {_title(b)}\nvia Service")
            on.append(thr[b].get("tcp-offloads", {}).get("gbps", 0.0))
            off.append(thr[b].get("tcp-no-offloads", {}).get("gbps", 0.0))
            kpps_on.append(thr[b].get("udp64-offloads", {}).get("pps", 0.0) / 1000)
            kpps_off.append(thr[b].get("udp64-no-offloads", {}).get("pps", 0.0) / 1000)
        kernel = data["kernel"] or {}
        for n in sorted(int(n) for n in kernel.get("throughput_gbps", {}))[-1:]:
            labels.append(f"kernel iptables\n{n:,} Services")
            on.append(kernel["throughput_gbps"][str(n)])
            off.append(0.0)
            kpps_on.append(kernel.get("udp64_pps", {}).get(str(n), 0.0) / 1000)
            kpps_off.append(0.0)
        streams = data["streams"]
        for case in ("kernel-veth", "raw-forwarder-offloads", "podnet-offloads"):
            if case in streams:
                labels.append(case.replace("-offloads", "") + "\npod→pod, no Service")
                on.append(streams[case]["gbps"])
                twin = case.replace("-offloads", "-no-offloads") if case.endswith("-offloads") else None
                off.append(streams.get(twin, {}).get("gbps", 0.0) if twin else 0.0)
                kpps_on.append(0.0)
                kpps_off.append(0.0)
        ys = list(range(len(labels)))
        for ax, a, b_, unit, title in ((tcp, on, off, "Gbit/s", "One TCP stream"),
                                       (udp, kpps_on, kpps_off, "thousand packets/s", "64-byte UDP")):
            bars_on = ax.barh([y - 0.2 for y in ys], a, height=0.4, color="C0", label="offloads on")
            bars_off = ax.barh([y + 0.2 for y in ys], b_, height=0.4, color="C1", label="offloads off")
            for bars in (bars_on, bars_off):
                ax.bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in bars.datavalues], padding=2, fontsize=7)
            ax.set_yticks(ys, labels, fontsize=7)
            ax.invert_yaxis()
            ax.margins(x=0.15)
            ax.set(xlabel=unit, title=title)
            ax.grid(True, axis="x", alpha=0.3)
        tcp.legend(fontsize=7)
        save(fig, "throughput")

    churn = data["churn"]
    if churn:
        fig, (fails, gaps) = plt.subplots(1, 2, figsize=(10, 4.2))
        labels, failed, gap = [], [], []
        for b in _ordered(churn):
            for variant, row in sorted(churn[b].items()):
                labels.append(f"{_title(b)}\n{variant}")
                kinds = row.get("failures") or row.get("failed_by_kind") or {}
                count = row.get("failed")
                if not isinstance(count, (int, float)):
                    count = sum(v for v in kinds.values() if isinstance(v, (int, float))) if isinstance(kinds, dict) else 0
                failed.append(count)
                gap.append(row.get("max_gap_ms") or 0.0)
        xs = list(range(len(labels)))
        bars = fails.bar(xs, failed, color=["C3" if "no-" in lab else "C2" for lab in labels])
        fails.bar_label(bars, fontsize=7)
        fails.set_xticks(xs, labels, fontsize=7)
        fails.set(ylabel="connections failed during the rollout", title="Failed new connections")
        bars = gaps.bar(xs, gap, color="C0")
        gaps.bar_label(bars, fmt="%.0f", fontsize=7)
        gaps.set_xticks(xs, labels, fontsize=7)
        gaps.set(ylabel="ms", title="Longest gap of the 10 ms probe (stall)")
        for ax in (fails, gaps):
            ax.grid(True, axis="y", alpha=0.3)
        save(fig, "churn")
    return written


