"""Every example runs, and does what it says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import trio

from podnet.core.datapath import NodeMode
from podnet.lab import LabConfig

pytestmark = pytest.mark.root
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(relative: str):
    spec = importlib.util.spec_from_file_location(relative.replace("/", "_")[:-3], EXAMPLES / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_fetches_from_every_server_through_the_datapath(state_dir, capsys):
    demo = _load("demo/run.py")
    config = LabConfig(prefix="pn-x1", state_dir=state_dir)
    seen = trio.run(demo.main, [str(EXAMPLES / "demo" / "pods.yaml")], config)
    assert seen["fetched"] == {"web-1": "web-1", "web-2": "web-2", "web-3": "web-3"}
    stats = seen["stats"]
    assert stats["fast_path_packets"] > 0 and stats["arp_replies"] >= 1 and not stats["drops"]
    out = capsys.readouterr().out
    assert "default via 169.254.1.1 dev eth0 onlink" in out
    assert "inet 10.244.0.2/32" in out and "PORT" in out
    # the Service, through each backend in turn: 30 answers, each from one of the servers
    from podnet.core.services.registry import BACKENDS
    assert set(seen["service"]) == set(BACKENDS)
    for backend, answers in seen["service"].items():
        assert sum(answers.values()) == 30 and set(answers) <= {"web-1", "web-2", "web-3"}, backend
    assert "-j KUBE-SVC-" in out                       # iptables-save of the Service's chains
    if "ebpf" in BACKENDS:
        assert "Frontend" in out and "=> 10.244.0.3:8080/TCP (active)" in out   # cilium service list
    # the three-node act: a Service on node-1 answered from node-2 and node-3, the client's address kept
    cluster = seen["cluster"]
    assert set(cluster["service"]) == {"web-2 (from 10.244.1.2)", "web-3 (from 10.244.1.2)"}
    assert sum(cluster["service"].values()) == 12 and cluster["direct"] == "web-3 (from 10.244.1.2)"
    assert cluster["show"]["bridge fdb show dev flannel.1"] == [
        "0e:00:ac:12:00:0c dev flannel.1 dst 172.18.0.12 self permanent",
        "0e:00:ac:12:00:0d dev flannel.1 dst 172.18.0.13 self permanent"]
    # the demo's trace: node-1 encapsulates the DNATed SYN, a backend's node delivers it
    hops = cluster["trace"]
    assert [h.node for h in hops][0] == "node-1" and hops[-1].node in ("node-2", "node-3")
    assert "vxlan" in [s.stage for s in hops[0].trace.steps]
    assert hops[-1].outputs[0].startswith("delivered to demo/web-")


def test_bridge_mode_udp_echo_is_switched_by_the_learning_bridge(state_dir):
    example = _load("library/bridge_udp_echo.py")
    config = LabConfig(prefix="pn-x2", state_dir=state_dir, mode=NodeMode.BRIDGE, node_cidr="10.244.1.0/24")
    seen = example.main(config, count=50)
    assert seen["answered"] == 50
    assert "default via 10.244.1.1 dev eth0" in seen["route"] and "onlink" not in seen["route"]
    assert "10.244.1.0/24 dev eth0" in seen["route"]
    assert seen["stats"].stages.get("bridge", 0) >= 100   # echo and reply frames were switched
    assert seen["fdb"] == {"default/echo-client", "default/echo-server"}
