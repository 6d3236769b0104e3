"""The etcd store: the contract of `podnet.store.base` on a real etcd v3 (Debian 12: etcd-server 3.4).

Layer: store. Talks to etcd's v3 JSON gRPC-gateway over HTTP (`/v3/kv/range`, `/v3/kv/txn`,
`/v3/lease/grant`, `/v3/watch`, ...) through etcd3gw, OpenStack's maintained pure-Python client:
its session, API-path discovery (`/v3/` from etcd 3.4 on, `/v3beta/` on 3.3) and error mapping,
and its `transaction` for compare-and-swap. gRPC clients (python-etcd3 and its forks) need grpcio
and generated protobuf modules that break with new protobuf releases; the gateway needs neither.

Invariants:
- Every call is one HTTP request and is synchronous (trio code runs it in a thread). Byte fields
  are base64 and int64 fields are decimal strings on the wire, and fields that are zero are left
  out, as the gateway's JSON marshalling does; this module turns them into `KeyValue`s.
- Compare-and-swap is one etcd transaction: `create` compares the key's create_revision with 0 (the
  key does not exist), `update` and `delete(mod_revision=)` compare its mod_revision; the failure
  branch reads the key, so a lost race reports the current value without a second request.
- A watch is one streaming `/v3/watch` request read by a daemon thread. `watch()` returns only
  after etcd confirmed the watch (`created`), so "from now on" really starts before the caller's
  next write. The stream's `canceled` response with `compact_revision` becomes CompactedError;
  a stream that ends or breaks becomes StoreUnavailable (etcd3gw's own watcher drops both, which is
  why this module reads the stream itself). `close()` shuts the socket down to end the thread.
- Errors: connection failures are StoreUnavailable; etcd's "requested lease not found" is
  LeaseNotFound; "required revision has been compacted" is CompactedError; anything else is a
  StoreError quoting etcd's message.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from typing import Any, Iterator
from urllib.parse import urlsplit

from podnet.errors import ConfigError

from .base import (CompactedError, Event, EventType, KeyExists, KeyValue, Lease, LeaseNotFound,
                   Listing, RevisionConflict, Store, StoreError, StoreUnavailable, Watch,
                   as_bytes, check_ttl, prefix_end)

DEFAULT_PORT = 2379
DEFAULT_TIMEOUT_S = 5.0
_UNAVAILABLE_CODES = (1, 14)  # gRPC CANCELLED, UNAVAILABLE: the server went away
_INSTALL_HINT = "the etcd store needs etcd3gw: pip install 'podnet[etcd]'"


def _b64(data: bytes | str) -> str:
    return base64.b64encode(as_bytes(data)).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _kv(data: dict[str, Any]) -> KeyValue:
    return KeyValue(key=_unb64(data.get("key")).decode("utf-8", errors="surrogateescape"),
                    value=_unb64(data.get("value")),
                    create_revision=int(data.get("create_revision", 0)),
                    mod_revision=int(data.get("mod_revision", 0)),
                    version=int(data.get("version", 0)),
                    lease=int(data.get("lease", 0)))


def _event(data: dict[str, Any]) -> Event:
    kind = EventType.DELETE if data.get("type") == "DELETE" else EventType.PUT
    return Event(kind, _kv(data["kv"]))


def _revision(response: dict[str, Any]) -> int:
    return int(response.get("header", {}).get("revision", 0))


def parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    """(protocol, host, port) of `etcd://HOST:PORT`, `http(s)://HOST:PORT` or `HOST:PORT`."""
    parts = urlsplit(endpoint if "://" in endpoint else f"etcd://{endpoint}")
    if parts.scheme not in ("etcd", "http", "https") or not parts.hostname \
            or parts.path not in ("", "/"):
        raise ConfigError(f"--store: {endpoint!r} is not an etcd address; expected "
                          "etcd://HOST:PORT (or http://HOST:PORT)")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ConfigError(f"--store: {endpoint!r}: the port must be a number") from None
    return ("https" if parts.scheme == "https" else "http"), parts.hostname, port


class EtcdStore(Store):
    name = "etcd"

    def __init__(self, endpoint: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        try:
            import etcd3gw
            from etcd3gw import exceptions as etcd_exceptions
        except ImportError:
            raise ConfigError(_INSTALL_HINT) from None
        protocol, host, port = parse_endpoint(endpoint)
        self.endpoint = f"{protocol}://{host}:{port}"
        self._timeout_s = timeout_s
        self._exceptions = etcd_exceptions
        self._new_client = lambda api_path: etcd3gw.Etcd3Client(
            host=host, port=port, protocol=protocol, timeout=timeout_s, api_path=api_path)
        self._api_path: str | None = None  # found by the first client (GET /version), shared
        self._lock = threading.Lock()
        self._local = threading.local()  # a requests.Session per thread: they are not
        self._clients: list[Any] = []    # documented as thread-safe
        self._watches: set[Watch] = set()

    @property
    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._new_client(self._api_path)
            with self._lock:
                self._clients.append(client)
        return client

    # -- requests ----------------------------------------------------------------------------
    def _call(self, what: str, path: str, payload: dict[str, Any], *,
              lease: int = 0) -> dict[str, Any]:
        errors = self._exceptions
        client = self._client
        try:
            if path == "/kv/txn":
                response = dict(client.transaction(payload))
            else:
                response = client.post(client.get_url(path), json=payload)
            if self._api_path is None:
                self._api_path = client.api_path  # known now: no further request
            return response
        except (errors.ConnectionFailedError, errors.ConnectionTimeoutError) as exc:
            raise StoreUnavailable(f"etcd at {self.endpoint}: {what}: "
                                   f"{exc.detail_text or exc}") from None
        except errors.Etcd3Exception as exc:
            message = exc.detail_text or str(exc)
            try:
                body = json.loads(message)
                message = body.get("error") or body.get("message") or message
            except (ValueError, AttributeError):
                pass
            if "lease not found" in message:
                raise LeaseNotFound(lease) from None
            raise StoreError(f"etcd at {self.endpoint}: {what}: {message}") from None

    def revision(self) -> int:
        return _revision(self._call("revision", "/kv/range",
                                    {"key": _b64("\0"), "count_only": True}))

    def get(self, key: str) -> KeyValue | None:
        response = self._call(f"get {key}", "/kv/range", {"key": _b64(key)})
        kvs = response.get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def list(self, prefix: str) -> Listing:
        response = self._call(f"list {prefix}", "/kv/range",
                              {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return Listing(tuple(_kv(kv) for kv in response.get("kvs", [])), _revision(response))

    def put(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        payload: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            payload["lease"] = str(lease)
        return _revision(self._call(f"put {key}", "/kv/put", payload, lease=lease))

    def _txn(self, what: str, key: str, compare: dict[str, Any], success: dict[str, Any],
             lease: int = 0) -> tuple[bool, dict[str, Any], KeyValue | None]:
        response = self._call(what, "/kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", **compare}],
            "success": [success],
            "failure": [{"request_range": {"key": _b64(key)}}],
        }, lease=lease)
        if response.get("succeeded"):
            return True, response, None
        kvs = response.get("responses", [{}])[0].get("response_range", {}).get("kvs", [])
        return False, response, _kv(kvs[0]) if kvs else None

    def _put_request(self, key: str, value: bytes | str, lease: int) -> dict[str, Any]:
        request: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            request["lease"] = str(lease)
        return {"request_put": request}

    def create(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        ok, response, current = self._txn(
            f"create {key}", key, {"target": "CREATE", "create_revision": "0"},
            self._put_request(key, value, lease), lease)
        if not ok:
            raise KeyExists(key, current)
        return _revision(response)

    def update(self, key: str, value: bytes | str, *, mod_revision: int, lease: int = 0) -> int:
        ok, response, current = self._txn(
            f"update {key}", key, {"target": "MOD", "mod_revision": str(mod_revision)},
            self._put_request(key, value, lease), lease)
        if not ok:
            raise RevisionConflict(key, mod_revision, current)
        return _revision(response)

    def delete(self, key: str, *, mod_revision: int | None = None) -> int | None:
        if mod_revision is None:
            response = self._call(f"delete {key}", "/kv/deleterange", {"key": _b64(key)})
            return _revision(response) if int(response.get("deleted", 0)) else None
        ok, response, current = self._txn(
            f"delete {key}", key, {"target": "MOD", "mod_revision": str(mod_revision)},
            {"request_delete_range": {"key": _b64(key)}})
        if not ok:
            raise RevisionConflict(key, mod_revision, current)
        return _revision(response)

    def delete_prefix(self, prefix: str) -> int:
        response = self._call(f"delete {prefix}*", "/kv/deleterange",
                              {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return int(response.get("deleted", 0))

    # -- leases ------------------------------------------------------------------------------
    def grant(self, ttl_s: int) -> Lease:
        check_ttl(ttl_s)
        response = self._call(f"grant a {ttl_s} s lease", "/lease/grant", {"TTL": ttl_s, "ID": 0})
        if response.get("error"):
            raise StoreError(f"etcd at {self.endpoint}: grant: {response['error']}")
        return Lease(int(response["ID"]), int(response["TTL"]))

    def keepalive(self, lease_id: int) -> int:
        response = self._call(f"keepalive lease {lease_id:x}", "/lease/keepalive",
                              {"ID": str(lease_id)}, lease=lease_id)
        ttl = int(response.get("result", response).get("TTL", 0))
        if ttl <= 0:  # etcd answers an ended lease with TTL 0 (left out of the JSON)
            raise LeaseNotFound(lease_id)
        return ttl

    def revoke(self, lease_id: int) -> None:
        self._call(f"revoke lease {lease_id:x}", "/lease/revoke", {"ID": str(lease_id)},
                   lease=lease_id)

    def time_to_live(self, lease_id: int) -> int | None:
        response = self._call(f"time-to-live of lease {lease_id:x}", "/lease/timetolive",
                              {"ID": str(lease_id)}, lease=lease_id)
        ttl = int(response.get("TTL", 0))
        return None if ttl < 0 else ttl

    def lease_keys(self, lease_id: int) -> list[str]:
        response = self._call(f"keys of lease {lease_id:x}", "/lease/timetolive",
                              {"ID": str(lease_id), "keys": True}, lease=lease_id)
        if int(response.get("TTL", 0)) < 0:
            raise LeaseNotFound(lease_id)
        return sorted(_unb64(key).decode("utf-8") for key in response.get("keys", []))

    # -- history -----------------------------------------------------------------------------
    def compact(self, revision: int) -> None:
        try:
            self._call(f"compact {revision}", "/kv/compaction",
                       {"revision": str(revision), "physical": True})
        except StoreError as exc:
            if "has been compacted" in str(exc):
                raise CompactedError("compact", revision) from None
            raise

    def watch(self, key: str, *, prefix: bool = False, start_revision: int | None = None) -> Watch:
        import requests

        description = f"watch {key}{'*' if prefix else ''}"
        request: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            request["range_end"] = _b64(prefix_end(key))
        if start_revision is not None:
            request["start_revision"] = str(start_revision)
        session = requests.Session()
        session.verify = self._client.session.verify
        session.cert = self._client.session.cert
        try:
            url = self._client.get_url("/watch")  # may ask etcd for its version first
        except (self._exceptions.ConnectionFailedError,
                self._exceptions.ConnectionTimeoutError) as exc:
            session.close()
            raise StoreUnavailable(f"etcd at {self.endpoint}: {description}: "
                                   f"{exc.detail_text or 'cannot connect'}") from None
        try:
            response = session.post(url,
                                    json={"create_request": request}, stream=True,
                                    timeout=(self._timeout_s, None))
        except requests.RequestException as exc:
            session.close()
            raise StoreUnavailable(f"etcd at {self.endpoint}: {description}: {exc}") from None
        if response.status_code != 200:
            text = response.text
            response.close()
            session.close()
            raise StoreError(f"etcd at {self.endpoint}: {description}: HTTP "
                             f"{response.status_code} {text}")
        watch = Watch(description)
        stream = _WatchStream(response, session, watch, description, start_revision or 0)
        stream.wait_created(self.endpoint)
        with self._lock:
            self._watches.add(watch)
        watch._on_close.append(stream.stop)
        watch._on_close.append(lambda: self._forget(watch))
        stream.start()
        return watch

    def _forget(self, watch: Watch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def close(self) -> None:
        with self._lock:
            watches = list(self._watches)
        for watch in watches:
            watch.close()
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.session.close()


class _WatchStream:
    """One `/v3/watch` response: newline-delimited JSON messages, read by a daemon thread."""

    def __init__(self, response: Any, session: Any, watch: Watch, description: str,
                 start_revision: int) -> None:
        self._response, self._session, self._watch = response, session, watch
        self._description, self._start = description, start_revision
        self._lines: Iterator[bytes] = response.iter_lines(chunk_size=None, delimiter=b"\n")
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=description, daemon=True)

    def _messages(self) -> Iterator[dict[str, Any]]:
        for line in self._lines:
            if line.strip():
                yield json.loads(line)

    def wait_created(self, endpoint: str) -> None:
        """Read up to etcd's `created` confirmation (raising what etcd said instead)."""
        try:
            for message in self._messages():
                outcome = self._handle(message)
                if outcome == "created":
                    return
                if outcome == "failed":
                    break
        except Exception as exc:
            self._close_response()
            raise StoreUnavailable(f"etcd at {endpoint}: {self._description}: {exc}") from None
        self._close_response()
        self._watch.pending()  # raises the error _handle queued, if there is one
        raise StoreUnavailable(f"etcd at {endpoint}: {self._description}: the stream ended "
                               "before etcd confirmed the watch")

    def _handle(self, message: dict[str, Any]) -> str:
        if "error" in message:  # the gateway's gRPC status: {"grpc_code", "message", ...}
            error = message["error"]
            details = error if isinstance(error, dict) else {"message": str(error)}
            text = details.get("message") or details.get("error") or str(error)
            unavailable = details.get("grpc_code") in _UNAVAILABLE_CODES \
                or details.get("http_code") == 503
            self._watch._fail((StoreUnavailable if unavailable else StoreError)(
                f"{self._description}: {text}"))
            return "failed"
        result = message.get("result", {})
        if result.get("canceled"):
            if compact_revision := int(result.get("compact_revision", 0)):
                self._watch._fail(CompactedError(self._description, self._start,
                                                 compact_revision))
            else:
                self._watch._fail(StoreError(f"{self._description}: canceled by etcd: "
                                             f"{result.get('cancel_reason', 'no reason given')}"))
            return "failed"
        for event in result.get("events", ()):
            self._watch._push(_event(event))
        return "created" if result.get("created") else "events"

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            for message in self._messages():
                if self._handle(message) == "failed":
                    return
            if not self._stopping.is_set():
                self._watch._fail(StoreUnavailable(f"{self._description}: the stream from etcd "
                                                   "ended"))
        except Exception as exc:  # the connection broke, or close() shut it down
            if not self._stopping.is_set():
                self._watch._fail(StoreUnavailable(f"{self._description}: {exc}"))
        finally:
            self._close_response()

    def _close_response(self) -> None:
        try:
            self._response.close()
        finally:
            self._session.close()

    def stop(self) -> None:
        """End the reader: shut the socket down so its blocking read returns."""
        self._stopping.set()
        connection = getattr(self._response.raw, "connection", None)
        sock = getattr(connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        elif not self._thread.is_alive():
            self._close_response()
