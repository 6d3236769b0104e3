"""A podnet node with a Deployment to roll, in a process of its own, for the churn benchmark.

Layer: bench (started by `test_churn.py`). It opens a lab (`open_lab`) on one node with the given
Service backend and holds, as plain model objects (no YAML):

    default/web          a Deployment of `--replicas` pods (RollingUpdate 25%/25%), each a tiny Python
                         TCP server on :8080 that reads one line and answers with its pod name; a
                         tcpSocket readiness probe every second; with `--prestop-s S` a preStop
                         sleep of S s and terminationGracePeriodSeconds S + 2, without it 2 s and
                         servers that exit at SIGTERM (Python's default)
    default/web          a ClusterIP Service, port 80 → 8080, selecting the Deployment's pods
    bench/bg-NNNNN       `--services` background ClusterIP Services, port 80 → 8080, each with one
                         EndpointSlice of 2 endpoints that no pod backs (10.245.x.y), so every
                         sync is of a realistic size
    probe-target-<tok>   a UDP echo server on :9999, outside the Deployment: the latency probe's target
    client-<tok>         `sleep infinity`: the benchmark runs its probe and load generator in its netns

Protocol: one JSON line on stdout when ready (pods, the web Service's ClusterIP, how long bring-up
took); then commands, one JSON line each on stdin:

    {"cmd": "rollout"}   set env VERSION=2 on the template and wait until it rolled out (one
                         {"progress": line} per `kubectl rollout status` line, then
                         {"rolled_out": {...}}), then until no pod is terminating ({"drained": {...}},
                         with the syncs kube-proxy did since the rollout began)
    {"cmd": "stop"}      (or EOF, SIGTERM, SIGINT) leave: `open_lab` undoes everything

    python bench/churn_node.py --token 1a2b --prefix pn-bc- --state-dir /run/podnet-bench \
        --backend iptables --replicas 100 --services 1000 [--prestop-s 3]

Running the node apart from the pytest process means it never shares a GIL with the code that
measures it (as `podnet_node.py` and `service_node.py`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

import trio

from podnet.cluster.model import (Container, ContainerPort, Deployment, DeploymentStrategy, Lifecycle, Manifests,
                                  Namespace, ObjectMeta, Origin, Pod, PodTemplate, Probe,
                                  RollingUpdateDeployment, SleepAction, TCPSocketAction)
from podnet.cluster.service import SERVICE_NAME_LABEL, Endpoint, EndpointPort, EndpointSlice, Service, ServicePort
from podnet.lab import LabConfig, open_lab

SERVER_PORT = 8080
ECHO_PORT = 9999
BACKGROUND_NAMESPACE = "bench"
ORIGIN = Origin("<churn_node>", 0)

# one request per connection: read a line (2 s at most), answer with the pod's name, close
SERVER = r"""
import os, socket
name = os.environ["HOSTNAME"].encode() + b"\n"
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(os.environ["PORT"]))); s.listen(1024)
while True:
    c, _ = s.accept()
    try:
        c.settimeout(2); c.recv(64); c.sendall(name)
    except OSError:
        pass
    c.close()
"""

ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(2048); s.sendto(data, peer)
"""


def manifests(args) -> Manifests:
    token = args.token
    probe = Probe(TCPSocketAction(SERVER_PORT), period_seconds=1)
    pre_stop = Lifecycle(SleepAction(args.prestop_s)) if args.prestop_s else None
    server = Container("srv", command=(sys.executable, "-S", "-c", SERVER), ports=(ContainerPort(SERVER_PORT, "http"),),
                       env=(("PORT", str(SERVER_PORT)), ("VERSION", "1")), readiness_probe=probe, lifecycle=pre_stop)
    template = PodTemplate({"app": "web"}, containers=(server,),
                           termination_grace_period_seconds=(args.prestop_s or 0) + 2)
    web = Deployment(ObjectMeta("web"), template, {"app": "web"}, args.replicas,
                     DeploymentStrategy("RollingUpdate", RollingUpdateDeployment("25%", "25%")))
    echo = Container("echo", command=(sys.executable, "-S", "-c", ECHO, str(ECHO_PORT)))
    target = Pod(ObjectMeta(f"probe-target-{token}", "default", {"app": "probe-target"}), (echo,),
                 termination_grace_period_seconds=1)
    client = Pod(ObjectMeta(f"client-{token}", "default", {"app": "client"}),
                 (Container("sh", command=("sleep", "infinity")),), termination_grace_period_seconds=1)
    objects: list = [Namespace(ObjectMeta(BACKGROUND_NAMESPACE, "")), target, client, web,
                     Service(ObjectMeta("web"), ports=(ServicePort("http", 80, target_port=SERVER_PORT),),
                             selector={"app": "web"})]
    for i in range(args.services):
        name = f"bg-{i:05d}"
        objects.append(Service(ObjectMeta(name, BACKGROUND_NAMESPACE),
                               ports=(ServicePort("http", 80, target_port=SERVER_PORT),)))
        endpoints = tuple(Endpoint((f"10.245.{(2 * i + k) // 250}.{(2 * i + k) % 250 + 1}",)) for k in range(2))
        objects.append(EndpointSlice(ObjectMeta(f"{name}-bench", BACKGROUND_NAMESPACE, {SERVICE_NAME_LABEL: name}),
                                     "IPv4", endpoints, (EndpointPort("http", SERVER_PORT, "TCP"),)))
    return Manifests.collect((obj, ORIGIN) for obj in objects)


def emit(doc: dict) -> None:
    print(json.dumps(doc), flush=True)


def _sync_rows(lab, since: int) -> dict:
    rows = lab.syncs[since:]
    return {"syncs": len(rows), "full_syncs": sum(r.full for r in rows),
            "max_sync_wait_ms": round(1000 * max((r.apply_s for r in rows), default=0.0), 3),
            "max_sync_ms": round(1000 * max((r.build_s + r.apply_s for r in rows), default=0.0), 3),
            "sync_wait_ms_total": round(1000 * sum(r.apply_s for r in rows), 3)}


async def rollout(lab, args) -> None:
    since = len(lab.syncs)
    began = time.monotonic()
    report = await lab.rollout("default", "web", env={"VERSION": "2"}, timeout_s=args.timeout,
                               on_progress=lambda line: emit({"progress": line}))
    emit({"rolled_out": {"rollout_s": round(report.duration_s, 3), "created": len(report.created),
                         "deleted": len(report.deleted), "max_pods": report.max_pods,
                         "min_available": report.min_available, "max_surge": report.max_surge,
                         "max_unavailable": report.max_unavailable, "old_hash": report.old_hash,
                         "new_hash": report.new_hash}})
    with trio.fail_after(args.timeout):
        while any(p.terminating for p in lab.pods.values()):
            await lab.wait_state_changed(lab.generation, trio.current_time() + 0.2)
    await lab.wait_synced()
    emit({"drained": {"drain_s": round(time.monotonic() - began, 3), **_sync_rows(lab, since),
                      "summary": lab.sync_summary()}})


async def commands(lab, args) -> None:
    receive = trio.lowlevel.FdStream(sys.stdin.fileno())
    buffer = b""
    while True:
        chunk = await receive.receive_some(4096)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            cmd = json.loads(line).get("cmd")
            if cmd == "stop":
                return
            if cmd == "rollout":
                await rollout(lab, args)
            else:
                emit({"error": f"unknown command {cmd!r}"})


async def serve(args) -> None:
    began = time.monotonic()
    config = LabConfig(prefix=args.prefix, state_dir=args.state_dir, persist_ipam=False, backend=args.backend,
                       cluster_cidr="10.244.0.0/14", node_cidr="10.244.0.0/23",
                       min_sync_period_s=args.min_sync_period, uplink=False)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_lab(manifests(args), config, wait_ready_s=args.timeout) as lab:
            pods = {p.name.rsplit("-", 1)[0].replace("probe-target", "target"): {"netns": p.netns, "ip": p.ip}
                    for p in lab.pods.values() if p.name.endswith(args.token)}
            web = next(s["cluster_ip"] for s in lab.services_status() if s["name"] == "web")
            emit({"ready": True, "pods": pods, "web": web, "echo_port": ECHO_PORT, "startup_s":
                  round(time.monotonic() - began, 3), "replicas": args.replicas, "services": args.services + 1,
                  **_sync_rows(lab, 0)})
            async with trio.open_nursery() as nursery:
                async def until_signal() -> None:
                    async for _ in signals:
                        break
                    nursery.cancel_scope.cancel()

                async def until_stop() -> None:
                    await commands(lab, args)
                    nursery.cancel_scope.cancel()
                nursery.start_soon(until_signal)
                nursery.start_soon(until_stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--token", required=True, help="makes pod, netns and TAP names unique")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--replicas", type=int, default=100)
    parser.add_argument("--services", type=int, default=1000, help="background Services")
    parser.add_argument("--prestop-s", type=int, default=0, help="preStop sleep (0: no preStop hook)")
    parser.add_argument("--min-sync-period", type=float, default=1.0, help="kube-proxy's --*-min-sync-period")
    parser.add_argument("--timeout", type=float, default=120.0)
    trio.run(serve, parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
