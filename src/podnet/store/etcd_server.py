"""A private etcd for tests and local clusters: one member, loopback only, random ports.

Layer: store (starts a process). `run_etcd()` starts Debian's /usr/bin/etcd (package etcd-server,
3.4) with every listener on 127.0.0.1 and ports the kernel just handed out, in a new data dir,
waits until it answers /health, and on exit ends that process by its pid and removes the dir.

Invariants:
- It never listens on anything but 127.0.0.1: client and peer URLs are given explicitly (etcd's
  defaults are localhost:2379/2380, which could collide with a system etcd), metrics are served
  on the client URL only.
- The process is ours alone: ended by pid (SIGTERM, then SIGKILL after `stop_timeout_s`), never by
  name. PR_SET_PDEATHSIG also ends it if the thread that started it dies without cleaning up (so a
  killed test run leaves no etcd behind; start it from a long-lived thread).
- Raft timing is short (heartbeat 10 ms, election 100 ms) so that etcd's minimum lease TTL,
  ceil(1.5 election timeouts), is 1 s and lease tests can use TTL 1. The data dir is under
  /dev/shm when it exists: etcd fsyncs every write and tmpfs makes that free.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .base import StoreUnavailable

ETCD_BINARY = "/usr/bin/etcd"  # Debian 12: package etcd-server
LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class EtcdServer:
    pid: int
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str

    @property
    def client_url(self) -> str:
        return f"http://{LOOPBACK}:{self.client_port}"

    @property
    def endpoint(self) -> str:
        """What `--store` takes: etcd://127.0.0.1:PORT."""
        return f"etcd://{LOOPBACK}:{self.client_port}"


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def die_with_parent():
    """A preexec_fn that asks the kernel to SIGTERM the child when its parent dies (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here, in the parent: the child only calls

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    return preexec


def etcd_healthy(url: str) -> bool:
    """etcd at client URL `url` answers /health with true."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return b'"true"' in response.read()
    except OSError:
        return False


def _end(process: subprocess.Popen, timeout_s: float) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def run_etcd(*, binary: str = ETCD_BINARY, name: str = "podnet", heartbeat_ms: int = 10,
             election_ms: int = 100, ready_timeout_s: float = 15.0, stop_timeout_s: float = 5.0,
             attempts: int = 3) -> Iterator[EtcdServer]:
    """A running one-member etcd on 127.0.0.1; ended (by pid) and its data dir removed on exit."""
    if not os.access(binary, os.X_OK):
        raise StoreUnavailable(f"{binary} not found: install Debian's etcd-server "
                               "(`make setup` does)")
    parent = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    workdir = tempfile.mkdtemp(prefix="podnet-etcd-", dir=parent)
    process: subprocess.Popen | None = None
    try:
        for attempt in range(attempts):
            client_port, peer_port = free_loopback_port(), free_loopback_port()
            if client_port == peer_port:
                continue
            data_dir = os.path.join(workdir, f"data-{attempt}")
            log_path = os.path.join(workdir, f"etcd-{attempt}.log")
            client, peer = f"http://{LOOPBACK}:{client_port}", f"http://{LOOPBACK}:{peer_port}"
            argv = [binary, "--name", name, "--data-dir", data_dir,
                    "--listen-client-urls", client, "--advertise-client-urls", client,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"{name}={peer}", "--initial-cluster-state", "new",
                    "--heartbeat-interval", str(heartbeat_ms),
                    "--election-timeout", str(election_ms),
                    "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"]
            with open(log_path, "wb") as log:
                process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, preexec_fn=die_with_parent(),
                                           close_fds=True)
            deadline = time.monotonic() + ready_timeout_s
            while process.poll() is None and time.monotonic() < deadline:
                if etcd_healthy(client):
                    yield EtcdServer(process.pid, client_port, peer_port, data_dir, log_path)
                    return
                time.sleep(0.05)
            _end(process, stop_timeout_s)  # a port taken meanwhile, or too slow: try again
        tail = Path(log_path).read_text(errors="replace")[-2000:]
        raise StoreUnavailable(f"etcd did not become healthy on {LOOPBACK} after {attempts} "
                               f"attempts; its log ends with:\n{tail}")
    finally:
        if process is not None:
            _end(process, stop_timeout_s)
        shutil.rmtree(workdir, ignore_errors=True)
