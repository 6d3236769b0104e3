"""The default demo: one node, a client pod and three HTTP server pods, all through podnet.

Run as root: `make demo` (or `.venv/bin/python examples/demo/run.py`). It brings the pods up from
pods.yaml, shows each pod's address and routes as `ip` shows them inside the pod, fetches from every
server from the client pod through the Python datapath, prints what the datapath counted, and
tears everything down.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from podnet.cli import format_pods, format_stats
from podnet.control import _jsonable
from podnet.lab import LabConfig, open_lab

HERE = Path(__file__).resolve().parent


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
        banner("what the datapath counted (podnet stats)")
        stats = _jsonable(lab.statistics())
        print(format_stats(stats))
        seen["stats"] = stats
        banner("tearing down")
    print("all namespaces, TAPs and processes removed")
    return seen


if __name__ == "__main__":
    files = sys.argv[1:] or [str(HERE / "pods.yaml")]
    trio.run(main, files)
