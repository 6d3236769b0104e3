"""Node registration under a lease, and the reflector that resyncs a node from the store."""

from __future__ import annotations

import pytest
import trio

from podnet.cluster.model import Node, NodeAddress, ObjectMeta
from podnet.store import EmbeddedStore, EventType
from podnet.store.informer import Reflector
from podnet.store.nodes import (deregister_node, heartbeat, keep_node_registered, register_node)
from podnet.store.objects import decode, kind_prefix


def node(name: str, ip: str = "172.18.0.2") -> Node:
    return Node(ObjectMeta(name, ""), pod_cidr=None, addresses=(NodeAddress("InternalIP", ip),))


def test_a_node_whose_heartbeat_stops_disappears_after_the_ttl(h):
    store = h.store
    watch = store.watch(kind_prefix("Node"), prefix=True)
    a = register_node(store, node("node-a"), ttl_s=1)
    b = register_node(store, node("node-b", "172.18.0.3"), ttl_s=30)
    assert [h.next_event(watch).key for _ in range(2)] == [a.key, b.key]
    assert a.key == "/registry/minions/node-a"
    assert decode(store.get(a.key)).obj == node("node-a")
    assert store.get(a.key).lease == a.lease_id
    for _ in range(6):  # heartbeats keep it past its TTL
        h.advance(0.25)
        assert heartbeat(store, a) == a
    assert store.get(a.key) is not None
    h.advance(h.lease_ended_after(1))  # node-a's process died: no more heartbeats
    gone = h.next_event(watch)
    assert (gone.type, gone.key) == (EventType.DELETE, a.key)
    assert [kv.key for kv in store.list(kind_prefix("Node"))] == [b.key]
    back = heartbeat(store, a)  # a late heartbeat registers again, under a new lease
    assert back.lease_id != a.lease_id
    assert (h.next_event(watch).type, store.get(a.key).lease) == (EventType.PUT, back.lease_id)
    watch.close()


def test_a_restarted_node_replaces_its_registration_at_once(h):
    store = h.store
    first = register_node(store, node("node-a"), ttl_s=30)
    second = register_node(store, node("node-a", "172.18.0.9"), ttl_s=30)  # new process
    assert store.get(first.key).lease == second.lease_id
    assert decode(store.get(first.key)).obj.addresses[0].address == "172.18.0.9"
    assert store.time_to_live(first.lease_id) is None  # the old lease held only this key
    deregister_node(store, second)
    assert store.get(first.key) is None
    deregister_node(store, second)  # already gone: fine


async def test_keep_node_registered_heartbeats_until_cancelled(autojump_clock):
    store = EmbeddedStore(clock=lambda: 0.0)  # store time stands still; trio's jumps
    async with trio.open_nursery() as nursery:
        registration = await nursery.start(
            lambda task_status: keep_node_registered(store, node("node-a"), ttl_s=40,
                                                     interval_s=10, task_status=task_status))
        assert store.get(registration.key) is not None
        await trio.sleep(35)
        nursery.cancel_scope.cancel()
    assert store.get(registration.key) is None  # deregistered on the way out
    with pytest.raises(ValueError):
        await keep_node_registered(store, node("node-b"), ttl_s=5, interval_s=5)
    store.close()


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


def test_reflector_lists_then_follows_and_resyncs_after_compaction(h):
    store = h.store
    for name in ("a", "b", "c"):
        store.put(f"/registry/pods/demo/{name}", name)
    reflector = Reflector(store, "/registry/pods/")
    first = reflector.relist()  # a (re)starting node: the full state, as PUTs
    assert [(e.type, e.key) for e in first] == [(EventType.PUT, f"/registry/pods/demo/{n}")
                                               for n in "abc"]
    watch = reflector.open_watch()
    store.put("/registry/pods/demo/d", "d")
    event = h.next_event(watch)
    reflector.apply(event)
    assert sorted(reflector.cache) == [f"/registry/pods/demo/{n}" for n in "abcd"]
    watch.close()
    # the node falls behind: changes it never watched, then compaction removes their history
    store.delete("/registry/pods/demo/a")
    store.put("/registry/pods/demo/b", "b2")
    store.put("/registry/pods/demo/e", "e")
    store.compact(store.revision())
    stale = reflector.open_watch()
    with pytest.raises(Exception) as compacted:
        h.next_event(stale)
    assert type(compacted.value).__name__ == "CompactedError"
    diff = reflector.relist()
    assert [(e.type, e.key) for e in diff] == [
        (EventType.DELETE, "/registry/pods/demo/a"), (EventType.PUT, "/registry/pods/demo/b"),
        (EventType.PUT, "/registry/pods/demo/e")]
    assert reflector.cache == {kv.key: kv for kv in store.list("/registry/pods/")}
    assert reflector.revision == store.revision()


def test_reflector_event_stream_relists_by_itself(h):
    store = h.store
    store.put("/x/1", "1")
    reflector = Reflector(store, "/x/")
    stream = reflector.events(timeout=0 if h.clock is not None else 5)
    assert next(stream).key == "/x/1"
    store.put("/x/2", "2")
    assert next(stream).key == "/x/2"
    stream.close()
    store.put("/x/3", "3")
    store.delete("/x/1")
    store.compact(store.revision())
    stream = reflector.events(timeout=0 if h.clock is not None else 5)  # resumes: compacted
    seen = [(e.type, e.key) for e in (next(stream), next(stream))]
    assert seen == [(EventType.DELETE, "/x/1"), (EventType.PUT, "/x/3")]  # the relist's diff
    assert reflector.relists == 2
    store.put("/x/4", "4")
    assert next(stream).key == "/x/4"  # and it watches on
    stream.close()


async def test_reflector_async_stream_resyncs_a_restarted_node(h):
    store = h.store
    for name in ("a", "b"):
        store.put(f"/registry/minions/{name}", name)
    seen, listed = [], trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async def follow():
                async for event in Reflector(store, "/registry/minions/").aevents():
                    seen.append((event.type, event.key))
                    if len(seen) == 2:
                        listed.set()
                    if len(seen) == 3:
                        nursery.cancel_scope.cancel()
            nursery.start_soon(follow)
            await listed.wait()  # the listing is in; its watch may not be open yet: no matter
            await trio.to_thread.run_sync(store.delete, "/registry/minions/a")
    assert seen == [(EventType.PUT, "/registry/minions/a"), (EventType.PUT, "/registry/minions/b"),
                    (EventType.DELETE, "/registry/minions/a")]
