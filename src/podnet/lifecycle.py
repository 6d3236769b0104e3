"""The kubelet's pod workers: a pod's containers started, restarted, probed, and stopped gracefully.

Layer: lab (above runtime and linux). `supervise` runs one container for the lab: it starts the
command inside the pod's netns, waits for its exit on a pidfd between readiness probes, and
restarts it per restartPolicy with CrashLoopBackOff delays. `Lab.delete_pod` sets the pod's
deletionTimestamp, which the EndpointSlice controller turns into a terminating endpoint (ready
false, serving while the readiness probe still passes, terminating true), then hands the pod to
`terminate_pod`, which does what the kubelet's killPod does for a deleted pod - every container at
once, each:

    preStop hook (exec in the pod's netns with the container's environment, httpGet to the pod's IP,
    or sleep), bounded by the grace period; a hook that fails is logged, not retried
    → SIGTERM to the container's process group
    → the rest of the grace period, never less than 2 s (the kubelet's minimumGracePeriodInSeconds)
    → SIGKILL to the group, and wait for the exit

after which the lab removes the endpoint and does CNI DEL. The grace period is the pod's
terminationGracePeriodSeconds unless the delete (or `LabConfig.grace_period_s`) overrides it.

Invariants: a process started here (an exec hook) is journalled in the lab's `Resources` before
anyone waits for it and is killed and reaped on every way out, cancellation included; exits are
awaited on a pidfd (no polling, no blocking thread), and only the lab's supervisor reaps a
container's own process (this module waits for its `exited` event).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import math
import os
import signal
import subprocess
from typing import TYPE_CHECKING

import trio

from podnet.cluster.model import ExecAction, HTTPGetAction, SleepAction
from podnet.linux.netns import popen_in_netns, run_in_netns
from podnet.probes import ReadinessTracker, run_probe

if TYPE_CHECKING:
    from podnet.lab import ContainerState, Lab, PodState

log = logging.getLogger(__name__)

MIN_GRACE_S = 2.0  # kubelet: minimumGracePeriodInSeconds, the shortest window between SIGTERM and SIGKILL
RESTART_BACKOFF_S = (10.0, 20.0, 40.0, 80.0, 160.0, 300.0)  # the kubelet's CrashLoopBackOff steps


async def wait_process(proc: subprocess.Popen) -> int:
    """Wait until a child of this process exits (on a pidfd), reap it, and return its exit code."""
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return proc.wait()
    try:
        while proc.poll() is None:
            await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
    return proc.returncode


def signal_group(proc: subprocess.Popen, signum: int) -> None:
    """Signal the session a container or hook runs in, if its leader has not been reaped yet."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)


def start_container(lab: Lab, state: PodState, cs: ContainerState) -> None:
    """Start the container's command in the pod's netns, journalled (blocking: a worker thread)."""
    c = cs.container
    lab.log_dir.mkdir(parents=True, exist_ok=True)
    cs.log_path = str(lab.log_dir / f"{state.namespace}_{state.name}_{c.name}.log")
    # a fresh tracker (not ready) before the process exists: the lab's thread reads `ready` while
    # this one runs, and a running container with no tracker yet would count as Ready unprobed
    if c.readiness_probe is not None:
        cs.readiness = ReadinessTracker(c.readiness_probe)
    with open(cs.log_path, "ab") as logf:
        cs.process = popen_in_netns(state.netns, list(c.command) + list(c.args),
                                    env=lab.container_env(state, c), cwd=c.working_dir or None,
                                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    cs.journal = lab.resources.record_process(cs.process.pid, name=f"{state.name}/{c.name}")
    cs.exit_code = None


async def supervise(lab: Lab, state: PodState, cs: ContainerState) -> None:
    """Start a container, restart it per restartPolicy, and run its readiness probe. A deleted
    pod's containers are not (re)started, but probes go on until they exit: they say whether a
    terminating endpoint still serves."""
    if not state.terminating and not await _start(lab, state, cs):
        return
    cs.started.set()
    if cs.process is None:
        return
    lab.pod_changed(state)
    probe = cs.container.readiness_probe
    next_probe = trio.current_time() + (probe.initial_delay_seconds if probe else 0)
    while True:
        with trio.move_on_at(next_probe if probe is not None else math.inf):
            await wait_process(cs.process)
        if (code := cs.process.returncode) is not None:
            cs.exit_code = code
            cs.exited.set()
            lab.pod_changed(state)  # a container that died is not ready
            if cs.journal is not None:  # the journal is rewritten whole: not in the datapath's thread
                journal, cs.journal = cs.journal, None
                await trio.to_thread.run_sync(lab.resources.forget, journal)
            policy = state.pod.restart_policy
            if state.terminating or policy == "Never" or (policy == "OnFailure" and code == 0):
                return
            delay = RESTART_BACKOFF_S[min(cs.restarts, len(RESTART_BACKOFF_S) - 1)]
            log.warning("%s/%s exited with %s; restarting in %ss", state.name, cs.container.name, code, delay)
            await trio.sleep(delay)
            if state.terminating:
                return
            cs.restarts += 1
            cs.exited = trio.Event()
            if not await _start(lab, state, cs):
                return
            lab.pod_changed(state)
            next_probe = trio.current_time() + (probe.initial_delay_seconds if probe else 0)
            continue
        ok, message = await trio.to_thread.run_sync(run_probe, state.netns, state.ip, cs.container, probe)
        was = state.ready
        cs.readiness.record(ok, message)
        if state.ready != was:
            lab.pod_changed(state)
        # probe fast until ready so a lab comes up quickly, then at periodSeconds
        period = probe.period_seconds if cs.readiness.ready else min(probe.period_seconds, 0.2)
        next_probe = trio.current_time() + period


async def _start(lab: Lab, state: PodState, cs: ContainerState) -> bool:
    """Start the container; a command that cannot be started (not found, not executable) is the
    kubelet's StartError: exit code 128, logged, not retried, the pod never Ready."""
    try:
        await trio.to_thread.run_sync(start_container, lab, state, cs)
        return True
    except OSError as exc:
        log.error("%s/%s: cannot start %s: %s", state.key, cs.container.name, cs.container.command[0], exc)
        cs.process, cs.exit_code = None, 128
        cs.started.set()
        cs.exited.set()
        lab.pod_changed(state)
        return False


async def terminate_pod(lab: Lab, state: PodState, grace_s: float) -> None:
    """Stop every container of a deleted pod, in parallel, as the kubelet does."""
    async with trio.open_nursery() as nursery:
        for cs in state.containers:
            nursery.start_soon(kill_container, lab, state, cs, grace_s)


async def kill_container(lab: Lab, state: PodState, cs: ContainerState, grace_s: float) -> None:
    """preStop within `grace_s`, then SIGTERM, then SIGKILL after what is left (at least 2 s)."""
    await cs.started.wait()
    if not cs.running:
        return
    began = trio.current_time()
    lifecycle = cs.container.lifecycle
    if lifecycle is not None and lifecycle.pre_stop is not None and grace_s > 0:
        with trio.move_on_after(grace_s) as scope:
            problem = await run_pre_stop(lab, state, cs)
        if scope.cancelled_caught:
            problem = f"did not finish within the grace period ({grace_s:g} s)"
        if problem:  # the kubelet records a FailedPreStopHook event and goes on
            log.warning("%s/%s: preStop hook %s", state.key, cs.container.name, problem)
        cs.pre_stop_s = trio.current_time() - began
    remaining = max(grace_s - (trio.current_time() - began), MIN_GRACE_S)
    if cs.process is None or cs.exited.is_set():
        return
    signal_group(cs.process, signal.SIGTERM)
    with trio.move_on_after(remaining):
        await cs.exited.wait()
        return
    log.info("%s/%s: still running %.1f s after SIGTERM; SIGKILL", state.key, cs.container.name, remaining)
    signal_group(cs.process, signal.SIGKILL)
    await cs.exited.wait()


async def run_pre_stop(lab: Lab, state: PodState, cs: ContainerState) -> str | None:
    """Run the container's preStop hook to its end; None on success, else what went wrong."""
    hook = cs.container.lifecycle.pre_stop
    if isinstance(hook, SleepAction):
        await trio.sleep(hook.seconds)
        return None
    if isinstance(hook, ExecAction):
        return await _exec_hook(lab, state, cs, list(hook.command))
    if isinstance(hook, HTTPGetAction):
        port = cs.container.port_number(hook.port)
        return await trio.to_thread.run_sync(run_in_netns, state.netns, _http_get, hook.host or state.ip,
                                             port, hook, abandon_on_cancel=True)
    return f"unsupported handler {type(hook).__name__}"


async def _exec_hook(lab: Lab, state: PodState, cs: ContainerState, argv: list[str]) -> str | None:
    with open(cs.log_path or os.devnull, "ab") as logf:
        proc = await trio.to_thread.run_sync(lambda: popen_in_netns(
            state.netns, argv, env=lab.container_env(state, cs.container),
            cwd=cs.container.working_dir or None, stdin=subprocess.DEVNULL, stdout=logf,
            stderr=subprocess.STDOUT))
    entry = None
    try:
        entry = await trio.to_thread.run_sync(lab.resources.record_process, proc.pid,
                                              f"{state.name}/{cs.container.name}/preStop")
        code = await wait_process(proc)
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:  # cancelled (grace period over, or the lab is going away)
                signal_group(proc, signal.SIGKILL)
                await wait_process(proc)
            if entry is not None:
                await trio.to_thread.run_sync(lab.resources.forget, entry)
    return None if code == 0 else f"exec {argv[0]}: exit code {code}"


def _http_get(host: str, port: int, action: HTTPGetAction, timeout_s: float = 30.0) -> str | None:
    """The kubelet's httpGet hook: any answer counts as run; a connection error is a failure."""
    cls = http.client.HTTPSConnection if action.scheme == "HTTPS" else http.client.HTTPConnection
    conn = cls(host, port, timeout=timeout_s)
    try:
        conn.request("GET", action.path, headers={"User-Agent": "kube-lifecycle/podnet"})
        conn.getresponse().read()  # runHTTPHandler discards the body; the status does not matter
    except (OSError, http.client.HTTPException) as exc:
        return f'Get "{action.scheme.lower()}://{host}:{port}{action.path}": {exc}'
    finally:
        conn.close()
    return None
