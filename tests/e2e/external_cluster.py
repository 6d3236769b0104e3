"""A three-node cluster seen from outside, described as data: NodePort and LoadBalancer Services
whose backends are on node-2 and node-3 only, and the scripts the external client runs."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace

from podnet.cluster.model import Manifests, Node, ObjectMeta
from podnet.cluster.service import Service, ServicePort

from .cluster_pods import NODES, WHO, placed
from .pods import pod

NODE_PORT, NODE_PORT_LOCAL = 30080, 30081
# the LoadBalancer IPs on the underlay; MetalLB's election (sha256 of "node#ip") gives the first to
# node-1 among all three nodes, and the second to node-3 among node-2 and node-3 (node-1 would win
# it too if every node were a candidate: Local policy is what keeps it off node-1)
LB_IP, LB_LOCAL_IP = "172.18.0.102", "172.18.0.103"


def metallb_winner(nodes, ip: str) -> str:
    """The node MetalLB's L2 election picks for `ip` among `nodes`, written out from its rule."""
    return min(nodes, key=lambda node: hashlib.sha256(f"{node}#{ip}".encode()).digest())


def manifests() -> Manifests:
    pods = []
    for node in ("node-2", "node-3"):
        web = placed(pod(f"web-{node[-1]}", [sys.executable, "-c", WHO], port=8080), node)
        pods.append(replace(web, meta=replace(web.meta, labels={"app": "web"})))

    def service(name: str, node_port: int, **kw) -> Service:
        return Service(ObjectMeta(name, "default"), selector={"app": "web"},
                       ports=(ServicePort("http", 80, target_port=8080, node_port=node_port),), **kw)

    services = (service("np", NODE_PORT, type="NodePort"),
                service("np-local", NODE_PORT_LOCAL, type="NodePort", external_traffic_policy="Local"),
                service("lb", 30082, type="LoadBalancer", load_balancer_ingress=(LB_IP,)),
                service("lb-local", 30083, type="LoadBalancer", load_balancer_ingress=(LB_LOCAL_IP,),
                        external_traffic_policy="Local"))
    return Manifests(nodes=tuple(Node(ObjectMeta(n, "")) for n in NODES), pods=tuple(pods), services=services)


# N connections to host:port, one line each: the answer ("web-2 10.244.1.0"), or "failed <error>"
CONNECT = """
import socket, sys
for _ in range(int(sys.argv[3])):
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4])) as s:
            print(s.makefile().readline().strip(), flush=True)
    except OSError as exc:
        print("failed", type(exc).__name__, flush=True)
"""

# One ARP request for argv[1] from eth0 (sender argv[2]); prints the sender MAC of every reply for
# that address seen within argv[3] seconds, as JSON: who on the segment answers for it
ARP_PROBE = """
import json, socket, struct, sys, time
target, me = socket.inet_aton(sys.argv[1]), socket.inet_aton(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind(("eth0", 0))
mac = s.getsockname()[4]
request = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, me, bytes(6), target)
s.send(b"\\xff" * 6 + mac + b"\\x08\\x06" + request)
seen = []
deadline = time.monotonic() + float(sys.argv[3])
while (left := deadline - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        frame = s.recv(2048)
    except TimeoutError:
        break
    op, sha, spa = struct.unpack_from("!H6s4s", frame, 20)
    if op == 2 and spa == target:
        seen.append(sha.hex(":"))
print(json.dumps(seen))
"""


def connect(c, host: str, port: int, n: int, timeout_s: float = 3.0) -> list[str]:
    """The external client's N connections to host:port: one answer line (or failure) each."""
    done = c.exec_external([sys.executable, "-c", CONNECT, host, str(port), str(n), str(timeout_s)],
                           timeout_s=30 + n * timeout_s)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().splitlines()
