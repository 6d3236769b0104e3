"""Reflector.catch_up (podnet.store.informer): a quiet reflector is confirmed against a listing, a late
one is not, on both stores."""

from __future__ import annotations

from podnet.store.informer import Reflector

SERVICES = "/registry/services/specs/"


def test_a_quiet_reflector_catches_up_and_a_late_one_does_not(h):
    store = h.store
    store.put(f"{SERVICES}demo/a", "a")
    services = Reflector(store, SERVICES)
    services.relist()
    listed_at = services.revision
    store.put("/registry/endpointslices/demo/a-1", "s")   # the store moves on, not under the prefix
    assert services.revision == listed_at < store.revision()
    assert services.catch_up(store.list(SERVICES))
    assert services.revision == store.revision()
    # a change under the prefix that the reflector has not seen yet: no catching up past it
    watch = services.open_watch()
    for change in (lambda: store.put(f"{SERVICES}demo/b", "b"), lambda: store.delete(f"{SERVICES}demo/a"),
                   lambda: store.put(f"{SERVICES}demo/b", "b2")):
        change()
        behind = services.revision
        assert not services.catch_up(store.list(SERVICES))
        assert services.revision == behind
        services.apply(h.next_event(watch))
        assert services.catch_up(store.list(SERVICES)) and services.revision == store.revision()
    assert sorted(services.cache) == [f"{SERVICES}demo/b"]
    watch.close()
