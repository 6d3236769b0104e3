"""Deployment (apps/v1) and preStop-hook manifests: good ones become model objects with the API
server's defaults, bad ones a ConfigError naming the file, the object and the field, in the API
server's words (ValidateDeploymentSpec, validateLifecycle, validateSleepAction). No root, no I/O."""

from __future__ import annotations

import textwrap

import pytest

from podnet.cluster.manifest import parse_manifests
from podnet.cluster.model import (Deployment, DeploymentStrategy, ExecAction, HTTPGetAction, Lifecycle,
                                  ObjectMeta, RollingUpdateDeployment, SleepAction)
from podnet.errors import ConfigError


def deployment_yaml(spec: str = "", template_spec: str = "", container: str = "",
                    labels: str = "{app: web}", selector: str = "{matchLabels: {app: web}}") -> str:
    """A Deployment "web"; `spec`, `template_spec` and `container` add YAML at their indentation."""
    return ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n"
            f"  selector: {selector}\n"
            f"{textwrap.indent(textwrap.dedent(spec), '  ')}"
            f"  template:\n    metadata: {{labels: {labels}}}\n    spec:\n"
            f"{textwrap.indent(textwrap.dedent(template_spec), '      ')}"
            "      containers:\n      - name: srv\n        command: [sleep, infinity]\n"
            f"{textwrap.indent(textwrap.dedent(container), '        ')}")


def parse(text: str):
    return parse_manifests(text, "deploy.yaml")


def test_a_deployment_gets_the_api_servers_defaults():
    [d] = parse(deployment_yaml()).deployments
    assert d.meta == ObjectMeta("web", "default")
    assert d.key == "default/web" and d.selector == {"app": "web"}
    assert (d.replicas, d.min_ready_seconds, d.progress_deadline_seconds) == (1, 0, 600)
    assert d.strategy == DeploymentStrategy("RollingUpdate", RollingUpdateDeployment("25%", "25%"))
    assert d.template.labels == {"app": "web"}
    assert d.template.containers[0].command == ("sleep", "infinity")
    assert (d.template.restart_policy, d.template.termination_grace_period_seconds) == ("Always", 30)
    pod = d.template.pod("web-abc-xyz12", "default", {"pod-template-hash": "abc"})
    assert pod.meta.labels == {"app": "web", "pod-template-hash": "abc"} and pod.containers == d.template.containers


def test_a_full_deployment_with_prestop_hooks():
    text = deployment_yaml(
        spec="""\
            replicas: 100
            minReadySeconds: 2
            progressDeadlineSeconds: 120
            strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 5, maxUnavailable: "10%"}}
        """,
        labels="{app: web, tier: front}",
        template_spec="terminationGracePeriodSeconds: 4\n",
        container="""\
            ports: [{containerPort: 8080, name: http}]
            lifecycle: {preStop: {sleep: {seconds: 3}}}
            env: [{name: VERSION, value: "1"}]
        """)
    [d] = parse(text).deployments
    assert (d.replicas, d.min_ready_seconds, d.progress_deadline_seconds) == (100, 2, 120)
    assert d.strategy.rolling_update == RollingUpdateDeployment(5, "10%")
    assert d.template.labels == {"app": "web", "tier": "front"} and d.selector == {"app": "web"}
    assert d.template.termination_grace_period_seconds == 4
    assert d.template.containers[0].lifecycle == Lifecycle(pre_stop=SleepAction(3))
    assert d.template.with_env({"VERSION": "2"}).containers[0].env == (("VERSION", "2"),)


def test_recreate_and_the_other_hooks():
    [d] = parse(deployment_yaml(spec="strategy: {type: Recreate}\n",
                                container="lifecycle: {preStop: {exec: {command: [sh, -c, 'sleep 1']}}}\n")).deployments
    assert d.strategy == DeploymentStrategy("Recreate", None)
    assert d.template.containers[0].lifecycle.pre_stop == ExecAction(("sh", "-c", "sleep 1"))
    pod_text = ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: c\n"
                "    command: [sleep, infinity]\n    ports: [{containerPort: 8080, name: http}]\n"
                "    lifecycle: {preStop: {httpGet: {port: http, path: /drain}}}\n")
    [pod] = parse(pod_text).pods
    assert pod.containers[0].lifecycle.pre_stop == HTTPGetAction("http", "/drain")
    assert pod.containers[0].port_number("http") == 8080
    # sleep 0 is allowed (PodLifecycleSleepActionAllowZero), and equal to the grace period too
    parse(deployment_yaml(template_spec="terminationGracePeriodSeconds: 3\n",
                          container="lifecycle: {preStop: {sleep: {seconds: 3}}}\n"))
    parse(deployment_yaml(container="lifecycle: {preStop: {sleep: {seconds: 0}}}\n"))


W = 'deploy.yaml: Deployment "default/web": '
BAD = [
    ("selector does not select the template",
     deployment_yaml(labels="{app: api}"),
     W + "spec.template.metadata.labels: `selector` does not match template `labels`"),
    ("no selector", deployment_yaml().replace("  selector: {matchLabels: {app: web}}\n", ""),
     W + "spec.selector: required"),
    ("empty selector", deployment_yaml(selector="{matchLabels: {}}"),
     W + "spec.selector: empty selector is invalid for deployment"),
    ("matchExpressions", deployment_yaml(
        selector="{matchLabels: {app: web}, matchExpressions: [{key: app, operator: Exists}]}"),
     W + "spec.selector.matchExpressions: not supported by podnet; use matchLabels"),
    ("restartPolicy", deployment_yaml(template_spec="restartPolicy: OnFailure\n"),
     W + 'spec.template.spec.restartPolicy: Unsupported value: "OnFailure": supported values: "Always"'),
    ("negative replicas", deployment_yaml(spec="replicas: -1\n"),
     W + "spec.replicas: must be a non-negative integer, got -1"),
    ("both zero", deployment_yaml(spec="strategy: {rollingUpdate: {maxSurge: 0, maxUnavailable: 0%}}\n"),
     W + 'spec.strategy.rollingUpdate.maxUnavailable: may not be 0 when `maxSurge` is 0, got "0%"'),
    ("more than 100%", deployment_yaml(spec="strategy: {rollingUpdate: {maxUnavailable: 150%}}\n"),
     W + 'spec.strategy.rollingUpdate.maxUnavailable: must not be greater than 100%, got "150%"'),
    ("not a percent", deployment_yaml(spec="strategy: {rollingUpdate: {maxSurge: '25'}}\n"),
     W + "spec.strategy.rollingUpdate.maxSurge: a valid percent string must be a numeric string "
         "followed by an ending '%'"),
    ("negative surge", deployment_yaml(spec="strategy: {rollingUpdate: {maxSurge: -1}}\n"),
     W + "spec.strategy.rollingUpdate.maxSurge: must be greater than or equal to 0, got -1"),
    ("Recreate with rollingUpdate", deployment_yaml(spec="strategy: {type: Recreate, rollingUpdate: {maxSurge: 1}}\n"),
     W + "spec.strategy.rollingUpdate: may not be specified when strategy `type` is 'Recreate'"),
    ("unknown strategy", deployment_yaml(spec="strategy: {type: BlueGreen}\n"),
     W + 'spec.strategy.type: must be one of "Recreate", "RollingUpdate", got "BlueGreen"'),
    ("deadline", deployment_yaml(spec="minReadySeconds: 10\nprogressDeadlineSeconds: 10\n"),
     W + "spec.progressDeadlineSeconds: must be greater than minReadySeconds (10), got 10"),
    ("paused", deployment_yaml(spec="paused: true\n"), W + "spec.paused: not supported by podnet"),
    ("no template", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n"
                    "spec: {selector: {matchLabels: {app: web}}}\n", W + "spec.template: required"),
    ("template errors name the template's fields",
     deployment_yaml().replace("        command: [sleep, infinity]\n", ""),
     W + "spec.template.spec.containers[0].command: required"),
    ("wrong apiVersion", deployment_yaml().replace("apps/v1", "extensions/v1beta1"),
     W + 'apiVersion: must be "apps/v1" for kind Deployment, got "extensions/v1beta1"'),
    ("sleep longer than the grace period",
     deployment_yaml(template_spec="terminationGracePeriodSeconds: 2\n",
                     container="lifecycle: {preStop: {sleep: {seconds: 3}}}\n"),
     W + "spec.template.spec.containers[0].lifecycle.preStop.sleep.seconds: must be non-negative and less "
         "than terminationGracePeriodSeconds (2), got 3"),
    ("negative sleep", deployment_yaml(container="lifecycle: {preStop: {sleep: {seconds: -1}}}\n"),
     "lifecycle.preStop.sleep.seconds: must be non-negative"),
    ("two handlers", deployment_yaml(
        container="lifecycle: {preStop: {sleep: {seconds: 1}, exec: {command: [true]}}}\n"),
     W + "spec.template.spec.containers[0].lifecycle.preStop: may not specify more than 1 handler type, "
         "got exec, sleep"),
    ("no handler", deployment_yaml(container="lifecycle: {preStop: {}}\n"),
     "lifecycle.preStop: must specify a handler type"),
    ("tcpSocket hook", deployment_yaml(container="lifecycle: {preStop: {tcpSocket: {port: 80}}}\n"),
     "lifecycle.preStop.tcpSocket: not supported: the kubelet never runs a tcpSocket lifecycle handler"),
    ("postStart", deployment_yaml(container="lifecycle: {postStart: {exec: {command: [true]}}}\n"),
     "lifecycle.postStart: not supported by podnet"),
    ("exec without command", deployment_yaml(container="lifecycle: {preStop: {exec: {}}}\n"),
     "lifecycle.preStop.exec.command: required"),
    ("httpGet port not declared", deployment_yaml(container="lifecycle: {preStop: {httpGet: {port: http}}}\n"),
     'lifecycle.preStop.httpGet.port: port name "http" is not declared'),
]


@pytest.mark.parametrize(("text", "expected"), [pytest.param(t, e, id=i) for i, t, e in BAD])
def test_bad_deployments_name_file_object_and_field(text, expected):
    with pytest.raises(ConfigError) as raised:
        parse(text)
    assert expected in str(raised.value)
    assert str(raised.value).startswith("deploy.yaml: ")


def test_a_deployment_and_its_service_load_together():
    text = deployment_yaml() + ("---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
                                "spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n")
    manifests = parse(text)
    assert [d.name for d in manifests.deployments] == ["web"] and [s.name for s in manifests.services] == ["web"]
    assert isinstance(next(o for o in manifests.objects() if o.KIND == "Deployment"), Deployment)
    with pytest.raises(ConfigError, match='duplicate object "web"'):
        parse(deployment_yaml() + "---\n" + deployment_yaml())
