"""Fixtures for the store's contract suite: every test taking `h` runs against the embedded store
(with a fake clock, so lease expiry is a clock step, not a wait) and against a real etcd started on
loopback for that test (ports from the kernel, a data dir of its own, ended by pid afterwards)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest

from podnet.store import EmbeddedStore, Event, Store, Watch
from podnet.store.etcd_server import ETCD_BINARY, EtcdServer, run_etcd
from podnet.testing.store import EtcdRestarter

ETCD_EVENT_TIMEOUT_S = 5.0  # generous: a loaded CI machine; a passing test never waits this long


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Harness:
    """One store under test and how time passes for it."""

    store: Store
    kind: str
    clock: FakeClock | None = None
    server: EtcdServer | None = None

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass: a clock step for the embedded store, real time for etcd."""
        if self.clock is not None:
            self.clock.advance(seconds)
            self.store.expire_leases()
        else:
            time.sleep(seconds)

    def next_event(self, watch: Watch) -> Event:
        """The watch's next event: already queued for the embedded store; etcd gets a while."""
        return watch.get(timeout=0 if self.clock is not None else ETCD_EVENT_TIMEOUT_S)

    def no_event(self, watch: Watch) -> bool:
        try:
            event = watch.get(timeout=0 if self.clock is not None else 0.3)
        except TimeoutError:
            return True
        raise AssertionError(f"unexpected event {event}")

    def lease_ended_after(self, ttl_s: int) -> float:
        """How long to let pass so that a lease of `ttl_s` has surely ended (etcd checks leases
        every 500 ms; the embedded store ends them at the clock step)."""
        return ttl_s + (0.0 if self.clock is not None else 0.1)


def etcd_available() -> bool:
    return os.access(ETCD_BINARY, os.X_OK)


@pytest.fixture
def etcd_server():
    if not etcd_available():
        if os.environ.get("PODNET_REQUIRE_ROOT_TESTS") == "1":
            pytest.fail(f"{ETCD_BINARY} is missing (Debian package etcd-server): `make setup` "
                        "installs it, and a run without the etcd tests must not look green")
        pytest.skip(f"{ETCD_BINARY} is missing (install Debian's etcd-server)")
    with run_etcd() as server:
        yield server


@pytest.fixture
def etcd_restarter(etcd_server):
    """Stops the test's etcd and starts it again on the same data dir and ports."""
    with EtcdRestarter(etcd_server) as restarter:
        yield restarter


@pytest.fixture(params=["embedded", "etcd"])
def h(request):
    if request.param == "embedded":
        clock = FakeClock()
        store = EmbeddedStore(clock=clock)
        try:
            yield Harness(store, "embedded", clock=clock)
        finally:
            store.close()
    else:
        from podnet.store.etcd import EtcdStore
        server = request.getfixturevalue("etcd_server")
        store = EtcdStore(server.endpoint)
        try:
            yield Harness(store, "etcd", server=server)
        finally:
            store.close()
