"""Reflector: keep a local copy of a key prefix up to date, as client-go's reflector does.

Layer: store. A node agent programs its datapath from the store the way kube-proxy does from the
API server: list everything under a prefix, then watch from the listing's revision + 1, applying
each event to a local cache. A node that restarts starts with an empty cache, so its first list is
the full resync; a watch that falls behind compaction (CompactedError) lists again and reports the
difference between the old cache and the new listing as events, so the consumer's view converges
without a gap (client-go's Replace). A watch that breaks (StoreUnavailable: etcd restarted, the
connection dropped) is opened again from the last revision seen + 1, after a short backoff.

A watch that is quiet cannot tell "nothing changed under the prefix" from "the change is still on
its way": `revision` moves only with events. A consumer that must know its view has every change up
to some revision R (a node's Service view, before it says it is synced) lists the prefix and asks
`catch_up`: a cache equal to a listing at R or later is at that listing's revision. (etcd's
progress notifications answer the same question without the listing; the contract has none.)

Invariants:
- Events come in revision order and every change after the first list is reported exactly once:
  by the watch, or, after a compaction, by the relist's difference.
- Events made up by a relist are a PUT for every key that is new or has another mod_revision, and
  a DELETE (key only, at the listing's revision) for every key that is gone.
- `cache` always equals the store's keys under the prefix as of `revision`, except that after a
  `catch_up` a key created and deleted again at or below the new revision may still come as two
  events, which leave the cache as it was.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator, Iterator

import trio

from .base import (CompactedError, Event, EventType, KeyValue, Listing, Store, StoreUnavailable,
                   Watch)

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0)


class Reflector:
    def __init__(self, store: Store, prefix: str) -> None:
        self.store, self.prefix = store, prefix
        self.cache: dict[str, KeyValue] = {}
        self.revision = 0
        self.relists = 0

    def relist(self) -> list[Event]:
        """List the prefix; the events that turn the cache into the listing (all PUTs at first)."""
        listing = self.store.list(self.prefix)
        fresh = {kv.key: kv for kv in listing}
        events = [Event(EventType.DELETE, KeyValue(key, b"", 0, listing.revision, 0))
                  for key in sorted(self.cache.keys() - fresh.keys())]
        events += [Event(EventType.PUT, kv) for kv in listing
                   if (old := self.cache.get(kv.key)) is None or old.mod_revision != kv.mod_revision]
        self.cache, self.revision = fresh, listing.revision
        self.relists += 1
        return events

    def apply(self, event: Event) -> None:
        if event.type is EventType.PUT:
            self.cache[event.key] = event.kv
        else:
            self.cache.pop(event.key, None)
        self.revision = max(self.revision, event.revision)

    def catch_up(self, listing: Listing) -> bool:
        """Whether the cache equals `listing` (this prefix, listed now): then it misses no change
        up to the listing's revision, and `revision` moves there. Call it in the thread that
        applies the events (trio's, for `aevents`), with a listing taken after the last event."""
        if {key: kv.mod_revision for key, kv in self.cache.items()} != \
                {kv.key: kv.mod_revision for kv in listing}:
            return False
        self.revision = max(self.revision, listing.revision)
        return True

    async def acatch_up(self) -> bool:
        """`catch_up` with a listing taken now (in a thread). StoreUnavailable if it cannot list."""
        listing = await trio.to_thread.run_sync(self.store.list, self.prefix)
        return self.catch_up(listing)

    def open_watch(self) -> Watch:
        return self.store.watch(self.prefix, prefix=True, start_revision=self.revision + 1)

    def events(self, *, timeout: float | None = None) -> Iterator[Event]:
        """Blocking: the first listing as events (unless this reflector listed before: then it
        goes on from its revision), then every change. TimeoutError after `timeout` seconds
        without a change."""
        if not self.relists:
            yield from self.relist()
        while True:
            watch = self.open_watch()
            try:
                while True:
                    event = watch.get(timeout)
                    self.apply(event)
                    yield event
            except CompactedError as exc:
                log.info("%s: %s", self.prefix, exc)
                yield from self.relist()
            except StopIteration:
                return
            finally:
                watch.close()

    async def aevents(self) -> AsyncIterator[Event]:
        """The same for trio: store calls run in threads; a broken watch is reopened."""
        if not self.relists:
            for event in await trio.to_thread.run_sync(self.relist):
                yield event
        failures = 0
        while True:
            try:
                watch = await trio.to_thread.run_sync(self.open_watch)
            except StoreUnavailable as exc:
                failures = await back_off(self.prefix, exc, failures)
                continue
            try:
                async for event in watch:
                    failures = 0
                    self.apply(event)
                    yield event
                return  # the store was closed
            except CompactedError as exc:
                log.info("%s: %s", self.prefix, exc)
                try:
                    events = await trio.to_thread.run_sync(self.relist)
                except StoreUnavailable as unavailable:
                    failures = await back_off(self.prefix, unavailable, failures)
                    continue
                for event in events:
                    yield event
            except StoreUnavailable as exc:
                failures = await back_off(self.prefix, exc, failures)
            finally:
                watch.close()


async def back_off(what: str, error: Exception, failures: int, *, then: str = "watching") -> int:
    """Sleep the backoff for the `failures`-th failure in a row (logged); `failures` + 1."""
    delay = RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S) - 1)]
    log.warning("%s: %s; %s again in %s s", what, error, then, delay)
    await trio.sleep(delay)
    return failures + 1
