"""The deployment/ReplicaSet planner against sequences worked out by hand from the controllers'
rules (pkg/controller/deployment/rolling.go, recreate.go, controller_utils.go). No root, no clock:
every call gets an explicit `now`."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from podnet.cluster.model import (Container, Deployment, DeploymentStrategy, ObjectMeta, PodTemplate,
                                  RollingUpdateDeployment)
from podnet.cluster.rollout import (ALPHANUMS, DeploymentStatus, ReplicaView, deletion_order, fnv32a,
                                    generate_name, max_unavailable, plan_rollout, resolve_fenceposts,
                                    rollout_message, safe_encode, scaled_value, template_hash)
from podnet.errors import ConfigError

TEMPLATE = PodTemplate({"app": "web"}, containers=(Container("srv", command=("sleep", "infinity")),))


def deployment(replicas=10, surge="25%", unavailable="25%", kind="RollingUpdate", min_ready=0) -> Deployment:
    rolling = RollingUpdateDeployment(surge, unavailable) if kind == "RollingUpdate" else None
    return Deployment(ObjectMeta("web"), TEMPLATE, {"app": "web"}, replicas,
                      DeploymentStrategy(kind, rolling), min_ready_seconds=min_ready)


# --- counts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, total, up, expected", [
    ("25%", 10, True, 3), ("25%", 10, False, 2), ("25%", 4, True, 1), ("25%", 4, False, 1),
    ("25%", 1, True, 1), ("25%", 1, False, 0), ("100%", 7, False, 7), ("0%", 7, True, 0),
    ("33%", 100, True, 33), ("34%", 3, True, 2), (5, 10, True, 5), (0, 10, False, 0),
])
def test_percent_rounds_surge_up_and_unavailable_down(value, total, up, expected):
    assert scaled_value(value, total, round_up=up) == expected


def test_fenceposts():
    assert resolve_fenceposts(deployment(10)) == (3, 2)
    assert resolve_fenceposts(deployment(4)) == (1, 1)
    assert resolve_fenceposts(deployment(1)) == (1, 0)
    assert resolve_fenceposts(deployment(100)) == (25, 25)
    # surge rounds up even from 10% of 3; when both come to 0, maxUnavailable becomes 1 so the
    # rollout can progress
    assert resolve_fenceposts(deployment(3, surge="10%", unavailable="10%")) == (1, 0)
    assert resolve_fenceposts(deployment(3, surge="0%", unavailable="10%")) == (0, 1)
    assert resolve_fenceposts(deployment(10, surge=0, unavailable=4)) == (0, 4)
    # maxUnavailable never counts more pods than there are; Recreate has no budget
    assert max_unavailable(deployment(2, unavailable=5)) == 2
    assert max_unavailable(deployment(0)) == 0
    assert max_unavailable(deployment(5, kind="Recreate")) == 0
    with pytest.raises(ConfigError, match="not a percentage"):
        scaled_value("25", 10, round_up=True)


# --- a tiny cluster the planner drives ---------------------------------------------------------------

class Cluster:
    """Pods as the planner sees them; `step` applies one plan like the lab (create, delete)."""

    def __init__(self, d: Deployment, old: int, now: float = 100.0) -> None:
        self.d = d
        self.new_hash = template_hash(d.template)
        self.pods: dict[str, ReplicaView] = {}
        self.n = 0
        for _ in range(old):  # an old ReplicaSet, all Ready since long ago
            self.add("old", created=0.0, ready_since=1.0)
        self.now = now
        self.log: list[tuple[str, int]] = []

    def add(self, pod_hash: str, created: float, ready_since: float | None = None) -> str:
        self.n += 1
        name = f"{pod_hash}-{self.n:03d}"
        self.pods[name] = ReplicaView(name, pod_hash, created, ready_since)
        return name

    def step(self):
        plan = plan_rollout(self.d, self.new_hash, list(self.pods.values()), self.now, replica_sets=["old"])
        for _ in range(plan.create):
            self.add(self.new_hash, self.now)
        for name in plan.delete:
            self.pods[name] = replace(self.pods[name], terminating=True)
        if plan.create:
            self.log.append(("create", plan.create))
        if plan.delete:
            self.log.append(("delete", len(plan.delete)))
        return plan

    def settle(self):
        """Plan until a pass changes nothing (the controller re-plans at once after acting)."""
        while (plan := self.step()).create or plan.delete:
            pass
        return plan

    def ready_new(self, at: float | None = None):
        for name, p in self.pods.items():
            if p.template_hash == self.new_hash and not p.ready and not p.terminating:
                self.pods[name] = replace(p, ready_since=self.now if at is None else at)

    def count(self, which: str) -> int:
        live = [p for p in self.pods.values() if not p.terminating]
        return len([p for p in live if (p.template_hash == self.new_hash) == (which == "new")])


def test_ten_replicas_25_25_surge_3_unavailable_2():
    c = Cluster(deployment(10), old=10)
    # first pass: scale the new ReplicaSet up by maxSurge and stop there
    assert c.step().create == 3
    # next pass: 13 pods, 8 must stay available, 3 new are not: 13 - 8 - 3 = 2 old may go
    plan = c.step()
    assert (plan.create, len(plan.delete)) == (0, 2)
    assert all(name.startswith("old-") for name in plan.delete)
    # two places freed below 13: two more new pods
    assert c.step().create == 2
    assert c.count("new") == 5 and c.count("old") == 8
    plan = c.step()  # 13 - 8 - 5 unavailable = 0: wait for readiness
    assert (plan.create, plan.delete) == (0, ())
    assert plan.message == 'Waiting for deployment "web" rollout to finish: 5 out of 10 new replicas have been updated...'
    c.ready_new()
    c.now += 1
    assert len(c.step().delete) == 5          # 13 available - 8 = 5 old go
    assert c.step().create == 5               # new ReplicaSet to 10
    assert c.step().delete == ()
    c.ready_new()
    c.now += 1
    assert len(c.step().delete) == 3          # the last old ones
    final = c.settle()
    assert final.complete and final.message == 'deployment "web" successfully rolled out'
    assert c.log == [("create", 3), ("delete", 2), ("create", 2), ("delete", 5), ("create", 5), ("delete", 3)]
    assert final.status == DeploymentStatus(replicas=10, updated_replicas=10, ready_replicas=10,
                                            available_replicas=10, unavailable_replicas=0,
                                            terminating_replicas=10)


def test_the_budget_holds_at_every_pass():
    """maxSurge 25 / maxUnavailable 25 of 100: never more than 125 pods, never fewer than 75 available,
    whatever order pods become ready in."""
    rng = random.Random(5)
    c = Cluster(deployment(100), old=100)
    for _ in range(400):
        plan = c.settle()
        live = [p for p in c.pods.values() if not p.terminating]
        assert len(live) <= 125
        assert sum(p.available(0, c.now) for p in live) >= 75
        if plan.complete:
            break
        unready = [n for n, p in c.pods.items() if not p.ready and not p.terminating]
        for name in rng.sample(unready, k=min(len(unready), rng.randint(1, 7))):
            c.pods[name] = replace(c.pods[name], ready_since=c.now)
        c.now += 0.5
    assert plan.complete and c.count("new") == 100 and c.count("old") == 0


def test_min_ready_seconds_gates_availability_and_says_when_to_look_again():
    c = Cluster(deployment(4, min_ready=5), old=4)
    c.settle()                                  # surge 1, unavailable 1: 2 new, 3 old
    assert (c.count("new"), c.count("old")) == (2, 3)
    c.ready_new(at=c.now)
    plan = c.step()
    # Ready, but not yet for 5 s: not available, nothing more may go; look again when they are
    assert (plan.create, plan.delete) == (0, ()) and plan.wake_at == c.now + 5
    c.now += 5                                  # available means Ready for MORE than minReadySeconds
    assert c.step().delete == ()
    c.now += 0.001
    assert len(c.step().delete) == 2


def test_unhealthy_old_pods_go_first_and_count_against_the_budget():
    c = Cluster(deployment(10, surge=0, unavailable=2), old=10)
    # two old pods are not ready (e.g. crash looping)
    sick = [n for n in c.pods][:2]
    for name in sick:
        c.pods[name] = replace(c.pods[name], ready_since=None)
    plan = c.step()
    # budget = 10 - 8 - 0 = 2: cleanupUnhealthyReplicas takes the two sick ones, and then only
    # 8 are available, which is the minimum: no healthy pod goes
    assert sorted(plan.delete) == sorted(sick)


def test_old_replica_sets_shrink_oldest_first():
    d = deployment(4, surge=0, unavailable=2)
    c = Cluster(d, old=0)
    older = [c.add("v1", created=0.0, ready_since=1.0) for _ in range(2)]
    [c.add("v2", created=10.0, ready_since=11.0) for _ in range(2)]
    plan = plan_rollout(d, c.new_hash, list(c.pods.values()), 100.0, replica_sets=["v1", "v2"])
    assert sorted(plan.delete) == sorted(older)
    plan = plan_rollout(d, c.new_hash, list(c.pods.values()), 100.0, replica_sets=["v2", "v1"])
    assert sorted(plan.delete) != sorted(older)


def test_recreate_deletes_everything_then_waits_for_the_old_pods_to_be_gone():
    c = Cluster(deployment(3, kind="Recreate"), old=3)
    plan = c.step()
    assert plan.create == 0 and len(plan.delete) == 3
    plan = c.step()           # the old pods still terminate: nothing new yet
    assert (plan.create, plan.delete) == (0, ())
    assert plan.message == 'Waiting for deployment "web" rollout to finish: 0 out of 3 new replicas have been updated...'
    c.pods = {n: p for n, p in c.pods.items() if not p.terminating}
    assert c.step().create == 3


def test_scaling_without_a_template_change():
    d = deployment(3)
    c = Cluster(d, old=0)
    c.d = d
    assert c.step().create == 3               # scale 0 -> 3 at once: all pods are "new"
    c.ready_new()
    c.now += 1
    assert c.settle().complete
    c.d = replace(d, replicas=1)
    plan = c.step()
    assert len(plan.delete) == 2
    assert c.settle().complete and c.count("new") == 1


def test_the_replica_set_controller_deletes_the_least_valuable_pods_first():
    now = 1000.0
    pending = ReplicaView("a-pending", "h", created=999.0, running=False)
    unready = ReplicaView("b-unready", "h", created=10.0)
    young = ReplicaView("c-young", "h", created=10.0, ready_since=999.0)           # Ready 1 s
    old = ReplicaView("d-old", "h", created=10.0, ready_since=100.0)              # Ready 900 s
    crashy = ReplicaView("e-crashy", "h", created=10.0, ready_since=100.0, restarts=3)
    assert [p.name for p in deletion_order([old, crashy, young, unready, pending], now)] == \
        ["a-pending", "b-unready", "c-young", "e-crashy", "d-old"]
    # Ready 900 s and 950 s ago are in the same log2 bucket (2^39 ns .. 2^40 ns): the UID (name) decides
    x = ReplicaView("x", "h", created=10.0, ready_since=100.0)
    w = ReplicaView("w", "h", created=10.0, ready_since=50.0)
    assert [p.name for p in deletion_order([x, w], now)] == ["w", "x"]
    # newer pods go before older ones when nothing else differs
    newer = ReplicaView("n", "h", created=900.0, ready_since=None)
    older = ReplicaView("o", "h", created=1.0, ready_since=None)
    assert [p.name for p in deletion_order([older, newer], now)] == ["n", "o"]


# --- names ----------------------------------------------------------------------------------------------

def test_fnv32a_and_safe_encode():
    assert fnv32a(b"") == 0x811C9DC5
    assert fnv32a(b"a") == 0xE40C292C
    assert fnv32a(b"foobar") == 0xBF9CF968
    # SafeEncodeString on decimal digits: '0' is 48, 48 % 27 = 21 -> '4', ...
    assert safe_encode("0123456789") == "456789bcdf"


def test_template_hash_is_stable_and_follows_the_template():
    h = template_hash(TEMPLATE)
    assert h == template_hash(PodTemplate({"app": "web"}, containers=TEMPLATE.containers))
    assert set(h) <= set(ALPHANUMS) and 1 <= len(h) <= 10
    assert template_hash(TEMPLATE.with_env({"V": "2"})) != h
    assert template_hash(TEMPLATE.with_env({"V": "2"})) == template_hash(TEMPLATE.with_env({"V": "2"}))


def test_generate_name_cuts_the_prefix_and_retries_on_a_clash():
    rng = random.Random(1)
    name = generate_name("web-78b745c6c9-", rng)
    assert name.startswith("web-78b745c6c9-") and len(name) == len("web-78b745c6c9-") + 5
    assert set(name[-5:]) <= set(ALPHANUMS)
    long = generate_name("x" * 70, random.Random(2))
    assert len(long) == 63 and long.startswith("x" * 58)
    first = generate_name("p-", random.Random(3))
    assert generate_name("p-", random.Random(3), {first}) != first


def test_rollout_messages_are_kubectls():
    s = DeploymentStatus(replicas=5, updated_replicas=5, ready_replicas=5, available_replicas=3,
                         unavailable_replicas=2, terminating_replicas=0)
    assert rollout_message("web", 5, s) == (
        'Waiting for deployment "web" rollout to finish: 3 of 5 updated replicas are available...', False)
    s = replace(s, replicas=7)
    assert rollout_message("web", 5, s) == (
        'Waiting for deployment "web" rollout to finish: 2 old replicas are pending termination...', False)
