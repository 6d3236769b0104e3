"""The etcd side: the private server's safety, the client's edges, choosing a store, layering."""

from __future__ import annotations

import ast
import os
import subprocess
import threading
from pathlib import Path

import pytest

from podnet.errors import ConfigError
from podnet.store import EmbeddedStore, StoreUnavailable, open_store
from podnet.store.etcd_server import LOOPBACK, free_loopback_port

STORE_PACKAGE = Path(__file__).resolve().parents[2] / "src" / "podnet" / "store"


def listening_sockets(pid: int) -> list[str]:
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def test_the_test_etcd_listens_on_loopback_only_and_leaves_nothing(etcd_server):
    sockets = listening_sockets(etcd_server.pid)
    assert sorted(sockets) == sorted([f"{LOOPBACK}:{etcd_server.client_port}",
                                      f"{LOOPBACK}:{etcd_server.peer_port}"])
    assert etcd_server.client_port not in (2379, 2380)


def test_run_etcd_ends_its_process_by_pid_and_removes_its_dir():
    from podnet.store.etcd_server import run_etcd
    from conftest import etcd_available
    if not etcd_available():
        pytest.skip("no etcd")
    with run_etcd() as server:
        pid, data_dir = server.pid, server.data_dir
        assert os.path.isdir(data_dir)
    assert not os.path.exists(data_dir) and not os.path.exists(os.path.dirname(data_dir))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_closing_a_watch_ends_its_reader_thread(etcd_server):
    store = open_store(etcd_server.endpoint)
    before = threading.active_count()
    watches = [store.watch(f"/w/{i}") for i in range(3)]
    assert threading.active_count() == before + 3
    for watch in watches:
        watch.close()
    assert threading.active_count() == before
    watch = store.watch("/w/")
    store.close()  # closes what is still open
    assert threading.active_count() == before and watch.closed


def test_an_unreachable_etcd_is_store_unavailable():
    store = open_store(f"etcd://{LOOPBACK}:{free_loopback_port()}")
    with pytest.raises(StoreUnavailable, match="etcd at http://127.0.0.1"):
        store.get("/x")
    with pytest.raises(StoreUnavailable):
        store.watch("/x")


def test_a_watch_whose_etcd_dies_fails_with_store_unavailable():
    from conftest import etcd_available
    from podnet.store.etcd_server import run_etcd
    if not etcd_available():
        pytest.skip("no etcd")
    with run_etcd() as server:
        store = open_store(server.endpoint)
        watch = store.watch("/x")
        os.kill(server.pid, 15)
        with pytest.raises(StoreUnavailable):
            watch.get(timeout=10)
        store.close()


@pytest.mark.parametrize("url, problem", [
    ("etcd://", "not an etcd address"), ("zookeeper://h:1", "unknown store"),
    ("etcd://h:port", "must be a number"), ("embedded://x", "takes no address")])
def test_store_urls(url, problem):
    with pytest.raises(ConfigError, match=problem):
        open_store(url)


def test_store_urls_that_open():
    store = open_store("embedded")
    assert isinstance(store, EmbeddedStore)
    store.close()
    for url in ("etcd://127.0.0.1:2379", "http://127.0.0.1:2379", "127.0.0.1:2379"):
        etcd = open_store(url if "://" in url else f"etcd://{url}")
        assert etcd.endpoint == "http://127.0.0.1:2379"  # nothing is asked until a call
        etcd.close()


def test_the_store_never_imports_the_lab():
    forbidden = ("podnet.lab", "podnet.runtime", "podnet.linux", "podnet.cli", "podnet.control")
    for path in sorted(STORE_PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                assert not name.startswith(forbidden), f"{path.name} imports {name}"
