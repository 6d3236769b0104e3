"""The Service conformance suite: real TCP clients in pods reach ClusterIPs through each backend.

Parametrized over every registered backend (core.services.registry.BACKENDS), so each backend
added later must pass the same checks, in namespaces, with real sockets.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from podnet.cluster.model import (Container, ContainerPort, HTTPGetAction, Manifests, ObjectMeta, Pod,
                                  Probe)
from podnet.cluster.service import Service, ServicePort
from podnet.core.services.registry import BACKENDS
from podnet.lab import LabConfig, run_lab
from podnet.linux.netns import popen_in_netns

pytestmark = pytest.mark.root

# An HTTP/1.1 keep-alive server: answers "<pod name> <client address>"; /healthz is 503 while
# the file <flag dir>/<pod name> exists (how a test makes a pod fail its readiness probe).
SERVER = """
import http.server, os, sys
name, flags = os.environ["HOSTNAME"], sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/healthz":
            code, body = (503, b"unready") if os.path.exists(os.path.join(flags, name)) else (200, b"ok")
        else:
            code, body = 200, f"{name} {self.client_address[0]}".encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""

# N new connections to host:80, one request each: {"counts": {pod: n}, "peers": [client addresses seen]}
CLIENT = """
import collections, http.client, json, sys
host, n = sys.argv[1], int(sys.argv[2])
counts, peers, refused = collections.Counter(), set(), 0
for _ in range(n):
    conn = http.client.HTTPConnection(host, 80, timeout=5)
    try:
        conn.request("GET", "/")
        name, peer = conn.getresponse().read().decode().split()
        counts[name] += 1
        peers.add(peer)
    except ConnectionRefusedError:
        refused += 1
    finally:
        conn.close()
print(json.dumps({"counts": counts, "peers": sorted(peers), "refused": refused}))
"""

# One kept-alive connection: a request per line read on stdin, each answer printed.
KEEPALIVE = """
import http.client, sys
conn = http.client.HTTPConnection(sys.argv[1], 80, timeout=10)
for _ in sys.stdin:
    conn.request("GET", "/")
    print(conn.getresponse().read().decode(), flush=True)
"""


def _server(name: str, app: str, flags: str) -> Pod:
    # a probe that times out under the fairness test's load would flip the pod for a second: give
    # it 3 s, and two failures in a row before the pod counts as unready
    probe = Probe(HTTPGetAction(8080, "/healthz"), period_seconds=1, timeout_seconds=3, failure_threshold=2)
    container = Container("http", command=(sys.executable, "-c", SERVER, flags),
                          ports=(ContainerPort(8080, "http"),), readiness_probe=probe)
    return Pod(ObjectMeta(name, "default", {"app": app}), (container,), termination_grace_period_seconds=1)


def _service(name: str, app: str, ports=None, **kw) -> Service:
    return Service(ObjectMeta(name, "default"), ports=ports or (ServicePort("http", 80, target_port="http"),),
                   selector={"app": app}, **kw)


# Sends 20 MB of seeded data per connection in 64 KB chunks, pausing so a transfer lasts ~2 s
SLOW = """
import random, socket, threading, time
blob = random.Random(7).randbytes(20 << 20)
srv = socket.create_server(("0.0.0.0", 9000))
def serve(conn):
    with conn:
        for i in range(0, len(blob), 1 << 16):
            conn.sendall(blob[i:i + (1 << 16)])
            time.sleep(0.006)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""
FETCH = """
import hashlib, socket, sys
with socket.create_connection((sys.argv[1], 80), timeout=30) as s:
    h, n = hashlib.sha256(), 0
    while chunk := s.recv(1 << 16):
        h.update(chunk); n += len(chunk)
print(n, h.hexdigest())
"""


def _slow_server() -> Pod:
    from podnet.cluster.model import TCPSocketAction
    container = Container("data", command=(sys.executable, "-c", SLOW), ports=(ContainerPort(9000, "data"),),
                          readiness_probe=Probe(TCPSocketAction(9000), period_seconds=1))
    return Pod(ObjectMeta("slow-0", "default", {"app": "slow"}), (container,), termination_grace_period_seconds=1)


LB_IP, LB_CLOSED_IP = "172.18.0.100", "172.18.0.101"  # on the uplink: the node answers ARP for them


def _external(name: str, node_port: int, **kw) -> Service:
    return Service(ObjectMeta(name, "default"),
                   ports=(ServicePort("http", 80, target_port="http", node_port=node_port),),
                   selector={"app": "web"}, **kw)


def topology(flags: str) -> Manifests:
    client = Pod(ObjectMeta("client", "default", {"app": "client"}),
                 (Container("shell", command=("sleep", "infinity")),), termination_grace_period_seconds=1)
    return Manifests.collect([
        (p, None) for p in (client, *(_server(f"web-{i}", "web", flags) for i in range(3)),
                            _server("solo", "solo", flags),
                            _service("web", "web"), _service("sticky", "web", session_affinity="ClientIP"),
                            _service("empty", "nothing"), _service("solo", "solo"),
                            _slow_server(), _service("slow", "slow", ports=(ServicePort("data", 80, target_port=9000),)),
                            _external("np", 30080, type="NodePort"),
                            _external("np-local", 30081, type="NodePort", external_traffic_policy="Local"),
                            _external("lb", 30082, type="LoadBalancer", load_balancer_ingress=(LB_IP,)),
                            _external("lb-closed", 30083, type="LoadBalancer", load_balancer_ingress=(LB_CLOSED_IP,),
                                      load_balancer_source_ranges=("10.0.0.0/8",)))])


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def lab(request, tmp_path_factory):
    flags = tmp_path_factory.mktemp("flags")
    config = LabConfig(prefix="pn-sv", state_dir=str(tmp_path_factory.mktemp("state")),
                       backend=request.param, min_sync_period_s=0.2)
    with run_lab(topology(str(flags)), config) as lab:
        lab.flags = flags
        yield lab


def cluster_ip(lab, name: str) -> str:
    return next(s["cluster_ip"] for s in lab.status_services() if s["name"] == name)


def wait_endpoints_ready(lab, service: str, count: int, timeout_s: float = 15.0) -> None:
    """Until `count` endpoints of `service` are ready and the backend has synced them (a test before
    may have made one unready)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = [ep for s in lab.endpoint_slices() if s.service_name == service for ep in s.endpoints if ep.ready]
        if len(ready) == count:
            lab.wait_synced()
            return
        time.sleep(0.1)
    raise AssertionError(f"{service} did not get {count} ready endpoints in {timeout_s} s")


def connect_many(lab, pod: str, host: str, n: int) -> dict:
    result = lab.exec(pod, [sys.executable, "-c", CLIENT, host, str(n)], timeout_s=120)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def test_cluster_ip_spreads_300_connections_fairly_and_replies_come_from_it(lab):
    wait_endpoints_ready(lab, "web", 3)
    seen = connect_many(lab, "client", cluster_ip(lab, "web"), 300)
    counts = seen["counts"]
    assert set(counts) == {"web-0", "web-1", "web-2"} and sum(counts.values()) == 300
    # chi-square against a uniform 1/3 split, 2 degrees of freedom: 13.82 is the 0.1% point, so
    # a fair balancer fails this one run in a thousand
    chi2 = sum((n - 100) ** 2 / 100 for n in counts.values())
    assert chi2 < 13.82, counts
    # no masquerade for pod-to-Service traffic: backends saw the client's own address
    assert seen["peers"] == [lab.pod("client").ip]
    # and every connection was a DNAT the client never saw: the reply tuple names the backend
    entries = [line for line in lab.conntrack_listing() if f"dst={cluster_ip(lab, 'web')} " in line]
    assert len(entries) >= 300
    assert all(any(f"src={lab.pod(f'web-{i}').ip} " in e for i in range(3)) for e in entries)


def test_hairpin_a_backend_reaching_its_own_service_is_masqueraded(lab):
    seen = connect_many(lab, "solo", cluster_ip(lab, "solo"), 3)
    assert seen["counts"] == {"solo": 3}
    # KUBE-SEP's `-s <endpoint> -j KUBE-MARK-MASQ`: the pod sees the node's address, not its own
    assert seen["peers"] == [lab.config.node_ip]


def test_a_service_without_endpoints_is_refused_at_once(lab):
    seen = connect_many(lab, "client", cluster_ip(lab, "empty"), 3)
    # REJECT sends an ICMP port unreachable (kube-proxy's default): connect() fails with
    # ECONNREFUSED, not a 5 s timeout
    assert seen["refused"] == 3 and seen["counts"] == {}
    assert lab.statistics().drops.get("service_reject", 0) >= 3


def test_session_affinity_client_ip_sticks(lab):
    wait_endpoints_ready(lab, "web", 3)
    seen = connect_many(lab, "client", cluster_ip(lab, "sticky"), 30)
    assert len(seen["counts"]) == 1 and sum(seen["counts"].values()) == 30


def test_unready_backend_leaves_the_endpoints_and_gets_no_new_connections(lab):
    wait_endpoints_ready(lab, "web", 3)
    host = cluster_ip(lab, "web")
    keep = popen_in_netns(lab.pod("client").netns, [sys.executable, "-c", KEEPALIVE, host],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        keep.stdin.write("\n")
        keep.stdin.flush()
        victim = keep.stdout.readline().split()[0]
        (lab.flags / victim).touch()          # its /healthz now answers 503
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            slices = lab.endpoint_slices()
            ready = {ep.addresses[0]: ep.ready for s in slices if s.service_name == "web" for ep in s.endpoints}
            if ready.get(lab.pod(victim).ip) is False:
                break
            time.sleep(0.1)
        assert ready[lab.pod(victim).ip] is False     # the controller took it out
        lab.wait_synced()
        seen = connect_many(lab, "client", host, 60)
        assert victim not in seen["counts"] and sum(seen["counts"].values()) == 60
        # the connection opened before still reaches it (conntrack keeps established flows)
        keep.stdin.write("\n")
        keep.stdin.flush()
        assert keep.stdout.readline().split()[0] == victim
    finally:
        (lab.flags / victim).unlink(missing_ok=True)
        keep.kill()
        keep.wait()


def test_a_trace_agrees_with_the_connections_that_really_happened(lab):
    import functools

    import trio

    from podnet.core.packet import ip_int, ip_str
    from podnet.core.services.iptables import EvalContext, trace_first_packet
    from podnet.core.services.packetinfo import PacketInfo
    wait_endpoints_ready(lab, "web", 3)
    client = lab.pod("client").ip
    for service, expect_single in (("sticky", True), ("web", False)):
        vip = cluster_ip(lab, service)
        seen = connect_many(lab, "client", vip, 5)
        pkt = PacketInfo(ip_int(client), ip_int(vip), 6, 45678, 80)
        if lab.backend.name != "iptables":
            # the other backends have no rules to walk; their trace is a dry-run decision, which
            # must agree too: the affinity entry pins the backend, otherwise one of the three
            decide = functools.partial(lab.backend.decide, pkt, effects=False)
            decisions = [trio.from_thread.run_sync(lambda: decide(trio.current_time()), trio_token=lab._token)
                         for _ in range(20)]
            predicted = {f"{ip_str(d.dnat[0])}:{d.dnat[1]}" for d in decisions}
            real = {f"{lab.pod(name).ip}:8080" for name in seen["counts"]}
            assert predicted == real if expect_single else predicted <= {f"{lab.pod(f'web-{i}').ip}:8080" for i in range(3)}
            assert not any(d.masquerade for d in decisions)
            continue

        def trace():
            ctx = EvalContext(now=trio.current_time(), local_addresses=lab.datapath.local_addresses)
            return trace_first_packet(lab.backend.ruleset, pkt, ctx, all_branches=True)

        outcomes = trio.from_thread.run_sync(trace, trio_token=lab._token)
        backends = {o.destination for o in outcomes}
        real = {f"{lab.pod(name).ip}:8080" for name in seen["counts"]}
        if expect_single:
            # the recent list pins the client: the trace predicts exactly the backend it got
            assert backends == real and len(outcomes) == 1
        else:
            assert real <= backends and len(backends) == 3
            assert abs(sum(o.probability for o in outcomes) - 1.0) < 1e-9
        assert all(o.verdict == "DNAT" and not o.masquerade for o in outcomes)
        assert {ip_str(ip_int(d.split(":")[0])) for d in backends} <= {lab.pod(f"web-{i}").ip for i in range(3)}


# From the external client: N connections to host:port, the same report as CLIENT
EXTERNAL = CLIENT.replace("HTTPConnection(host, 80, timeout=5)", "HTTPConnection(host, int(sys.argv[3]), timeout=2)").replace(
    "    except ConnectionRefusedError:\n        refused += 1", "    except (ConnectionRefusedError, TimeoutError):\n        refused += 1")


def connect_external(lab, host: str, port: int, n: int) -> dict:
    result = lab.exec_external([sys.executable, "-c", EXTERNAL, host, str(n), str(port)], timeout_s=120)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


@pytest.mark.parametrize("target, port", [("node", 30080), ("lb", 80)])
def test_an_external_client_reaches_nodeport_and_loadbalancer_masqueraded(lab, target, port):
    wait_endpoints_ready(lab, "web", 3)
    host = lab.config.node_ip if target == "node" else LB_IP
    seen = connect_external(lab, host, port, 30)
    assert sum(seen["counts"].values()) == 30 and set(seen["counts"]) <= {"web-0", "web-1", "web-2"}
    # externalTrafficPolicy Cluster: kube-proxy (iptables, ipvs) masquerades all external traffic, so
    # the backend sees the node's address; Cilium SNATs only when the backend is on another node
    # (nodeport.h), and on this one-node lab every backend is local, so it sees the client's own
    expected = lab.external.ip if lab.backend.name == "ebpf" else lab.config.node_ip
    assert seen["peers"] == [expected]


def test_external_traffic_policy_local_keeps_the_client_address(lab):
    wait_endpoints_ready(lab, "web", 3)
    seen = connect_external(lab, lab.config.node_ip, 30081, 10)
    assert sum(seen["counts"].values()) == 10
    assert seen["peers"] == [lab.external.ip]


def test_load_balancer_source_ranges_are_enforced(lab):
    wait_endpoints_ready(lab, "web", 3)
    before = lab.statistics().drops
    seen = connect_external(lab, LB_CLOSED_IP, 80, 2)
    assert seen["counts"] == {} and seen["refused"] == 2   # dropped: the client times out
    after = lab.statistics().drops
    # where it was dropped: kube-proxy's KUBE-PROXY-FIREWALL (a backend decision), or the eBPF
    # backend's XDP program on the uplink, before the frame is even parsed
    where = "xdp_drop" if lab.backend.name == "ebpf" else "service_drop"
    assert after.get(where, 0) > before.get(where, 0)
    assert sum(connect_external(lab, LB_IP, 80, 2)["counts"].values()) == 2   # the open one still works


@pytest.mark.parametrize("to", sorted(BACKENDS))
def test_switching_backends_keeps_an_established_transfer_going(lab, to):
    import hashlib
    import random
    host = cluster_ip(lab, "slow")
    fetch = popen_in_netns(lab.pod("client").netns, [sys.executable, "-c", FETCH, host],
                           stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)                  # the transfer is under way ...
        assert fetch.poll() is None
        was = lab.backend.name
        lab.set_backend(to)              # ... when the node changes its Service backend
        assert lab.backend.name == to and fetch.poll() is None   # switched mid-transfer
        out, _ = fetch.communicate(timeout=60)
    finally:
        fetch.kill()
        fetch.wait()
    expected = hashlib.sha256(random.Random(7).randbytes(20 << 20)).hexdigest()
    assert out.split() == [str(20 << 20), expected]
    # and NEW connections go through the new backend
    assert sum(connect_many(lab, "client", cluster_ip(lab, "web"), 5)["counts"].values()) == 5
    lab.set_backend(was)
