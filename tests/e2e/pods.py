"""Pods for the end-to-end tests, described as data (the library's way, no YAML)."""

from __future__ import annotations

import sys

from podnet.cluster.model import Container, ContainerPort, Manifests, ObjectMeta, Pod, Probe, TCPSocketAction

BLOB_BYTES = 20 * 1024 * 1024
BLOB_SEED = 2026

# Serves BLOB_BYTES of seeded pseudo-random data per connection, after a first line naming the
# address it saw the client connect from (so a test can check that no NAT happened).
SERVER = f"""
import random, socket, threading
blob = random.Random({BLOB_SEED}).randbytes({BLOB_BYTES})
srv = socket.create_server(("0.0.0.0", 9000), backlog=16)
def serve(conn, peer):
    with conn:
        conn.sendall(f"peer={{peer[0]}}\\n".encode())
        conn.sendall(blob)
while True:
    conn, peer = srv.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""

# Reads everything from host:9000 and prints the peer line and the data's length and sha256.
CLIENT = """
import hashlib, socket, sys
with socket.create_connection((sys.argv[1], 9000), timeout=30) as s:
    f = s.makefile("rb")
    peer = f.readline().decode().strip()
    h, n = hashlib.sha256(), 0
    while chunk := f.read(1 << 16):
        h.update(chunk); n += len(chunk)
print(peer, n, h.hexdigest())
"""


def pod(name: str, argv: list[str], *, port: int | None = None, namespace: str = "default") -> Pod:
    ports = (ContainerPort(port, name="main"),) if port else ()
    probe = Probe(TCPSocketAction(port), period_seconds=1) if port else None
    container = Container(name="main", command=tuple(argv), ports=ports, readiness_probe=probe)
    return Pod(ObjectMeta(name, namespace, {"app": name}), (container,), termination_grace_period_seconds=1)


def two_pods() -> Manifests:
    return Manifests(pods=(
        pod("client", ["sleep", "infinity"]),
        pod("server", [sys.executable, "-c", SERVER], port=9000),
    ))
