"""A podnet node with Services, in a process of its own, for the data-plane benchmarks.

Layer: bench (started by `topologies.service_lab`). It opens a lab (`open_lab`) on one node with
the given Service backend and offloads, and holds, as plain model objects (no YAML, so 10,000
Services build in well under a second):

    bench/svc-00000 … svc-NNNNN   `--fillers` ClusterIP Services, port "http" 80/TCP → 8080, each with
                                  one EndpointSlice of 5 endpoints that no pod backs (addresses from
                                  10.244.1.1 on, as test_services.py numbers them). They only make
                                  the backend hold N Services.
    default/target                with `--servers K`: port "http" 80/TCP → 8080, selecting K pods
                                  `srv-<i>-<token>`, each a tiny Python TCP server that accepts and
                                  closes. ("default", "target") sorts after every ("bench", …), so
                                  it is the LAST Service in kube-proxy's KUBE-SERVICES order: a NEW
                                  connection to it walks past every filler's rule.
    default/iperf                 with `--iperf`: ports "tcp" 5201/TCP and "udp" 5201/UDP selecting
                                  one pod `iperf-<token>` running `iperf3 -s` (one endpoint, so
                                  iperf3's control and data connections reach the same server).
    client-<token>                a pod running `sleep infinity`: the benchmarks run their clients
                                  in its netns.

The lab runs with kube-proxy's min sync period at 0.25 s (`--min-sync-period-s`; 1 s is kube-proxy's
default) and no uplink. Before it reports ready, the node waits until no sync has run for a sync
period + 0.2 s (the lab's proxy loop may owe one more partial sync after the pods became ready;
at 10,000 iptables Services that one blocks the datapath for ~2 s) and runs one full garbage
collection, so each measurement starts from a quiet node.

Protocol on stdout, one JSON line each: a ready line (pods, the Services' ClusterIPs, the syncs so
far, counters), then one statistics line per SIGUSR1 (so a benchmark can take differences around
what it measures), and after SIGTERM a last statistics line; then `open_lab` undoes everything.
The counters are the datapath's (frames, fast/slow path, NEW-flow decisions and their summed
Decision.cost, drops, flows, conntrack entries) and the garbage collector's (collections and
seconds spent in them, per generation: the datapath stands still meanwhile).

    python bench/service_node.py --token 1a2b --prefix pn-b- --state-dir /run/podnet-bench \
        --backend iptables --fillers 999 --servers 5 [--iperf] [--no-offloads] [--backend-options JSON]

Running the node apart from the pytest process means it never shares a GIL with the code that
measures it (as `podnet_node.py` and `rawfwd.py`).
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import time

import trio

from podnet.cluster.model import (Container, ContainerPort, ExecAction, Manifests, Namespace,
                                  ObjectMeta, Origin, Pod, Probe, TCPSocketAction)
from podnet.cluster.service import (SERVICE_NAME_LABEL, Endpoint, EndpointPort, EndpointSlice,
                                    Service, ServicePort)
from podnet.lab import LabConfig, open_lab

SERVER_PORT = 8080
SERVICE_PORT = 80
IPERF_PORT = 5201
FILLER_NAMESPACE = "bench"
ENDPOINTS_PER_FILLER = 5
CLUSTER_CIDR = "10.244.0.0/14"   # as test_services.py: 50,000 Services' endpoints spill past 10.244/16
ORIGIN = Origin("<service_node>", 0)

# accept and close, nothing else: the cheapest server a connect() can reach
ACCEPT_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4096)
while True:
    c, _ = s.accept(); c.close()
"""


def filler_ip(j: int) -> str:
    """The j-th filler endpoint: 10.244.1.1, … 10.244.1.254, 10.244.2.1, … (test_services.pod_ip)."""
    block = j // 254 + 1
    return f"10.{244 + block // 256}.{block % 256}.{j % 254 + 1}"


def filler_objects(count: int):
    """`count` Services of namespace "bench", each with one EndpointSlice of 5 endpoints."""
    yield Namespace(ObjectMeta(FILLER_NAMESPACE, "")), ORIGIN
    endpoint_ports = (EndpointPort("http", SERVER_PORT, "TCP"),)
    for i in range(count):
        name = f"svc-{i:05d}"
        ports = (ServicePort("http", SERVICE_PORT, "TCP", SERVER_PORT),)
        yield Service(ObjectMeta(name, FILLER_NAMESPACE), ports), ORIGIN
        endpoints = tuple(Endpoint((filler_ip(i * ENDPOINTS_PER_FILLER + k),))
                          for k in range(ENDPOINTS_PER_FILLER))
        yield EndpointSlice(ObjectMeta(f"{name}-bench", FILLER_NAMESPACE, {SERVICE_NAME_LABEL: name}),
                            "IPv4", endpoints, endpoint_ports), ORIGIN


def pod_objects(token: str, servers: int, iperf: bool, python: str):
    # probes run until ready, then every periodSeconds: none runs while a benchmark measures
    for i in range(servers):
        container = Container("server", command=(python, "-c", ACCEPT_SERVER, str(SERVER_PORT)),
                              ports=(ContainerPort(SERVER_PORT, "http"),),
                              readiness_probe=Probe(TCPSocketAction(SERVER_PORT), period_seconds=300))
        yield Pod(ObjectMeta(f"srv-{i}-{token}", labels={"app": "target"}), (container,),
                  termination_grace_period_seconds=1), ORIGIN
    if servers:
        yield Service(ObjectMeta("target"), (ServicePort("http", SERVICE_PORT, "TCP", SERVER_PORT),),
                      selector={"app": "target"}), ORIGIN
    if iperf:
        # an exec probe, not tcpSocket: a bare connect makes iperf3 log an aborted test
        probe = Probe(ExecAction(("sh", "-c", f"ss -Hltn 'sport = :{IPERF_PORT}' | grep -q .")),
                      period_seconds=300)
        container = Container("iperf3", command=("iperf3", "-s", "-p", str(IPERF_PORT)),
                              ports=(ContainerPort(IPERF_PORT, "tcp"), ContainerPort(IPERF_PORT, "udp", "UDP")),
                              readiness_probe=probe)
        yield Pod(ObjectMeta(f"iperf-{token}", labels={"app": "iperf"}), (container,),
                  termination_grace_period_seconds=1), ORIGIN
        yield Service(ObjectMeta("iperf"), (ServicePort("tcp", IPERF_PORT, "TCP", IPERF_PORT),
                                            ServicePort("udp", IPERF_PORT, "UDP", IPERF_PORT)),
                      selector={"app": "iperf"}), ORIGIN
    yield Pod(ObjectMeta(f"client-{token}"), (Container("shell", command=("sleep", "infinity")),),
              termination_grace_period_seconds=1), ORIGIN


def manifests(args) -> Manifests:
    return Manifests.collect([*filler_objects(args.fillers),
                              *pod_objects(args.token, args.servers, args.iperf, sys.executable)])


class GcClock:
    """Collections of the node's garbage collector and the time the datapath stood still in them,
    per generation (gc.callbacks): at 10,000 Services a full collection walks millions of objects."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._start


def statistics(lab, clock: GcClock) -> dict:
    s = lab.statistics()
    return {"frames": lab.node.frames_processed,
            "write_errors": sum(port.counters.write_errors for port in lab.node.ports.values()),
            "fast_path_packets": s.fast_path_packets, "slow_path_packets": s.slow_path_packets,
            "decisions": s.decisions, "decision_cost": s.decision_cost, "dropped": s.dropped,
            "drops": s.drops, "flows": s.flows, "conntrack_entries": s.conntrack_entries,
            "gc_collections": list(clock.count), "gc_pause_s": list(clock.seconds)}


async def wait_quiet(lab, quiet_s: float) -> None:
    """Until no sync has run for `quiet_s`. The lab's proxy loop can still owe one: a readiness
    change that lands while it waits out min_sync_period_s sets its event again, so one more (no-op)
    partial sync follows the one wait_synced saw, and at 10,000 iptables Services it blocks the
    datapath for ~2 s. Measuring must not start before it."""
    seen, since = len(lab.syncs), trio.current_time()
    while trio.current_time() - since < quiet_s:
        await trio.sleep(0.05)
        if len(lab.syncs) != seen:
            seen, since = len(lab.syncs), trio.current_time()


def _role(pod_name: str) -> str:
    return pod_name.rsplit("-", 1)[0]   # "srv-3-1a2b" -> "srv-3"


async def serve(args) -> dict:
    clock = GcClock()
    started = time.perf_counter()
    built = manifests(args)
    build_s = time.perf_counter() - started
    config = LabConfig(prefix=args.prefix, offloads=args.offloads, state_dir=args.state_dir,
                       persist_ipam=False, grace_period_s=1.0, uplink=False, backend=args.backend,
                       backend_options=json.loads(args.backend_options), cluster_cidr=CLUSTER_CIDR,
                       min_sync_period_s=args.min_sync_period_s)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
        async with open_lab(built, config, wait_ready_s=args.wait_ready_s) as lab:
            await wait_quiet(lab, args.min_sync_period_s + 0.2)
            # one full collection now, so every case starts from the same collector state with
            # nothing owed from the set-up; the collections the traffic itself triggers happen as
            # they would and are counted (gc_collections, gc_pause_s)
            gc.collect()
            services = {svc.name: {"ip": svc.cluster_ip, "namespace": svc.namespace}
                        for svc in lab.manifests.services if svc.namespace != FILLER_NAMESPACE}
            pods = {_role(p.name): {"netns": p.netns, "ip": p.ip, "tap_offloads": p.tap.offloads}
                    for p in lab.pods.values()}
            print(json.dumps({"ready": True, "pods": pods, "services": services,
                              "services_total": len(lab.manifests.services), "build_s": build_s,
                              "setup_s": time.perf_counter() - started, "backend": lab.backend.name,
                              "sync": lab.sync_summary() | {"backend_stats": None},
                              "initial_sync_ms": 1000 * (lab.syncs[0].build_s + lab.syncs[0].apply_s),
                              "stats": statistics(lab, clock)}), flush=True)
            async for signum in signals:
                if signum != signal.SIGUSR1:
                    break
                print(json.dumps({"stats": statistics(lab, clock)}), flush=True)
            final = statistics(lab, clock)
    return {"stats": final}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--token", required=True, help="makes pod, netns and TAP names unique")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--backend", default="iptables")
    parser.add_argument("--backend-options", default="{}", help="JSON: LabConfig.backend_options")
    parser.add_argument("--fillers", type=int, default=0, help="Services without pods, 5 endpoints each")
    parser.add_argument("--servers", type=int, default=0, help="accept-and-close pods behind default/target")
    parser.add_argument("--iperf", action="store_true", help="an iperf3 -s pod behind default/iperf")
    parser.add_argument("--no-offloads", dest="offloads", action="store_false")
    parser.add_argument("--wait-ready-s", type=float, default=120.0)
    parser.add_argument("--min-sync-period-s", type=float, default=0.25,
                        help="kube-proxy's --iptables-min-sync-period (1 s by default there): shorter, so the "
                             "node is quiet sooner after its pods become ready")
    args = parser.parse_args(argv)
    print(json.dumps(trio.run(serve, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
