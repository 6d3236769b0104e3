"""The lab's sync loop without namespaces: a Lab is built but never opened, and its view of the
Services is computed from pods and statuses given by hand."""

from __future__ import annotations

import pytest

from podnet.cluster.endpoints import PodStatus
from podnet.cluster.model import Container, Manifests, ObjectMeta, Pod
from podnet.cluster.service import Service, ServicePort
from podnet.lab import Lab, LabConfig
from podnet.linux.resources import Resources


def _lab(tmp_path, backend: str) -> tuple[Lab, list[Pod]]:
    pods = [Pod(ObjectMeta(f"srv-{i}", "default", {"app": f"app-{i}"}), (Container("c", command=("true",)),))
            for i in range(3)]
    services = [Service(ObjectMeta(f"svc-{i}"), ports=(ServicePort("", 80, target_port=8080),),
                        selector={"app": f"app-{i}"}) for i in range(3)]
    manifests = Manifests.collect([(o, None) for o in (*pods, *services)])
    config = LabConfig(prefix="pn-ls", state_dir=str(tmp_path), backend=backend)
    return Lab(manifests, config, Resources(prefix="pn-ls", state_dir=str(tmp_path))), pods


def _status(pods: list[Pod], unready: str | None = None) -> dict[str, PodStatus]:
    return {p.key: PodStatus(f"10.244.0.{i + 2}", ready=p.meta.name != unready, node_name="node-1")
            for i, p in enumerate(pods)}


@pytest.mark.parametrize("backend", ["ebpf", "ipvs"])
def test_the_sync_loop_hands_unchanged_service_ports_over_as_the_same_objects(tmp_path, backend):
    lab, pods = _lab(tmp_path, backend)
    first, view = lab._proxy_ports_reusing(pods, _status(pods), {})
    lab.backend.sync(first, full=True)
    again, view = lab._proxy_ports_reusing(pods, _status(pods), view)
    assert [a is b for a, b in zip(first, again)] == [True, True, True]
    changed, view = lab._proxy_ports_reusing(pods, _status(pods, unready="srv-1"), view)
    assert [a is b for a, b in zip(first, changed)] == [True, False, True]
    assert changed[1].name == "svc-1" and not changed[1].endpoints[0].ready
    assert changed == lab._proxy_ports(pods, _status(pods, unready="srv-1"))    # the same view, as values
    report = lab.backend.sync(changed, full=False)
    assert report.detail["services_examined"] == 1 and report.objects_written > 0
