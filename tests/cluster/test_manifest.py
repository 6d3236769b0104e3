"""Loading Kubernetes manifests: good ones become model objects, bad ones a ConfigError that names
the file, the object and the field. No root, no I/O beyond reading files under tests/cluster/data.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from podnet.cluster.manifest import KINDS, Manifests, load_manifests, parse_manifests
from podnet.cluster.model import (Container, ContainerPort, ExecAction, HTTPGetAction, Namespace,
                                  Node, NodeAddress, ObjectMeta, Origin, Pod, Probe,
                                  TCPSocketAction)
from podnet.errors import ConfigError

DATA = Path(__file__).parent / "data"


def parse(text: str, source: str = "test.yaml") -> Manifests:
    return parse_manifests(textwrap.dedent(text), source)


def pod_yaml(container: str = "", spec: str = "", meta: str = "", name: str = "web") -> str:
    """A one-container pod; `container` and `spec` add fields (YAML at their indentation)."""
    return (
        "apiVersion: v1\nkind: Pod\n"
        f"metadata:\n  name: {name}\n{textwrap.indent(textwrap.dedent(meta), '  ')}"
        f"spec:\n{textwrap.indent(textwrap.dedent(spec), '  ')}"
        "  containers:\n    - name: app\n      command: [sleep, infinity]\n"
        f"{textwrap.indent(textwrap.dedent(container), '      ')}"
    )


# --- good manifests ----------------------------------------------------------------------------


def test_example_file_loads_into_model_objects():
    manifests = load_manifests([DATA / "pods.yaml"])
    assert manifests.namespaces == (Namespace(ObjectMeta("demo", "", {"team": "networking"})),)
    assert [pod.key for pod in manifests.pods] == ["demo/web-1", "demo/web-2", "demo/web-3"]
    assert all(pod.meta.labels["app"] == "web" for pod in manifests.pods)

    web1, web2, web3 = manifests.pods
    assert web1.meta.annotations == {"podnet.dev/note": "probed over TCP"}
    server = web1.containers[0]
    assert server.image == "python:3.12-slim"  # kept, not used
    assert web1.argv(server) == ("python3", "-m", "http.server", "8080")
    assert server.ports == (ContainerPort(8080, "http", "TCP"),)
    assert server.readiness_probe == Probe(TCPSocketAction(8080), period_seconds=2)

    assert web2.node_name == "node-a"
    assert web2.containers[0].env == (("PYTHONUNBUFFERED", "1"),)
    assert web2.containers[0].working_dir == "/tmp"
    probe = web2.containers[0].readiness_probe
    assert probe == Probe(HTTPGetAction("http", path="/index.html"), initial_delay_seconds=1,
                          failure_threshold=5)
    assert web2.containers[0].port_number(probe.handler.port) == 8080

    assert web3.restart_policy == "OnFailure"
    assert web3.termination_grace_period_seconds == 5
    assert isinstance(web3.containers[0].readiness_probe.handler, ExecAction)
    assert web3.containers[0].readiness_probe.timeout_seconds == 2

    origin = manifests.origins[web2.object_key]
    assert origin == Origin(str(DATA / "pods.yaml"), 3)


def test_defaults_follow_kubernetes():
    pod = parse(pod_yaml(container="""\
        ports: [{containerPort: 53, protocol: UDP}, {containerPort: 80}]
        readinessProbe: {httpGet: {port: 80}, periodSeconds: 0}
    """)).pods[0]
    assert pod.meta == ObjectMeta("web", "default")
    assert (pod.node_name, pod.restart_policy, pod.termination_grace_period_seconds) == (
        None, "Always", 30)
    container = pod.containers[0]
    assert container.ports == (ContainerPort(53, None, "UDP"), ContainerPort(80, None, "TCP"))
    assert container.readiness_probe == Probe(HTTPGetAction(80, "/", None, "HTTP"), 0, 10, 1, 1, 3)
    assert (container.image, container.args, container.env) == (None, (), ())


def test_list_and_multiple_documents_and_empty_documents():
    manifests = parse("""\
        ---
        apiVersion: v1
        kind: List
        items:
          - {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
          - apiVersion: v1
            kind: Node
            metadata: {name: node-a.example, labels: {zone: a}}
            spec: {podCIDR: 10.244.1.0/24}
            status: {addresses: [{type: InternalIP, address: 192.168.1.10}]}
        ---
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: cart, namespace: shop}
        spec:
          containers:
            - name: cart
              command: [sleep]
              args: [infinity]
        ---
    """)
    assert [ns.name for ns in manifests.namespaces] == ["shop"]
    assert manifests.nodes == (Node(ObjectMeta("node-a.example", "", {"zone": "a"}),
                                    "10.244.1.0/24", (NodeAddress("InternalIP", "192.168.1.10"),)),)
    assert manifests.pods[0].key == "shop/cart"
    assert manifests.origins[manifests.nodes[0].object_key] == Origin("test.yaml", 1, 1)
    # Document 2 is the empty one between the two `---`.
    assert manifests.origins[manifests.pods[0].object_key] == Origin("test.yaml", 3)


def test_namespace_may_be_declared_in_another_file_and_builtins_need_none():
    manifests = load_manifests([DATA / "shop-pods.yaml", DATA / "shop-namespace.yaml"])
    assert [pod.key for pod in manifests.pods] == ["shop/cart"]
    assert parse(pod_yaml(meta="namespace: kube-system\n")).pods[0].key == "kube-system/web"


def test_directory_is_read_like_kubectl_apply(tmp_path):
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
    (tmp_path / "b.json").write_text('{"apiVersion": "v1", "kind": "Namespace", '
                                     '"metadata": {"name": "b"}}')
    (tmp_path / "notes.txt").write_text("not a manifest")
    assert [ns.name for ns in load_manifests([tmp_path]).namespaces] == ["a", "b"]


def test_merge_combines_and_rejects_duplicates():
    a = parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n", "a.yaml")
    b = parse(pod_yaml(), "b.yaml")
    merged = a + b
    assert (merged.namespaces, merged.pods) == (a.namespaces, b.pods)
    assert merged.origins[b.pods[0].object_key].source == "b.yaml"
    with pytest.raises(ConfigError, match=r'b\.yaml: Pod "default/web": metadata\.name: duplicate'):
        merged.merge(b)


def test_objects_are_immutable():
    pod = parse(pod_yaml(meta="labels: {app: web}\n")).pods[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        pod.node_name = "elsewhere"  # type: ignore[misc]
    with pytest.raises(TypeError):
        pod.meta.labels["app"] = "changed"  # type: ignore[index]
    assert hash(pod) == hash(parse(pod_yaml(meta="labels: {app: web}\n")).pods[0])


def test_argv_without_command_is_a_config_error():
    pod = Pod(ObjectMeta("web"), (Container("app", image="nginx"),))
    with pytest.raises(ConfigError, match=r'Pod "default/web": spec\.containers\[0\]\.command'):
        pod.argv("app")


def test_registry_is_explicit():
    assert sorted(KINDS) == ["Deployment", "EndpointSlice", "Namespace", "Node", "Pod", "Service"]
    assert {kind: spec.api_version for kind, spec in KINDS.items()
            if spec.api_version != "v1"} == {"EndpointSlice": "discovery.k8s.io/v1",
                                               "Deployment": "apps/v1"}
    assert sorted(Manifests.FIELDS) == sorted(KINDS)


# --- bad manifests -------------------------------------------------------------------------------

NAMESPACE_DOC = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n---\n"

BAD = [
    # (id, manifest text, substrings the message must contain besides the file name)
    ("unknown kind", NAMESPACE_DOC + "apiVersion: v1\nkind: Pdo\nmetadata: {name: web}\n",
     ['document 2 (Pdo/web): unknown kind "Pdo" (supported: Deployment, EndpointSlice, Namespace, '
      'Node, Pod, Service)']),
    ("ReplicaSet is not supported (Deployment is)",
     "apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {name: web}\n",
     ['document 1 (ReplicaSet/web): unknown kind "ReplicaSet"']),
    ("Endpoints is not supported (EndpointSlice is)",
     "apiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\n",
     ['document 1 (Endpoints/web): unknown kind "Endpoints" (supported: Deployment, EndpointSlice, ']),
    ("missing kind", "apiVersion: v1\nmetadata: {name: web}\n",
     ["document 1 (web): kind: required"]),
    ("missing metadata", "apiVersion: v1\nkind: Pod\nspec: {}\n",
     ["document 1 (Pod): metadata: required"]),
    ("missing metadata.name", "apiVersion: v1\nkind: Pod\nmetadata: {namespace: demo}\n",
     ["document 1 (Pod): metadata.name: required"]),
    ("not a mapping", "- just\n- a list\n",
     ['document 1: must be a mapping (a Kubernetes object), got ["just", "a list"]']),
    ("missing apiVersion", "kind: Pod\nmetadata: {name: web}\n",
     ['Pod "default/web": apiVersion: required']),
    ("wrong apiVersion", pod_yaml().replace("apiVersion: v1", "apiVersion: apps/v1"),
     ['Pod "default/web": apiVersion: must be "v1" for kind Pod, got "apps/v1"']),
    ("missing containers", "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {}\n",
     ['Pod "default/web": spec.containers: required']),
    ("empty containers", "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\n"
                         "spec: {containers: []}\n",
     ['Pod "default/web": spec.containers: required']),
    ("missing spec", "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\n",
     ['Pod "default/web": spec: required']),
    ("containerPort not a number", pod_yaml(container="ports: [{containerPort: http}]\n",
                                            name="web-1"),
     ['Pod "default/web-1": spec.containers[0].ports[0].containerPort: must be an integer between '
      '1 and 65535, got "http"']),
    ("port out of range", pod_yaml(container="ports: [{containerPort: 70000}]\n"),
     ['Pod "default/web": spec.containers[0].ports[0].containerPort: must be an integer between 1 '
      "and 65535, got 70000"]),
    ("missing containerPort", pod_yaml(container="ports: [{name: http}]\n"),
     ["spec.containers[0].ports[0].containerPort: required"]),
    ("bad pod name", pod_yaml(name="Web_1"),
     ['Pod "default/Web_1": metadata.name: a lowercase RFC 1123 subdomain must consist of',
      'got "Web_1"']),
    ("namespace name too long for a label",
     f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {'n' * 64}}}\n",
     [f'Namespace "{"n" * 64}": metadata.name: must be no more than 63 characters']),
    ("namespace name with a dot", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a.b}\n",
     ['Namespace "a.b": metadata.name: a lowercase RFC 1123 label must consist of']),
    ("duplicate pod", pod_yaml() + "---\n" + pod_yaml(),
     ['Pod "default/web": metadata.name: duplicate object "web", already defined at '
      "bad-manifest.yaml: document 1"]),
    ("bad protocol", pod_yaml(container="ports: [{containerPort: 80, protocol: HTTP}]\n"),
     ['Pod "default/web": spec.containers[0].ports[0].protocol: must be one of "TCP", "UDP", '
      '"SCTP", got "HTTP"']),
    ("duplicate containerPort and protocol",
     pod_yaml(container="ports: [{containerPort: 80}, {containerPort: 80, protocol: TCP}]\n"),
     ['Pod "default/web": spec.containers[0].ports[1]: duplicate containerPort 80/TCP, already '
      "declared at spec.containers[0].ports[0]"]),
    ("bad port name", pod_yaml(container="ports: [{containerPort: 80, name: HTTP}]\n"),
     ["spec.containers[0].ports[0].name: must contain only alpha-numeric characters"]),
    ("probe with two handlers",
     pod_yaml(container="ports: [{containerPort: 80}]\n"
                        "readinessProbe: {httpGet: {port: 80}, tcpSocket: {port: 80}}\n"),
     ['Pod "default/web": spec.containers[0].readinessProbe: may not specify more than 1 handler '
      "type, got httpGet, tcpSocket"]),
    ("probe without a handler", pod_yaml(container="readinessProbe: {periodSeconds: 5}\n"),
     ['Pod "default/web": spec.containers[0].readinessProbe: must specify a handler type']),
    ("probe port name not declared",
     pod_yaml(container="ports: [{containerPort: 80, name: http}]\n"
                        "readinessProbe: {httpGet: {port: metrics}}\n"),
     ['Pod "default/web": spec.containers[0].readinessProbe.httpGet.port: port name "metrics" is '
      'not declared in spec.containers[0].ports (declared names: "http")']),
    ("probe port neither number nor name",
     pod_yaml(container="readinessProbe: {tcpSocket: {port: \"8080\"}}\n"),
     ["spec.containers[0].readinessProbe.tcpSocket.port: must be an integer between 1 and 65535 "
      'or a port name declared in spec.containers[0].ports, got "8080"']),
    ("negative probe timing",
     pod_yaml(container="readinessProbe: {exec: {command: [\"true\"]}, periodSeconds: -1}\n"),
     ["spec.containers[0].readinessProbe.periodSeconds: must be a non-negative integer, got -1"]),
    ("exec probe without command", pod_yaml(container="readinessProbe: {exec: {}}\n"),
     ["spec.containers[0].readinessProbe.exec.command: required"]),
    ("grpc probe", pod_yaml(container="readinessProbe: {grpc: {port: 9090}}\n"),
     ["spec.containers[0].readinessProbe.grpc: not supported"]),
    ("bad http scheme",
     pod_yaml(container="readinessProbe: {httpGet: {port: 80, scheme: http}}\n"),
     ['spec.containers[0].readinessProbe.httpGet.scheme: must be one of "HTTP", "HTTPS"']),
    ("undeclared namespace", pod_yaml(meta="namespace: shop\n"),
     ['Pod "shop/web": metadata.namespace: namespace "shop" not found']),
    ("bad namespace name", pod_yaml(meta="namespace: Shop\n"),
     ['Pod "Shop/web": metadata.namespace: a lowercase RFC 1123 label']),
    ("container without command",
     "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\n"
     "spec: {containers: [{name: app, image: nginx}]}\n",
     ['Pod "default/web": spec.containers[0].command: required: podnet runs no images']),
    ("command not a list", pod_yaml().replace("command: [sleep, infinity]", "command: sleep 1"),
     ['spec.containers[0].command: must be a list of strings, got "sleep 1"']),
    ("args not strings", pod_yaml(container="args: [1]\n"),
     ["spec.containers[0].args[0]: must be a string, got 1"]),
    ("env value not a string", pod_yaml(container="env: [{name: PORT, value: 8080}]\n"),
     ["spec.containers[0].env[0].value: must be a string (quote it in YAML), got 8080"]),
    ("env valueFrom", pod_yaml(container="env: [{name: A, valueFrom: {secretKeyRef: {}}}]\n"),
     ["spec.containers[0].env[0].valueFrom: not supported"]),
    ("container name missing",
     "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {containers: [{command: [a]}]}\n",
     ['Pod "default/web": spec.containers[0].name: required']),
    ("container name duplicate",
     "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\n"
     "spec: {containers: [{name: a, command: [a]}, {name: a, command: [b]}]}\n",
     ['Pod "default/web": spec.containers[1].name: duplicate value "a"']),
    ("label value not a string", pod_yaml(meta="labels: {version: 2}\n"),
     ['Pod "default/web": metadata.labels[version]: keys and values must be strings']),
    ("bad label value", pod_yaml(meta="labels: {app: -web}\n"),
     ["metadata.labels[app]: a valid label must be an empty string or consist of"]),
    ("bad label key", pod_yaml(meta="labels: {'a/b/c': x}\n"),
     ["metadata.labels[a/b/c]: prefix part a lowercase RFC 1123 subdomain"]),
    ("bad restartPolicy", pod_yaml(spec="restartPolicy: Sometimes\n"),
     ['spec.restartPolicy: must be one of "Always", "OnFailure", "Never", got "Sometimes"']),
    ("negative grace period", pod_yaml(spec="terminationGracePeriodSeconds: -5\n"),
     ["spec.terminationGracePeriodSeconds: must be a non-negative integer, got -5"]),
    ("hostNetwork", pod_yaml(spec="hostNetwork: true\n"), ["spec.hostNetwork: not supported"]),
    ("node with host bits in podCIDR",
     "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec: {podCIDR: 10.244.1.1/24}\n",
     ['Node "node-a": spec.podCIDR: must be a valid CIDR']),
    ("List item with unknown kind",
     "apiVersion: v1\nkind: List\nitems:\n  - {apiVersion: v1, kind: Pdo, metadata: {name: x}}\n",
     ['document 1, items[0] (Pdo/x): unknown kind "Pdo"']),
    ("YAML syntax error", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [web\n",
     ["line 5, column 1: invalid YAML"]),
    ("key given twice", "apiVersion: v1\nkind: Pod\nkind: Namespace\nmetadata: {name: a}\n",
     ['line 3, column 1: invalid YAML: while constructing a mapping: found duplicate key "kind"']),
]


@pytest.mark.parametrize(("text", "expected"), [pytest.param(t, e, id=i) for i, t, e in BAD])
def test_bad_manifest_names_file_object_and_field(text, expected):
    with pytest.raises(ConfigError) as raised:
        parse_manifests(text, "bad-manifest.yaml")
    message = str(raised.value)
    assert message.startswith("bad-manifest.yaml: ")
    for part in expected:
        assert part in message


@pytest.mark.parametrize(("name", "expected"), [
    ("bad-kind.yaml", 'bad-kind.yaml: document 2 (Pdo/web): unknown kind "Pdo" '
                      "(supported: Deployment, EndpointSlice, Namespace, Node, Pod, Service)"),
    ("bad-port.yaml", 'bad-port.yaml: Pod "default/web-1": spec.containers[0].ports[0]'
                      '.containerPort: must be an integer between 1 and 65535, got "http"'),
    ("bad-syntax.yaml", "bad-syntax.yaml: line 9, column 7: invalid YAML"),
])
def test_errors_name_the_file_they_came_from(name, expected):
    with pytest.raises(ConfigError) as raised:
        load_manifests([DATA / "pods.yaml", DATA / name])
    assert str(raised.value).startswith(str(DATA / name))
    assert expected in str(raised.value)


def test_duplicate_across_files_names_both(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_manifests([DATA / "pods.yaml", DATA / "pods.yaml"])
    assert str(raised.value) == (
        f'{DATA / "pods.yaml"}: Namespace "demo": metadata.name: duplicate object "demo", '
        f'already defined at {DATA / "pods.yaml"}: document 1')


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: cannot read manifest"):
        load_manifests([tmp_path / "missing.yaml"])
