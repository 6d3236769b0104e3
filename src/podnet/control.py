"""The control socket of a running lab: one JSON request line in, one JSON response line out.

Layer: lab. `podnet up` (in the foreground or with -d) serves it at `<state_dir>/control.sock`;
`podnet status`, `podnet exec`, `podnet stats` and `podnet down` are its clients. Requests:

    {"op": "ping"}     -> {"ok": true, "pid": 1234, "ready": true}
    {"op": "status"}   -> {"ok": true, "pods": [{"namespace", "name", "ip", "node", "phase", ...}]}
    {"op": "stats"}    -> {"ok": true, "stats": {...DatapathStatistics...}}
    {"op": "down"}     -> {"ok": true}            (the lab then tears down and exits)
    {"op": "backend", "set": "ipvs"} -> {"ok": true, "backend": "ipvs", "sync": {...}}  (no "set": show it)
    {"op": "services"} -> {"ok": true, "services": [{"namespace", "name", "type", "cluster_ip", "ports"}]}

The Service inspection ops answer like the tool they stand for: what it would print on stdout and
stderr, and its exit status (an unknown chain is not a failed request):

    {"op": "iptables-save", "table": null, "counters": false}
        -> {"ok": true, "stdout": "...", "stderr": "", "exit": 0}
    {"op": "iptables-list", "table": "nat", "chain": null, "numeric": true, "verbose": false,
     "exact": false, "line_numbers": false}            -> the same shape
    {"op": "conntrack", "what": "L" | "S" | "C"}     -> {"ok": true, "lines": [...]}
    {"op": "trace", "src", "sport", "proto", "dst", "dport", "all_branches", "local_ips": null}
        -> {"ok": true, "outcomes": [...outcomes_json...], "rules": {"nat/KUBE-SVC-X:2": "-m ..."}}
    {"op": "packet-trace", "pod", "namespace": null, "dst", "dport": 80, "proto": "tcp", "sport"}
        -> {"ok": true, "text": "...", "hops": [{"node", "frame", "in_port", "steps", "outputs"}]}
       (the first packet from a pod through the datapath, and on across nodes: podnet.packet_trace)

`local_ips` null means the lab's own addresses (the datapath's gateway and node IP). A trace reads
the live rules and a copy of the backend's random generator: it changes nothing, and without
all_branches it shows the pick the next new connection would get if nothing else came first.

Errors come back as {"ok": false, "error": "..."}; the server never dies of a bad request.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import socket
import time
from pathlib import Path

import trio

from podnet import inspection, packet_trace
from podnet.core.conntrack_format import format_conntrack_C, format_conntrack_S
from podnet.core.services.iptables import outcomes_json
from podnet.errors import PodnetError

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
            external = self.lab.external
            return {"ok": True, "pods": self.lab.status(),
                    "external": {"netns": external.netns, "ip": external.ip} if external else None}
        if op == "stats":
            return {"ok": True, "stats": _jsonable(self.lab.statistics()), "sync": self.lab.sync_summary()}
        if op == "down":
            self.stop.set()
            return {"ok": True}
        if op == "backend-view":
            from podnet.cli_backends import backend_view
            options = {**(request.get("options") or {}), "now": trio.current_time()}
            return {"ok": True, "text": backend_view(self.lab.backend, request["view"], options)}
        if op == "backend":
            if request.get("set"):
                report = self.lab.set_backend(request["set"])
                return {"ok": True, "backend": self.lab.backend.name, "sync": _jsonable(report)}
            return {"ok": True, "backend": self.lab.backend.name}
        if op == "services":
            return {"ok": True, "services": self.lab.services_status()}
        if op in ("iptables-save", "iptables-list"):
            return self._tool(op, request)
        if op == "conntrack":
            return self._conntrack(request.get("what", "L"))
        if op == "trace":
            return self._trace(request)
        if op == "packet-trace":
            return self._packet_trace(request)
        return {"ok": False, "error": f"unknown op {op!r}"}

    # ---- Service inspection ------------------------------------------------------------------

    def _ruleset(self):
        ruleset = getattr(self.lab.backend, "ruleset", None)
        if ruleset is None:
            raise inspection.ToolError(f"the {self.lab.backend.name} backend has no iptables rules")
        return ruleset

    def _tool(self, op: str, request: dict) -> dict:
        try:
            if op == "iptables-save":
                text = inspection.save_rules(self._ruleset(), request.get("table"),
                                             counters=bool(request.get("counters")), header=time.ctime())
            else:
                text = inspection.list_rules(
                    self._ruleset(), request.get("table") or "filter", request.get("chain"),
                    numeric=bool(request.get("numeric")), verbose=bool(request.get("verbose")),
                    exact=bool(request.get("exact")), line_numbers=bool(request.get("line_numbers")))
        except inspection.ToolError as exc:
            return {"ok": True, "stdout": "", "stderr": str(exc), "exit": exc.exit_code}
        return {"ok": True, "stdout": text, "stderr": "", "exit": 0}

    def _conntrack(self, what: str) -> dict:
        table = self.lab.datapath.conntrack
        if what == "L":
            lines = self.lab.conntrack_listing()
        elif what == "S":
            lines = [format_conntrack_S(table.statistics())]
        elif what == "C":
            lines = [format_conntrack_C(table)]
        else:
            return {"ok": False, "error": f"conntrack: unknown command {what!r} (L, S or C)"}
        return {"ok": True, "lines": lines}

    def _trace(self, request: dict) -> dict:
        ruleset = self._ruleset()
        rng = random.Random()
        rng.setstate(self.lab.backend.rng.getstate())   # a copy: the trace draws, the lab does not
        local = request.get("local_ips")
        outcomes = inspection.trace_connection(
            ruleset, src=request["src"], dst=request["dst"], proto=request.get("proto", "tcp"),
            sport=request.get("sport", inspection.DEFAULT_SPORT), dport=request.get("dport", 0),
            local_addresses=self.lab.datapath.local_addresses if local is None else local,
            all_branches=bool(request.get("all_branches")), rng=rng, now=trio.current_time())
        return {"ok": True, **outcomes_json(outcomes), "rules": inspection.path_rules(ruleset, outcomes)}

    def _packet_trace(self, request: dict) -> dict:
        hops = packet_trace.trace_from_pod(
            self.lab, request["pod"], request["dst"], dport=int(request.get("dport", 80)),
            proto=request.get("proto", "tcp"), sport=int(request.get("sport", inspection.DEFAULT_SPORT)),
            namespace=request.get("namespace"), now=trio.current_time())
        return {"ok": True, "text": packet_trace.format_hops(hops), "hops": packet_trace.hops_json(hops)}

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
            except PodnetError as exc:  # what was asked cannot be done (a bad address, ...)
                reply = {"ok": False, "error": str(exc)}
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


async def serve_until_stopped(target, path: Path, on_ready) -> None:
    """Serve `target`'s (a lab's or a cluster's) control socket at `path` until SIGINT, SIGTERM or
    SIGHUP, or a `down` request; `on_ready(target)` runs once the socket answers."""
    stop = trio.Event()
    server = ControlServer(target, path, stop)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        server.ready = True
        on_ready(target)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async def wait_signal():
                async for _ in signals:
                    stop.set()
                    return
            nursery.start_soon(wait_signal)
            await stop.wait()
        nursery.cancel_scope.cancel()
