"""The control socket of a running lab: one JSON request line in, one JSON response line out.

Layer: lab. `podnet up` (in the foreground or with -d) serves it at `<state_dir>/control.sock`;
`podnet status`, `podnet exec`, `podnet stats` and `podnet down` are its clients. Requests:

    {"op": "ping"}     -> {"ok": true, "pid": 1234, "ready": true}
    {"op": "status"}   -> {"ok": true, "pods": [{"namespace", "name", "ip", "node", "phase", ...}]}
    {"op": "stats"}    -> {"ok": true, "stats": {...DatapathStatistics...}}
    {"op": "down"}     -> {"ok": true}            (the lab then tears down and exits)

Errors come back as {"ok": false, "error": "..."}; the server never dies of a bad request.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import trio

SOCKET_NAME = "control.sock"
_MAX_REQUEST = 64 * 1024


class ControlError(Exception):
    """No lab answers on the socket, or it answered with an error."""


def socket_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / SOCKET_NAME


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


class ControlServer:
    def __init__(self, lab, path: Path, stop: trio.Event) -> None:
        self.lab = lab
        self.path = path
        self.stop = stop
        self.ready = False

    def answer(self, request: dict) -> dict:
        op = request.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "ready": self.ready}
        if op == "status":
            return {"ok": True, "pods": self.lab.status()}
        if op == "stats":
            return {"ok": True, "stats": _jsonable(self.lab.statistics())}
        if op == "down":
            self.stop.set()
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.unlink()  # the caller checked no live lab answers on it
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await listener.bind(str(self.path))
            os.chmod(self.path, 0o600)
            listener.listen(16)
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(self._handle, conn)
        finally:
            listener.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    async def _handle(self, conn) -> None:
        with conn:
            data = b""
            with trio.move_on_after(5):
                while b"\n" not in data and len(data) < _MAX_REQUEST:
                    chunk = await conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            try:
                reply = self.answer(json.loads(data.decode() or "{}"))
            except (ValueError, UnicodeDecodeError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            except Exception as exc:  # a bug in one answer must not take the lab down
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            payload = (json.dumps(reply) + "\n").encode()
            while payload:
                sent = await conn.send(payload)
                payload = payload[sent:]


def request(state_dir: str | os.PathLike, op: str, timeout_s: float = 10.0, **fields) -> dict:
    """Send one request to the lab serving `state_dir` (blocking client for the CLI)."""
    path = socket_path(state_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall((json.dumps({"op": op, **fields}) + "\n").encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(f"no podnet lab is running (nothing answers on {path}); start one with `podnet up -d -f ...`") from None
    except OSError as exc:
        raise ControlError(f"{path}: {exc}") from None
    reply = json.loads(data.decode())
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "the lab refused the request"))
    return reply
