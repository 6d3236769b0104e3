"""One TCP stream between pods of a two-node cluster: same node, across nodes direct, across VXLAN.

Group "crossnode-stream", three cases in one run, all through `podnet.cluster_lab.open_cluster`
(every node in this process, around the embedded store; offloads on):

    same-node          client and iperf3 server on node-1: one datapath, TAP to TAP
    crossnode-direct   client on node-1, server on node-2, host-gw routing: node-1's datapath, its
                       uplink TAP, the underlay bridge, node-2's uplink TAP and datapath; TSO
                       super-frames cross the bridge whole
    crossnode-vxlan    the same over Flannel-style VXLAN: where both uplink TAPs negotiate GSO over
                       UDP tunnels (Linux 6.17+), node-1 encapsulates each super-frame once and
                       node-2 hands its pod the inner super-frame whole; otherwise node-1 cuts them
                       to the tunnel's MTU (1450) in software (core/gso) and encapsulates each segment

The nodes share one trio thread (the embedded-store mode), so a cross-node stream costs the two
datapaths' work on one core: the numbers compare what crossing nodes costs in podnet itself, not
what separate node processes on separate cores would reach. `extra_info["gbps"]` (the receiver's
rate) goes into the session report as streams["same-node"], ["crossnode-direct"] and
["crossnode-vxlan"].

Knobs: PODNET_BENCH_SECONDS (default 3), PODNET_BENCH_ROUNDS (default 2; the median is reported).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import pytest

from podnet.cluster.model import Container, Manifests, Node, ObjectMeta, Pod
from podnet.cluster.topology import ClusterConfig
from podnet.cluster_lab import run_cluster
from topologies import new_token

SECONDS = float(os.environ.get("PODNET_BENCH_SECONDS", "3"))
ROUNDS = int(os.environ.get("PODNET_BENCH_ROUNDS", "2"))

# case -> (network, the server pod's node)
CASES = {"same-node": ("direct", "node-1"), "crossnode-direct": ("direct", "node-2"),
         "crossnode-vxlan": ("vxlan", "node-2")}


def _cluster() -> Manifests:
    def pod(name: str, node: str, argv: list[str]) -> Pod:
        return Pod(ObjectMeta(name, "default", {"app": name}), (Container("main", command=tuple(argv)),),
                   node_name=node, termination_grace_period_seconds=1)
    return Manifests(
        nodes=(Node(ObjectMeta("node-1", "")), Node(ObjectMeta("node-2", ""))),
        pods=(pod("client", "node-1", ["sleep", "infinity"]),
              pod("local", "node-1", ["iperf3", "-s", "-p", "5201"]),
              pod("remote", "node-2", ["iperf3", "-s", "-p", "5201"])))


def _iperf3(cluster, server_ip: str, seconds: float) -> dict:
    """iperf3 from the client pod; retried while the server is still starting."""
    argv = ["iperf3", "-c", server_ip, "-p", "5201", "-O", "1", "-t", str(seconds), "-J"]
    deadline = time.monotonic() + 15
    while True:
        done = cluster.exec("client", argv, timeout_s=seconds + 30)
        result = json.loads(done.stdout or b"{}")
        if done.returncode == 0 and "error" not in result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"iperf3 failed: {result.get('error') or done.stderr.decode()}")
        time.sleep(0.2)


@pytest.mark.root
@pytest.mark.benchmark(group="crossnode-stream")
@pytest.mark.parametrize("case", list(CASES))
def test_crossnode_stream(benchmark, case, report, needs_root):
    network, server_node = CASES[case]
    server = "local" if server_node == "node-1" else "remote"
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="podnet-bench-") as state_dir:
        config = ClusterConfig(network=network, prefix=f"pn-{new_token()[:2]}-", state_dir=state_dir,
                               persist_ipam=False)
        with run_cluster(_cluster(), config) as cluster:
            server_ip = cluster.pod(server).ip
            assert cluster.call(lambda: cluster.cluster.node_of(server).name) == server_node

            def stream() -> None:
                result = _iperf3(cluster, server_ip, SECONDS)
                received = result["end"]["sum_received"]
                runs.append({"gbps": received["bits_per_second"] / 1e9, "bytes": received["bytes"],
                             "retransmits": result["end"]["sum_sent"].get("retransmits", 0)})

            benchmark.pedantic(stream, rounds=ROUNDS, iterations=1, warmup_rounds=0)
            uplink = next((p for p in cluster.statistics("node-1").ports if p.name == "uplink"), None)
            tunnel = cluster.statistics("node-2").tunnel
    assert runs and all(r["bytes"] > 0 for r in runs), f"iperf3 moved no data: {runs}"
    if case != "same-node":   # the stream really crossed the underlay (and the tunnel in vxlan)
        assert uplink is not None and uplink.tx_bytes > sum(r["bytes"] for r in runs) // 2
    if network == "vxlan":
        assert tunnel is not None and tunnel.rx_packets > 0
    extra = {"gbps": statistics.median(r["gbps"] for r in runs), "gbps_runs": [round(r["gbps"], 3) for r in runs],
             "bytes": sum(r["bytes"] for r in runs), "retransmits": sum(r["retransmits"] for r in runs),
             "seconds": SECONDS, "network": network}
    benchmark.extra_info.update(extra)
    report.seconds = SECONDS
    report.streams[case] = extra
