"""Three node processes and a real etcd on loopback: kill one node, start it again.

The control plane runs in this test's process; each node is a `podnet node join` process of its
own. Killing node-2's process (SIGKILL, by its pid) makes its pod unreachable while node-1's pod
still reaches node-3's and the Service, once node-2's registration lease runs out, answers from
node-3's backend alone; started again, node-2 releases what its killed run left, gets its subnet
back from the store and its pod's address back from its IPAM files, and is reachable again.
Through the command line, `--node NAME` is answered by that node's own process.
"""

from __future__ import annotations

import os
import sys

import pytest

from podnet.cluster.topology import ClusterConfig
from podnet.cluster_procs import run_cluster_processes
from podnet.linux.resources import process_matches

from .cluster_pods import ASK, cluster

from podnet.testing.waiting import wait_until

pytestmark = pytest.mark.root

# one TCP connection to host:port with a short timeout: prints ok and the first line, or the error.
# The line is read as bytes: blob's server sends its 20 MB of random bytes right after it, and a
# text-mode reader would decode whatever else the first read brought along.
PROBE = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        print("ok", s.makefile("rb").readline().decode(errors="replace").strip())
except OSError as exc:
    print("failed", type(exc).__name__)
"""


def _probe(c, target: str, port: int = 8080, timeout_s: float = 5.0) -> str:
    done = c.exec("client", [sys.executable, "-c", PROBE, target, str(port), str(timeout_s)])
    # a probe that died without a verdict says why (its stderr) in the assertion that fails
    return done.stdout.decode().strip() or f"no answer: {done.stderr.decode(errors='replace')[-500:]}"






def test_kill_a_node_process_and_start_it_again(etcd, tmp_path):
    config = ClusterConfig(network="vxlan", store=etcd.endpoint, prefix="pn-me-", state_dir=str(tmp_path / "state"),
                           node_lease_ttl_s=2, min_sync_period_s=0.2, grace_period_s=1)
    with run_cluster_processes(cluster(), config) as c:
        pids = {name: node.pid for name, node in c.nodes.items()}
        assert len(set(pids.values())) == 3 and os.getpid() not in pids.values()
        web2, web3, blob = (c.pod(n)["ip"] for n in ("web-2", "web-3", "blob"))
        assert {r["name"]: r["node"] for r in c.status()} == {
            "client": "node-1", "web-2": "node-2", "web-3": "node-3", "blob": "node-3"}
        cluster_ip = next(s["cluster_ip"] for s in c.services_status() if s["name"] == "web")
        client_ip = c.pod("client")["ip"]
        assert _probe(c, web2) == f"ok web-2 {client_ip}"
        answers = c.exec("client", [sys.executable, "-c", ASK, cluster_ip, "80", "12"]).stdout.decode().split("\n")
        assert {line.split()[0] for line in answers if line} == {"web-2", "web-3"}

        # node-2 crashes: its pod is unreachable, everything else goes on
        c.kill_node("node-2")
        assert not process_matches(pids["node-2"], 0) and os.path.exists("/run/netns/pn-me-web-2")
        assert _probe(c, web2, timeout_s=1.0).startswith("failed")
        assert _probe(c, blob, port=9000).startswith("ok peer=")
        assert _probe(c, web3) == f"ok web-3 {client_ip}"
        # once its registration lease ran out, the control plane takes its pod out of the Service
        wait_until(lambda: c.pod("web-2")["phase"] == "NodeLost", "node-2's pods to be marked lost", 60)
        wait_until(lambda: all(line.startswith("web-3") for line in c.exec(
            "client", [sys.executable, "-c", ASK, cluster_ip, "80", "8"]).stdout.decode().split("\n") if line),
            "the Service to answer from node-3 alone")

        # node-2 starts again: same subnet, same pod address, reachable again
        c.start_node("node-2")
        assert c.nodes["node-2"].pid != pids["node-2"]
        c.wait_ready(60)
        assert c.pod("web-2")["ip"] == web2 and c.pod("web-2")["node"] == "node-2"
        assert wait_until(lambda: _probe(c, web2) == f"ok web-2 {client_ip}", "web-2 to answer again")
        wait_until(lambda: {line.split()[0] for line in c.exec(
            "client", [sys.executable, "-c", ASK, cluster_ip, "80", "12"]).stdout.decode().split("\n") if line}
            == {"web-2", "web-3"}, "the Service to answer from both nodes again")
    assert not any(process_matches(pid, 0) for pid in pids.values())


def _wait_dead(pid: int, timeout_s: float = 10.0) -> None:
    """Until `pid` is gone or a zombie (its parent, `podnet up`, reaps it when it next looks)."""
    import time
    from pathlib import Path
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return
        except (FileNotFoundError, IndexError):
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still running {timeout_s} s after SIGKILL")


def test_each_node_process_answers_for_itself(etcd, state_dir):
    """`podnet ... --node NAME` against `podnet up --store etcd://`: podnet up forwards the request to
    that node's process, which answers from its own datapath; a killed node is a clear error."""
    import json
    import signal
    from pathlib import Path

    from podnet.control import request

    from .clitools import netns_with, podnet
    cluster_yaml = str(Path(__file__).resolve().parents[2] / "examples" / "demo" / "cluster.yaml")
    podnet(state_dir, "up", "-d", "-f", cluster_yaml, "--store", etcd.endpoint, "--prefix", "pn-mp-")
    try:
        parent = request(state_dir, "ping")["pid"]
        rows = json.loads(podnet(state_dir, "status", "-o", "json").stdout)   # from the store
        ips = {r["name"]: r["ip"] for r in rows}
        assert {r["name"]: r["node"] for r in rows} == {"client": "node-1", "web-2": "node-2", "web-3": "node-3"}

        stats = {n: json.loads(podnet(state_dir, "stats", "--node", n, "-o", "json").stdout)
                 for n in ("node-1", "node-2", "node-3")}
        pids = {n: s["pid"] for n, s in stats.items()}
        assert [s["node"] for s in stats.values()] == ["node-1", "node-2", "node-3"]
        assert len(set(pids.values())) == 3 and parent not in pids.values()
        assert json.loads(podnet(state_dir, "stats", "-o", "json").stdout)["pid"] == pids["node-1"]
        # each process has its own pods' ports only
        assert [[p["name"] for p in s["ports"] if p["kind"] == "pod"] for s in stats.values()] == [
            ["demo/client"], ["demo/web-2"], ["demo/web-3"]]

        # client -> web-3 crosses node-1 and node-3: their conntrack tables have it, node-2's not
        got = podnet(state_dir, "exec", "-n", "demo", "client", "--", "curl", "-sS", "-m", "5", "--local-port",
                     "45678", f"http://{ips['web-3']}:8080/").stdout
        assert got.strip() == f"web-3 (from {ips['client']})"
        flow = f"src={ips['client']} dst={ips['web-3']} sport=45678 dport=8080"
        listed = {n: podnet(state_dir, "conntrack", "-L", "--node", n).stdout for n in ("node-1", "node-2", "node-3")}
        assert [flow in listed[n] for n in ("node-1", "node-2", "node-3")] == [True, False, True], listed
        # a trace starts in the pod's node process, and says where it has to stop
        trace = podnet(state_dir, "trace", "-n", "demo", "client", f"{ips['web-3']}:8080").stdout
        assert trace.startswith(f"node-1: IP {ips['client']}.40000 > {ips['web-3']}.8080: tcp 0")
        assert "leaves node-1 for another node; the trace stops here" in trace, trace
        wrong = podnet(state_dir, "trace", "-n", "demo", "client", ips["web-3"], "--node", "node-2", check=False)
        assert wrong.returncode == 1 and "no pod 'client' in namespace 'demo' on node-2" in wrong.stderr
        unknown = podnet(state_dir, "conntrack", "-L", "--node", "node-9", check=False)
        assert unknown.returncode == 1 and "no node 'node-9' (nodes: node-1, node-2, node-3)" in unknown.stderr

        # node-3's process is killed: asking it is an error at once; the others and status go on
        os.kill(pids["node-3"], signal.SIGKILL)
        _wait_dead(pids["node-3"])
        dead = podnet(state_dir, "stats", "--node", "node-3", check=False, timeout=30)
        assert dead.returncode == 1, dead.stdout
        assert f"node node-3 is down: its process (pid {pids['node-3']}) was killed by SIGKILL" in dead.stderr
        assert json.loads(podnet(state_dir, "stats", "--node", "node-2", "-o", "json").stdout)["pid"] == pids["node-2"]
        assert len(json.loads(podnet(state_dir, "status", "-o", "json").stdout)) == 3
    finally:
        podnet(state_dir, "down")
    assert netns_with("pn-mp-") == []
