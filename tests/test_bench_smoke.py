"""A tiny version of every benchmark runs inside `make test`, so none of them rots.

The real numbers come from `make bench`; here each case runs once, at the smallest size (100
Services, 1 s iperf3 streams, a 4-replica Deployment rolled beside 10 Services), and must pass and
skip nothing. Nothing about speed is asserted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.root


def test_every_benchmark_runs_in_a_tiny_version(tmp_path):
    env = {**os.environ, "PODNET_BENCH_SERVICE_SIZES": "100", "PODNET_BENCH_SECONDS": "1",
           "PODNET_BENCH_ROUNDS": "1", "PODNET_BENCH_REPORT": "0", "PODNET_BENCH_CONNECTS": "50",
           "PODNET_BENCH_CHURN_REPLICAS": "4", "PODNET_BENCH_CHURN_SERVICES": "10"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(REPO / "bench"), "-q", "-p", "no:cacheprovider",
         "--benchmark-only", "--benchmark-max-time=0.0001", "--benchmark-min-rounds=1",
         "--benchmark-warmup=off", f"--benchmark-storage=file://{tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    tail = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    summary = [line for line in done.stdout.splitlines() if re.search(r"\d+ passed", line)][-1]
    assert "skipped" not in summary and "deselected" not in summary, summary
    assert int(re.search(r"(\d+) passed", summary).group(1)) >= 30, summary
    # every group reported into the summary tables
    for heading in ("one TCP stream", "Datapath.process per frame", "deciding the first packet",
                    "one endpoint change", "memory a synced backend holds", "churn: rolling update",
                    "new connections through TAPs", "established flows through a Service",
                    "same-node Service traffic"):
        assert heading in done.stdout, heading
