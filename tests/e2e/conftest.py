"""Fixtures the cluster e2e tests share."""

from __future__ import annotations

import os

import pytest

from podnet.store.etcd_server import ETCD_BINARY, run_etcd


@pytest.fixture
def etcd():
    """A private etcd on loopback (kernel-chosen ports, data in /dev/shm), stopped by pid after the test."""
    if not os.access(ETCD_BINARY, os.X_OK):
        pytest.fail(f"{ETCD_BINARY} is missing (Debian's etcd-server; `make setup` installs it)")
    with run_etcd() as server:
        yield server
