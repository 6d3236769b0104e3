"""The control socket's per-node ops: which node answers, and the forwarding to node processes.

No root: the labs are stand-ins, and the node processes of a ClusterProcesses are plain child
processes whose control sockets this test serves itself (a ControlServer over a stand-in, at the
path a `podnet node join` would serve). What the real node processes answer is tested in
tests/e2e/test_multinode_etcd.py.
"""

from __future__ import annotations

import os
import subprocess
import types
from pathlib import Path

import pytest
import trio

from podnet.cluster.model import Manifests, Node, ObjectMeta
from podnet.cluster.topology import ClusterConfig, plan_cluster
from podnet.cluster_node import node_state_dir
from podnet.cluster_procs import ClusterProcesses, NodeProcess
from podnet.control import ControlError, ControlServer, RemoteNode, forward, request, socket_path


def stand_in(node: str, switched: list | None = None):
    """A node's Lab as the per-node ops use it: its name, counters, sync summary and backend."""
    lab = types.SimpleNamespace(config=types.SimpleNamespace(node_name=node),
                                backend=types.SimpleNamespace(name="iptables"),
                                statistics=lambda: {"node": node}, sync_summary=lambda: {"backend": "iptables"})

    def set_backend(name: str) -> dict:
        lab.backend = types.SimpleNamespace(name=name)
        if switched is not None:
            switched.append(node)
        return {"objects_total": 1}
    lab.set_backend = set_backend
    return lab


async def ask(state_dir, op: str, **fields) -> dict:
    """`request` from a worker thread (it blocks); a refusal as {"ok": False, "error": ...}."""
    try:
        return await trio.to_thread.run_sync(lambda: request(state_dir, op, **fields))
    except ControlError as exc:
        return {"ok": False, "error": str(exc)}


async def test_a_lab_is_one_node(tmp_path):
    server = ControlServer(stand_in("node-1"), socket_path(tmp_path), trio.Event())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        assert (await ask(tmp_path, "stats"))["node"] == "node-1"
        assert (await ask(tmp_path, "stats", node="node-1"))["stats"] == {"node": "node-1"}
        other = await ask(tmp_path, "stats", node="node-2")
        assert other == {"ok": False, "error": "no node 'node-2': this lab is one node, node-1"}
        assert not (await ask(tmp_path, "conntrack", what="C", node="node-2"))["ok"]
        nursery.cancel_scope.cancel()


# ---- node processes ------------------------------------------------------------------------------

@pytest.fixture
def processes(tmp_path):
    """A ClusterProcesses of node-1 and node-2 whose "processes" are `sleep`s (ended by pid)."""
    state = tmp_path / "state"
    manifests = Manifests(nodes=(Node(ObjectMeta("node-1", "")), Node(ObjectMeta("node-2", ""))))
    config = ClusterConfig(store="etcd://127.0.0.1:1", state_dir=str(state))
    procs = ClusterProcesses(config, plan_cluster(manifests), None, None, None, None)
    for spec in procs.plan.nodes:
        child = subprocess.Popen(["sleep", "60"])
        procs.nodes[spec.name] = NodeProcess(spec, child, None, str(state / f"{spec.name}.log"))
        Path(node_state_dir(str(state), spec.name)).mkdir(parents=True)
    try:
        yield procs
    finally:
        for node in procs.nodes.values():
            if node.process.poll() is None:
                node.process.kill()
                node.process.wait()


async def test_requests_for_a_node_process_are_forwarded_to_its_own_socket(processes):
    state = processes.config.state_dir
    switched: list[str] = []
    servers = {name: ControlServer(stand_in(name, switched), socket_path(node_state_dir(state, name)), trio.Event(),
                                   node_process=True) for name in processes.nodes}
    parent = ControlServer(processes, socket_path(state), trio.Event())
    async with trio.open_nursery() as nursery:
        for server in (*servers.values(), parent):
            await nursery.start(server.serve)
        first, second = await ask(state, "stats"), await ask(state, "stats", node="node-2")
        assert (first["node"], second["node"]) == ("node-1", "node-2")
        assert second["stats"] == {"node": "node-2"}
        unknown = await ask(state, "conntrack", what="L", node="node-9")
        assert unknown == {"ok": False, "error": "no node 'node-9' (nodes: node-1, node-2)"}
        # backend set: without a node, every node switches; with one, that node alone
        assert (await ask(state, "backend", set="ipvs"))["backend"] == "ipvs" and switched == ["node-1", "node-2"]
        assert (await ask(state, "backend", set="ebpf", node="node-2"))["backend"] == "ebpf"
        assert switched == ["node-1", "node-2", "node-2"]
        assert [(await ask(state, "backend", node=n))["backend"] for n in ("node-1", "node-2")] == ["ipvs", "ebpf"]
        # ops that are not per node stay with the parent
        assert (await ask(state, "ping"))["pid"] == os.getpid()

        # node-2's process is killed: asking it says so at once
        node2 = processes.nodes["node-2"]
        node2.process.kill()
        node2.process.wait()
        dead = await ask(state, "stats", node="node-2")
        assert not dead["ok"] and dead["error"].startswith(
            f"node node-2 is down: its process (pid {node2.pid}) was killed by SIGKILL")
        assert (await ask(state, "stats", node="node-1"))["ok"]
        nursery.cancel_scope.cancel()


async def test_a_node_that_does_not_answer_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "control.sock"
    node = RemoteNode("node-3", 4242, path)
    gone = await forward(node, {"op": "stats"}, timeout_s=1.0)
    assert gone == {"ok": False, "error": f"node node-3 (pid 4242) does not answer on {path}: its process is "
                                          "starting, or has stopped"}
    # a process that accepts and never answers (stopped, hung)
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with listener:
        await listener.bind(str(path))
        listener.listen(1)
        with trio.fail_after(5):
            hung = await forward(node, {"op": "stats"}, timeout_s=0.2)
    assert hung == {"ok": False, "error": f"node node-3 (pid 4242) did not answer on {path} within 0.2 s"}


async def test_a_node_process_that_closes_without_an_answer(tmp_path):
    path = tmp_path / "control.sock"

    async def close_at_once(stream) -> None:
        await stream.aclose()
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, close_at_once, [trio.SocketListener(listener)])
        reply = await forward(RemoteNode("node-1", 1, path), {"op": "stats"}, timeout_s=5)
        nursery.cancel_scope.cancel()
    assert reply == {"ok": False, "error": "node node-1 (pid 1) closed its control socket without an answer"}

