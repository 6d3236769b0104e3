"""Deployments on a running node: the deployment and ReplicaSet controllers, carried out in a lab.

Layer: lab. `DeploymentController` owns the pods of one Deployment. Its loop asks the sans-IO
planner (`podnet.cluster.rollout.plan_rollout`) what to do with the pods as they are now, carries
the answer out, and asks again whenever a pod changes (started, Ready, unready, deleted, gone), or
when a Ready pod is due to become available (minReadySeconds):

    create n  → n pod objects `<deployment>-<pod-template-hash>-<5 chars>` at once (they count
                from now, as in the API); CNI ADD and the containers follow, one pod at a time
    delete p  → `Lab.begin_delete`: the pod is terminating at once (it leaves its ReplicaSet and
                its endpoint goes terminating), its preStop hook and SIGTERM run in the background

`rollout` (a new template, e.g. an env change) and `scale` change the Deployment and wait until
`kubectl rollout status` would print "successfully rolled out", returning a `RolloutReport` with
what happened on the way: every progress line, the pods created and deleted, and the most pods
and the fewest available pods seen, which maxSurge and maxUnavailable bound.

`RolloutTracker` is the part shared with the control plane's controller of a cluster's
Deployments (podnet.cluster_deployments, which writes Pod objects to the store instead): the spec,
its ReplicaSets, and `rollout`/`scale`/`apply` with the report.

Invariants: the controller only ever counts and deletes pods it created (a manifest Pod whose
labels match the selector is not adopted, as it lacks the pod-template-hash); a pod it deletes is
not counted again; a failed CNI ADD is retried with backoff (1 s doubling to 30 s), as the
ReplicaSet controller retries a failed create.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Mapping

import trio

from podnet.cluster.model import Deployment, Pod, PodTemplate, describe
from podnet.cluster.rollout import (DeploymentStatus, ReplicaView, RolloutStep, name_draws, new_pod,
                                    plan_rollout, resolve_fenceposts, template_hash)
from podnet.errors import ConfigError

if TYPE_CHECKING:
    from podnet.lab import Lab, PodState

log = logging.getLogger(__name__)

_IDLE_REPLAN_S = 1.0
_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


@dataclass(frozen=True)
class RolloutReport:
    """What a rollout (or scale) did. Times are seconds since it began; `max_pods` counts pods that
    were not terminating, `min_available` pods available (Ready for minReadySeconds)."""

    deployment: str
    old_hash: str
    new_hash: str
    replicas: int
    max_surge: int
    max_unavailable: int
    duration_s: float
    created: tuple[str, ...]
    deleted: tuple[str, ...]
    max_pods: int
    min_available: int
    progress: tuple[tuple[float, str], ...]
    status: DeploymentStatus | None


@dataclass
class _Member:
    pod: Pod
    template_hash: str
    created: float
    state: PodState | None = None   # None until CNI ADD is done
    deleting: bool = False

    def view(self) -> ReplicaView:
        st = self.state
        running = st is not None and bool(st.containers) and all(c.process is not None for c in st.containers)
        return ReplicaView(
            self.pod.name, self.template_hash, self.created,
            ready_since=st.ready_since if st is not None and not st.terminating else None,
            running=running, terminating=self.deleting or (st is not None and st.terminating),
            restarts=max((c.restarts for c in st.containers), default=0) if st is not None else 0)


@dataclass
class _Watch:
    """One rollout being waited for: what the controller saw while it ran."""

    began: float
    replicas: int
    on_progress: Callable[[str], None] | None
    max_pods: int = 0
    min_available: int | None = None
    progress: list[tuple[float, str]] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)


def check_deployment(deployment: Deployment) -> None:
    """What the API server refuses and a Deployment built in Python could still hold."""
    where = describe(deployment)
    labels = deployment.template.labels
    if not deployment.selector:
        raise ConfigError(f"{where}: spec.selector: empty selector is invalid for deployment")
    if any(labels.get(k) != v for k, v in deployment.selector.items()):
        raise ConfigError(f"{where}: spec.template.metadata.labels: `selector` does not match template "
                          f"`labels` (selector {dict(deployment.selector)}, labels {dict(labels)})")
    if not deployment.template.containers:
        raise ConfigError(f"{where}: spec.template.spec.containers: required")
    for index, container in enumerate(deployment.template.containers):
        if not container.command:
            raise ConfigError(f"{where}: spec.template.spec.containers[{index}].command: required, podnet "
                              "runs no images so there is no entrypoint to fall back on")
    if deployment.template.restart_policy != "Always":
        raise ConfigError(f'{where}: spec.template.spec.restartPolicy: Unsupported value: '
                          f'"{deployment.template.restart_policy}": supported values: "Always"')
    if deployment.replicas < 0:
        raise ConfigError(f"{where}: spec.replicas: must be greater than or equal to 0")
    resolve_fenceposts(deployment)  # a malformed maxSurge/maxUnavailable fails here


class RolloutTracker:
    """A Deployment's spec and what its rollouts are waited on with: the part the lab's controller
    and the control plane's (podnet.cluster_deployments) share. A subclass runs the loop: it asks
    the planner, calls `_observe` with each step, logs pods in `created_log`/`deleted_log`, and
    `_wake`s on a change of spec."""

    def __init__(self, deployment: Deployment) -> None:
        check_deployment(deployment)
        self.deployment = deployment
        self.hash = template_hash(deployment.template)
        self.replica_sets: list[str] = [self.hash]   # pod-template-hashes, oldest ReplicaSet first
        self.created_log: list[str] = []
        self.deleted_log: list[str] = []
        self.status: DeploymentStatus | None = None
        self.message = "waiting for the deployment controller"
        self.complete = False
        self.last_error: str | None = None
        self._kick = trio.Event()
        self._watches: list[_Watch] = []

    @property
    def key(self) -> str:
        return self.deployment.key

    def _wake(self) -> None:
        kick, self._kick = self._kick, trio.Event()
        kick.set()

    def _observe(self, step: RolloutStep, now: float) -> None:
        changed = step.message != self.message
        self.status, self.message, self.complete = step.status, step.message, step.complete
        if changed:
            log.info("%s", step.message)
        for watch in self._watches:
            watch.max_pods = max(watch.max_pods, step.status.replicas)
            available = step.status.available_replicas
            watch.min_available = available if watch.min_available is None else min(watch.min_available, available)
            if not watch.progress or watch.progress[-1][1] != step.message:
                watch.progress.append((round(now - watch.began, 3), step.message))
                if watch.on_progress is not None:
                    watch.on_progress(step.message)
            if step.complete:
                watch.done.set()

    # ---- changes ----------------------------------------------------------------------------

    async def rollout(self, *, env: Mapping[str, str] | None = None, container: str | None = None,
                      template: PodTemplate | None = None, timeout_s: float | None = None,
                      on_progress: Callable[[str], None] | None = None) -> RolloutReport:
        """A new pod template - `template`, or the current one with `env` set (`kubectl set env`) -
        rolled out per the strategy; returns when it is rolled out."""
        if (env is None) == (template is None):
            raise ConfigError(f"{describe(self.deployment)}: rollout: give either env or template")
        if template is None:
            template = self.deployment.template.with_env(env, container)
        return await self.apply(replace(self.deployment, template=template), timeout_s=timeout_s,
                                on_progress=on_progress)

    async def scale(self, replicas: int, *, timeout_s: float | None = None) -> RolloutReport:
        return await self.apply(replace(self.deployment, replicas=replicas), timeout_s=timeout_s)

    async def apply(self, deployment: Deployment, *, timeout_s: float | None = None,
                    on_progress: Callable[[str], None] | None = None) -> RolloutReport:
        """Make `deployment` (same namespace and name) the spec, and wait for the rollout to finish;
        TimeoutError after `timeout_s` (default: its progressDeadlineSeconds)."""
        if deployment.key != self.key:
            raise ConfigError(f"{describe(deployment)}: not the Deployment {self.key}")
        check_deployment(deployment)
        old_hash = self.hash
        began = trio.current_time()
        created, deleted = len(self.created_log), len(self.deleted_log)
        self.deployment, self.hash = deployment, template_hash(deployment.template)
        if self.hash not in self.replica_sets:
            self.replica_sets.append(self.hash)
        self.complete = False
        watch = _Watch(began, deployment.replicas, on_progress)
        self._watches.append(watch)
        self._wake()
        limit = deployment.progress_deadline_seconds if timeout_s is None else timeout_s
        try:
            with trio.move_on_after(limit):
                await watch.done.wait()
        finally:
            self._watches.remove(watch)
        if not watch.done.is_set():
            why = f"; last error: {self.last_error}" if self.last_error else ""
            raise TimeoutError(f'deployment "{deployment.name}" exceeded its progress deadline ({limit:g} s): '
                               f"{self.message}{why}")
        surge, unavailable = resolve_fenceposts(deployment)
        return RolloutReport(
            deployment=self.key, old_hash=old_hash, new_hash=self.hash, replicas=deployment.replicas,
            max_surge=surge, max_unavailable=min(unavailable, deployment.replicas),
            duration_s=trio.current_time() - began, created=tuple(self.created_log[created:]),
            deleted=tuple(self.deleted_log[deleted:]), max_pods=watch.max_pods,
            min_available=watch.min_available or 0, progress=tuple(watch.progress), status=self.status)


class DeploymentController(RolloutTracker):
    """The pods of one Deployment on this node, kept as its spec says (see the module docstring)."""

    def __init__(self, lab: Lab, deployment: Deployment) -> None:
        super().__init__(deployment)
        self.lab = lab
        self.members: dict[str, _Member] = {}
        self._rng = name_draws(lab.config.seed, deployment)
        self._failures = 0
        self._hold_until = 0.0

    def pods(self) -> list[PodState]:
        """The lab's pods this Deployment owns now (terminating ones included)."""
        return [m.state for m in self.members.values() if m.state is not None]

    # ---- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            generation = self.lab.generation
            now = trio.current_time()
            for name in [n for n, m in self.members.items() if m.state is not None and m.state.removed.is_set()]:
                del self.members[name]
            step = plan_rollout(self.deployment, self.hash, [m.view() for m in self.members.values()], now,
                                replica_sets=self.replica_sets)
            self._observe(step, now)
            creating = step.create if now >= self._hold_until else 0
            for _ in range(creating):
                self._create(now)
            for name in step.delete:
                self._delete(name)
            if creating or step.delete:
                await trio.lowlevel.checkpoint()
                continue
            wake = now + _IDLE_REPLAN_S
            if step.wake_at is not None:
                wake = min(wake, step.wake_at + 0.001)
            if step.create:
                wake = min(wake, self._hold_until)
            await self._wait(generation, wake)

    async def _wait(self, generation: int, deadline: float) -> None:
        kick = self._kick
        async with trio.open_nursery() as nursery:
            async def on_pods() -> None:
                await self.lab.wait_state_changed(generation, deadline)
                nursery.cancel_scope.cancel()

            async def on_kick() -> None:
                with trio.move_on_at(deadline):
                    await kick.wait()
                nursery.cancel_scope.cancel()
            nursery.start_soon(on_pods)
            nursery.start_soon(on_kick)

    def _create(self, now: float) -> None:
        """The ReplicaSet controller creates a pod: the object exists now, the node plumbs it next."""
        namespace = self.deployment.namespace
        taken = {p.name for p in self.lab.pods.values() if p.namespace == namespace} | set(self.members)
        pod = new_pod(self.deployment, self.hash, self._rng, taken)
        member = _Member(pod, self.hash, now)
        self.members[pod.name] = member
        self.created_log.append(pod.name)
        self.lab._nursery.start_soon(self._materialise, member)

    async def _materialise(self, member: _Member) -> None:
        try:
            member.state = await self.lab.add_pod(member.pod)
        except Exception as exc:  # noqa: BLE001 - FailedCreate: logged, retried after a backoff
            self.members.pop(member.pod.name, None)
            self.last_error = f"{member.pod.key}: {exc}"
            delay = _BACKOFF_S[min(self._failures, len(_BACKOFF_S) - 1)]
            self._failures += 1
            self._hold_until = trio.current_time() + delay
            log.error("%s: creating pod %s failed (retrying in %g s): %s", self.key, member.pod.name, delay, exc)
        else:
            self._failures = 0
            if member.deleting:  # deleted while it was being created
                self.lab.begin_delete(member.state)
        self._wake()

    def _delete(self, name: str) -> None:
        member = self.members[name]
        member.deleting = True
        self.deleted_log.append(name)
        if member.state is not None:
            self.lab.begin_delete(member.state)
