"""A podnet node in a process of its own, for the TCP-stream benchmark.

Layer: bench (started by `topologies.podnet_pair`). It opens a lab with two pods on one node —
`server-<token>` running `iperf3 -s` (ready once port 5201 listens) and `client-<token>` running
`sleep infinity` — prints one JSON line describing them, and serves until SIGTERM. Then it prints
one JSON line with the datapath's statistics and lets `open_lab` undo everything.

Running the node apart from the pytest process gives it the same process structure as the raw
forwarder (`rawfwd.py`): neither shares a GIL with the benchmark harness.

    python bench/podnet_node.py --token 1a2b --prefix pn-b- --state-dir /run/podnet-bench [--no-offloads]
    python bench/podnet_node.py ... --profile /tmp/node.prof   # cProfile of the whole node
"""

from __future__ import annotations

import argparse
import cProfile
import json
import signal
import sys

import trio

from podnet.cluster.manifest import parse_manifests
from podnet.lab import LabConfig, open_lab

IPERF_PORT = 5201

MANIFESTS = """\
apiVersion: v1
kind: Pod
metadata: {{name: server-{token}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: iperf3
    image: networkstatic/iperf3
    command: ["iperf3", "-s", "-p", "{port}"]
    ports: [{{containerPort: {port}}}]
    readinessProbe:
      # an exec probe, not tcpSocket: a bare connect makes iperf3 log an aborted test. The lab
      # probes fast until ready, then every periodSeconds: none runs during a measurement.
      exec: {{command: ["sh", "-c", "ss -Hltn 'sport = :{port}' | grep -q ."]}}
      periodSeconds: 30
---
apiVersion: v1
kind: Pod
metadata: {{name: client-{token}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: shell
    image: busybox
    command: ["sleep", "infinity"]
"""


async def serve(args) -> dict:
    manifests = parse_manifests(MANIFESTS.format(token=args.token, port=IPERF_PORT), "<podnet_node>")
    config = LabConfig(prefix=args.prefix, offloads=args.offloads, state_dir=args.state_dir,
                       persist_ipam=False, grace_period_s=1.0)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_lab(manifests, config, wait_ready_s=30.0) as lab:
            pods = {p.name.rsplit("-", 1)[0]: {"netns": p.netns, "ip": p.ip, "tap_offloads": p.tap.offloads}
                    for p in lab.pods.values()}
            print(json.dumps({"ready": True, "pods": pods}), flush=True)
            async for _ in signals:
                break
            stats = lab.statistics()
            write_errors = sum(port.counters.write_errors for port in lab.node.ports.values())
    return {"frames": lab.node.frames_processed, "write_errors": write_errors,
            "fast_path_packets": stats.fast_path_packets, "slow_path_packets": stats.slow_path_packets,
            "dropped": stats.dropped, "drops": stats.drops, "flows": stats.flows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--token", required=True, help="makes pod, netns and TAP names unique")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--no-offloads", dest="offloads", action="store_false")
    parser.add_argument("--profile", help="write a cProfile of the node to this file")
    args = parser.parse_args(argv)
    if args.profile:
        profiler = cProfile.Profile()
        stats = profiler.runcall(trio.run, serve, args)
        profiler.dump_stats(args.profile)
    else:
        stats = trio.run(serve, args)
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
