"""Churn: a rolling update of a Deployment behind a Service, per Service backend, with and without preStop.

Group `churn` (root). For each backend in `podnet.core.services.registry.BACKENDS` and each variant:

    prestop      each pod has a preStop sleep of PRESTOP_S (3 s; terminationGracePeriodSeconds 5), which
                 covers kube-proxy's sync delay (--min-sync-period 1 s, its default): a terminating pod
                 keeps serving until the proxy no longer sends it new connections
    no-prestop   no hook (terminationGracePeriodSeconds 2): the servers exit at SIGTERM, at once

`churn_node.py` runs the node in a process of its own (no GIL shared with the measuring code) with a
Deployment of PODNET_BENCH_CHURN_REPLICAS (100) tiny TCP servers behind the ClusterIP Service `web`,
PODNET_BENCH_CHURN_SERVICES (1,000) background Services with EndpointSlices and no pods (so every
sync has a realistic size), a UDP echo pod outside the Deployment and a client pod. In the client
pod two processes (`churn_clients.py`) run from 1 s before the rollout until 0.5 s after the last old
pod is gone:

    probe   a UDP datagram every 10 ms through the datapath to the echo pod (pod IP, not the Service:
            a stable target whatever the rollout does): round-trip p50/p99/max, and the longest gap
            between two answers - the stall the datapath shows while a sync holds it
    load    PODNET_BENCH_CHURN_RATE (150) new connections per second to the Service, each one line out
            and the serving pod's name back; failures by kind (refused, reset, timeout, unreachable,
            closed without an answer)

The rollout sets env VERSION=2 on the template (RollingUpdate, maxSurge 25%, maxUnavailable 25%).
What each run records in the session `Report`, `report.churn[(backend, variant)]`:

    replicas, background_services, prestop_s, min_sync_period_s, rate_per_s
    rollout_s            rollout began → `kubectl rollout status` would say "successfully rolled out"
    drain_s              rollout began → no pod left terminating
    max_pods, min_available, max_surge, max_unavailable   what the Deployment controller saw (the
                         budget: max_pods <= replicas + max_surge, min_available >= replicas - max_unavailable)
    window_s             the measured window: rollout began → drained + 0.5 s
    probe_ms             {"p50", "p99", "max"}: round trips of the probes sent in the window (answered ones)
    probes, probes_lost  probes sent in the window, and those with no answer
    max_gap_ms           longest time between two probe answers in the window (the stall)
    probe_send_lag_ms    how late the prober itself sent a probe at worst (its own CPU starvation)
    attempted, succeeded, failed           new connections started in the window
    failed_by_kind       {kind: count}
    answered_by          {"old": n, "new": n}: successful connections served by the old and new template
    syncs, full_syncs, max_sync_wait_ms, max_sync_ms, sync_wait_ms_total
                         kube-proxy's syncs during the rollout (from the node's `Lab.syncs`; wait = the time
                         the datapath was held by the backend's apply, sync = build + apply)
    sync_summary         the node's `sync_summary()` after the drain
    startup_s            how long the node took to come up (not part of the measurement)

Benchmarks report, never assert speed; each run asserts the traffic really flowed: connections
succeeded, answered by old and by new pods, and probes were answered.

Safety on a shared machine: the node journals its netns (`pn-bc-<token>…`) in PODNET_BENCH_STATE_DIR,
the processes started here are journalled too, and all are stopped in `finally`
(`podnet --state-dir /run/podnet-bench clean --prefix pn-bc-` removes leftovers of a killed run).
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from podnet.core.services.registry import BACKENDS
from podnet.linux.netns import popen_in_netns
from podnet.linux.resources import Resources

from topologies import STATE_DIR, _stop, new_token

PREFIX = "pn-bc-"
REPLICAS = int(os.environ.get("PODNET_BENCH_CHURN_REPLICAS", "100"))
SERVICES = int(os.environ.get("PODNET_BENCH_CHURN_SERVICES", "1000"))
RATE = float(os.environ.get("PODNET_BENCH_CHURN_RATE", "150"))
PRESTOP_S = 3
MIN_SYNC_PERIOD_S = 1.0     # kube-proxy's default --iptables-min-sync-period
PROBE_INTERVAL_MS = 10
BASELINE_S, TAIL_S = 1.0, 0.5
TIMEOUT_S = 180.0
VARIANTS = ("prestop", "no-prestop")
BENCH_DIR = Path(__file__).resolve().parent


def _root_or_skip() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        if os.environ.get("PODNET_REQUIRE_ROOT_TESTS") == "1":
            pytest.fail("needs root and /dev/net/tun (PODNET_REQUIRE_ROOT_TESTS=1)")
        pytest.skip("needs root and /dev/net/tun")


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class _Lines:
    """The node's stdout, one JSON document per line, read by a thread (several lines can arrive at
    once, so select() on the pipe cannot say whether a buffered one is waiting)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, name="churn-node-stdout", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.queue.put(line)
        self.queue.put(None)

    def next(self) -> dict:
        try:
            line = self.queue.get(timeout=TIMEOUT_S)
        except queue.Empty:
            raise TimeoutError(f"churn node: nothing on stdout after {TIMEOUT_S:.0f} s") from None
        if line is None:
            raise RuntimeError(f"churn node exited with {self.proc.wait()} before reporting")
        return json.loads(line)


def _until(lines: _Lines, key: str, seen: dict) -> dict:
    """Read the node's JSON lines until one has `key`; keep every line's content in `seen`."""
    while True:
        line = lines.next()
        if "error" in line:
            raise RuntimeError(f"churn node: {line['error']}")
        if "progress" in line:
            seen.setdefault("progress", []).append(line["progress"])
            continue
        seen.update(line)
        if key in line:
            return line[key]


def _finish(proc: subprocess.Popen, what: str) -> dict:
    """Close a client's stdin (its signal to stop) and read the JSON line it prints."""
    out, _ = proc.communicate(timeout=30)
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"{what} exited with {proc.returncode}")
    return json.loads(out)


def summarise(probe: dict, load: dict, t0: float, t1: float, old_hash: str, new_hash: str) -> dict:
    """The probe and load results of the window [t0, t1] (time.monotonic() of this machine)."""
    samples = [(t, rtt) for t, rtt in probe["samples"] if t0 <= t <= t1]
    rtts = [rtt for _, rtt in samples if rtt is not None]
    arrivals = [t for t in probe["arrivals"] if t0 <= t <= t1]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    results = [r for r in load["results"] if t0 <= r[0] <= t1]
    kinds: dict[str, int] = {}
    answered = {"old": 0, "new": 0, "other": 0}
    for _, kind, name in results:
        if kind == "ok":
            template = name.split("-")[1] if name.count("-") >= 2 else ""
            answered["old" if template == old_hash else "new" if template == new_hash else "other"] += 1
        else:
            kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "window_s": round(t1 - t0, 3),
        "probe_ms": ({"p50": round(statistics.median(rtts), 3), "p99": round(_quantile(rtts, 0.99), 3),
                      "max": round(max(rtts), 3)} if rtts else {}),
        "probes": len(samples), "probes_lost": len(samples) - len(rtts),
        "max_gap_ms": round(1000 * max(gaps), 3) if gaps else None,
        "probe_send_lag_ms": probe["max_send_lag_ms"],
        "attempted": len(results), "succeeded": answered["old"] + answered["new"] + answered["other"],
        "failed": sum(kinds.values()), "failed_by_kind": dict(sorted(kinds.items())),
        "answered_by": answered, "rate_per_s": RATE,
    }


def churn_run(backend: str, variant: str) -> dict:
    token = new_token()
    prestop_s = PRESTOP_S if variant == "prestop" else 0
    procs: list[subprocess.Popen] = []
    with Resources(prefix=PREFIX, state_dir=STATE_DIR) as res:
        try:
            node = subprocess.Popen(
                [sys.executable, str(BENCH_DIR / "churn_node.py"), "--token", token, "--prefix", PREFIX,
                 "--state-dir", STATE_DIR, "--backend", backend, "--replicas", str(REPLICAS),
                 "--services", str(SERVICES), "--prestop-s", str(prestop_s),
                 "--min-sync-period", str(MIN_SYNC_PERIOD_S), "--timeout", str(TIMEOUT_S)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
            procs.append(node)
            res.record_process(node.pid, name="churn-node")
            seen: dict = {}
            lines = _Lines(node)
            ready = _until(lines, "ready", seen)
            assert ready is True, seen
            client_netns, target_ip = seen["pods"]["client"]["netns"], seen["pods"]["target"]["ip"]
            clients = {}
            for mode, host, port, value in (("probe", target_ip, seen["echo_port"], PROBE_INTERVAL_MS),
                                            ("load", seen["web"], 80, RATE)):
                proc = popen_in_netns(client_netns, [sys.executable, str(BENCH_DIR / "churn_clients.py"), mode, host,
                                                     str(port), str(value)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                procs.append(proc)
                res.record_process(proc.pid, name=f"churn-{mode}")
                clients[mode] = proc
            time.sleep(BASELINE_S)
            t0 = time.monotonic()
            node.stdin.write(json.dumps({"cmd": "rollout"}) + "\n")
            node.stdin.flush()
            rolled = _until(lines, "rolled_out", seen)
            drained = _until(lines, "drained", seen)
            time.sleep(TAIL_S)
            t1 = time.monotonic()
            probe, load = _finish(clients["probe"], "the probe"), _finish(clients["load"], "the load generator")
            node.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
            node.stdin.flush()
            node.wait(timeout=60)
        finally:
            for proc in reversed(procs):
                _stop(proc, grace_s=10.0)
    row = {"replicas": REPLICAS, "background_services": SERVICES, "prestop_s": prestop_s,
           "min_sync_period_s": MIN_SYNC_PERIOD_S, "startup_s": seen["startup_s"],
           **{k: rolled[k] for k in ("rollout_s", "max_pods", "min_available", "max_surge", "max_unavailable")},
           "drain_s": drained["drain_s"],
           **summarise(probe, load, t0, t1, rolled["old_hash"], rolled["new_hash"]),
           **{k: drained[k] for k in ("syncs", "full_syncs", "max_sync_wait_ms", "max_sync_ms", "sync_wait_ms_total")},
           "sync_summary": {k: v for k, v in drained["summary"].items() if k != "backend_stats"}}
    return row


@pytest.mark.benchmark(group="churn")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_churn(benchmark, report, backend, variant):
    _root_or_skip()
    rows = []
    benchmark.pedantic(lambda: rows.append(churn_run(backend, variant)), rounds=1, iterations=1)
    row = rows[0]
    benchmark.extra_info.update(row)
    report.churn[(backend, variant)] = row
    # the traffic really flowed: through old pods, then new ones, and the probe was answered
    assert row["succeeded"] > 0 and row["answered_by"]["old"] > 0 and row["answered_by"]["new"] > 0, row
    assert row["probes"] > 0 and row["probe_ms"], row
    assert row["max_pods"] <= REPLICAS + row["max_surge"], row
