"""A store that fails where a test says: for code that must outlive etcd restarting under it.

Layer: store (testing; imports nothing above the store). `FaultyStore` wraps any Store and passes
every call through. A test can

- run a hook before or after a call (`before("list", hook)`, `after("update", hook)`): to make a
  write land between two calls of the code under test, to hold a call until something else has
  happened, or to fail it - raised after the call, the call took effect and its answer was lost,
  as when etcd dies mid-request;
- fail the watches open on a key (`fail_watches`) with StoreUnavailable (the connection broke) or
  CompactedError (the history it was reading is gone), as etcd restarting or compacting does;
- hold a prefix's watch events back (`hold`, `release`): a watch that is late, which a consumer
  cannot tell from a quiet prefix.

Every watch is forwarded from the inner store's by a daemon thread, so a held or failed watch
keeps the inner store's ordering: events come in revision order, an error after the events queued
before it. The wrapper keeps the contract of `podnet.store.base` otherwise.

`EtcdRestarter` does the real thing to a private etcd (`podnet.store.etcd_server.run_etcd`): stops
it and starts it again with the same command line, data dir and ports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

from podnet.store.base import KeyValue, Lease, Listing, Store, StoreUnavailable, Watch
from podnet.store.etcd_server import LOOPBACK, EtcdServer, die_with_parent, etcd_healthy


@dataclass
class Call:
    """One store call as a hook sees it: the method, the key or prefix ("" for lease calls), and
    after the call what it returned."""

    op: str
    key: str
    result: Any = None


Hook = Callable[[Call], None]


class _Forwarded:
    """One watch: events move from the inner store's watch to the caller's while `flowing`."""

    def __init__(self, key: str, inner: Watch, flowing: bool) -> None:
        self.key, self.inner = key, inner
        self.outer = Watch(inner.description)
        self.flowing = threading.Event()
        if flowing:
            self.flowing.set()
        self.outer._on_close.append(self._closed)
        self._thread = threading.Thread(target=self._run, name=f"faulty {inner.description}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self.inner:
                self.flowing.wait()
                self.outer._push(event)
        except BaseException as exc:   # the inner watch failed: so does the caller's, in order
            self.outer._fail(exc)
        else:
            self.outer._finish()

    def _closed(self) -> None:
        self.flowing.set()
        self.inner.close()


class FaultyStore(Store):
    """`inner` with faults where the test puts them (see the module)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.name = f"faulty {inner.name}"
        self._lock = threading.Lock()
        self._hooks: dict[tuple[str, bool], list[Hook]] = defaultdict(list)
        self._watches: list[_Forwarded] = []
        self._held: set[str] = set()
        self.watches_opened: list[str] = []   # the key or prefix of every watch opened, in order

    # -- what a test does ----------------------------------------------------------------------
    def before(self, op: str, hook: Hook) -> Hook:
        """Run `hook(call)` before every `op` call (a Store method name); it may raise."""
        with self._lock:
            self._hooks[(op, False)].append(hook)
        return hook

    def after(self, op: str, hook: Hook) -> Hook:
        """Run `hook(call)` after every `op` call, `call.result` set; raising loses the answer."""
        with self._lock:
            self._hooks[(op, True)].append(hook)
        return hook

    def remove(self, hook: Hook) -> None:
        with self._lock:
            for hooks in self._hooks.values():
                if hook in hooks:
                    hooks.remove(hook)

    def open_watches(self, key: str) -> int:
        """How many watches on exactly `key` (a key, or the prefix a prefix watch was given) are open."""
        with self._lock:
            return sum(1 for w in self._watches if w.key == key and not w.outer.closed)

    def fail_watches(self, key: str, error: BaseException) -> int:
        """End every open watch on `key` with `error` (after the events already queued); how many."""
        with self._lock:
            failing = [w for w in self._watches if w.key == key and not w.outer.closed]
            self._watches = [w for w in self._watches if w not in failing]
        for watch in failing:
            watch.outer._fail(error)   # first: the forwarding thread's _finish must not win
            watch.inner.close()
        return len(failing)

    def hold(self, prefix: str) -> None:
        """Hold back the events of watches (open or opened later) on keys starting with `prefix`."""
        with self._lock:
            self._held.add(prefix)
            for watch in self._watches:
                if watch.key.startswith(prefix):
                    watch.flowing.clear()

    def release(self, prefix: str) -> None:
        with self._lock:
            self._held.discard(prefix)
            for watch in self._watches:
                if watch.key.startswith(prefix) and not any(watch.key.startswith(p) for p in self._held):
                    watch.flowing.set()

    # -- the Store contract, passed through ----------------------------------------------------
    def _call(self, op: str, key: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        call = Call(op, key)
        with self._lock:
            before, after = list(self._hooks[(op, False)]), list(self._hooks[(op, True)])
        for hook in before:
            hook(call)
        call.result = fn(*args, **kw)
        for hook in after:
            hook(call)
        return call.result

    def revision(self) -> int:
        return self._call("revision", "", self.inner.revision)

    def get(self, key: str) -> KeyValue | None:
        return self._call("get", key, self.inner.get, key)

    def list(self, prefix: str) -> Listing:
        return self._call("list", prefix, self.inner.list, prefix)

    def put(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        return self._call("put", key, self.inner.put, key, value, lease=lease)

    def create(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        return self._call("create", key, self.inner.create, key, value, lease=lease)

    def update(self, key: str, value: bytes | str, *, mod_revision: int, lease: int = 0) -> int:
        return self._call("update", key, self.inner.update, key, value, mod_revision=mod_revision, lease=lease)

    def delete(self, key: str, *, mod_revision: int | None = None) -> int | None:
        return self._call("delete", key, self.inner.delete, key, mod_revision=mod_revision)

    def delete_prefix(self, prefix: str) -> int:
        return self._call("delete_prefix", prefix, self.inner.delete_prefix, prefix)

    def grant(self, ttl_s: int) -> Lease:
        return self._call("grant", "", self.inner.grant, ttl_s)

    def keepalive(self, lease_id: int) -> int:
        return self._call("keepalive", "", self.inner.keepalive, lease_id)

    def revoke(self, lease_id: int) -> None:
        return self._call("revoke", "", self.inner.revoke, lease_id)

    def time_to_live(self, lease_id: int) -> int | None:
        return self._call("time_to_live", "", self.inner.time_to_live, lease_id)

    def lease_keys(self, lease_id: int) -> list[str]:
        return self._call("lease_keys", "", self.inner.lease_keys, lease_id)

    def compact(self, revision: int) -> None:
        return self._call("compact", "", self.inner.compact, revision)

    def watch(self, key: str, *, prefix: bool = False, start_revision: int | None = None) -> Watch:
        def open_watch() -> Watch:
            inner = self.inner.watch(key, prefix=prefix, start_revision=start_revision)
            with self._lock:
                forwarded = _Forwarded(key, inner, not any(key.startswith(p) for p in self._held))
                self._watches = [w for w in self._watches if not w.outer.closed] + [forwarded]
                self.watches_opened.append(key)
            return forwarded.outer
        return self._call("watch", key, open_watch)

    def close(self) -> None:
        with self._lock:
            watches, self._watches = self._watches, []
        for watch in watches:
            watch.outer.close()
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        """The inner store's own extras (the embedded store's `expire_leases`, `compact_revision`)."""
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class EtcdRestarter:
    """Stop a test's etcd and start it again with the same command line (read from /proc): the
    same data dir and ports, so it comes back with the keys, leases and revisions it had, as a
    restarted etcd member does. Only processes this process started are signalled, by pid: the
    one `run_etcd` started, then the ones started here, which are ended on `close()`."""

    def __init__(self, server: EtcdServer, *, timeout_s: float = 15.0) -> None:
        self.server, self.timeout_s = server, timeout_s
        with open(f"/proc/{server.pid}/cmdline", "rb") as f:
            self.argv = [arg.decode() for arg in f.read().split(b"\0") if arg]
        self.pid = server.pid
        self._started: list[subprocess.Popen] = []

    def stop(self) -> None:
        """SIGTERM, and wait until it has exited (its parent reaps it)."""
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.timeout_s
        while not _exited(self.pid):
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"etcd (pid {self.pid}) still running {self.timeout_s} s after SIGTERM")
            time.sleep(0.02)

    def start(self) -> None:
        """Start it again and wait until it answers /health."""
        with open(self.server.log_path, "ab") as log:   # it dies with us, as run_etcd's does
            process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       close_fds=True, preexec_fn=die_with_parent())
        self._started.append(process)
        self.pid = process.pid
        deadline = time.monotonic() + self.timeout_s
        while not etcd_healthy(self.server.client_url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise StoreUnavailable(f"etcd did not come back on {LOOPBACK}:{self.server.client_port} "
                                       f"(see {self.server.log_path})")
            time.sleep(0.05)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        for process in self._started:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=self.timeout_s)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()

    def __enter__(self) -> EtcdRestarter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _exited(pid: int) -> bool:
    """Gone, or a zombie waiting for its parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return True


__all__ = ["Call", "EtcdRestarter", "FaultyStore"]
