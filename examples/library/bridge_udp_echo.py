"""podnet as a library, from a plain synchronous script: a topology described as data, a bridge-mode
(kubenet cbr0-style) node, and a UDP echo between two pods with Python sockets.

Run as root: `.venv/bin/python examples/library/bridge_udp_echo.py`. In bridge mode the pods share
the node's /24 and find each other with ARP through podnet's learning bridge; the frames between
them are switched at L2, not routed (their TTL arrives unchanged).
"""

from __future__ import annotations

import sys

from podnet import LabConfig, NodeMode, run_lab
from podnet.cluster.model import Container, ContainerPort, Manifests, ObjectMeta, Pod, Probe, TCPSocketAction

ECHO_SERVER = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 7007))
t = socket.create_server(("0.0.0.0", 7008))  # a TCP port for the readiness probe
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

ECHO_CLIENT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
rtts = []
for i in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    s.sendto(f"ping {i}".encode(), (sys.argv[1], 7007))
    data, _ = s.recvfrom(2048)
    assert data == f"ping {i}".encode()
    rtts.append((time.perf_counter() - t0) * 1e6)
rtts.sort()
print(len(rtts), round(rtts[len(rtts) // 2]), round(rtts[int(len(rtts) * 0.99) - 1]))
"""


def topology() -> Manifests:
    server = Container("echo", command=(sys.executable, "-c", ECHO_SERVER),
                       ports=(ContainerPort(7008, "probe"),),
                       readiness_probe=Probe(TCPSocketAction("probe"), period_seconds=1))
    client = Container("shell", command=("sleep", "infinity"))
    return Manifests(pods=(
        Pod(ObjectMeta("echo-client"), (client,), termination_grace_period_seconds=1),
        Pod(ObjectMeta("echo-server"), (server,), termination_grace_period_seconds=1),
    ))


def main(config: LabConfig | None = None, count: int = 200) -> dict:
    config = config or LabConfig(mode=NodeMode.BRIDGE, node_cidr="10.244.1.0/24")
    with run_lab(topology(), config) as lab:
        server = lab.pod("echo-server")
        result = lab.exec("echo-client", [sys.executable, "-c", ECHO_CLIENT, server.ip, str(count)])
        if result.returncode != 0:
            raise SystemExit(result.stderr.decode())
        answered, p50, p99 = map(int, result.stdout.split())
        route = lab.exec("echo-client", ["ip", "route"]).stdout.decode().strip()
        stats = lab.statistics()
        print(f"pods: echo-client {lab.pod('echo-client').ip}, echo-server {server.ip}  (bridge mode)")
        print("echo-client's routes:\n  " + route.replace("\n", "\n  "))
        print(f"UDP echo: {answered}/{count} answered, RTT p50 {p50} us, p99 {p99} us")
        print(f"bridge: {stats.stages.get('bridge', 0)} frames switched, {stats.arp_replies} ARP replies")
        return {"answered": answered, "route": route, "stats": stats,
                "fdb": {lab.datapath.port(e.port).name for e in lab.datapath.bridge.fdb.values()}}


if __name__ == "__main__":
    main()
