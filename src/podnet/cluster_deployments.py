"""Deployments of a cluster: the deployment, ReplicaSet and scheduler controllers, on the store.

Layer: lab (store + trio; no namespaces, no datapath). It runs in the control plane's process
(podnet.control_plane), for both cluster modes, as kube-controller-manager and kube-scheduler run
beside the API server. Each `StoreDeployment` asks the sans-IO planner
(`podnet.cluster.rollout.plan_rollout`) what to do with the Deployment's pods as the store has
them, and carries the answer out as the API would:

    create n  → n Pod objects `<deployment>-<pod-template-hash>-<5 chars>` (podnet.deployments'
                naming), each with spec.nodeName set when it is created: the template's, else the
                registered node with the fewest pods in the store (the first such in manifest
                order), as `plan_cluster` places the manifests' pods; the node's kubelet starts it
    delete p  → the pod's key is deleted; its node terminates it gracefully (preStop, SIGTERM,
                grace period) and its endpoint leaves the slices at once

Readiness is read from the status each node writes (IP: started; Ready); a pod whose node is not
registered is not Ready (the node lifecycle controller). A pod becomes Ready, for minReadySeconds,
when this controller first sees it so. The pods are scheduled only once every Node of the
manifests has registered, or `schedule_wait_s` after the first one did, so that replicas created at
start spread over all nodes instead of going to whichever registered first.

Invariants: a Deployment owns the pods it created and the stored pods whose name is
`<deployment>-<a hash it used>-…` carrying that pod-template-hash label and its selector's labels;
a pod created and then seen deleted (the revision its watch reached is past the create) has left
its ReplicaSet and is replaced. Differences from Kubernetes: a deleted pod's key goes at once
(no deletionTimestamp), so this controller does not see it terminating: `terminating_replicas` is
0, and Recreate does not wait for the old pods' grace periods before creating new ones.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import trio

from podnet.cluster.endpoints import PodStatus
from podnet.cluster.model import Deployment, Pod
from podnet.cluster.rollout import POD_TEMPLATE_HASH_LABEL, ReplicaView, RolloutStep, name_draws, new_pod, plan_rollout
from podnet.deployments import RolloutTracker
from podnet.store import KeyExists, Store, StoreUnavailable
from podnet.store.informer import back_off
from podnet.store.objects import ObjectView, encode, key_of, object_key, parse_key

log = logging.getLogger(__name__)

_IDLE_REPLAN_S = 1.0


@dataclass
class _Replica:
    pod: Pod                        # as created (spec.nodeName set)
    created: float
    revision: int = 0               # the store revision its create had (0: not written yet)
    ready_since: float | None = None
    status: PodStatus | None = None


@dataclass(frozen=True)
class Actions:
    """One pass's writes: pods to create (placed) and keys to delete; the planner's step, which
    the rollout's waiters see once the writes are done (as the lab's see it once carried out)."""

    create: tuple[Pod, ...] = ()
    delete: tuple[str, ...] = ()
    step: RolloutStep | None = None


class StoreDeployment(RolloutTracker):
    """One Deployment's pods as Pod objects in the store (see the module docstring)."""

    def __init__(self, deployment: Deployment, seed: int | str = 0) -> None:
        super().__init__(deployment)
        self.members: dict[str, _Replica] = {}
        # pods deleted here, until a listing at or past the delete no longer has them (a listing
        # from before the delete must not bring them back): name -> the delete's revision (0: not yet)
        self.gone: dict[str, int] = {}
        self._rng = name_draws(seed, deployment)
        self.wake_at: float | None = None

    def owns(self, pod: Pod) -> bool:
        """Whether a stored pod is one of this Deployment's (see the module's invariants)."""
        d = self.deployment
        labels = pod.meta.labels
        pod_hash = labels.get(POD_TEMPLATE_HASH_LABEL)
        return (pod.namespace == d.namespace and pod_hash in self.replica_sets
                and pod.name.startswith(f"{d.name}-{pod_hash}-")
                and all(labels.get(k) == v for k, v in d.selector.items()))

    def settled(self, pods: Sequence[Pod]) -> bool:
        """Whether `pods` (a listing) hold exactly `replicas` of this Deployment's pods, all of the
        current template: with every pod Ready, the rollout is done as far as that listing goes."""
        owned = [p for p in pods if self.owns(p)]
        return len(owned) == self.deployment.replicas and all(
            p.meta.labels[POD_TEMPLATE_HASH_LABEL] == self.hash for p in owned)

    def reconcile(self, stored: dict[str, tuple[Pod, PodStatus | None]], revision: int, registered: set[str],
              load: Counter, now: float, *, schedulable: bool = True) -> Actions:
        """One pass over the pods the store has (`stored`: name -> pod, status, for this namespace
        at `revision`), `registered` nodes and each node's pod count `load` (updated with the
        pods placed here). `schedulable` False: create nothing yet."""
        ns = self.deployment.namespace
        for name, deleted_at in list(self.gone.items()):
            if deleted_at and revision >= deleted_at and name not in stored:
                del self.gone[name]
        for name, (pod, status) in stored.items():
            if name not in self.members and name not in self.gone and self.owns(pod):
                self.members[name] = _Replica(pod, now, revision)   # one this controller did not create
        for name in list(self.members):
            member = self.members[name]
            if name not in stored:
                if member.revision and revision >= member.revision:   # deleted by someone else: gone
                    del self.members[name]
                continue
            pod, status = stored[name]
            if status is not None and pod.node_name is not None and \
                    (status.node_name or pod.node_name) not in registered:
                status = replace(status, ready=False)   # no lease, no Ready pods
            member.status = status
            ready = status is not None and status.ready and not status.terminating
            if not ready:
                member.ready_since = None
            elif member.ready_since is None:
                member.ready_since = now
        views = [ReplicaView(name, m.pod.meta.labels[POD_TEMPLATE_HASH_LABEL], m.created,
                             ready_since=m.ready_since, running=m.status is not None and m.status.ip is not None)
                 for name, m in self.members.items()]
        step = plan_rollout(self.deployment, self.hash, views, now, replica_sets=self.replica_sets)
        self.wake_at = step.wake_at
        created = []
        if schedulable:
            taken = set(stored) | set(self.members)
            for _ in range(step.create):
                pod = new_pod(self.deployment, self.hash, self._rng, taken)
                node = pod.node_name or _least_loaded(registered, load)
                if node is None:
                    break
                pod = replace(pod, node_name=node)
                load[node] += 1
                taken.add(pod.name)
                self.members[pod.name] = _Replica(pod, now)
                self.created_log.append(pod.name)
                created.append(pod)
        for name in step.delete:
            member = self.members.pop(name)
            self.gone[name] = 0
            self.deleted_log.append(name)
            if member.pod.node_name:
                load[member.pod.node_name] -= 1
        return Actions(tuple(created), tuple(key_of("Pod", ns, name) for name in step.delete), step)

    def recorded(self, name: str, revision: int) -> None:
        """The store took the create of `name` at `revision`."""
        if (member := self.members.get(name)) is not None:
            member.revision = revision

    def deleted(self, name: str, revision: int) -> None:
        """The store took the delete of `name` at `revision`."""
        if name in self.gone:
            self.gone[name] = revision

    def failed(self, name: str, why: str) -> None:
        """A create the store refused: the pod is not there (the next pass creates another)."""
        self.members.pop(name, None)
        self.last_error = f"{self.deployment.namespace}/{name}: {why}"


def _least_loaded(registered: set[str], load: Counter) -> str | None:
    """The registered node with the fewest pods, the first such in `load`'s order (manifest order)."""
    candidates = [node for node in load if node in registered]
    candidates += sorted(node for node in registered if node not in load)
    return min(candidates, key=lambda node: load[node], default=None)


class Deployments:
    """Every Deployment's controller in the control plane, run from the control plane's reflectors."""

    def __init__(self, store: Store, deployments: Sequence[Deployment], nodes: Sequence[str], *,
                 seed: int | str = 0, schedule_wait_s: float = 10.0) -> None:
        self.store = store
        self.controllers = {d.key: StoreDeployment(d, seed) for d in deployments}
        self.nodes = tuple(nodes)        # the manifests' Nodes, in their order
        self.schedule_wait_s = schedule_wait_s
        self.view = ObjectView("Pod", "deployment controller")
        self._first_registered: float | None = None
        self._changed = trio.Event()

    def __bool__(self) -> bool:
        return bool(self.controllers)

    def get(self, namespace: str, name: str) -> StoreDeployment:
        try:
            return self.controllers[f"{namespace}/{name}"]
        except KeyError:
            raise KeyError(f"no deployment {name!r} in namespace {namespace!r}") from None

    def settled(self, pods: Sequence[Pod]) -> bool:
        return all(c.settled(pods) for c in self.controllers.values())

    def changed(self) -> None:
        """Something the controllers read changed (a reflector event)."""
        self._changed.set()

    def unfinished(self) -> list[str]:
        return [f"{c.key} ({c.message})" for c in self.controllers.values() if not c.complete]

    # ---- one pass ---------------------------------------------------------------------------

    def schedulable(self, registered: set[str], now: float) -> bool:
        if registered and self._first_registered is None:
            self._first_registered = now
        if not registered:
            return False
        return set(self.nodes) <= registered or now >= self._first_registered + self.schedule_wait_s

    def plan(self, pod_kvs: list, revision: int, registered: set[str], now: float) -> list[tuple[StoreDeployment, Actions]]:
        """Every controller's pass over one snapshot (no I/O: the caller writes the actions)."""
        stored: dict[str, dict[str, tuple[Pod, PodStatus | None]]] = {}
        load = Counter({node: 0 for node in self.nodes})
        for obj in self.view.sync(pod_kvs):
            stored.setdefault(obj.obj.namespace, {})[obj.obj.name] = (obj.obj, obj.status)
            if obj.obj.node_name:
                load[obj.obj.node_name] += 1
        for controller in self.controllers.values():   # created, not listed yet: placed all the same
            listed = stored.get(controller.deployment.namespace, {})
            for name, member in controller.members.items():
                if name not in listed and member.pod.node_name:
                    load[member.pod.node_name] += 1
        schedulable = self.schedulable(registered, now)
        out = []
        for controller in self.controllers.values():
            actions = controller.reconcile(stored.get(controller.deployment.namespace, {}), revision, registered,
                                           load, now, schedulable=schedulable)
            out.append((controller, actions))
        return out

    def write(self, planned: list[tuple[StoreDeployment, Actions]]) -> None:
        """Carry the passes out (blocking: store calls). A create the store refuses (the name is
        taken) is forgotten; StoreUnavailable goes to the caller, which waits and plans again."""
        store = self.store
        for controller, actions in planned:
            for pod in actions.create:
                try:
                    controller.recorded(pod.name, store.create(object_key(pod), encode(pod)))
                except KeyExists as exc:
                    controller.failed(pod.name, str(exc))
                except StoreUnavailable as exc:
                    controller.failed(pod.name, str(exc))
                    raise
            for key in actions.delete:
                revision = store.delete(key)
                # (None: it was gone already; any listing from now on lacks it)
                controller.deleted(parse_key(key)[2], revision or store.revision())

    # ---- the loop ---------------------------------------------------------------------------

    async def run(self, snapshot: Callable[[], tuple[list, int, set[str]]]) -> None:
        """Pass and write until cancelled: on every change the reflectors see, a spec change, when
        a pod is due to become available, and at least every second. `snapshot()` gives the pods'
        cache, the revision it is at, and the registered nodes (trio's thread)."""
        failures = 0
        while True:
            self._changed = changed = trio.Event()   # what changes from here on wakes the wait below
            kicks = [c._kick for c in self.controllers.values()]
            now = trio.current_time()
            pods, revision, registered = snapshot()
            planned = self.plan(pods, revision, registered, now)
            try:
                await trio.to_thread.run_sync(self.write, planned)
                failures = 0
            except StoreUnavailable as exc:
                failures = await back_off("control plane: deployments", exc, failures, then="planning")
                continue
            for controller, actions in planned:
                controller._observe(actions.step, now)
            if any(actions.create or actions.delete for _, actions in planned):
                await trio.lowlevel.checkpoint()
                continue
            wake = now + _IDLE_REPLAN_S
            for controller in self.controllers.values():
                if controller.wake_at is not None:
                    wake = min(wake, controller.wake_at + 0.001)
            await _first_of([changed, *kicks], wake)


async def _first_of(events: list[trio.Event], deadline: float) -> None:
    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:
            for event in events:
                async def one(event=event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()
                nursery.start_soon(one)


__all__ = ["Actions", "Deployments", "StoreDeployment"]
