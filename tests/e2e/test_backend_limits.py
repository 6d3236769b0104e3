"""A full BPF map, end to end: the eBPF backend refuses a new Service with a clear error, and the
Services it already has keep working."""

from __future__ import annotations

import sys

import pytest

from podnet.cluster.model import Container, ContainerPort, Manifests, ObjectMeta, Pod, Probe, TCPSocketAction
from podnet.cluster.service import Service, ServicePort
from podnet.lab import LabConfig, run_lab

pytestmark = pytest.mark.root

SERVER = "import socket\ns = socket.create_server(('0.0.0.0', 8080))\nwhile True:\n    c, _ = s.accept(); c.sendall(b'hi'); c.close()\n"
FETCH = ("import socket, sys\ntry:\n    s = socket.create_connection((sys.argv[1], 80), timeout=3); print(s.recv(10).decode())\n"
         "except OSError as exc:\n    print(type(exc).__name__)\n")


def manifests() -> Manifests:
    probe = Probe(TCPSocketAction(8080), period_seconds=1)
    pods = [Pod(ObjectMeta(f"srv-{i}", "default", {"app": f"app-{i}"}),
                (Container("c", command=(sys.executable, "-c", SERVER), ports=(ContainerPort(8080),),
                           readiness_probe=probe),), termination_grace_period_seconds=1) for i in range(2)]
    client = Pod(ObjectMeta("client"), (Container("c", command=("sleep", "infinity")),), termination_grace_period_seconds=1)
    services = [Service(ObjectMeta(f"svc-{i}"), ports=(ServicePort("", 80, target_port=8080),), selector={"app": f"app-{i}"})
                for i in range(2)]
    return Manifests.collect([(o, None) for o in (*pods, client, *services)])


def test_a_full_bpf_map_refuses_a_new_service_and_the_others_keep_working(tmp_path):
    # room for three entries: both Services' master entries (written before their pods are ready),
    # then one backend slot; whichever Service gets its endpoint second no longer fits
    config = LabConfig(prefix="pn-lm", state_dir=str(tmp_path), backend="ebpf", min_sync_period_s=0.2,
                       backend_options={"lb_map_max": 3})
    with run_lab(manifests(), config) as lab:
        lab.wait_synced()    # the pods are ready; wait for the sync that programs their endpoints
        summary = trio_call(lab, lab.lab.sync_summary)
        syncs = trio_call(lab, lambda: [(r.objects_written, r.detail.get("failed")) for r in lab.lab.syncs])
        ready = trio_call(lab, lambda: {p.name: p.ready for p in lab.lab.pods.values()})
        assert len(summary["failed"]) == 1, (syncs, ready, trio_call(lab, lambda: lab.lab.backend.errors))
        failure = summary["failed"][0]
        assert "lb4_services_v2" in failure and "map is full" in failure and "E2BIG" in failure
        assert summary["backend_stats"]["map_full_errors"] >= 1
        ips = {s["name"]: s["cluster_ip"] for s in lab.status_services()}
        refused = [name for name in ips if name in failure or ips[name] in failure]
        assert len(refused) == 1
        working = next(name for name in ips if name not in refused)
        answer = lab.exec("client", [sys.executable, "-c", FETCH, ips[working]]).stdout.decode().strip()
        assert answer == "hi"        # the Service that fits goes on
        missing = lab.exec("client", [sys.executable, "-c", FETCH, ips[refused[0]]]).stdout.decode().strip()
        assert missing != "hi"       # the one that did not fit is not served


def trio_call(lab, fn):
    import trio
    return trio.from_thread.run_sync(fn, trio_token=lab._token)
