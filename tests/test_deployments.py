"""Deployments without root: what the lab refuses in a Deployment built in Python (the API server's
checks, which the manifest parser also makes), and the offline node (`podnet iptables-save -f`)
seeing a Deployment's pods, named as the lab's controller names them."""

from __future__ import annotations

from dataclasses import replace

import pytest

from podnet.cluster.model import (Container, ContainerPort, Deployment, Manifests, ObjectMeta, PodTemplate)
from podnet.cluster.rollout import POD_TEMPLATE_HASH_LABEL, name_draws, new_pod, template_hash
from podnet.cluster.service import Service, ServicePort
from podnet.deployments import check_deployment
from podnet.errors import ConfigError
from podnet.offline import build_offline_node

SERVER = Container("srv", command=("sleep", "infinity"), ports=(ContainerPort(8080),))
WEB = Deployment(ObjectMeta("web"), PodTemplate({"app": "web"}, containers=(SERVER,)), {"app": "web"}, replicas=3)


@pytest.mark.parametrize("broken, message", [
    (replace(WEB, selector={"app": "api"}),
     'Deployment "default/web": spec.template.metadata.labels: `selector` does not match template `labels`'),
    (replace(WEB, template=replace(WEB.template, restart_policy="OnFailure")),
     'spec.template.spec.restartPolicy: Unsupported value: "OnFailure": supported values: "Always"'),
    (replace(WEB, template=replace(WEB.template, containers=(Container("srv"),))),
     "spec.template.spec.containers[0].command: required"),
    (replace(WEB, template=replace(WEB.template, containers=())), "spec.template.spec.containers: required"),
    (replace(WEB, replicas=-1), "spec.replicas: must be greater than or equal to 0"),
])
def test_a_deployment_built_in_python_is_checked_as_the_api_server_would(broken, message):
    with pytest.raises(ConfigError) as raised:
        check_deployment(broken)
    assert message in str(raised.value)


def test_a_deployment_without_a_selector_selects_its_template():
    assert Deployment(ObjectMeta("web"), WEB.template).selector == {"app": "web"}


def test_the_offline_node_programs_the_deployments_pods():
    service = Service(ObjectMeta("web"), ports=(ServicePort("", 80, target_port=8080),), selector={"app": "web"})
    node = build_offline_node(Manifests(services=(service,), deployments=(WEB,)))
    rng, pod_hash = name_draws(0, WEB), template_hash(WEB.template)
    expected = []
    for _ in range(3):
        expected.append(new_pod(WEB, pod_hash, rng, set(expected)).name)
    assert sorted(node.pod_ips) == sorted(f"default/{name}" for name in expected)
    assert all(name.startswith(f"web-{pod_hash}-") for name in expected)
    [port] = node.service_ports
    assert sorted(ep.ip for ep in port.endpoints) == sorted(node.pod_ips.values())
    pod = new_pod(WEB, pod_hash, name_draws(0, WEB), set())
    assert pod.meta.labels == {"app": "web", POD_TEMPLATE_HASH_LABEL: pod_hash} and pod.name == expected[0]
