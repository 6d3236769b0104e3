"""The store contract (podnet.store.base), run against the embedded store and a real etcd."""

from __future__ import annotations

import threading

import pytest
import trio

from podnet.store import (CompactedError, EventType, KeyExists, LeaseNotFound, RevisionConflict,
                          StoreError)


# --- keys, revisions, compare-and-swap ----------------------------------------------------------


def test_revisions_count_writes_and_keys_remember_theirs(h):
    store = h.store
    assert store.revision() == 1  # an empty etcd is at revision 1
    assert store.put("/a/x", "1") == 2
    assert store.put("/a/y", b"2") == 3
    assert store.put("/a/x", "3") == 4
    kv = store.get("/a/x")
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == \
        (b"3", 2, 4, 2, 0)
    assert store.get("/a/missing") is None
    assert store.revision() == 4


def test_create_only_if_absent(h):
    store = h.store
    revision = store.create("/a/x", "first")
    with pytest.raises(KeyExists) as lost:
        store.create("/a/x", "second")
    assert lost.value.current.value == b"first" and lost.value.current.mod_revision == revision
    assert store.revision() == revision  # a failed compare writes nothing
    assert store.get("/a/x").value == b"first"


def test_update_only_if_mod_revision_matches(h):
    store = h.store
    first = store.put("/a/x", "1")
    second = store.update("/a/x", "2", mod_revision=first)
    with pytest.raises(RevisionConflict) as stale:
        store.update("/a/x", "3", mod_revision=first)
    assert stale.value.expected == first and stale.value.current.mod_revision == second
    assert store.get("/a/x").value == b"2"
    with pytest.raises(RevisionConflict) as missing:
        store.update("/a/none", "1", mod_revision=first)
    assert missing.value.current is None


def test_delete_plain_conditional_and_by_prefix(h):
    store = h.store
    x = store.put("/a/x", "1")
    assert store.delete("/a/missing") is None
    assert store.revision() == x  # deleting nothing makes no revision
    with pytest.raises(RevisionConflict):
        store.delete("/a/x", mod_revision=x - 1)
    assert store.delete("/a/x", mod_revision=x) == x + 1
    with pytest.raises(RevisionConflict):
        store.delete("/a/x", mod_revision=x)  # gone
    for name in ("p/1", "p/2", "p/3", "q/1"):
        store.put(f"/a/{name}", name)
    before = store.revision()
    watch = store.watch("/a/p/", prefix=True)
    assert store.delete_prefix("/a/p/") == 3
    events = [h.next_event(watch) for _ in range(3)]
    assert {e.type for e in events} == {EventType.DELETE}
    assert {e.revision for e in events} == {before + 1}  # one write, one revision
    assert [kv.key for kv in store.list("/a/")] == ["/a/q/1"]
    watch.close()


def test_list_prefix_in_key_order_with_its_revision(h):
    store = h.store
    for key in ("/r/b", "/r/a", "/r/c/d", "/rx", "/q"):
        store.put(key, key)
    listing = store.list("/r/")
    assert [kv.key for kv in listing] == ["/r/a", "/r/b", "/r/c/d"]
    assert [kv.value for kv in listing][0] == b"/r/a"
    assert listing.revision == store.revision() == 6
    assert len(store.list("/nothing/")) == 0


# --- watches ------------------------------------------------------------------------------------


def test_list_then_watch_from_revision_plus_one_misses_nothing(h):
    store = h.store
    store.put("/w/old", "before the list")
    listing = store.list("/w/")
    store.put("/w/a", "1")  # after the list, before the watch: must still be seen
    store.delete("/w/old")
    watch = store.watch("/w/", prefix=True, start_revision=listing.revision + 1)
    store.put("/w/b", "2")
    store.put("/elsewhere", "x")
    events = [h.next_event(watch) for _ in range(3)]
    assert [(e.type, e.key) for e in events] == [
        (EventType.PUT, "/w/a"), (EventType.DELETE, "/w/old"), (EventType.PUT, "/w/b")]
    assert [e.revision for e in events] == sorted(e.revision for e in events)
    assert all(e.revision > listing.revision for e in events)
    assert h.no_event(watch)
    watch.close()


def test_list_then_watch_under_concurrent_writes_sees_every_key_once(h):
    store = h.store
    written = [f"/c/{i:03d}" for i in range(40)]
    started = threading.Event()

    def writer():
        started.set()
        for key in written:
            store.put(key, key)

    thread = threading.Thread(target=writer)
    thread.start()
    started.wait()
    listing = store.list("/c/")
    watch = store.watch("/c/", prefix=True, start_revision=listing.revision + 1)
    thread.join()
    seen = [kv.key for kv in listing]
    while len(seen) < len(written):
        event = h.next_event(watch) if h.clock is None else watch.get(timeout=1)
        assert event.revision > listing.revision
        seen.append(event.key)
    assert sorted(seen) == written  # each key exactly once: in the listing or as an event
    assert h.no_event(watch)
    watch.close()


def test_watch_one_key_from_now_and_delete_event_shape(h):
    store = h.store
    store.put("/k", "before")
    watch = store.watch("/k")  # from the next write on
    store.put("/k2", "other key")
    store.put("/k", "after")
    revision = store.delete("/k")
    put, delete = h.next_event(watch), h.next_event(watch)
    assert (put.type, put.kv.value, put.kv.version) == (EventType.PUT, b"after", 2)
    assert delete.type is EventType.DELETE
    assert (delete.key, delete.revision, delete.kv.value) == ("/k", revision, b"")
    watch.close()
    store.put("/k", "again")
    with pytest.raises(StopIteration):
        watch.get(timeout=0)


async def test_watch_is_a_trio_async_iterator(h):
    store = h.store
    watch = await trio.to_thread.run_sync(lambda: store.watch("/t/", prefix=True))
    seen = []

    async def consume():
        async for event in watch:
            seen.append(event.key)
            if len(seen) == 3:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        for key in ("/t/1", "/t/2", "/t/3"):  # from another thread, as etcd's reader is
            await trio.to_thread.run_sync(store.put, key, "v")
    assert seen == ["/t/1", "/t/2", "/t/3"]
    watch.close()


# --- leases -------------------------------------------------------------------------------------


def test_lease_expiry_deletes_its_keys_with_delete_events(h):
    store = h.store
    lease = store.grant(1)
    assert lease.ttl_s == 1
    store.put("/l/a", "1", lease=lease.id)
    store.put("/l/b", "2", lease=lease.id)
    store.put("/l/kept", "3")
    assert store.get("/l/a").lease == lease.id
    assert store.lease_keys(lease.id) == ["/l/a", "/l/b"]
    watch = store.watch("/l/", prefix=True)
    h.advance(h.lease_ended_after(1))
    deletes = [h.next_event(watch), h.next_event(watch)]
    assert sorted((e.type, e.key) for e in deletes) == [
        (EventType.DELETE, "/l/a"), (EventType.DELETE, "/l/b")]
    assert deletes[0].revision == deletes[1].revision  # the lease's keys go in one revision
    assert [kv.key for kv in store.list("/l/")] == ["/l/kept"]
    assert store.time_to_live(lease.id) is None
    with pytest.raises(LeaseNotFound):
        store.keepalive(lease.id)
    with pytest.raises(LeaseNotFound):
        store.put("/l/c", "late", lease=lease.id)
    watch.close()


def test_keepalive_keeps_keys_until_it_stops(h):
    store = h.store
    lease = store.grant(1)
    store.put("/l/a", "1", lease=lease.id)
    watch = store.watch("/l/", prefix=True)
    for _ in range(6):  # 1.5 s: past the TTL, kept alive every 0.25 s
        h.advance(0.25)
        assert store.keepalive(lease.id) == 1
    assert store.get("/l/a") is not None
    assert 0 <= store.time_to_live(lease.id) <= 1
    assert h.no_event(watch)
    h.advance(h.lease_ended_after(1))
    event = h.next_event(watch)
    assert (event.type, event.key) == (EventType.DELETE, "/l/a")
    watch.close()


def test_revoke_ends_a_lease_now_and_a_put_moves_a_key_off_it(h):
    store = h.store
    old, new = store.grant(30), store.grant(30)
    store.put("/l/moved", "1", lease=old.id)
    store.put("/l/moved", "2", lease=new.id)  # re-attached
    store.put("/l/detached", "1", lease=old.id)
    store.put("/l/detached", "2")  # lease 0: no lease any more
    store.put("/l/gone", "1", lease=old.id)
    assert store.lease_keys(old.id) == ["/l/gone"]
    watch = store.watch("/l/", prefix=True)
    store.revoke(old.id)
    event = h.next_event(watch)
    assert (event.type, event.key) == (EventType.DELETE, "/l/gone")
    assert sorted(kv.key for kv in store.list("/l/")) == ["/l/detached", "/l/moved"]
    with pytest.raises(LeaseNotFound):
        store.revoke(old.id)
    with pytest.raises(LeaseNotFound):
        store.lease_keys(old.id)
    with pytest.raises(ValueError):
        store.grant(0)
    watch.close()


# --- compaction ---------------------------------------------------------------------------------


def test_watch_from_a_compacted_revision_says_to_relist(h):
    store = h.store
    first = store.put("/h/x", "1")
    store.put("/h/x", "2")
    third = store.put("/h/x", "3")
    store.compact(third)
    watch = store.watch("/h/", prefix=True, start_revision=first)
    with pytest.raises(CompactedError) as compacted:
        h.next_event(watch)
    assert compacted.value.requested == first
    assert "list again" in str(compacted.value) and "compacted" in str(compacted.value)
    with pytest.raises(StopIteration):  # the failed watch is over
        watch.get(timeout=0)
    listing = store.list("/h/")  # what the message says to do
    watch = store.watch("/h/", prefix=True, start_revision=listing.revision + 1)
    store.put("/h/x", "4")
    assert h.next_event(watch).kv.value == b"4"
    watch.close()
    with pytest.raises(CompactedError):
        store.compact(first)  # already compacted
    with pytest.raises(StoreError, match="future revision"):
        store.compact(store.revision() + 10)


async def test_compaction_error_reaches_async_consumers(h):
    store = h.store
    first = store.put("/h/x", "1")
    store.put("/h/x", "2")
    store.compact(store.revision())
    watch = await trio.to_thread.run_sync(
        lambda: store.watch("/h/x", start_revision=first))
    with pytest.raises(CompactedError):
        async for _ in watch:
            pass
