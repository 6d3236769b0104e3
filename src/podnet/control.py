"""The control socket of a running lab: one JSON request line in, one JSON response line out.

Layer: lab. `podnet up` (in the foreground or with -d) serves it at `<state_dir>/control.sock`;
`podnet status`, `podnet exec`, `podnet stats` and `podnet down` are its clients. Requests:

    {"op": "ping"}     -> {"ok": true, "pid": 1234, "ready": true}
    {"op": "status"}   -> {"ok": true, "pods": [{"namespace", "name", "ip", "node", "phase", ...}]}
    {"op": "stats"}    -> {"ok": true, "node": "node-1", "pid": 1234, "stats": {...DatapathStatistics...},
                           "sync": {...}}
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

The per-node ops (stats, backend, backend-view, iptables-save, iptables-list, conntrack, trace,
packet-trace) take `"node": NAME`, the first node when absent. A lab is one node, and any other
name is an error. An embedded cluster (podnet.cluster_lab) answers from that node's Lab. In a
cluster of node processes (podnet.cluster_procs) each `podnet node join` serves its own socket
in its node directory, `<state_dir>/nodes/<node>/control.sock`; `podnet up`'s server forwards the
request there, with a timeout, and a node whose process is gone is an error that says so.
`backend set` without a node switches every node. `packet-trace` without a node starts at the
pod's node. A node process traces its own datapath only, and its trace says where a frame left
for another node.

Errors come back as {"ok": false, "error": "..."}; the server never dies of a bad request.
"""

from __future__ import annotations

import contextlib
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
from podnet.errors import ConfigError, PodnetError

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


@dataclasses.dataclass(frozen=True)
class RemoteNode:
    """A node of a cluster that runs in a process of its own, and where it answers control requests."""

    name: str
    pid: int
    socket: Path


NODE_OPS = frozenset({"stats", "backend", "backend-view", "iptables-save", "iptables-list", "conntrack",
                      "trace", "packet-trace"})
FORWARD_TIMEOUT_S = 8.0      # under the CLI's 10 s: a node that does not answer is reported as such
SWITCH_TIMEOUT_S = 280.0     # `backend set` programs every Service (the CLI waits 300 s)


class ControlServer:
    """Answers one lab's, or one cluster's, control socket. `lab` is a Lab, a Cluster (every node
    in this process) or a ClusterProcesses (node processes: per-node ops are forwarded);
    `node_process` says that `lab` is one node process of a cluster (`podnet node join`)."""

    def __init__(self, lab, path: Path, stop: trio.Event, *, node_process: bool = False) -> None:
        self.lab = lab
        self.path = path
        self.stop = stop
        self.node_process = node_process
        self.ready = False

    async def respond(self, request: dict) -> dict:
        """The answer to `request`: `answer`'s, or for a node in a process of its own, that
        node's, asked on its own control socket."""
        remote = await self._remote_nodes(request)
        if not remote:
            return self.answer(request)
        timeout_s = SWITCH_TIMEOUT_S if request.get("op") == "backend" and request.get("set") else FORWARD_TIMEOUT_S
        for node in remote:   # `backend set` without a node: every node, in turn
            reply = await forward(node, {**request, "node": node.name}, timeout_s)
            if not reply.get("ok"):
                return reply
        return reply

    async def _remote_nodes(self, request: dict) -> list[RemoteNode]:
        """The node processes a per-node op goes to (none: this process answers)."""
        op, name = request.get("op"), request.get("node")
        locate = getattr(self.lab, "locate_node", None)
        if op not in NODE_OPS or locate is None:
            return []
        if op == "packet-trace" and name is None:
            node_of_pod = getattr(self.lab, "node_of_pod", None)
            if node_of_pod is None:   # every node is in this process: the trace finds the pod
                return []
            name = await trio.to_thread.run_sync(node_of_pod, request.get("pod"), request.get("namespace"))
        if op == "backend" and request.get("set") and name is None:
            found = [locate(node) for node in self.lab.nodes]
        else:
            found = [locate(name)]
        return [node for node in found if isinstance(node, RemoteNode)]

    def node_lab(self, name: str | None):
        """The Lab that answers the per-node ops for node `name` (None: the first node)."""
        locate = getattr(self.lab, "locate_node", None)
        if locate is None:   # a lab: one node
            if name is not None and name != self.lab.config.node_name:
                raise ConfigError(f"no node {name!r}: this lab is one node, {self.lab.config.node_name}")
            return self.lab
        lab = locate(name)
        if isinstance(lab, RemoteNode):
            raise ConfigError(f"node {lab.name} runs in its own process (pid {lab.pid}): ask it on {lab.socket}")
        return lab

    def answer(self, request: dict) -> dict:
        op = request.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "ready": self.ready}
        if op == "status":
            external = self.lab.external
            return {"ok": True, "pods": self.lab.status(),
                    "external": {"netns": external.netns, "ip": external.ip} if external else None}
        if op == "down":
            self.stop.set()
            return {"ok": True}
        if op == "services":
            return {"ok": True, "services": self.lab.services_status()}
        if op == "backend":
            return self._backend(request)
        if op == "packet-trace":
            return self._packet_trace(request)
        if op not in NODE_OPS:
            return {"ok": False, "error": f"unknown op {op!r}"}
        lab = self.node_lab(request.get("node"))
        if op == "stats":
            health = getattr(lab, "store_health", None)   # a cluster node: what it skipped from the store
            return {"ok": True, "node": lab.config.node_name, "pid": os.getpid(),
                    "stats": _jsonable(lab.statistics()), "sync": lab.sync_summary(),
                    "store": health() if health is not None else None}
        if op == "backend-view":
            from podnet.cli_backends import backend_view
            options = {**(request.get("options") or {}), "now": trio.current_time()}
            return {"ok": True, "text": backend_view(lab.backend, request["view"], options)}
        if op in ("iptables-save", "iptables-list"):
            return self._tool(lab, op, request)
        if op == "conntrack":
            return self._conntrack(lab, request.get("what", "L"))
        return self._trace(lab, request)

    def _backend(self, request: dict) -> dict:
        """Show a node's backend; switch one node's, or without a node every node's."""
        name = request.get("node")
        lab = self.node_lab(name)
        if request.get("set"):
            owner = self.lab if name is None else lab   # a Cluster's set_backend switches every node
            report = owner.set_backend(request["set"])
            return {"ok": True, "backend": lab.backend.name, "sync": _jsonable(report)}
        return {"ok": True, "backend": lab.backend.name}

    # ---- Service inspection ------------------------------------------------------------------

    @staticmethod
    def _ruleset(lab):
        ruleset = getattr(lab.backend, "ruleset", None)
        if ruleset is None:
            raise inspection.ToolError(f"the {lab.backend.name} backend has no iptables rules")
        return ruleset

    def _tool(self, lab, op: str, request: dict) -> dict:
        try:
            if op == "iptables-save":
                text = inspection.save_rules(self._ruleset(lab), request.get("table"),
                                             counters=bool(request.get("counters")), header=time.ctime())
            else:
                text = inspection.list_rules(
                    self._ruleset(lab), request.get("table") or "filter", request.get("chain"),
                    numeric=bool(request.get("numeric")), verbose=bool(request.get("verbose")),
                    exact=bool(request.get("exact")), line_numbers=bool(request.get("line_numbers")))
        except inspection.ToolError as exc:
            return {"ok": True, "stdout": "", "stderr": str(exc), "exit": exc.exit_code}
        return {"ok": True, "stdout": text, "stderr": "", "exit": 0}

    @staticmethod
    def _conntrack(lab, what: str) -> dict:
        table = lab.datapath.conntrack
        if what == "L":
            lines = lab.conntrack_listing()
        elif what == "S":
            lines = [format_conntrack_S(table.statistics())]
        elif what == "C":
            lines = [format_conntrack_C(table)]
        else:
            return {"ok": False, "error": f"conntrack: unknown command {what!r} (L, S or C)"}
        return {"ok": True, "lines": lines}

    def _trace(self, lab, request: dict) -> dict:
        ruleset = self._ruleset(lab)
        rng = random.Random()
        rng.setstate(lab.backend.rng.getstate())   # a copy: the trace draws, the lab does not
        local = request.get("local_ips")
        outcomes = inspection.trace_connection(
            ruleset, src=request["src"], dst=request["dst"], proto=request.get("proto", "tcp"),
            sport=request.get("sport", inspection.DEFAULT_SPORT), dport=request.get("dport", 0),
            local_addresses=lab.datapath.local_addresses if local is None else local,
            all_branches=bool(request.get("all_branches")), rng=rng, now=trio.current_time())
        return {"ok": True, **outcomes_json(outcomes), "rules": inspection.path_rules(ruleset, outcomes)}

    def _packet_trace(self, request: dict) -> dict:
        """From the pod's node (`node`, if given, must be it) and on through every node of this
        process; a node process traces itself only."""
        name, pod, namespace = request.get("node"), request["pod"], request.get("namespace")
        if name is not None:
            try:
                self.node_lab(name).pod(pod, namespace)
            except KeyError as exc:
                raise ConfigError(f"trace: {exc.args[0]} on {name} (a trace starts at its pod's node: "
                                  "without --node, that node is found)") from None
        hops = packet_trace.trace_from_pod(
            self.lab, pod, request["dst"], dport=int(request.get("dport", 80)),
            proto=request.get("proto", "tcp"), sport=int(request.get("sport", inspection.DEFAULT_SPORT)),
            namespace=namespace, now=trio.current_time(), peers_elsewhere=self.node_process)
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
                reply = await self.respond(json.loads(data.decode() or "{}"))
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


async def forward(node: RemoteNode, request: dict, timeout_s: float = FORWARD_TIMEOUT_S) -> dict:
    """Ask node process `node` on its own control socket. A node that is not there, or does not
    answer within `timeout_s` (stopped, hung), is an error reply that says which and where."""
    where = f"node {node.name} (pid {node.pid})"
    data = b""
    try:
        with trio.fail_after(timeout_s):
            async with await trio.open_unix_socket(str(node.socket)) as stream:
                await stream.send_all((json.dumps(request) + "\n").encode())
                while not data.endswith(b"\n"):
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    data += chunk
    except trio.TooSlowError:
        return {"ok": False, "error": f"{where} did not answer on {node.socket} within {timeout_s:g} s"}
    except (FileNotFoundError, ConnectionRefusedError):
        return {"ok": False, "error": f"{where} does not answer on {node.socket}: its process is starting, "
                                      "or has stopped"}
    except trio.BrokenResourceError:   # it went away while answering
        data = b""
    except OSError as exc:
        return {"ok": False, "error": f"{where}: {node.socket}: {exc}"}
    try:
        return json.loads(data.decode())
    except (ValueError, UnicodeDecodeError):
        return {"ok": False, "error": f"{where} closed its control socket without an answer"}


async def serve_until_stopped(target, path: Path, on_ready, *, signals=None, node_process: bool = False) -> None:
    """Serve `target`'s (a lab's, a cluster's or a node process's) control socket at `path` until
    SIGINT, SIGTERM or SIGHUP, or a `down` request; `on_ready(target)` runs once the socket
    answers. `signals` is a receiver the caller opened already (to hold signals while it started)."""
    stop = trio.Event()
    server = ControlServer(target, path, stop, node_process=node_process)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        server.ready = True
        on_ready(target)
        with contextlib.ExitStack() as stack:
            if signals is None:
                signals = stack.enter_context(trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP))

            async def wait_signal():
                async for _ in signals:
                    stop.set()
                    return
            nursery.start_soon(wait_signal)
            await stop.wait()
        nursery.cancel_scope.cancel()
