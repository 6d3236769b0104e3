"""Readiness probes, run the way the kubelet runs them (tcpSocket, httpGet, exec).

Layer: lab (above runtime and linux). The kubelet probes a pod from the node at the pod's IP. A
podnet node has no kernel route to its pods (they are reachable only through the Python datapath),
so a probe runs inside the pod's own network namespace and dials the pod's IP there, which the
pod's kernel delivers locally. What a probe can tell — is the port open, does the path answer with
a 2xx/3xx, does the command exit 0 — is the same.

Invariants: a probe never raises; it returns (success, message). Timing (initialDelaySeconds,
periodSeconds, success/failure thresholds) is applied by the caller, `ReadinessTracker`.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
from dataclasses import dataclass

from podnet.cluster.model import Container, ExecAction, HTTPGetAction, Probe, TCPSocketAction
from podnet.errors import ConfigError
from podnet.linux.netns import run_in_netns


def _tcp(ip: str, port: int, timeout_s: float) -> tuple[bool, str]:
    try:
        with socket.create_connection((ip, port), timeout=timeout_s):
            return True, f"tcp {ip}:{port} open"
    except OSError as exc:
        return False, f"dial tcp {ip}:{port}: {exc.strerror or exc}"


def _http(ip: str, action: HTTPGetAction, port: int, timeout_s: float) -> tuple[bool, str]:
    cls = http.client.HTTPSConnection if action.scheme == "HTTPS" else http.client.HTTPConnection
    conn = cls(action.host or ip, port, timeout=timeout_s)
    try:
        conn.request("GET", action.path, headers={"User-Agent": "kube-probe/podnet"})
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return False, f"Get \"{action.scheme.lower()}://{ip}:{port}{action.path}\": {exc}"
    finally:
        conn.close()
    # the kubelet counts 200 <= status < 400 as success
    return 200 <= status < 400, f"HTTP probe returned {status}"


def _exec(command: tuple[str, ...], timeout_s: float) -> tuple[bool, str]:
    try:
        done = subprocess.run(list(command), capture_output=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"exec {command[0]}: {exc}"
    return done.returncode == 0, f"exit code {done.returncode}"


def run_probe(netns: str, ip: str, container: Container, probe: Probe) -> tuple[bool, str]:
    """One probe attempt inside `netns` (blocking: call from a worker thread)."""
    handler = probe.handler
    timeout_s = float(probe.timeout_seconds)
    try:
        if isinstance(handler, TCPSocketAction):
            port = container.port_number(handler.port)
            return run_in_netns(netns, _tcp, ip, port, timeout_s)
        if isinstance(handler, HTTPGetAction):
            port = container.port_number(handler.port)
            return run_in_netns(netns, _http, ip, handler, port, timeout_s)
        if isinstance(handler, ExecAction):
            return run_in_netns(netns, _exec, handler.command, timeout_s)
    except (OSError, ConfigError) as exc:
        return False, str(exc)
    return False, f"unsupported probe handler {type(handler).__name__}"


@dataclass
class ReadinessTracker:
    """Success and failure thresholds over consecutive probe results, as the kubelet counts them."""

    probe: Probe
    ready: bool = False
    successes: int = 0
    failures: int = 0
    last_message: str = ""

    def record(self, success: bool, message: str) -> bool:
        self.last_message = message
        if success:
            self.successes += 1
            self.failures = 0
            if self.successes >= self.probe.success_threshold:
                self.ready = True
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= self.probe.failure_threshold:
                self.ready = False
        return self.ready
