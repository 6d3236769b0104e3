"""Running `podnet` from a shell, for the end-to-end tests of the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = str(Path(__file__).resolve().parents[2] / "examples" / "demo" / "pods.yaml")


def podnet(state_dir: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "podnet.cli", "--state-dir", state_dir, *args],
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"podnet {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def netns_with(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]
