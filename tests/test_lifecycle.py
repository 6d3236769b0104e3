"""The kubelet's pod workers (podnet.lifecycle) without namespaces: what a container looks like to
the lab's thread while `start_container` is still running in its worker thread."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from podnet import lifecycle
from podnet.cluster.model import Container, ObjectMeta, Pod, Probe, TCPSocketAction
from podnet.lab import ContainerState, PodState

PROBE = Probe(TCPSocketAction(8080), period_seconds=1)


class FakeLab:
    """What start_container uses of a Lab: a log dir, the container environment and the journal.
    The journal write is the moment the lab's thread may read the pod between Popen and return."""

    def __init__(self, log_dir: Path, state: PodState) -> None:
        self.log_dir = log_dir
        self.resources = self
        self.state = state
        self.ready_while_starting: list[bool] = []

    def container_env(self, state, c) -> dict[str, str]:
        return {}

    def record_process(self, pid: int, name: str | None = None):
        self.ready_while_starting.append(self.state.ready)
        return None


@pytest.fixture
def started(tmp_path, monkeypatch):
    """Start containers with plain Popen (no netns); every process started is killed by pid."""
    procs: list[subprocess.Popen] = []

    def popen(netns, argv, **kw):
        proc = subprocess.Popen(argv, **kw)
        procs.append(proc)
        return proc
    monkeypatch.setattr(lifecycle, "popen_in_netns", popen)
    yield tmp_path
    for proc in procs:
        proc.kill()
        proc.wait()


def _pod(probe: Probe | None) -> tuple[PodState, ContainerState]:
    container = Container("c", command=(sys.executable, "-c", "import time; time.sleep(30)"), readiness_probe=probe)
    cs = ContainerState(container)
    pod = Pod(ObjectMeta("srv"), (container,))
    return PodState(pod, netns="pn-unused", ip="10.244.0.2", mac="02:00:00:00:00:02", port_id=0, tap=None,
                    containers=[cs]), cs


def test_a_container_with_a_readiness_probe_is_not_ready_before_its_first_probe(started):
    state, cs = _pod(PROBE)
    lab = FakeLab(started, state)
    lifecycle.start_container(lab, state, cs)
    assert cs.running
    assert lab.ready_while_starting == [False]    # the process ran, but no probe had passed
    assert not state.ready


def test_a_restarted_container_is_not_ready_on_its_previous_probe_results(started):
    state, cs = _pod(PROBE)
    lab = FakeLab(started, state)
    lifecycle.start_container(lab, state, cs)
    cs.readiness.record(True, "tcp open")
    assert state.ready
    cs.process.kill()
    cs.process.wait()
    lifecycle.start_container(lab, state, cs)     # the supervisor's restart
    assert lab.ready_while_starting == [False, False]
    assert cs.running and not state.ready


def test_a_container_without_a_readiness_probe_is_ready_once_running(started):
    state, cs = _pod(None)
    lab = FakeLab(started, state)
    lifecycle.start_container(lab, state, cs)
    assert lab.ready_while_starting == [True]
    assert state.ready
