"""Node registration under a lease: a node is in the store while its process keeps a heartbeat.

Layer: store. A node agent registers its Node object at `/registry/minions/<name>` attached to a
lease of `ttl_s` seconds and renews the lease every `interval_s`; when the process dies the
renewals stop, the lease ends after at most `ttl_s` (plus etcd's 0.5 s expiry check) and the key is
deleted, so every other node sees a DELETE and stops routing to it. A node that restarts registers
again and the others see a PUT.

Invariants:
- Registration replaces whatever Node object was stored under the name (a restarted node takes
  its name back at once instead of waiting for its old lease to run out); the old lease, if still
  alive, is revoked only when it held nothing but this key.
- A heartbeat that finds the lease gone (the store was unreachable for longer than the TTL, or
  someone revoked it) registers again under a new lease: the node reappears, and watchers see a
  DELETE followed by a PUT, which is the truth about the gap.

Kubernetes does this differently: the kubelet keeps the Node object and renews a Lease object
(coordination.k8s.io, `/registry/leases/kube-node-lease/<node>`, 40 s, renewed every 10 s), and
the node lifecycle controller marks the node NotReady when the Lease goes stale. podnet has no
controller manager, so the key itself carries the lease, as Flannel's subnet leases do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio

from podnet.cluster.model import Node

from .base import LeaseNotFound, Store, StoreUnavailable, revoke_if_unused
from .objects import encode, object_key

log = logging.getLogger(__name__)

NODE_LEASE_TTL_S = 40  # the kubelet's nodeLeaseDurationSeconds
NODE_HEARTBEAT_S = 10.0  # its renew interval: a quarter of the duration


@dataclass(frozen=True)
class NodeRegistration:
    node: Node
    key: str
    lease_id: int
    ttl_s: int
    revision: int


def register_node(store: Store, node: Node, *, ttl_s: int = NODE_LEASE_TTL_S) -> NodeRegistration:
    """Write `node` under a new lease of `ttl_s` seconds (replacing a previous registration)."""
    key = object_key(node)
    previous = store.get(key)
    lease = store.grant(ttl_s)
    revision = store.put(key, encode(node), lease=lease.id)
    if previous is not None and previous.lease and previous.lease != lease.id:
        revoke_if_unused(store, previous.lease)
    return NodeRegistration(node, key, lease.id, lease.ttl_s, revision)


def heartbeat(store: Store, registration: NodeRegistration) -> NodeRegistration:
    """Renew the registration's lease; register again if it has ended. The registration now."""
    try:
        store.keepalive(registration.lease_id)
        return registration
    except LeaseNotFound:
        log.warning("node %s: lease %x ended, registering again", registration.node.name,
                    registration.lease_id)
        return register_node(store, registration.node, ttl_s=registration.ttl_s)


def deregister_node(store: Store, registration: NodeRegistration) -> None:
    """Leave the cluster now: revoke the lease, which deletes the Node key."""
    try:
        store.revoke(registration.lease_id)
    except LeaseNotFound:
        pass


async def keep_node_registered(store: Store, node: Node, *, ttl_s: int = NODE_LEASE_TTL_S,
                               interval_s: float = NODE_HEARTBEAT_S,
                               task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Register `node` and keep its heartbeat until cancelled, then deregister. Started with
    `nursery.start`, it reports the first NodeRegistration when the node is in the store."""
    if not 0 < interval_s < ttl_s:
        raise ValueError(f"heartbeat interval {interval_s} s must be shorter than the lease TTL "
                         f"{ttl_s} s")
    registration = await trio.to_thread.run_sync(lambda: register_node(store, node, ttl_s=ttl_s))
    task_status.started(registration)
    try:
        while True:
            await trio.sleep(interval_s)
            current = registration
            try:
                registration = await trio.to_thread.run_sync(lambda: heartbeat(store, current))
            except StoreUnavailable as exc:  # keep trying: the lease may outlive the outage
                log.warning("node %s: heartbeat failed: %s", node.name, exc)
    finally:
        with trio.CancelScope(shield=True):
            final = registration
            try:
                await trio.to_thread.run_sync(lambda: deregister_node(store, final))
            except StoreUnavailable as exc:  # the lease ends by itself after its TTL
                log.warning("node %s: could not deregister: %s", node.name, exc)
