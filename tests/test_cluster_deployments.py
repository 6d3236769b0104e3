"""The control plane's Deployment controller (podnet.cluster_deployments) against the embedded store.

No root: no node runs; the tests write what nodes write (registrations, pod status) and read what
the controller writes (Pod objects with spec.nodeName, key deletions). What is checked: a
Deployment's replicas are created as Pod objects named and labelled with the template hash, spread
over the registered nodes by load; a rollout keeps the pods in the store within maxSurge and the
Ready ones within maxUnavailable while statuses turn Ready one by one; a scale-down deletes the
keys in the ReplicaSet controller's order (not started, then not Ready, then the rest); a listing
from before a delete does not bring the deleted pod back; a pod on a node whose registration went
is not Ready.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import trio

from podnet.cluster.endpoints import PodStatus
from podnet.cluster.model import (Container, Deployment, DeploymentStrategy, Manifests, Node, ObjectMeta, Pod,
                                  PodTemplate, RollingUpdateDeployment)
from podnet.cluster.rollout import POD_TEMPLATE_HASH_LABEL, template_hash
from podnet.cluster.topology import ClusterConfig, plan_cluster
from podnet.cluster_deployments import StoreDeployment
from podnet.control_plane import ControlPlane, allocated
from podnet.store import EmbeddedStore
from podnet.store.objects import ObjectView, encode, kind_prefix, object_key, update_pod_status
from podnet.testing.waiting import await_until

CONFIG = ClusterConfig(network="vxlan", prefix="pn-cd-")
NODES = ("node-1", "node-2", "node-3")


def _deployment(replicas: int = 4, version: str = "1") -> Deployment:
    template = PodTemplate({"app": "web"}, containers=(Container("main", command=("sleep", "1"),
                                                                env=(("VERSION", version),)),))
    return Deployment(ObjectMeta("web", "default"), template, {"app": "web"}, replicas,
                      DeploymentStrategy("RollingUpdate", RollingUpdateDeployment(1, 1)))


def _control_plane(store, deployment: Deployment) -> ControlPlane:
    client = Pod(ObjectMeta("client", "default"), (Container("main", command=("sleep", "1")),), node_name="node-1")
    manifests = Manifests(nodes=tuple(Node(ObjectMeta(n, "")) for n in NODES), pods=(client,),
                          deployments=(deployment,))
    plan = plan_cluster(manifests)
    control_plane = ControlPlane(store, allocated(plan.manifests, CONFIG), CONFIG)
    control_plane.publish()
    for name in NODES:   # what each node's kubelet registers
        node = Node(ObjectMeta(name, ""))
        store.put(object_key(node), encode(node))
    return control_plane


def _pods(store) -> dict[str, tuple[Pod, PodStatus | None]]:
    """The deployment's pods in the store: name -> pod, status."""
    return {s.obj.name: (s.obj, s.status) for s in ObjectView("Pod", "test").sync(store.list(kind_prefix("Pod")))
            if s.obj.name.startswith("web-")}


class Kubelets:
    """What the nodes write: each new pod gets an IP (running, not Ready); `ready` pods, in the
    order given or all, turn Ready. Records the most pods and the fewest Ready ones seen."""

    def __init__(self, store) -> None:
        self.store = store
        self.ips = (f"10.244.9.{i}" for i in range(2, 250))
        self.max_pods = 0
        self.min_ready: int | None = None

    def step(self, ready=lambda name: True, one_at_a_time: bool = False) -> None:
        pods = _pods(self.store)
        turned = False
        for name, (pod, status) in sorted(pods.items()):
            key = object_key(pod)
            if status is None:
                update_pod_status(self.store, key, PodStatus(next(self.ips), False, False, pod.node_name))
            elif not status.ready and ready(name) and not (one_at_a_time and turned):
                update_pod_status(self.store, key, PodStatus(status.ip, True, False, pod.node_name))
                turned = True
        pods = _pods(self.store)
        ready_now = sum(1 for _, status in pods.values() if status is not None and status.ready)
        self.max_pods = max(self.max_pods, len(pods))
        self.min_ready = ready_now if self.min_ready is None else min(self.min_ready, ready_now)

    async def run(self, period_s: float = 0.05, **kw) -> None:
        while True:
            self.step(**kw)
            await trio.sleep(period_s)



async def test_replicas_are_pod_objects_with_the_template_hash_spread_over_the_nodes():
    store = EmbeddedStore()
    deployment = _deployment()
    control_plane = _control_plane(store, deployment)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control_plane.run)
            pods = await await_until(lambda: len(p := _pods(store)) == 4 and p, "4 pods in the store")
            pod_hash = template_hash(deployment.template)
            for name, (pod, status) in pods.items():
                assert name.startswith(f"web-{pod_hash}-") and len(name) == len(f"web-{pod_hash}-") + 5
                assert pod.meta.labels == {"app": "web", POD_TEMPLATE_HASH_LABEL: pod_hash}
                assert status is None   # the node writes it
            # node-1 has the client already: least-loaded placement gives it one replica, the others two and one
            assert Counter(pod.node_name for pod, _ in pods.values()) == {"node-1": 1, "node-2": 2, "node-3": 1}
            assert control_plane.ready_revision == 0   # nothing Ready yet
            kubelets = Kubelets(store)
            update_pod_status(store, "/registry/pods/default/client", PodStatus("10.244.1.2", True, False, "node-1"))
            nursery.start_soon(kubelets.run)
            await control_plane.wait_ready(10)
            assert control_plane.deployments.get("default", "web").complete
            assert len(_pods(store)) == 4
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_a_rollout_keeps_to_max_surge_and_max_unavailable_as_pods_turn_ready():
    store = EmbeddedStore()
    control_plane = _control_plane(store, _deployment())
    kubelets = Kubelets(store)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control_plane.run)
            await await_until(lambda: len(_pods(store)) == 4, "4 pods")
            for _ in range(3):
                kubelets.step()
            web = control_plane.deployments.get("default", "web")
            await await_until(lambda: web.complete, "the first rollout")
            old = set(_pods(store))
            kubelets.max_pods, kubelets.min_ready = 0, None
            # new pods turn Ready one at a time, so the surge and unavailability budgets are what limit it
            nursery.start_soon(lambda: kubelets.run(0.03, one_at_a_time=True))
            report = await web.rollout(env={"VERSION": "2"}, timeout_s=20)
            new = _pods(store)
            assert set(report.deleted) == old and len(report.created) == 4 and set(new) == set(report.created)
            assert all(pod.meta.labels[POD_TEMPLATE_HASH_LABEL] == report.new_hash for pod, _ in new.values())
            assert all(dict(pod.containers[0].env)["VERSION"] == "2" for pod, _ in new.values())
            assert (report.max_surge, report.max_unavailable) == (1, 1)
            assert report.max_pods <= 5 and report.min_available >= 3
            # and as the store had it
            assert kubelets.max_pods <= 5 and kubelets.min_ready >= 3
            assert report.progress[-1][1] == 'deployment "web" successfully rolled out'
            assert len(report.progress) >= 3   # it went through the waits kubectl prints
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_scale_down_deletes_keys_in_the_replica_set_order():
    store = EmbeddedStore()
    control_plane = _control_plane(store, _deployment(replicas=5))
    kubelets = Kubelets(store)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control_plane.run)
            names = sorted(await await_until(lambda: len(p := _pods(store)) == 5 and p, "5 pods"))
            web = control_plane.deployments.get("default", "web")
            pending, unready = names[0], names[1]   # one never started (no status), one started not Ready
            pods = _pods(store)
            for name in names[1:]:
                update_pod_status(store, object_key(pods[name][0]),
                                  PodStatus(next(kubelets.ips), name != unready, False, pods[name][0].node_name))
            await await_until(lambda: web.status is not None and web.status.ready_replicas == 3, "3 Ready")
            report = await web.scale(3, timeout_s=10)
            assert report.deleted == (pending, unready)
            assert set(_pods(store)) == set(names[2:])
            # scaled further: the pod Ready for the shortest time goes first
            await trio.sleep(0.3)
            last = names[4]
            node = pods[last][0].node_name
            update_pod_status(store, object_key(pods[last][0]), PodStatus("10.244.9.250", False, False, node))
            await await_until(lambda: web.status.ready_replicas == 2, "one unready")
            update_pod_status(store, object_key(pods[last][0]), PodStatus("10.244.9.250", True, False, node))
            await await_until(lambda: web.status.ready_replicas == 3, "ready again")
            report = await web.scale(2, timeout_s=10)
            assert report.deleted == (last,)
            assert set(_pods(store)) == set(names[2:4]), (names, sorted(_pods(store)), report)
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def test_a_listing_from_before_a_delete_does_not_bring_the_pod_back_and_lost_nodes_are_not_ready():
    web = StoreDeployment(_deployment(replicas=2))
    nodes = set(NODES)
    first = web.reconcile({}, 1, nodes, Counter({n: 0 for n in NODES}), 0.0)
    assert [p.node_name for p in first.create] == ["node-1", "node-2"] and first.delete == ()
    for revision, pod in enumerate(first.create, start=2):
        web.recorded(pod.name, revision)
    listing = {p.name: (p, PodStatus(f"10.244.9.{i}", True, False, p.node_name)) for i, p in enumerate(first.create)}
    # node-2's registration is gone: its pod is not Ready (the node lifecycle controller)
    lost = web.reconcile(listing, 3, {"node-1"}, Counter(), 1.0)
    assert lost.step.status.ready_replicas == 1 and lost.create == () and lost.delete == ()
    web.deployment = dataclasses.replace(web.deployment, replicas=1)
    down = web.reconcile(listing, 3, nodes, Counter(), 2.0)
    (deleted,) = down.delete
    name = deleted.rsplit("/", 1)[1]
    web.deleted(name, 4)
    # the watch has not delivered the delete yet: the pod is still listed, and stays gone
    stale = web.reconcile(listing, 3, nodes, Counter(), 2.1)
    assert (stale.create, stale.delete) == ((), ()) and name not in web.members and web.deleted_log == [name]
    fresh = web.reconcile({n: v for n, v in listing.items() if n != name}, 4, nodes, Counter(), 2.2)
    assert (fresh.create, fresh.delete) == ((), ()) and web.gone == {} and fresh.step.complete
