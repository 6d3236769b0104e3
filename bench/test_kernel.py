"""The kernel as the anchor: the same kube-proxy rule sets loaded into the real kernel, in the same run.

Group `kernel` (root, `ip`, `iptables-restore`). For each size of PODNET_BENCH_SERVICE_SIZES, the same
N Services as test_services.py (`services(n)`: 5 endpoints each, cluster CIDR 10.244.0.0/14, node
172.18.0.2) go through podnet's `KubeProxyIptables(...).sync(services, full=True)`, and its payload,
preceded by `jump_rules_restore()`, is what the kernel gets:

    kernel-restore[N]       a fresh netns `pn-bk-<token>-r<i>`, then the wall time of
                            `ip netns exec NS iptables-restore --noflush` of jumps + payload, and
                            the same with iptables-legacy-restore (when installed) in another
                            fresh netns (median of 3 runs up to 1,000 Services, 1 run above).
                            The default iptables-restore (nf_tables) is only timed up to 1,000
                            Services, or 10,000 with PODNET_BENCH_FULL=1 (10,000 took 161 s; its
                            time grows faster than linearly, so 50,000 is never tried). extra_info:
                            restore_s, restore_legacy_s, rules (`-A` lines loaded), payload_bytes,
                            iptables (version).
    kernel-first-packet[N]  three namespaces joined by veth pairs, the rules in the middle one:

        client 10.244.0.2/24 ── veth ── 10.244.0.1/24 router 192.168.77.1/30 ── veth ── 192.168.77.2/30 server
                                     (ip_forward=1, the N Services' rules + bench/bulk)  + the 5 endpoint IPs /32

                            The measured Service is the LAST one in KUBE-SERVICES' order (a NEW
                            connection walks past every other Service's rule); its 5 endpoints
                            are addresses of the server netns, where a tiny Python TCP server
                            listens on :8080. From the client netns, `bench/connect_client.py`
                            (the program test_dataplane.py runs through podnet): CONNECTS (default
                            200, PODNET_BENCH_CONNECTS) new TCP connections to ClusterIP:80, each
                            timed around connect(): SYN → DNAT → SYN/ACK back through conntrack;
                            then PODNET_BENCH_SECONDS of back-to-back connects with
                            PODNET_BENCH_CONNECT_CONCURRENCY (4) in flight → connects_per_s.
                            The router's rules are loaded with iptables-legacy-restore when
                            installed (x_tables, fast to load). extra_info: p50/p90/p99/mean ms,
                            connects_per_s.
    kernel-throughput[N]    the same three namespaces and rules (one router per size, shared with
                            kernel-first-packet[N]). The router also holds one more Service,
                            bench/bulk at 10.100.0.1, TCP and UDP 5201 → 192.168.77.2:5201 (one
                            endpoint: the server netns' own address, so iperf3's UDP replies leave
                            from the address the DNAT chose; it sorts before every bench/svc-…, so
                            the first-packet target stays last). iperf3 -s runs in the server netns.
                            One TCP stream client → 10.100.0.1:5201 (`-O 1 -t PODNET_BENCH_SECONDS`,
                            the receiver's bits/s) → throughput_gbps, and 64-byte UDP exactly as
                            test_dataplane.py defines it (`-u -b 0 -l 18`: 18-byte payloads, 64-byte
                            Ethernet frames with FCS; the receiver's packets − lost per second) →
                            udp64_pps; median of PODNET_BENCH_ROUNDS runs each. extra_info also:
                            retransmits, udp64_sent_pps, udp64_lost_percent.

Sizes above 10,000 are skipped unless PODNET_BENCH_FULL=1 (loading 50,000 Services' rules takes
minutes with iptables-nft; see bench/README.md). Kernel IPVS is not available on these machines, so
only the iptables mode is anchored.

Safety on a shared machine: every namespace is `pn-bk-…` with a per-run token and is journalled in a
`Resources` (state dir PODNET_BENCH_STATE_DIR) before it exists; veths are created inside those
namespaces; rules and sysctls are only set inside them; everything is removed in `finally`
(`podnet --state-dir /run/podnet-bench clean --prefix pn-bk-` removes leftovers of a killed run).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from podnet.core.services.kubeproxy import KubeProxyIptables, ProxyEndpoint, ProxyServicePort
from podnet.linux.netns import create_netns, popen_in_netns
from podnet.linux.resources import Resources

from test_services import CLUSTER_CIDR, NODE_IP, SIZES, services
from topologies import (IPERF_PORT, STATE_DIR, Pair, _iperf3_server, _stop, connect_burst, iperf3_stream,
                        iperf3_udp, latency_ms, new_token, udp_received)

PREFIX = "pn-bk-"
FULL = os.environ.get("PODNET_BENCH_FULL") == "1"
MAX_SIZE = 10_000          # larger sizes only with PODNET_BENCH_FULL=1
NFT_MAX_SIZE = 1_000       # iptables-restore (nf_tables) above this only with PODNET_BENCH_FULL=1: 10,000 took 161 s
NFT_FULL_MAX_SIZE = 10_000  # and never above this: its load time grows faster than linearly (0.9 s at 1,000,
                            # 161 s at 10,000), so 50,000 would hold the full profile for an hour or more
CONNECTS = int(os.environ.get("PODNET_BENCH_CONNECTS", "200"))
CONCURRENCY = int(os.environ.get("PODNET_BENCH_CONNECT_CONCURRENCY", "4"))
SECONDS = float(os.environ.get("PODNET_BENCH_SECONDS", "3"))
ROUNDS = int(os.environ.get("PODNET_BENCH_ROUNDS", "2"))
CLIENT_IP, ROUTER_IP = "10.244.0.2", "10.244.0.1"
LINK_ROUTER, LINK_SERVER = "192.168.77.1", "192.168.77.2"
SERVER_PORT = 8080
# the throughput cases' Service: one more than the N, one endpoint (the server netns' own address,
# so iperf3's UDP replies leave from the address the DNAT chose), TCP and UDP on 5201
BULK_IP = "10.100.0.1"
IPVS_NOTE = "not available on these machines"

SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1024)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""


def _tools_or_skip() -> None:
    missing = [tool for tool in ("ip", "iptables-restore") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.insert(0, "root")
    if missing:
        message = f"needs {', '.join(missing)}"
        if os.environ.get("PODNET_REQUIRE_ROOT_TESTS") == "1":
            pytest.fail(message + " (PODNET_REQUIRE_ROOT_TESTS=1)")
        pytest.skip(message)


def _size_or_skip(n: int) -> None:
    if n > MAX_SIZE and not FULL:
        pytest.skip(f"{n:,} Services: loading takes minutes; set PODNET_BENCH_FULL=1")


@functools.lru_cache(maxsize=1)
def _restore_input(n: int) -> tuple[str, int]:
    """jump_rules_restore() + the full sync payload of services(n), and its number of rules."""
    return _payload(services(n))


def bulk_service() -> tuple[ProxyServicePort, ...]:
    """bench/bulk: TCP and UDP 5201 → the server netns' LINK_SERVER:5201, where iperf3 -s runs. It
    sorts before every bench/svc-NNNNN, so the first-packet target stays the last Service."""
    endpoint = (ProxyEndpoint(LINK_SERVER, IPERF_PORT),)
    return tuple(ProxyServicePort("bench", "bulk", name, proto, BULK_IP, IPERF_PORT, endpoints=endpoint)
                 for name, proto in (("tcp", "TCP"), ("udp", "UDP")))


@functools.lru_cache(maxsize=1)
def _router_input(n: int) -> str:
    """What the router netns gets: the N Services' rules plus bench/bulk (throughput)."""
    return _payload((*services(n), *bulk_service()))[0]


def _payload(ports) -> tuple[str, int]:
    proxy = KubeProxyIptables(cluster_cidr=CLUSTER_CIDR, node_ips=[NODE_IP])
    text = proxy.jump_rules_restore() + proxy.sync(list(ports), full=True).payload
    return text, sum(1 for line in text.splitlines() if line.startswith("-A "))


def _sh(*argv: str, input: str | None = None, timeout: float = 60) -> None:
    done = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv[:6])} failed ({done.returncode}): {done.stderr[-2000:]}")


def _netns(res: Resources, name: str) -> str:
    res.record_netns(name)
    create_netns(name)
    return name


def _restore(netns: str, text: str, *, tool: str = "iptables-restore", timeout: float = 1800) -> float:
    start = time.perf_counter()
    _sh("ip", "netns", "exec", netns, tool, "--noflush", input=text, timeout=timeout)
    return time.perf_counter() - start


def _version(tool: str) -> str:
    done = subprocess.run([tool, "--version"], capture_output=True, text=True)
    return (done.stdout or done.stderr).strip()


def _record(report, n: int, **values) -> None:
    report.kernel.setdefault(n, {}).update(values)


def _loaders(n: int) -> list[str]:
    """The iptables-restore binaries timed at n Services: the distribution's default (nf_tables here,
    up to NFT_MAX_SIZE, or NFT_FULL_MAX_SIZE with PODNET_BENCH_FULL=1) and iptables-legacy-restore when
    installed."""
    out = []
    if n <= NFT_MAX_SIZE or (FULL and n <= NFT_FULL_MAX_SIZE):
        out.append("iptables-restore")
    if shutil.which("iptables-legacy-restore"):
        out.append("iptables-legacy-restore")
    return out


def _first_packet_loader() -> str:
    """The router's rules go in with legacy when there is one: it loads 10,000 Services in ~1.5 s, the
    nf_tables one in minutes. The packet then walks x_tables, kube-proxy's classic iptables mode."""
    return "iptables-legacy-restore" if shutil.which("iptables-legacy-restore") else "iptables-restore"


@pytest.mark.parametrize("n", SIZES, ids=lambda n: str(n))
def test_kernel_restore(benchmark, report, n):
    _tools_or_skip()
    _size_or_skip(n)
    loaders = _loaders(n)
    if not loaders:
        pytest.skip(f"{n:,} Services with the default iptables-restore take minutes; set PODNET_BENCH_FULL=1")
    text, rules = _restore_input(n)
    rounds = 3 if n <= 1000 else 1
    token = new_token()
    res = Resources(prefix=PREFIX, state_dir=STATE_DIR)
    made = iter(range(rounds))
    times: dict[str, list[float]] = {tool: [] for tool in loaders}
    first: list[str] = []

    def load() -> None:
        i = next(made)
        for tool in loaders:
            netns = _netns(res, f"{PREFIX}{token}-{'l' if 'legacy' in tool else 'r'}{i}")
            first.append(netns)
            times[tool].append(_restore(netns, text, tool=tool))

    benchmark.group = "kernel"
    try:
        benchmark.pedantic(load, rounds=rounds, iterations=1)
        # the kernel holds what was loaded: every Service's rule is in KUBE-SERVICES
        for netns, tool in zip(first, loaders):
            save = tool.replace("-restore", "-save")
            done = subprocess.run(["ip", "netns", "exec", netns, save, "-t", "nat"],
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0 and done.stdout.count("-A KUBE-SERVICES") >= n, (tool, done.stderr)
    finally:
        res.release_all()
    values = {"rules": rules, "iptables": _version("iptables-restore")}
    if "iptables-restore" in times:
        values["restore_s"] = statistics.median(times["iptables-restore"])
    if "iptables-legacy-restore" in times:
        values["restore_legacy_s"] = statistics.median(times["iptables-legacy-restore"])
    benchmark.extra_info.update(values, payload_bytes=len(text.encode()), runs=rounds)
    _record(report, n, **values)


def _veth(netns_a: str, name_a: str, netns_b: str, name_b: str) -> None:
    """A veth pair created inside netns_a, its peer moved straight into netns_b: never in the root netns."""
    _sh("ip", "-n", netns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", netns_b)


@contextlib.contextmanager
def _router(res: Resources, token: str, text: str, endpoints: list[str]):
    client = _netns(res, f"{PREFIX}{token}-c")
    router = _netns(res, f"{PREFIX}{token}-x")
    server = _netns(res, f"{PREFIX}{token}-s")
    _veth(client, "eth0", router, "to-c")
    _veth(server, "eth0", router, "to-s")
    steps = [
        ("-n", client, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0"),
        ("-n", client, "link", "set", "eth0", "up"),
        ("-n", client, "link", "set", "lo", "up"),
        ("-n", client, "route", "add", "default", "via", ROUTER_IP),
        ("-n", router, "addr", "add", f"{ROUTER_IP}/24", "dev", "to-c"),
        ("-n", router, "addr", "add", f"{LINK_ROUTER}/30", "dev", "to-s"),
        ("-n", router, "link", "set", "to-c", "up"),
        ("-n", router, "link", "set", "to-s", "up"),
        ("-n", router, "link", "set", "lo", "up"),
        ("-n", server, "addr", "add", f"{LINK_SERVER}/30", "dev", "eth0"),
        ("-n", server, "link", "set", "eth0", "up"),
        ("-n", server, "link", "set", "lo", "up"),
        ("-n", server, "route", "add", "default", "via", LINK_ROUTER),
    ]
    for ep in endpoints:
        steps.append(("-n", server, "addr", "add", f"{ep}/32", "dev", "eth0"))
        steps.append(("-n", router, "route", "add", f"{ep}/32", "via", LINK_SERVER))
    for step in steps:
        _sh("ip", *step)
    _sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    _restore(router, text, tool=_first_packet_loader())
    proc = popen_in_netns(server, [sys.executable, "-c", SERVER, str(SERVER_PORT)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        res.record_process(proc.pid, name="kernel-tcp-server")
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"TCP server in {server} exited with {proc.wait()}")
        yield client, server
    finally:
        _stop(proc, grace_s=2.0)


@dataclass
class Router:
    n: int
    client: str                # netns names
    server: str
    target: ProxyServicePort   # the last Service in KUBE-SERVICES
    res: Resources


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: str(n))
def router(request):
    """The three namespaces with the N Services' rules (+ bench/bulk) in the router, once per size:
    kernel-first-packet[N] and kernel-throughput[N] share it."""
    n = request.param
    _tools_or_skip()
    _size_or_skip(n)
    text = _router_input(n)
    target = services(n)[-1]            # last in KUBE-SERVICES: the walk passes every other Service
    res = Resources(prefix=PREFIX, state_dir=STATE_DIR)
    try:
        with _router(res, new_token(), text, [ep.ip for ep in target.endpoints]) as (client, server):
            yield Router(n, client, server, target, res)
    finally:
        res.release_all()


def test_kernel_first_packet(benchmark, report, router):
    n, target = router.n, router.target
    out: dict = {}
    benchmark.group = "kernel"
    benchmark.pedantic(lambda: out.update(connect_burst(router.client, target.cluster_ip, target.port,
                                                        count=CONNECTS, seconds=SECONDS,
                                                        concurrency=CONCURRENCY)),
                       rounds=1, iterations=1)
    times, rate = out["times_s"], out["rate"]
    # every timed connection went through; the rate phase completed connections
    assert len(times) == CONNECTS and out["failed"] == 0, out["errors"]
    assert rate["connects"] > 0, rate
    ms = latency_ms(times) | {"connects": CONNECTS, "loader": _first_packet_loader()}
    benchmark.extra_info.update(ms, connects_per_s=rate["connects_per_s"], concurrency=CONCURRENCY,
                                rate_failed=rate["failed"])
    _record(report, n, first_packet_ms=ms, connects_per_s=rate["connects_per_s"])


def test_kernel_throughput(benchmark, report, router):
    """One iperf3 TCP stream and 64-byte UDP through the router holding the N Services' rules."""
    if shutil.which("iperf3") is None:
        pytest.skip("needs iperf3")
    pair = Pair(router.client, BULK_IP)
    tcp: list[dict] = []
    udp: list[dict] = []

    def run() -> None:
        result = iperf3_stream(pair, SECONDS)
        tcp.append({"gbps": result["end"]["sum_received"]["bits_per_second"] / 1e9,
                    "bytes": result["end"]["sum_received"]["bytes"],
                    "retransmits": result["end"]["sum_sent"].get("retransmits", 0)})
        udp.append(udp_received(iperf3_udp(pair, SECONDS)))

    benchmark.group = "kernel"
    with _iperf3_server(router.res, router.server):
        benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    assert all(r["bytes"] > 0 for r in tcp), tcp
    assert all(r["packets_received"] > 0 for r in udp), udp
    values = {"throughput_gbps": statistics.median(r["gbps"] for r in tcp),
              "throughput_retransmits": sum(r["retransmits"] for r in tcp),
              "udp64_pps": statistics.median(r["pps"] for r in udp),
              "udp64_sent_pps": statistics.median(r["sent_pps"] for r in udp),
              "udp64_lost_percent": statistics.median(r["lost_percent"] for r in udp)}
    benchmark.extra_info.update(values, gbps_runs=[round(r["gbps"], 3) for r in tcp],
                                pps_runs=[round(r["pps"]) for r in udp], seconds=SECONDS)
    _record(report, n=router.n, **values)
