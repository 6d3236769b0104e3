"""What Services cost a Service backend as the cluster grows: deciding a NEW connection, and one
endpoint change.

Two groups, no I/O, no root, parametrized over every registered backend
(core.services.registry.BACKENDS), so a backend added later shows up in the same tables:

    service-decision   decide(pkt, now) for the first packet of a NEW TCP connection from a pod,
                       with N ClusterIP Services synced (5 endpoints each), to
                         first    the first Service in kube-proxy's order (KUBE-SERVICES' first rule)
                         last     the last Service in that order
                         random   a Service drawn per call from a seeded list of 1,024
                         miss     an address in the Service CIDR that is no Service, so the walk
                                  passes every Service rule and decides nothing
                       extra_info: us (mean µs per decide) and cost (Decision.cost: rules examined,
                       or map lookups; for `random`, the mean over a sample).
    service-update     one endpoint change (one endpoint IP of one Service replaced) applied with
                       sync(full=True) and with sync(full=False), timed as the sync call's wall
                       time: what the datapath waits, since the backend's sync runs in the
                       datapath's thread. Each round flips the endpoint back and forth, so every
                       sync really changes a rule. extra_info: rules_written, rules_total, the
                       backend's SyncReport.detail (for iptables payload_bytes, chains_written,
                       chains_deleted) and initial_sync_ms, the first full sync of the N Services.

N is 100, 1,000 and 10,000 in the quick profile (`make bench`), and also 50,000 in the full one
(`make bench FULL=1`, PODNET_BENCH_FULL=1); PODNET_BENCH_SERVICE_SIZES overrides, e.g. "100,1000".
Each (N, backend) is built and synced once per session (a module-scoped fixture) and shared by
both groups; sizes go one after the other, so only one is in memory at a time.

The cluster: node 172.18.0.2, cluster CIDR 10.244.0.0/14, the client pod 10.244.0.10. Service i is
bench/svc-NNNNN port "http" 80/TCP at ClusterIP 10.96.(i // 254).(i % 254 + 1); its endpoints are
five pods at :8080, numbered across the cluster from 10.244.1.1 on (skipping .0 and .255; 50,000
Services need 250,000 pod IPs, so large sizes spill into 10.245-10.247, all inside the /14).
Every pod IP is distinct. The miss goes to 10.97.0.1:80.

Nothing here asserts a speed (bench/ reports, it does not judge). Each test asserts that what it
timed did what it is named after: a hit DNATs to one of that Service's endpoints without
masquerade, a miss is ACCEPT without DNAT, a sync installs the new endpoint and drops the old one.
"""

from __future__ import annotations

import functools
import dataclasses
import ipaddress
import itertools
import random
import time
from dataclasses import dataclass, replace

import pytest

from podnet.core.services.base import (ProxyEndpoint, ProxyServicePort, ServiceBackend, SyncReport,
                                       Verdict)
from podnet.core.services.iptables_backend import IptablesBackend
from podnet.core.services.kubeproxy_rules import KUBE_SERVICES, endpoint_chain_name
from podnet.core.services.packetinfo import CtState, PacketInfo
from podnet.core.services.registry import BACKENDS
from report import bench_profile

SIZES = bench_profile()[1]   # quick: 100, 1,000, 10,000; PODNET_BENCH_FULL=1 adds 50,000 (bench/report.py)
ENDPOINTS = 5
NODE_IP = "172.18.0.2"
CLUSTER_CIDR = "10.244.0.0/14"
CLIENT_IP = "10.244.0.10"
CLIENT_IFACE = "pn-client"
MISS = ("10.97.0.1", 80)
NOW = 1000.0
SEED = 1
RANDOM_TARGETS = 1024


def _ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


# --- the cluster ---------------------------------------------------------------------------------

def cluster_ip(i: int) -> str:
    if not 0 <= i < 256 * 254:
        raise ValueError(f"service {i}: 10.96.0.0/16 has room for {256 * 254} ClusterIPs")
    return f"10.96.{i // 254}.{i % 254 + 1}"


def pod_ip(j: int) -> str:
    """The j-th endpoint pod of the cluster: 10.244.1.1, ... 10.244.1.254, 10.244.2.1, ... on to
    10.247.255.254 (10.244.0.0/24 is left for the client)."""
    block = j // 254 + 1
    if block >= 4 * 256:
        raise ValueError(f"pod {j}: {CLUSTER_CIDR} is full")
    return f"10.{244 + block // 256}.{block % 256}.{j % 254 + 1}"


@functools.lru_cache(maxsize=1)
def services(n: int) -> tuple[ProxyServicePort, ...]:
    """N Services in kube-proxy's order (namespace, name, port name, protocol)."""
    ports = [ProxyServicePort("bench", f"svc-{i:05d}", "http", "TCP", cluster_ip(i), 80,
                              endpoints=tuple(ProxyEndpoint(pod_ip(i * ENDPOINTS + k), 8080)
                                              for k in range(ENDPOINTS)))
             for i in range(n)]
    return tuple(sorted(ports, key=lambda s: (s.namespace, s.name, s.port_name, s.protocol)))


def packet_to(ip: str, port: int) -> PacketInfo:
    """The first packet (SYN) of a TCP connection from the client pod, as the datapath hands it over."""
    return PacketInfo(_ip(CLIENT_IP), _ip(ip), 6, 40000, port, in_iface=CLIENT_IFACE,
                      ct_state=CtState.NEW, tcp_flags=0x02, length=60)


FRESH = 200_000  # more NEW connections than one benchmark makes: no tuple is decided twice


def fresh_packets(ip: str, port: int, count: int = FRESH) -> list[PacketInfo]:
    """First packets of `count` different connections to ip:port (source port, then source address,
    varies). A backend that keeps per-connection state (IPVS's connection table, Cilium's CT map)
    pins a tuple it has seen, so deciding the same tuple twice would measure a lookup of an
    existing connection, not a NEW one."""
    base = _ip(CLIENT_IP)
    return [PacketInfo(base + i // 28000, _ip(ip), 6, 32768 + i % 28000, port, in_iface=CLIENT_IFACE,
                       ct_state=CtState.NEW, tcp_flags=0x02, length=60) for i in range(count)]


def endpoints_of(svc: ProxyServicePort) -> set[tuple[int, int]]:
    return {(_ip(ep.ip), ep.port) for ep in svc.endpoints}


# what an operator sizes for this many Services: Cilium's LB maps hold 65,536 entries by default
# (--bpf-lb-map-max), and 50,000 Services x (1 master + 5 slots) need 300,000
SIZING = {"ebpf": {"lb_map_max": 1 << 19}}


def make_backend(name: str) -> ServiceBackend:
    """Every backend takes the node's view the way lab.py builds it (plus the sizing above)."""
    return BACKENDS[name](cluster_cidr=CLUSTER_CIDR, node_ips=[NODE_IP], local_addresses=[_ip(NODE_IP)],
                          partial_sync=True, seed=SEED, **SIZING.get(name, {}))


@dataclass
class Scale:
    backend_name: str
    n: int
    backend: ServiceBackend
    services: list[ProxyServicePort]   # as synced last, in kube-proxy's order
    initial: SyncReport
    initial_s: float
    changed: int = 0                   # the Service whose endpoint the update tests flip: the first,
    #                                    so checking a sync by deciding for it is cheap everywhere

    def info(self) -> dict:
        return {"services": self.n, "endpoints_per_service": ENDPOINTS, "backend": self.backend_name}


@pytest.fixture(scope="module", params=[(n, name) for n in SIZES for name in sorted(BACKENDS)],
                ids=lambda p: f"{p[1]}-{p[0]}")
def scale(request) -> Scale:
    n, name = request.param
    ports = list(services(n))
    backend = make_backend(name)
    started = time.perf_counter()
    initial = backend.sync(ports, full=True)
    elapsed = time.perf_counter() - started
    assert initial.services == n and initial.objects_total > 0
    return Scale(name, n, backend, ports, initial, elapsed)


def _row(report, scale: Scale) -> dict:
    row = report.services.setdefault((scale.backend_name, scale.n), {})
    row.setdefault("initial_sync_ms", scale.initial_s * 1e3)
    row.setdefault("rules_total", scale.initial.objects_total)
    return row


def _assert_hit(decision, svc: ProxyServicePort) -> None:
    assert decision.verdict is Verdict.ACCEPT and decision.dnat in endpoints_of(svc), (decision, svc)
    assert not decision.masquerade, decision   # pod to Service from inside the cluster CIDR


# --- service-decision ----------------------------------------------------------------------------

CASES = ("first", "last", "random", "miss")


@pytest.mark.benchmark(group="service-decision")
@pytest.mark.parametrize("case", CASES)
def test_decide(benchmark, report, scale, case):
    backend, ports = scale.backend, scale.services
    decide = backend.decide
    benchmark.extra_info.update(scale.info(), case=case)
    if case == "random":
        rng = random.Random(SEED)
        picks = [ports[rng.randrange(len(ports))] for _ in range(RANDOM_TARGETS)]
        packets = iter([dataclasses.replace(p, dst=_ip(s.cluster_ip), dport=s.port)
                        for p, s in zip(fresh_packets(*MISS), itertools.cycle(picks))])
        benchmark(lambda: decide(next(packets), NOW))
        costs = []
        for svc in picks[:64]:
            decision = decide(packet_to(svc.cluster_ip, svc.port), NOW)
            _assert_hit(decision, svc)
            costs.append(decision.cost)
        cost = sum(costs) / len(costs)
    else:
        svc = {"first": ports[0], "last": ports[-1], "miss": None}[case]
        packets = iter(fresh_packets(*MISS) if svc is None else fresh_packets(svc.cluster_ip, svc.port))
        decision = benchmark(lambda: decide(next(packets), NOW))
        if svc is None:
            assert decision.verdict is Verdict.ACCEPT and decision.dnat is None and not decision.masquerade, decision
        else:
            _assert_hit(decision, svc)
        cost = decision.cost
    if isinstance(backend, IptablesBackend):
        rules = backend.ruleset.rules("nat", KUBE_SERVICES)
        if case == "first":   # what "first" means: KUBE-SERVICES' first rule is this Service's
            assert rules[0].dst == _ip(ports[0].cluster_ip) and cost < 50, cost
        if case == "last":
            assert rules[len(ports) - 1].dst == _ip(ports[-1].cluster_ip) and cost > scale.n, cost
        if case == "miss":    # walked past every Service rule
            assert cost > scale.n, cost
    # the median: a backend whose per-connection state grows while it is measured (IPVS's connection
    # table, Cilium's CT map) meets garbage-collection pauses that make the mean a measure of the GC
    us = benchmark.stats.stats.median * 1e6
    benchmark.extra_info.update(us=round(us, 3), cost=cost)
    row = _row(report, scale)
    row[f"decide_{case}_us"] = us
    row[f"cost_{case}"] = cost


# --- service-update ------------------------------------------------------------------------------

def update_rounds(n: int) -> int:
    """Syncs per measurement: 10 at 100 Services, down to one from 3,000 on (a full sync of
    50,000 Services takes half a minute here)."""
    return max(1, min(10, 3000 // n))


def _check_serves(backend: ServiceBackend, svc: ProxyServicePort, gone: ProxyEndpoint) -> None:
    """The backend now sends the Service's connections to its new endpoint set: within 200 NEW
    connections every endpoint shows up (all five, one of them new), and the replaced one never."""
    want, seen = endpoints_of(svc), set()
    for pkt in fresh_packets(svc.cluster_ip, svc.port, 200):
        decision = backend.decide(pkt, NOW)
        _assert_hit(decision, svc)
        seen.add(decision.dnat)
        if seen == want:
            break
    assert seen == want and (_ip(gone.ip), gone.port) not in seen, (seen, want)


@pytest.mark.benchmark(group="service-update")
@pytest.mark.parametrize("mode", ("full", "partial"))
def test_update(benchmark, report, scale, mode):
    backend, ports, i = scale.backend, scale.services, scale.changed
    full = mode == "full"
    original = services(scale.n)[i]
    fresh = ProxyEndpoint(pod_ip(scale.n * ENDPOINTS), 8080)   # the first pod IP no Service uses
    variants = (original, replace(original, endpoints=(fresh, *original.endpoints[1:])))
    flips = itertools.count(1 if ports[i] == variants[0] else 0)

    def one_change():
        ports[i] = variants[next(flips) % 2]
        return (ports,), {"full": full}

    rounds = update_rounds(scale.n)
    result = benchmark.pedantic(backend.sync, setup=one_change, rounds=rounds, iterations=1)

    now_svc = ports[i]
    gone = next(ep for ep in variants[0].endpoints + variants[1].endpoints if ep not in now_svc.endpoints)
    assert result.full == full and result.services == scale.n, result
    assert result.objects_written > 0 and result.objects_total == scale.initial.objects_total, result
    if isinstance(backend, IptablesBackend):
        chains = backend.ruleset.table("nat").chains
        name = now_svc.service_port_name
        assert all(endpoint_chain_name(name, "tcp", ep.endpoint) in chains for ep in now_svc.endpoints)
        assert endpoint_chain_name(name, "tcp", gone.endpoint) not in chains
        assert result.detail["chains_deleted"] == 1, result.detail   # the replaced endpoint's SEP chain
    _check_serves(backend, now_svc, gone)

    ms = benchmark.stats.stats.mean * 1e3
    benchmark.extra_info.update(scale.info(), mode=mode, ms=round(ms, 3), rules_written=result.objects_written,
                                rules_total=result.objects_total, initial_sync_ms=round(scale.initial_s * 1e3, 3),
                                **result.detail)
    row = _row(report, scale)
    row[f"{mode}_sync_ms"] = ms
    row[f"written_{mode}"] = result.objects_written
    row[f"payload_{mode}"] = result.detail.get("payload_bytes")


# --- memory per Service ----------------------------------------------------------------------------

MEMORY_SIZES = tuple(n for n in SIZES if n <= 10_000)  # tracemalloc makes building 50,000 too slow


@pytest.mark.benchmark(group="service-memory")
@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("n", MEMORY_SIZES)
def test_memory_per_service(benchmark, report, name, n):
    """What one backend holds for n Services (5 endpoints each) once synced: Python heap traced by
    tracemalloc, after a collection, divided by n. The ServiceBackend input (`services(n)`) is built
    before tracing starts and is not counted."""
    import gc
    import tracemalloc
    ports = services(n)
    gc.collect()
    box = {}

    def build_traced():   # timed once; the time is tracemalloc's, not a number to read
        tracemalloc.start()
        try:
            backend = make_backend(name)
            backend.sync(ports, full=True)
            gc.collect()
            box["held"], _peak = tracemalloc.get_traced_memory()
            box["backend"] = backend
        finally:
            tracemalloc.stop()

    benchmark.pedantic(build_traced, rounds=1, iterations=1)
    backend, held = box["backend"], box["held"]
    benchmark.extra_info.update(bytes_held=held, bytes_per_service=held / n)
    assert backend.decide(packet_to(ports[0].cluster_ip, ports[0].port), NOW).dnat is not None
    report.memory[(name, n)] = held
