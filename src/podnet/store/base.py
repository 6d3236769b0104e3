"""The cluster state store's interface: keys with revisions, compare-and-swap, leases and watches.

Layer: store (beside `cluster`, below the lab; it may do I/O and use threads and trio, and it never
imports the lab, the runtime or linux). Two implementations keep this contract: `EmbeddedStore`
(in-process, the default) and `EtcdStore` (a real etcd v3). One conformance suite
(tests/store/test_contract.py) runs against both; what it checks is what this module promises.

The model is etcd v3's, because etcd is what Kubernetes and Flannel keep their state in:
- One store-wide `revision` counts writes. A write (put, a delete that deleted something, a lease
  revoke or expiry with keys attached) makes exactly one new revision; every key it touched gets
  that `mod_revision`. An empty store is at revision 1, as etcd is.
- A key has `create_revision` (the revision of the write that created it since it last did not
  exist), `mod_revision`, `version` (1 on create, +1 per put) and the lease it is attached to (0: none).
- Compare-and-swap: `create` only when the key does not exist, `update` and `delete(..,
  mod_revision=)` only when the key's mod_revision is the one given. A lost race raises
  `KeyExists` / `RevisionConflict` carrying the current value, so the caller can retry from it.
- `list(prefix)` returns the keys under a prefix in key order and the revision they were read at.
  `watch(prefix, prefix=True, start_revision=listing.revision + 1)` then yields every change after
  that list and none before: the list-then-watch pattern of Kubernetes' reflectors, without gaps.
- A watch yields `Event`s (PUT or DELETE, the key's state after the write; a DELETE carries the key
  and the deleting revision only) in revision order. Watching from a revision that compaction has
  removed raises `CompactedError` from the watch; the caller must list again and watch from the new
  listing's revision + 1 (`podnet.store.informer.Reflector` does that).
- Leases: `grant(ttl_s)` (whole seconds, as in etcd), `keepalive` restarts the TTL, `revoke` ends
  it at once. When a lease ends, every key attached to it is deleted in one revision and watchers
  see a DELETE for each. Keepalive or revoke of an ended lease raises `LeaseNotFound`.

Consuming watches: a `Watch` is a blocking iterator (`for event in watch`, `watch.get(timeout)`)
and a trio async iterator (`async for event in watch`); both can be used from any thread, the async
side wakes its task through the trio token, never by polling. Other operations are synchronous:
the embedded store's are quick and never block, the etcd store's are HTTP requests, so trio code
calls them with `await trio.to_thread.run_sync(store.put, key, value)`.
"""

from __future__ import annotations

import enum
import json
import threading
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator

import trio

from podnet.errors import PodnetError


class StoreError(PodnetError):
    """A store operation failed; the message names the key or lease and what the store said."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (etcd down, connection lost). Retrying later may work."""


class KeyExists(StoreError):
    """`create` found the key already there; `current` is its value now."""

    def __init__(self, key: str, current: KeyValue | None) -> None:
        super().__init__(f"{key}: already exists" + (
            f" (mod_revision {current.mod_revision})" if current is not None else ""))
        self.key, self.current = key, current


class RevisionConflict(StoreError):
    """`update` or `delete(mod_revision=)` found another mod_revision (or no key): someone wrote
    first. `current` is the key's value now (None: it does not exist)."""

    def __init__(self, key: str, expected: int, current: KeyValue | None) -> None:
        found = f"mod_revision {current.mod_revision}" if current is not None else "no such key"
        super().__init__(f"{key}: expected mod_revision {expected}, found {found}")
        self.key, self.expected, self.current = key, expected, current


class LeaseNotFound(StoreError):
    """The lease expired or was revoked (or never existed)."""

    def __init__(self, lease_id: int) -> None:
        super().__init__(f"lease {lease_id:x}: requested lease not found (expired or revoked)")
        self.lease_id = lease_id


class CompactedError(StoreError):
    """The revision asked for is older than the store's compaction: its history is gone. List
    again and watch from the listing's revision + 1."""

    def __init__(self, what: str, requested: int, compact_revision: int = 0) -> None:
        since = f" (history starts at {compact_revision})" if compact_revision else ""
        super().__init__(f"{what}: required revision {requested} has been compacted{since}; "
                         "list again and watch from the listing's revision + 1")
        self.requested, self.compact_revision = requested, compact_revision


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True)
class KeyValue:
    """A key's state at `mod_revision`. In a DELETE event: key and mod_revision only (the rest 0)."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    def text(self) -> str:
        return self.value.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.value)


@dataclass(frozen=True)
class Event:
    type: EventType
    kv: KeyValue

    @property
    def key(self) -> str:
        return self.kv.key

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(frozen=True)
class Listing:
    """The keys under a prefix, in key order, as of `revision`."""

    kvs: tuple[KeyValue, ...]
    revision: int

    def __iter__(self) -> Iterator[KeyValue]:
        return iter(self.kvs)

    def __len__(self) -> int:
        return len(self.kvs)


@dataclass(frozen=True)
class Lease:
    id: int
    ttl_s: int


def prefix_end(prefix: str) -> str:
    """The first key after every key that starts with `prefix` (etcd's range_end for a prefix)."""
    data = bytearray(prefix.encode("utf-8"))
    while data:
        if data[-1] < 0xFF:
            data[-1] += 1
            return bytes(data).decode("utf-8", errors="surrogateescape")
        data.pop()
    return "\0"  # etcd: every key


def as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


class Watch:
    """The events of one watch, in revision order, for blocking and for trio consumers.

    The store (or its reader thread) calls `_push`, `_fail` and `_finish`; consumers iterate. An
    error (CompactedError, StoreUnavailable) is raised once, after the events queued before it, and
    ends the watch. `close()` ends it from the consumer's side; iteration then stops.
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._events: deque[Event] = deque()
        self._error: BaseException | None = None
        self._ended = False
        self._waiters: list[tuple[trio.lowlevel.TrioToken, trio.Event]] = []
        self._on_close: list[Any] = []

    # -- producer side -----------------------------------------------------------------------
    def _push(self, event: Event) -> None:
        with self._lock:
            if self._ended:
                return
            self._events.append(event)
            self._wake()

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self._ended or self._error is not None:
                return
            self._error = error
            self._wake()

    def _finish(self) -> None:
        with self._lock:
            self._ended = True
            self._wake()

    def _wake(self) -> None:  # with self._lock held
        self._ready.notify_all()
        waiters, self._waiters = self._waiters, []
        for token, event in waiters:
            try:
                token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                pass

    def _take(self) -> Event | None:
        """The next event, raising a pending error when no event is left; None: nothing yet.
        With self._lock held."""
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            error, self._error = self._error, None
            self._ended = True
            raise error
        if self._ended:
            raise StopIteration
        return None

    # -- consumer side -----------------------------------------------------------------------
    def get(self, timeout: float | None = None) -> Event:
        """The next event; TimeoutError after `timeout` seconds without one, StopIteration once
        the watch is closed, the store's error (e.g. CompactedError) if the watch failed."""
        with self._lock:
            if not self._ready.wait_for(lambda: self._events or self._error is not None
                                        or self._ended, timeout):
                raise TimeoutError(f"{self.description}: no event within {timeout} s")
            event = self._take()
            assert event is not None
            return event

    def pending(self) -> list[Event]:
        """The events already queued, without waiting. A failed watch's error is raised by the
        call that finds no event before it."""
        events: list[Event] = []
        with self._lock:
            while True:
                if not self._events and events:
                    return events  # an error, if any, waits for the next call
                try:
                    event = self._take()
                except StopIteration:
                    return events
                if event is None:
                    return events
                events.append(event)

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        return self.get()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Event:
        while True:
            with self._lock:
                try:
                    event = self._take()
                except StopIteration:
                    raise StopAsyncIteration from None
                if event is not None:
                    return event
                woken = trio.Event()
                waiter = (trio.lowlevel.current_trio_token(), woken)
                self._waiters.append(waiter)
            try:
                await woken.wait()
            finally:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)

    def close(self) -> None:
        with self._lock:
            self._ended = True
            self._events.clear()
            self._error = None
            self._wake()
            callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback()

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._ended and not self._events and self._error is None

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Store(ABC):
    """Keys (str) to values (bytes) with revisions, compare-and-swap, leases and watches: the
    contract described in this module's docstring."""

    name: str

    @abstractmethod
    def revision(self) -> int:
        """The store's current revision."""

    @abstractmethod
    def get(self, key: str) -> KeyValue | None: ...

    @abstractmethod
    def list(self, prefix: str) -> Listing: ...

    @abstractmethod
    def put(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        """Write unconditionally; the new revision. `lease` attaches the key (0 detaches it)."""

    @abstractmethod
    def create(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        """Write only if the key does not exist (else KeyExists); the new revision."""

    @abstractmethod
    def update(self, key: str, value: bytes | str, *, mod_revision: int, lease: int = 0) -> int:
        """Write only if the key's mod_revision is `mod_revision` (else RevisionConflict)."""

    @abstractmethod
    def delete(self, key: str, *, mod_revision: int | None = None) -> int | None:
        """Delete; the deleting revision, or None if there was no such key. With `mod_revision`,
        only if the key has it (else RevisionConflict, also when the key is gone)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix` in one revision; how many were deleted."""

    @abstractmethod
    def grant(self, ttl_s: int) -> Lease: ...

    @abstractmethod
    def keepalive(self, lease_id: int) -> int:
        """Restart the lease's TTL; its TTL in seconds. LeaseNotFound if it has ended."""

    @abstractmethod
    def revoke(self, lease_id: int) -> None:
        """End the lease now, deleting its keys. LeaseNotFound if it has ended already."""

    @abstractmethod
    def time_to_live(self, lease_id: int) -> int | None:
        """Whole seconds left on the lease, or None if it has ended."""

    @abstractmethod
    def lease_keys(self, lease_id: int) -> list[str]:
        """The keys attached to the lease, sorted. LeaseNotFound if it has ended."""

    @abstractmethod
    def compact(self, revision: int) -> None:
        """Drop the history before `revision`: watches from an older revision raise
        CompactedError. A future revision, or one compacted already, is a StoreError."""

    @abstractmethod
    def watch(self, key: str, *, prefix: bool = False, start_revision: int | None = None) -> Watch:
        """Changes to `key` (every key under it with `prefix`) from `start_revision` (None: from
        the next write on)."""

    def close(self) -> None:
        """Release connections and threads; open watches end."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def revoke_if_unused(store: Store, lease_id: int) -> bool:
    """Revoke a lease that no key is attached to any more (after its key moved to a new lease);
    whether it was revoked. A lease that ended meanwhile is fine."""
    try:
        if not store.lease_keys(lease_id):
            store.revoke(lease_id)
            return True
    except LeaseNotFound:
        pass
    return False


def check_ttl(ttl_s: int) -> int:
    if type(ttl_s) is not int or ttl_s < 1:
        raise ValueError(f"lease TTL must be a whole number of seconds >= 1, got {ttl_s!r}")
    return ttl_s
