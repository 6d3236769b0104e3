"""A three-node cluster for the multi-node tests, described as data (no YAML)."""

from __future__ import annotations

import sys

from podnet.cluster.model import Manifests, Node, ObjectMeta, Pod
from podnet.cluster.service import Service, ServicePort

from .pods import SERVER, pod

NODES = ("node-1", "node-2", "node-3")

# answers every connection on 8080 with its pod name and the address it saw the client connect from
WHO = """
import os, socket, threading
srv = socket.create_server(("0.0.0.0", 8080), backlog=64)
name = os.environ["POD_NAME"]
def serve(conn, peer):
    with conn:
        conn.sendall(f"{name} {peer[0]}\\n".encode())
while True:
    conn, peer = srv.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""

# connects to host:port N times and prints each answer line
ASK = """
import socket, sys
for _ in range(int(sys.argv[3])):
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        print(s.makefile().readline().strip(), flush=True)
"""


def placed(p: Pod, node: str) -> Pod:
    from dataclasses import replace
    return replace(p, node_name=node)


def cluster(*, web_replicas_on: tuple[str, ...] = ("node-2", "node-3")) -> Manifests:
    """client on node-1, the 20 MB server on node-3, a `web` pod on each node of `web_replicas_on`
    behind the Service `web` (port 80 -> 8080)."""
    pods = [placed(pod("client", ["sleep", "infinity"]), "node-1"),
            placed(pod("blob", [sys.executable, "-c", SERVER], port=9000), "node-3")]
    for node in web_replicas_on:
        web = pod(f"web-{node[-1]}", [sys.executable, "-c", WHO], port=8080)
        web = placed(web, node)
        from dataclasses import replace
        pods.append(replace(web, meta=replace(web.meta, labels={"app": "web"})))
    service = Service(ObjectMeta("web", "default"), selector={"app": "web"},
                      ports=(ServicePort("http", 80, target_port=8080),))
    return Manifests(nodes=tuple(Node(ObjectMeta(n, "")) for n in NODES), pods=tuple(pods), services=(service,))
