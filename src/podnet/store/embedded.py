"""The embedded store: etcd's data model in one process, the default when all nodes share a process.

Layer: store. Keeps the contract of `podnet.store.base` (revisions, compare-and-swap, leases,
watches, compaction) with the semantics etcd v3 has where the contract promises them, so code
tested against it behaves the same on a real etcd.

Invariants:
- One lock guards everything, so the store is safe from any thread; watch events are queued while
  it is held, so every watcher sees writes in revision order and a watch created from revision R
  gets the history from R and then the live writes, with nothing lost or doubled between them.
- Time comes from `clock` (seconds, monotonic). Leases end at the first operation, or
  `expire_leases()` call, at or after their deadline, each in its own revision, as etcd's lessor
  revokes each expired lease in its own transaction. With the default clock a daemon thread calls
  `expire_leases()` every 0.5 s (etcd's lessor checks every 500 ms); with an injected clock nothing
  runs by itself: tests advance the clock and call `expire_leases()`, so they are deterministic.
- History is kept from `compact_revision` on. `compact(r)` drops the events before r; with
  `history_revisions` set, the store also compacts by itself to keep that many revisions (as
  kube-apiserver compacts etcd every few minutes), so memory stays bounded.

Differences from etcd: no transactions beyond the compare-and-swap forms of the contract, no range
reads at an old revision, lease IDs are small counters, and a lease's TTL is taken as given
(etcd raises TTLs below its minimum, about 1.5 election timeouts, to that minimum).
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .base import (CompactedError, Event, EventType, KeyExists, KeyValue, Lease, LeaseNotFound,
                   Listing, RevisionConflict, Store, StoreError, Watch, as_bytes, check_ttl)

LEASE_CHECK_INTERVAL_S = 0.5  # etcd's lessor runLoop period
DEFAULT_HISTORY_REVISIONS = 100_000


@dataclass
class _LeaseState:
    id: int
    ttl_s: int
    deadline: float
    keys: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Watcher:
    key: str
    prefix: bool
    watch: Watch

    def matches(self, key: str) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key


class EmbeddedStore(Store):
    name = "embedded"

    def __init__(self, *, clock: Callable[[], float] | None = None,
                 history_revisions: int | None = DEFAULT_HISTORY_REVISIONS) -> None:
        self._lock = threading.RLock()
        self._clock = clock or time.monotonic
        self._history_revisions = history_revisions
        self._revision = 1  # an empty etcd is at revision 1
        self._compacted = 0
        self._kvs: dict[str, KeyValue] = {}
        self._history: list[Event] = []
        self._leases: dict[int, _LeaseState] = {}
        self._lease_ids = itertools.count(1)
        self._watchers: list[_Watcher] = []
        self._closed = threading.Event()
        self._ticker: threading.Thread | None = None
        if clock is None:
            self._ticker = threading.Thread(target=self._tick, name="embedded-store-leases",
                                            daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._closed.wait(LEASE_CHECK_INTERVAL_S):
            self.expire_leases()

    # -- time --------------------------------------------------------------------------------
    def expire_leases(self) -> int:
        """End every lease whose deadline has passed (each in its own revision); how many."""
        with self._lock:
            now = self._clock()
            expired = sorted((lease for lease in self._leases.values() if lease.deadline <= now),
                             key=lambda lease: (lease.deadline, lease.id))
            for lease in expired:
                self._end_lease(lease)
            return len(expired)

    def next_deadline(self) -> float | None:
        """When the next lease ends (clock seconds), or None without leases."""
        with self._lock:
            return min((lease.deadline for lease in self._leases.values()), default=None)

    # -- reads -------------------------------------------------------------------------------
    def revision(self) -> int:
        with self._lock:
            self.expire_leases()
            return self._revision

    def get(self, key: str) -> KeyValue | None:
        with self._lock:
            self.expire_leases()
            return self._kvs.get(key)

    def list(self, prefix: str) -> Listing:
        with self._lock:
            self.expire_leases()
            kvs = sorted((kv for key, kv in self._kvs.items() if key.startswith(prefix)),
                         key=lambda kv: kv.key.encode("utf-8"))
            return Listing(tuple(kvs), self._revision)

    # -- writes ------------------------------------------------------------------------------
    def put(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        with self._lock:
            self.expire_leases()
            return self._put(key, as_bytes(value), lease)

    def create(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        with self._lock:
            self.expire_leases()
            if (current := self._kvs.get(key)) is not None:
                raise KeyExists(key, current)
            return self._put(key, as_bytes(value), lease)

    def update(self, key: str, value: bytes | str, *, mod_revision: int, lease: int = 0) -> int:
        with self._lock:
            self.expire_leases()
            current = self._kvs.get(key)
            if current is None or current.mod_revision != mod_revision:
                raise RevisionConflict(key, mod_revision, current)
            return self._put(key, as_bytes(value), lease)

    def delete(self, key: str, *, mod_revision: int | None = None) -> int | None:
        with self._lock:
            self.expire_leases()
            current = self._kvs.get(key)
            if mod_revision is not None and (current is None
                                             or current.mod_revision != mod_revision):
                raise RevisionConflict(key, mod_revision, current)
            if current is None:
                return None
            return self._delete([key])

    def delete_prefix(self, prefix: str) -> int:
        with self._lock:
            self.expire_leases()
            keys = sorted(key for key in self._kvs if key.startswith(prefix))
            if keys:
                self._delete(keys)
            return len(keys)

    def _put(self, key: str, value: bytes, lease_id: int) -> int:
        if lease_id and lease_id not in self._leases:
            raise LeaseNotFound(lease_id)
        previous = self._kvs.get(key)
        revision = self._revision + 1
        if previous is not None and previous.lease and previous.lease in self._leases:
            self._leases[previous.lease].keys.discard(key)
        if lease_id:
            self._leases[lease_id].keys.add(key)
        kv = KeyValue(key, value,
                      create_revision=previous.create_revision if previous else revision,
                      mod_revision=revision, version=previous.version + 1 if previous else 1,
                      lease=lease_id)
        self._kvs[key] = kv
        self._commit(revision, [Event(EventType.PUT, kv)])
        return revision

    def _delete(self, keys: list[str]) -> int:
        revision = self._revision + 1
        events = []
        for key in keys:
            kv = self._kvs.pop(key)
            if kv.lease and kv.lease in self._leases:
                self._leases[kv.lease].keys.discard(key)
            events.append(Event(EventType.DELETE, KeyValue(key, b"", 0, revision, 0, 0)))
        self._commit(revision, events)
        return revision

    def _commit(self, revision: int, events: list[Event]) -> None:
        self._revision = revision
        self._history.extend(events)
        for watcher in self._watchers:
            for event in events:
                if watcher.matches(event.key):
                    watcher.watch._push(event)
        if self._history_revisions is not None:
            oldest_kept = self._revision - self._history_revisions + 1
            if oldest_kept > max(self._compacted, 1):
                self._compact(oldest_kept)

    # -- leases ------------------------------------------------------------------------------
    def grant(self, ttl_s: int) -> Lease:
        check_ttl(ttl_s)
        with self._lock:
            self.expire_leases()
            lease_id = next(self._lease_ids)
            self._leases[lease_id] = _LeaseState(lease_id, ttl_s, self._clock() + ttl_s)
            return Lease(lease_id, ttl_s)

    def keepalive(self, lease_id: int) -> int:
        with self._lock:
            self.expire_leases()
            if (lease := self._leases.get(lease_id)) is None:
                raise LeaseNotFound(lease_id)
            lease.deadline = self._clock() + lease.ttl_s
            return lease.ttl_s

    def revoke(self, lease_id: int) -> None:
        with self._lock:
            self.expire_leases()
            if (lease := self._leases.get(lease_id)) is None:
                raise LeaseNotFound(lease_id)
            self._end_lease(lease)

    def time_to_live(self, lease_id: int) -> int | None:
        with self._lock:
            self.expire_leases()
            if (lease := self._leases.get(lease_id)) is None:
                return None
            return max(0, int(lease.deadline - self._clock()))

    def lease_keys(self, lease_id: int) -> list[str]:
        with self._lock:
            self.expire_leases()
            if (lease := self._leases.get(lease_id)) is None:
                raise LeaseNotFound(lease_id)
            return sorted(lease.keys)

    def _end_lease(self, lease: _LeaseState) -> None:
        del self._leases[lease.id]
        keys = sorted(key for key in lease.keys if key in self._kvs)
        if keys:
            self._delete(keys)

    # -- history -----------------------------------------------------------------------------
    def compact(self, revision: int) -> None:
        with self._lock:
            if revision > self._revision:
                raise StoreError(f"compact {revision}: mvcc: required revision is a future "
                                 f"revision (current revision {self._revision})")
            if revision <= self._compacted:
                raise CompactedError("compact", revision, self._compacted)
            self._compact(revision)

    def _compact(self, revision: int) -> None:
        self._compacted = revision
        cut = bisect.bisect_left(self._history, revision, key=lambda event: event.revision)
        del self._history[:cut]

    @property
    def compact_revision(self) -> int:
        with self._lock:
            return self._compacted

    def watch(self, key: str, *, prefix: bool = False, start_revision: int | None = None) -> Watch:
        with self._lock:
            self.expire_leases()
            description = f"watch {key}{'*' if prefix else ''}"
            watch = Watch(description)
            if self._closed.is_set():
                watch._finish()
                return watch
            start = self._revision + 1 if start_revision is None else start_revision
            if start < self._compacted:
                watch._fail(CompactedError(description, start, self._compacted))
                return watch
            watcher = _Watcher(key, prefix, watch)
            first = bisect.bisect_left(self._history, start, key=lambda event: event.revision)
            for event in self._history[first:]:
                if watcher.matches(event.key):
                    watch._push(event)
            self._watchers.append(watcher)
            watch._on_close.append(lambda: self._forget(watcher))
            return watch

    def _forget(self, watcher: _Watcher) -> None:
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            watcher.watch._finish()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join(timeout=2)
