"""The default demo: one node, a client pod and three HTTP server pods, all through podnet; then
three nodes.

Run as root: `make demo` (or `.venv/bin/python examples/demo/run.py`). It brings the pods up from
pods.yaml, shows each pod's address and routes as `ip` shows them inside the pod, fetches from every
server from the client pod through the Python datapath, prints what the datapath counted, and
tears everything down. The three-node act brings up cluster.yaml: three nodes, each its own
datapath, on an underlay bridge, joined by Flannel-style VXLAN and programmed from the cluster
store; the client on node-1 reaches a Service whose backends are on node-2 and node-3.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from podnet.cli import format_pods, format_stats
from podnet.cluster.topology import ClusterConfig
from podnet.cluster_lab import open_cluster
from podnet.packet_trace import format_hops, trace_from_pod
from podnet.control import _jsonable
from podnet.core.services.registry import BACKENDS
from podnet.lab import LabConfig, open_lab

HERE = Path(__file__).resolve().parent


def service_rules(save: str, service_port: str) -> str:
    """The lines of an iptables-save that belong to one service port: its KUBE-SERVICES entry and
    the KUBE-SVC / KUBE-SEP chains it jumps to."""
    lines = [line for line in save.splitlines() if line.startswith("-A KUBE-SERVICES") and service_port in line]
    chains = {word for line in lines for word in line.split() if word.startswith("KUBE-SVC-")}
    for line in save.splitlines():
        if line.startswith("-A KUBE-SVC-") and line.split()[1] in chains:
            lines.append(line)
            chains.update(w for w in line.split() if w.startswith("KUBE-SEP-"))
    lines += [line for line in save.splitlines() if line.startswith("-A KUBE-SEP-") and line.split()[1] in chains]
    return "\n".join(dict.fromkeys(lines))


# the Service backends the demo shows in turn, each with its own tool's view
SHOWN_BACKENDS = [name for name in ("iptables", "ipvs", "ebpf") if name in BACKENDS]


async def fetch_many(lab, url: str, count: int) -> dict[str, int]:
    """`count` curls from the client pod, each a new connection: which backend answered how often."""
    script = f"for i in $(seq {count}); do curl -sS -m 5 {url}; done"
    result = await lab.exec("client", ["sh", "-c", script], namespace="demo")
    answers: dict[str, int] = {}
    for line in result.stdout.decode().splitlines():
        answers[line.strip()] = answers.get(line.strip(), 0) + 1
    return answers


def backend_view(lab, svc: dict) -> tuple[str, str]:
    """The running backend's own view of the Service, as its real tool prints it."""
    from podnet.cli_backends import backend_view as view
    name = lab.backend.name
    if name == "iptables":
        return ("the rules that carried it (podnet iptables-save -t nat, this Service's chains)",
                service_rules(lab.backend.dump(), "demo/web:http"))
    if name == "ipvs":
        return "podnet ipvsadm -Ln", view(lab.backend, "-Ln", {})
    return "podnet cilium service list", view(lab.backend, "service list", {})


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 76 - len(text)), flush=True)


async def main(manifests: list[str], config: LabConfig | None = None) -> dict:
    """Run the demo; returns what it saw, for the example's test."""
    seen: dict = {"fetched": {}}
    async with open_lab(manifests, config) as lab:
        banner("pods (podnet status)")
        print(format_pods(lab.status()))
        for state in lab.pods.values():
            banner(f"inside {state.namespace}/{state.name}: ip -4 addr show eth0; ip route")
            for argv in (["ip", "-4", "addr", "show", "eth0"], ["ip", "route"]):
                result = await lab.exec(state.name, argv, namespace=state.namespace)
                print(result.stdout.decode().rstrip())
        client = lab.pod("client", "demo")
        banner(f"from {client.name} ({client.ip}): curl each server through the datapath")
        for state in sorted(lab.pods.values(), key=lambda s: s.name):
            if state is client:
                continue
            url = f"http://{state.ip}:8080/"
            result = await lab.exec("client", ["curl", "-sS", "-m", "5", url], namespace="demo")
            answer = result.stdout.decode().strip() or result.stderr.decode().strip()
            seen["fetched"][state.name] = answer
            print(f"curl {url:<26} -> {answer}")
        result = await lab.exec("client", ["ping", "-c", "2", "-i", "0.2", "-W", "1", "169.254.1.1"], namespace="demo")
        print(result.stdout.decode().strip().splitlines()[-2])

        svc = next(s for s in lab.services_status() if s["name"] == "web")
        url = f"http://{svc['cluster_ip']}/"
        seen["service"] = {}
        for backend in SHOWN_BACKENDS:
            if lab.backend.name != backend:
                lab.set_backend(backend)   # live: established flows keep their NAT
            banner(f"Service demo/web: ClusterIP {svc['cluster_ip']} port 80, backend {backend}")
            answers = await fetch_many(lab, url, 30)
            seen["service"][backend] = answers
            print(f"30 x curl {url} -> " + ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())))
            title, text = backend_view(lab, svc)
            banner(title)
            print(text.rstrip())
        banner("conntrack -L (podnet conntrack -L), the Service's flows")
        flows = [line for line in lab.conntrack_listing() if f"dst={svc['cluster_ip']} " in line]
        print("\n".join(flows[:3]) + (f"\n... {len(flows) - 3} more" if len(flows) > 3 else ""))
        banner("what the datapath counted (podnet stats)")
        stats = _jsonable(lab.statistics())
        print(format_stats(stats, lab.sync_summary()))
        seen["stats"] = stats
        banner("tearing down")
    print("all namespaces, TAPs and processes removed")
    seen["cluster"] = await cluster_act(config or LabConfig())
    return seen


async def cluster_act(config: LabConfig, network: str = "vxlan") -> dict:
    """Three nodes from cluster.yaml, in this process around the embedded store."""
    seen: dict = {}
    cluster_config = ClusterConfig(network=network, prefix=config.prefix, state_dir=config.state_dir,
                                   offloads=config.offloads, persist_ipam=config.persist_ipam)
    async with open_cluster([str(HERE / "cluster.yaml")], cluster_config) as cluster:
        banner(f"three nodes, {network} (podnet up -f cluster.yaml --network {network}): podnet status")
        print(format_pods(cluster.status()))
        for node in cluster.nodes.values():
            print(f"{node.name}: underlay {node.spec.ip} ({node.spec.uplink_mac}), pod subnet {node.subnet} "
                  f"(leased from the store), pods {', '.join(p.name for p in node.lab.pods.values())}")
        svc = next(s for s in cluster.services_status() if s["name"] == "web")
        url = f"http://{svc['cluster_ip']}/"
        banner(f"from client on node-1: curl the Service {svc['cluster_ip']} (backends on node-2 and node-3)")
        answers = await fetch_many(cluster, url, 12)
        seen["service"] = answers
        for answer, count in sorted(answers.items()):
            print(f"{count:3} x {answer}")
        web = cluster.pod("web-3", "demo")
        result = await cluster.exec("client", ["curl", "-sS", "-m", "5", f"http://{web.ip}:8080/"], namespace="demo")
        seen["direct"] = result.stdout.decode().strip()
        print(f"curl http://{web.ip}:8080/ -> {seen['direct']}   (the client pod's own address arrives)")
        node = cluster.node("node-1")
        for title, lines in node.show().items():
            banner(f"node-1: {title}")
            print("\n".join(lines))
        seen["show"] = node.show()
        banner(f"podnet trace -n demo client {svc['cluster_ip']}:80   (the first packet, node by node)")
        hops = trace_from_pod(cluster, "client", svc["cluster_ip"], dport=80, namespace="demo",
                              now=trio.current_time())
        seen["trace"] = hops
        print(format_hops(hops))
        banner("tearing down the three nodes")
    print("all namespaces, TAPs and the underlay removed")
    return seen


if __name__ == "__main__":
    files = sys.argv[1:] or [str(HERE / "pods.yaml")]
    # host-local's cursor moves on after every run (round robin), so a persistent pool would give the
    # demo new addresses each time; the demo's node starts from a fresh pool, like a new node
    trio.run(main, files, LabConfig(persist_ipam=False))
