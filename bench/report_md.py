"""report.md of `make bench`, from the results.json data (bench/report.py builds it).

Only numbers of this one run are compared; the published kernel numbers are labelled as published
wherever they appear.
"""

from __future__ import annotations

from report import PUBLISHED, PUBLISHED_IPTABLES_MS, ordered as _ordered, title as _title


# --- report.md ---------------------------------------------------------------------------------------

def _num(value, fmt: str = ",.1f") -> str:
    return "—" if value is None else format(value, fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def markdown(data: dict, plots: dict[str, str]) -> str:
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
        counts = data["rules_total"]
        if counts:
            lines += ["What each backend holds after syncing N Services (iptables: rules in the nat and filter "
                      "tables; IPVS: virtual services and real servers; eBPF: entries in its service, backend and rev-NAT maps):", ""]
            lines += _table(["Service count"] + [f"{_title(b)} objects" for b in backends],
                            [[f"{n:,}"] + [_num(counts.get(b, {}).get(str(n)), ",.0f") for b in backends]
                             for n in sizes])
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
                  "round trip. " + ("podnet's own first-packet latency on real traffic through TAPs is in \"New connections "
                                   "through TAPs\" below." if data["first_packet_ms"] else
                                   "podnet's own first-packet latency on real traffic through TAPs was not measured "
                                   "in this run (`first_packet_ms` in results.json is empty)."), ""]
        by_case = data["decision_us_by_case"]
        if any("miss" in cases for cases in by_case.values()):
            rows = [[f"{n:,}"] + [_num(by_case.get(b, {}).get("miss", {}).get(str(n)), ",.2f") for b in backends]
                    for n in measured]
            lines += ["Worst case, an address in the Service CIDR that is no Service (every rule walked):", ""]
            lines += _table(["Service count"] + [f"{_title(b)} miss (µs)" for b in backends], rows)
        if "decision" in plots:
            lines += [f"![decision cost vs Services]({plots['decision']})", ""]

    lines += _dataplane_lines(data, plots)
    lines += _throughput_lines(data, plots)
    lines += _churn_lines(data, plots)
    lines += _socket_lb_lines(data)

    memory = data["memory_kib_per_service"]
    if memory:
        sizes = sorted({int(n) for b in memory.values() for n in b})
        lines += ["## Memory a synced backend holds (KiB per Service with 5 endpoints, Python heap)", ""]
        lines += _table(["Service count"] + [_title(b) for b in _ordered(memory)],
                        [[f"{n:,}"] + [_num(memory[b].get(str(n)), ",.2f") for b in _ordered(memory)] for n in sizes])

    lines += ["## One TCP stream, pod A → pod B without a Service (iperf3)", ""]
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
    else:
        lines += ["Not run in this session (the stream cases need root, /dev/net/tun and iperf3).", ""]

    if data["fastpath_ns"]:
        lines += ["## Datapath.process per frame, no I/O (mean ns)", ""]
        names = ("fast-path", "fast-path-net", "slow-path", "parse_ipv4", "dpkt-parse")
        lines += _table(["frame"] + list(names),
                        [[kind] + [_num(v.get(name), ",.0f") for name in names]
                         for kind, v in sorted(data["fastpath_ns"].items()) if any(n in v for n in names)])
        between = ("direct-egress", "direct-ingress", "vxlan-egress", "vxlan-ingress")
        rows = [[kind] + [_num(v.get(name), ",.0f") for name in between]
                for kind, v in sorted(data["fastpath_ns"].items()) if any(n in v for n in between)]
        if rows:
            lines += ["An established flow between nodes, per frame on one node (mean ns, no I/O): *egress* on the "
                      "sender's node (route, neighbour, and for vxlan the encapsulation), *ingress* on the "
                      "receiver's (for vxlan the decapsulation, with the outer UDP checksum verified):", ""]
            lines += _table(["frame"] + list(between), rows)

    kernel = data["kernel"]
    if kernel:
        sizes = sorted({int(n) for key in ("restore_s", "restore_legacy_s", "first_packet_ms", "throughput_gbps")
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
                         _num(kernel.get("throughput_gbps", {}).get(str(n)), ",.2f"),
                         _num((kernel.get("udp64_pps", {}).get(str(n)) or 0) / 1000 or None, ",.1f"),
                         f"{pub['p50']:.3f} / {pub['p99']:.3f}" if pub else "—"])
        lines += ["## The kernel as the anchor (measured in this run)", ""]
        lines += _table(["Service count", "rules loaded", "kernel iptables-restore (s)",
                         "kernel iptables-legacy-restore (s)", "podnet iptables full sync (ms)",
                         "kernel first packet p50 / p90 / p99 (ms)", "podnet iptables decide (µs)",
                         "kernel TCP Gbit/s", "kernel UDP 64 B kpps",
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
    if data["not_measured"]:
        lines += ["## Not measured in this run", ""]
        lines += [f"- `{key}`: {text}" for key, text in data["not_measured"].items()] + [""]
    if not plots:
        lines += ["(No plots: matplotlib is not installed; `make setup` installs it.)", ""]
    return "\n".join(lines)




# --- the data-plane sections (bench/test_dataplane.py, bench/test_churn.py) ------------------------------

def _ms3(q: dict | None) -> str:
    return " / ".join(_num(q.get(k), ",.3f") for k in ("p50", "p90", "p99")) if q else "—"


def _dataplane_lines(data: dict, plots: dict[str, str]) -> list[str]:
    """The seed's table: Service count | new-connection latency per backend, beside the kernel and published."""
    fp, cps = data["first_packet_ms"], data["connects_per_s"]
    if not fp:
        return []
    backends = _ordered(fp)
    kernel = data["kernel"].get("first_packet_ms", {}) if data["kernel"] else {}
    sizes = sorted({int(n) for b in fp.values() for n in b} | {int(n) for n in kernel} | set(PUBLISHED_IPTABLES_MS))
    lines = ["## New connections through TAPs: first-packet latency per backend (ms, p50 / p90 / p99)", "",
             "A client pod opens new TCP connections to a Service whose 5 endpoints are real server pods; each is "
             "timed around `connect()` (SYN → the backend's decision → DNAT → SYN/ACK back through conntrack), on "
             "real frames through the TAPs. The Service is the last one in kube-proxy's order, so the iptables "
             "backend walks every other Service's rule. **kernel** is the same rules in the real kernel "
             "(iptables-restore into a router namespace joined by veths, measured in this run); **published** is "
             "kube-proxy iptables mode on a real node, from the nftables blog (not measured here).", ""]
    rows = []
    for n in sizes:
        pub = PUBLISHED_IPTABLES_MS.get(n)
        rows.append([f"{n:,}"] + [_ms3(fp.get(b, {}).get(str(n))) for b in backends]
                    + [_ms3(kernel.get(str(n))), _ms3(pub) if pub else "—"])
    lines += _table(["Service count"] + [f"podnet {_title(b)}" for b in backends]
                    + ["kernel iptables (this run)", "**published** kernel iptables"], rows)
    if cps:
        lines += ["New connections per second from one client pod (non-blocking connects, 4 in flight, each closed "
                  "at once; the client and podnet share the machine's CPUs):", ""]
        kcps = data["kernel"].get("connects_per_s", {}) if data["kernel"] else {}
        lines += _table(["Service count"] + [_title(b) for b in _ordered(cps)] + ["kernel iptables (this run)"],
                        [[f"{n:,}"] + [_num(cps[b].get(str(n)), ",.0f") for b in _ordered(cps)]
                         + [_num(kcps.get(str(n)), ",.0f")]
                         for n in sorted({int(n) for b in cps.values() for n in b})])
    lines += _growth_lines(fp)
    if "first_packet" in plots:
        lines += [f"![first-packet latency vs Services]({plots['first_packet']})", ""]
    return lines


def _growth_lines(fp: dict) -> list[str]:
    """How much each backend's p50 grew from the smallest to the largest size measured (computed, not claimed)."""
    out = []
    for b in _ordered(fp):
        series = {int(n): q["p50"] for n, q in fp[b].items() if "p50" in q}
        if len(series) >= 2:
            lo, hi = min(series), max(series)
            out.append(f"- {_title(b)}: p50 {series[lo]:.3f} ms at {lo:,} Services, {series[hi]:.3f} ms at "
                       f"{hi:,} ({series[hi] / series[lo]:.1f}×)")
    return (["Growth of the median with the number of Services, in this run:", ""] + out + [""]) if out else []


def _throughput_lines(data: dict, plots: dict[str, str]) -> list[str]:
    thr = data["throughput"]
    kernel = data["kernel"] or {}
    if not thr and not kernel.get("throughput_gbps"):
        return []
    lines = ["## Established flows through a Service, per backend", "",
             "One iperf3 TCP stream from a client pod to a ClusterIP whose endpoint is a server pod, and 64-byte "
             "UDP packets per second (64-byte Ethernet frames counting the FCS: 18 bytes of UDP payload, sent as "
             "fast as the sender can; received packets per second), with the TAPs' offloads on and off. Once a "
             "flow is established no backend is asked again, so the backends should agree here: the seed's "
             "differences are in new connections and updates, not in established flows.", ""]
    cases = (("tcp-offloads", "gbps", "TCP Gbit/s, offloads on", ",.2f"),
             ("tcp-no-offloads", "gbps", "TCP Gbit/s, offloads off", ",.2f"),
             ("udp64-offloads", "pps", "UDP 64 B kpps, offloads on", ",.1f"),
             ("udp64-no-offloads", "pps", "UDP 64 B kpps, offloads off", ",.1f"))
    rows = []
    for b in _ordered(thr):
        row = [f"podnet {_title(b)}"]
        for case, key, _, fmt in cases:
            value = thr[b].get(case, {}).get(key)
            row.append(_num(None if value is None else value / (1000 if key == "pps" else 1), fmt))
        rows.append(row)
    for n in sorted(int(n) for n in kernel.get("throughput_gbps", {})):
        pps = kernel.get("udp64_pps", {}).get(str(n))
        rows.append([f"kernel iptables, {n:,} Services", _num(kernel["throughput_gbps"][str(n)], ",.2f"), "—",
                     _num(None if pps is None else pps / 1000, ",.1f"), "—"])
    lines += _table(["path"] + [c[2] for c in cases], rows)
    if "throughput" in plots:
        lines += [f"![throughput per backend]({plots['throughput']})", ""]
    return lines


def _churn_lines(data: dict, plots: dict[str, str]) -> list[str]:
    churn = data["churn"]
    if not churn:
        return []
    lines = ["## Churn: a rolling update of a Deployment behind a Service", "",
             "While the Deployment rolls (maxSurge 25%, maxUnavailable 25%), a probe crosses the datapath every "
             "10 ms to a pod outside the Deployment (its latency and the longest gap between answers are the stall "
             "the datapath shows while the backend is reprogrammed), and a client opens new connections to the "
             "Service continuously; a failure is a connection refused, reset or timed out, i.e. one that reached an "
             "endpoint that was going away. *prestop* gives each pod a preStop sleep, so it keeps serving until "
             "the proxy has stopped sending it new connections; *no-prestop* pods exit at SIGTERM.", ""]
    rows = []
    for b in _ordered(churn):
        for variant, row in sorted(churn[b].items()):
            probe = row.get("probe_ms") or {}
            failed = row.get("failed") if isinstance(row.get("failed"), (int, float)) else None
            kinds = row.get("failures") or row.get("failed_by_kind") or {}
            if failed is None and isinstance(kinds, dict):
                failed = sum(v for v in kinds.values() if isinstance(v, (int, float)))
            detail = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()) if v) if isinstance(kinds, dict) else ""
            rows.append([_title(b), variant, f"{row.get('replicas', '—')}",
                         f"{_num(row.get('attempted'), ',.0f')}",
                         f"{_num(failed, ',.0f')}" + (f" ({detail})" if detail else ""),
                         " / ".join(_num(probe.get(k), ",.1f") for k in ("p50", "p99", "max")),
                         _num(row.get("max_gap_ms"), ",.1f"), _num(row.get("max_sync_wait_ms"), ",.1f"),
                         _num(row.get("rollout_s"), ",.1f")])
    lines += _table(["backend", "variant", "replicas", "connections", "failed", "probe p50 / p99 / max (ms)",
                     "longest probe gap (ms)", "longest sync wait (ms)", "rollout (s)"], rows)
    if "churn" in plots:
        lines += [f"![churn]({plots['churn']})", ""]
    return lines


def _socket_lb_lines(data: dict) -> list[str]:
    slb = data["socket_lb"]
    if not slb:
        return []
    lines = ["## The same-node shortcut: the eBPF backend's socket-LB analogue, off and on", "",
             "Same-node Service traffic with `socket_lb` off (the tc program decides each new flow from its "
             "packets) and on (the decision socket-LB takes at connect(), once per connection). Cilium's "
             "socket-LB lets the pod's socket talk to the backend directly, so no packet needs NAT; a userspace "
             "dataplane cannot hook the pod's connect(), so podnet still rewrites every packet. The seed's 2–5× "
             "for Cilium's sockmap cannot appear here by construction; what differs is only the decision.", ""]
    rows = []
    for state, row in sorted(slb.items(), key=lambda kv: kv[0] != "off"):
        fp = row.get("first_packet_ms") or {}
        runs = row.get("gbps_runs") or []
        rows.append([state, _ms3(fp), _num(row.get("connects_per_s"), ",.0f"),
                     _num(row.get("rules_per_decision"), ",.1f"),
                     _num(row.get("gbps"), ",.2f") + (f" ({', '.join(f'{g:.2f}' for g in runs)})" if runs else ""),
                     _num(row.get("forwarder_cpu_stream"), ".0%") if row.get("forwarder_cpu_stream") is not None else "—"])
    lines += _table(["socket-LB", "first packet p50 / p90 / p99 (ms)", "connects/s", "map lookups per decision",
                     "TCP Gbit/s (runs)", "node CPU during the stream"], rows)
    return lines
