"""The deployment controller and the ReplicaSet controller as one pure function: pods in, a step out.

Layer: cluster (no I/O, no clock: every call takes `now`, monotonic seconds). `plan_rollout` is
given a Deployment, the pod-template-hash of its current template, and a `ReplicaView` of every pod
the Deployment owns (any template, terminating or not), and answers with a `RolloutStep`: how many
pods of the current template to create, which pods to delete, and when to ask again if nothing else
changes (a Ready pod that will become available once minReadySeconds have passed). The lab carries
the step out and asks again whenever a pod changes.

Invariants:
- A ReplicaSet is the set of owned pods with one pod-template-hash; its size is its pods that are
  not terminating (a deleted pod leaves its ReplicaSet at once, as in the API). The "new" one has
  the current template's hash; the others are "old", oldest first (`replica_sets`, else by their
  first pod's creation).
- RollingUpdate, per pass (dc.rolloutRolling): first reconcileNewReplicaSet - grow the new
  ReplicaSet up to replicas + maxSurge pods in all (NewRSNewReplicas), or shrink it to replicas;
  a pass that scales up stops there. Otherwise reconcileOldReplicaSets - may delete at most
  all - (replicas - maxUnavailable) - (new pods not available); unavailable old pods go first
  (cleanupUnhealthyReplicas), then, while more than replicas - maxUnavailable pods are available,
  available old ones (scaleDownOldReplicaSetsForRollingUpdate). Old ReplicaSets shrink oldest first.
- maxSurge rounds a percent up, maxUnavailable rounds it down (GetScaledValueFromIntOrPercent);
  when both come to 0, maxUnavailable is 1 (ResolveFenceposts); maxUnavailable is at most replicas.
- Recreate: delete every old pod; create nothing while any old pod still exists (terminating ones
  included: oldPodsRunning); then scale the new ReplicaSet to replicas.
- Which pod of a ReplicaSet goes when it shrinks is the ReplicaSet controller's choice
  (`deletion_order`, ActivePodsWithRanks with LogarithmicScaleDown): not started before running,
  not Ready before Ready, Ready for less time before longer (log2 buckets of the duration), more
  restarts first, newer before older (log2 buckets); ties inside a bucket by UID, here the name.
- A pod is available when it has been Ready for more than minReadySeconds (IsPodAvailable).

Names: a ReplicaSet is `<deployment>-<pod-template-hash>` and its pods `<replicaset>-<5 characters>`
(generateName: the prefix cut to 58 characters, then 5 from apimachinery's vowel-free alphabet).
The hash is FNV-32a, its decimal digits mapped onto that alphabet (SafeEncodeString), as
controller.ComputeHash does; but ComputeHash hashes Go's spew dump of the PodTemplateSpec, which
Python cannot reproduce, so podnet hashes a canonical JSON of its own `PodTemplate`: the same
template gives the same hash across runs, but not the hash a real cluster would print.

Differences: no proportional scaling of several ReplicaSets when `replicas` changes mid-rollout
(the new ReplicaSet absorbs the change, old ones only shrink); no collisionCount; no
progressDeadlineSeconds condition here (the lab's `rollout` turns it into a timeout).
"""

from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Mapping, Sequence

from podnet.errors import ConfigError

from .model import Deployment, IntOrPercent, Pod, PodTemplate

POD_TEMPLATE_HASH_LABEL = "pod-template-hash"  # apps.DefaultDeploymentUniqueLabelKey
# k8s.io/apimachinery/pkg/util/rand: no vowels (no words), no 0/1/3 (no look-alikes)
ALPHANUMS = "bcdfghjklmnpqrstvwxz2456789"
NAME_SUFFIX_LENGTH = 5
MAX_GENERATED_NAME_BASE = 63 - NAME_SUFFIX_LENGTH  # names.SimpleNameGenerator cuts the prefix to this
_FNV32_OFFSET, _FNV32_PRIME = 0x811C9DC5, 0x01000193


# --- names ----------------------------------------------------------------------------------------

def fnv32a(data: bytes) -> int:
    h = _FNV32_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV32_PRIME) & 0xFFFFFFFF
    return h


def safe_encode(text: str) -> str:
    """rand.SafeEncodeString: each character mapped onto the vowel-free alphabet by its code."""
    return "".join(ALPHANUMS[ord(ch) % len(ALPHANUMS)] for ch in text)


def _canonical(value: Any) -> Any:
    if is_dataclass(value):
        return {"@" + type(value).__name__: {f.name: _canonical(getattr(value, f.name)) for f in fields(value)}}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (tuple, list)):
        return [_canonical(v) for v in value]
    return value


def template_hash(template: PodTemplate) -> str:
    """The pod-template-hash label of pods made from `template` (see the module docstring)."""
    text = json.dumps(_canonical(template), sort_keys=True, separators=(",", ":"))
    return safe_encode(str(fnv32a(text.encode())))


def replica_set_name(deployment: Deployment, pod_hash: str) -> str:
    return f"{deployment.name}-{pod_hash}"


def generate_name(prefix: str, rng: random.Random, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """generateName: `prefix` cut to 58 characters plus 5 random ones, drawn again on a clash."""
    base = prefix[:MAX_GENERATED_NAME_BASE]
    while True:
        name = base + "".join(rng.choice(ALPHANUMS) for _ in range(NAME_SUFFIX_LENGTH))
        if name not in taken:
            return name


def name_draws(seed: int | str, deployment: Deployment) -> random.Random:
    """Where a Deployment's pod name suffixes are drawn from: seeded, so a run is repeatable."""
    return random.Random(f"{seed}/{deployment.key}")


def new_pod(deployment: Deployment, pod_hash: str, rng: random.Random, taken: set[str] | frozenset[str]) -> Pod:
    """The pod its ReplicaSet creates next: `<deployment>-<hash>-<5 chars>`, labelled with the hash."""
    name = generate_name(replica_set_name(deployment, pod_hash) + "-", rng, taken)
    return deployment.template.pod(name, deployment.namespace, {POD_TEMPLATE_HASH_LABEL: pod_hash})


# --- maxSurge / maxUnavailable ---------------------------------------------------------------------

def scaled_value(value: IntOrPercent, total: int, *, round_up: bool) -> int:
    """intstr.GetScaledValueFromIntOrPercent: an int as is, "N%" of `total` rounded up or down."""
    if isinstance(value, int):
        return value
    if not (isinstance(value, str) and value.endswith("%") and value[:-1].isdigit()):
        raise ConfigError(f"invalid value for IntOrString: invalid type: string is not a percentage: {value!r}")
    exact = int(value[:-1]) * total / 100
    return math.ceil(exact) if round_up else math.floor(exact)


def resolve_fenceposts(deployment: Deployment) -> tuple[int, int]:
    """(maxSurge, maxUnavailable) as pod counts for the Deployment's replicas (ResolveFenceposts)."""
    rolling = deployment.strategy.rolling_update
    if deployment.strategy.type != "RollingUpdate" or rolling is None:
        return 0, 0
    surge = scaled_value(rolling.max_surge, deployment.replicas, round_up=True)
    unavailable = scaled_value(rolling.max_unavailable, deployment.replicas, round_up=False)
    if surge == 0 and unavailable == 0:
        unavailable = 1  # a percent that rounded down to 0: progress needs one of the two
    return surge, unavailable


def max_unavailable(deployment: Deployment) -> int:
    """deploymentutil.MaxUnavailable: 0 for Recreate or 0 replicas, never more than replicas."""
    if deployment.strategy.type != "RollingUpdate" or deployment.replicas == 0:
        return 0
    return min(resolve_fenceposts(deployment)[1], deployment.replicas)


# --- pods as the controllers see them -------------------------------------------------------------

@dataclass(frozen=True)
class ReplicaView:
    """One pod a Deployment owns. `ready_since` is when its Ready condition last turned true (None:
    not Ready); `running` is false until its containers have started (phase Pending)."""

    name: str
    template_hash: str
    created: float
    ready_since: float | None = None
    running: bool = True
    terminating: bool = False
    restarts: int = 0

    @property
    def ready(self) -> bool:
        return self.ready_since is not None

    def available(self, min_ready_seconds: float, now: float) -> bool:
        """IsPodAvailable: Ready, for more than minReadySeconds."""
        if self.ready_since is None:
            return False
        return min_ready_seconds == 0 or self.ready_since + min_ready_seconds < now


def _log_rank(t: float, now: float) -> int:
    elapsed_ns = (now - t) * 1e9
    return int(math.log2(elapsed_ns)) if elapsed_ns > 0 else -1


def _before(a: ReplicaView, b: ReplicaView, now: float) -> bool:
    """ActivePodsWithRanks.Less: True if `a` should be deleted before `b`."""
    if a.running != b.running:                       # Pending < Running
        return not a.running
    if a.ready != b.ready:                           # not Ready < Ready
        return not a.ready
    if a.ready and b.ready and a.ready_since != b.ready_since:   # Ready for less time first
        diff = _log_rank(a.ready_since, now) - _log_rank(b.ready_since, now)
        return a.name < b.name if diff == 0 else diff < 0
    if a.restarts != b.restarts:                     # more restarts first
        return a.restarts > b.restarts
    if a.created != b.created:                       # newer first
        diff = _log_rank(a.created, now) - _log_rank(b.created, now)
        return a.name < b.name if diff == 0 else diff < 0
    return False


def deletion_order(pods: Sequence[ReplicaView], now: float) -> list[ReplicaView]:
    """The pods of one ReplicaSet, those it deletes first when it shrinks first."""
    def compare(a: ReplicaView, b: ReplicaView) -> int:
        return -1 if _before(a, b, now) else 1 if _before(b, a, now) else 0
    return sorted(pods, key=functools.cmp_to_key(compare))


# --- one pass ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeploymentStatus:
    """apps/v1 DeploymentStatus as the controller would write it after the pass: `replicas`
    counts pods that are not terminating; `terminating` is status.terminatingReplicas."""

    replicas: int
    updated_replicas: int
    ready_replicas: int
    available_replicas: int
    unavailable_replicas: int
    terminating_replicas: int


@dataclass(frozen=True)
class RolloutStep:
    create: int = 0                      # pods of the current template to create
    delete: tuple[str, ...] = ()         # pods to delete (gracefully), in the order chosen
    wake_at: float | None = None         # plan again then, if nothing changes before
    status: DeploymentStatus | None = None   # before the step is carried out
    complete: bool = False               # `kubectl rollout status` would say "successfully rolled out"
    message: str = ""                    # what `kubectl rollout status` would print now


def rollout_message(name: str, replicas: int, status: DeploymentStatus) -> tuple[str, bool]:
    """kubectl's DeploymentStatusViewer: its line for this status, and whether the rollout is done."""
    if status.updated_replicas < replicas:
        return (f'Waiting for deployment "{name}" rollout to finish: {status.updated_replicas} out of '
                f"{replicas} new replicas have been updated...", False)
    if status.replicas > status.updated_replicas:
        return (f'Waiting for deployment "{name}" rollout to finish: '
                f"{status.replicas - status.updated_replicas} old replicas are pending termination...", False)
    if status.available_replicas < status.updated_replicas:
        return (f'Waiting for deployment "{name}" rollout to finish: {status.available_replicas} of '
                f"{status.updated_replicas} updated replicas are available...", False)
    return f'deployment "{name}" successfully rolled out', True


def plan_rollout(deployment: Deployment, new_hash: str, pods: Sequence[ReplicaView], now: float, *,
                 replica_sets: Sequence[str] = ()) -> RolloutStep:
    """One pass of the deployment controller, with the ReplicaSet controllers carrying it out."""
    min_ready = deployment.min_ready_seconds
    live = [p for p in pods if not p.terminating]
    new = [p for p in live if p.template_hash == new_hash]
    old_sets = _old_replica_sets(live, new_hash, replica_sets)
    available = {p.name for p in live if p.available(min_ready, now)}
    desired = deployment.replicas
    status = DeploymentStatus(
        replicas=len(live), updated_replicas=len(new), ready_replicas=sum(p.ready for p in live),
        available_replicas=len(available), unavailable_replicas=max(desired - len(available), 0),
        terminating_replicas=len(pods) - len(live))
    message, complete = rollout_message(deployment.name, desired, status)
    pending = [p.ready_since + min_ready for p in live
               if p.ready_since is not None and p.name not in available]
    done = dict(status=status, complete=complete, message=message, wake_at=min(pending, default=None))

    if deployment.strategy.type == "Recreate":
        if any(old_sets.values()):
            return RolloutStep(delete=tuple(p.name for pods_ in old_sets.values() for p in pods_), **done)
        if any(p.template_hash != new_hash for p in pods):
            return RolloutStep(**done)                 # old pods still terminating: wait
        return _scale_new(new, desired, now, done)

    surge, _ = resolve_fenceposts(deployment)
    # reconcileNewReplicaSet
    if len(new) > desired:
        return _scale_new(new, desired, now, done)
    if len(new) < desired:
        room = desired + surge - len(live)
        if room > 0:
            return RolloutStep(create=min(room, desired - len(new)), **done)
    # reconcileOldReplicaSets
    if not any(old_sets.values()):
        return RolloutStep(**done)
    min_available = desired - max_unavailable(deployment)
    new_unavailable = sum(p.name not in available for p in new)
    budget = len(live) - min_available - new_unavailable
    if budget <= 0:
        return RolloutStep(**done)
    deleted: list[str] = []
    for rs_pods in old_sets.values():                  # cleanupUnhealthyReplicas, oldest first
        unhealthy = [p for p in rs_pods if p.name not in available]
        count = min(budget - len(deleted), len(unhealthy))
        if count > 0:
            deleted += [p.name for p in deletion_order(rs_pods, now)[:count]]
    gone = set(deleted)
    still_available = len(available - gone)
    if still_available > min_available:                # scaleDownOldReplicaSetsForRollingUpdate
        scale_down = still_available - min_available
        taken = 0
        for rs_pods in old_sets.values():
            remaining = [p for p in rs_pods if p.name not in gone]
            count = min(len(remaining), scale_down - taken)
            if count > 0:
                deleted += [p.name for p in deletion_order(remaining, now)[:count]]
                taken += count
    return RolloutStep(delete=tuple(deleted), **done)


def _scale_new(new: list[ReplicaView], desired: int, now: float, done: dict) -> RolloutStep:
    if len(new) < desired:
        return RolloutStep(create=desired - len(new), **done)
    extra = deletion_order(new, now)[:len(new) - desired]
    return RolloutStep(delete=tuple(p.name for p in extra), **done)


def _old_replica_sets(live: list[ReplicaView], new_hash: str,
                      order: Sequence[str]) -> dict[str, list[ReplicaView]]:
    """hash -> its pods that are not terminating, oldest ReplicaSet first."""
    groups: dict[str, list[ReplicaView]] = {}
    for p in sorted(live, key=lambda p: p.created):
        if p.template_hash != new_hash:
            groups.setdefault(p.template_hash, []).append(p)
    rank = {h: i for i, h in enumerate(order)}
    first = {h: ps[0].created for h, ps in groups.items()}
    return dict(sorted(groups.items(), key=lambda kv: (rank.get(kv[0], -1), first[kv[0]])))
