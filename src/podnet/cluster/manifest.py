"""Load Kubernetes manifests (YAML) into `podnet.cluster.model` objects, validating them.

Layer: cluster. Reading the named files is the only I/O, and nothing is created: either every
object in every file is valid and a `Manifests` comes back, or a `ConfigError` is raised and there
is no partial result. So a bad manifest creates nothing.

Invariants:
- Every error names the file, the object and the field: `pods.yaml: Pod "default/web-1":
  spec.containers[0].ports[0].containerPort: must be an integer between 1 and 65535, got "http"`.
  Until an object has a known kind and a name it is named by position and by what it claims to
  be: `pods.yaml: document 2 (Pdo/web)`, `pods.yaml: document 1, items[3] (Pod)`.
- Kinds are read through the explicit `KINDS` registry (kind -> `KindSpec`), never filled by
  imports. A kind missing from it is an error listing the supported kinds. Service and
  EndpointSlice are parsed by `podnet.cluster.service`, whose parsers take a `FieldReader`.

Kubernetes behaviour followed: what `kubectl apply -f` and the API server accept. Multi-document
YAML and `kind: List`; empty documents skipped; a key given twice in one mapping is an error (as in
kubectl's decoder); apiVersion per kind; apimachinery's name rules and messages; unknown fields
ignored (the API server prunes them); `null` means "not set"; probe timings of 0 take their
defaults (`SetDefaults_Probe`). Where podnet cannot honour a valid field (no images, so `command`
is required; `hostNetwork`; `initContainers`; `env[].valueFrom`; gRPC probes; postStart hooks;
a paused Deployment; selector matchExpressions) it says so rather than silently doing less.
A Deployment (apps/v1) is checked as ValidateDeploymentSpec checks it - a non-empty selector that
selects the template's labels, restartPolicy Always, maxSurge/maxUnavailable as a count or a
percent (not both 0, maxUnavailable at most 100%), no rollingUpdate with Recreate,
progressDeadlineSeconds above minReadySeconds - and its template is read by the Pod's own parser,
so its errors name `spec.template.spec.containers[0]...`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NoReturn

import yaml

from podnet.errors import ConfigError

from .model import (DEFAULT_NAMESPACE, DEPLOYMENT_STRATEGY_TYPES, PROTOCOLS, RESTART_POLICIES,
                    URI_SCHEMES, ClusterObject, Container, ContainerPort, Deployment,
                    DeploymentStrategy, ExecAction, HTTPGetAction, IntOrPercent, Lifecycle,
                    Manifests, Namespace, Node, NodeAddress, ObjectMeta, Origin, Pod, PodTemplate,
                    Probe, RollingUpdateDeployment, SleepAction, TCPSocketAction,
                    dns1035_label_problem, dns1123_label_problem, dns1123_subdomain_problem,
                    label_value_problem, port_name_problem, qualified_name_problem)
from .model import show_value as _show
from .service import parse_endpoint_slice, parse_service

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")  # what `kubectl apply -f DIR` reads


# --- typed reads --------------------------------------------------------------------------------


class FieldReader:
    """Typed reads from one mapping of a manifest; a failure raises a ConfigError naming the
    object (`where`, which starts with the file) and the field path. A missing key and an explicit
    `null` both mean "not set", as in the API server."""

    def __init__(self, where: str, path: str, data: Mapping[str, Any]) -> None:
        self.where, self.path, self.data = where, path, data

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path and key else self.path or key

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(f"{self.where}: {self.at(key)}: {problem}")

    def check_name(self, key: str, value: str, problem_of: Callable[[str], str | None]) -> None:
        if problem := problem_of(value):
            self.fail(key, f"{problem}, got {_show(value)}")

    def raw(self, key: str, *, required: bool = False) -> Any:
        """The value as decoded from YAML, unchecked (None when not set)."""
        value = self.data.get(key)
        if value is None and required:
            self.fail(key, "required")
        return value

    def string(self, key: str, default: str | None = None, *, required: bool = False,
               choices: tuple[str, ...] = ()) -> str | None:
        value = self.raw(key, required=required)
        if value is None:
            return default
        if not isinstance(value, str):
            hint = " (quote it in YAML)" if isinstance(value, (int, float, bool)) else ""
            self.fail(key, f"must be a string{hint}, got {_show(value)}")
        if choices and value not in choices:
            self.fail(key, f"must be one of {', '.join(map(_show, choices))}, got {_show(value)}")
        return value

    def integer(self, key: str, default: int | None = None, *, required: bool = False,
                low: int | None = None, high: int | None = None) -> int | None:
        value = self.raw(key, required=required)
        if value is None:
            return default
        # `type(...) is int`: YAML's true/false are bools, and a bool is not a number here.
        if type(value) is int and (low is None or value >= low) and (high is None or value <= high):
            return value
        wanted = (f"an integer between {low} and {high}" if high is not None else
                  "a non-negative integer" if low == 0 else "an integer")
        self.fail(key, f"must be {wanted}, got {_show(value)}")

    def boolean(self, key: str, default: bool | None = None, *,
                required: bool = False) -> bool | None:
        value = self.raw(key, required=required)
        if value is None:
            return default
        if not isinstance(value, bool):
            hint = " (unquote it in YAML)" if value in ("true", "false") else ""
            self.fail(key, f"must be true or false{hint}, got {_show(value)}")
        return value

    def mapping(self, key: str, *, required: bool = False) -> FieldReader:
        """A nested mapping; when not set, an empty one."""
        value = {} if (value := self.raw(key, required=required)) is None else value
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping, got {_show(value)}")
        return FieldReader(self.where, self.at(key), value)

    def _list(self, key: str, required: bool, item_type: type, item_name: str) -> list[Any]:
        value = [] if (value := self.raw(key, required=required)) is None else value
        if not isinstance(value, list):
            self.fail(key, f"must be a list of {item_name}s, got {_show(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, item_type):
                self.fail(f"{key}[{index}]", f"must be a {item_name}, got {_show(item)}")
        return value

    def mappings(self, key: str, *, required: bool = False) -> list[FieldReader]:
        """A list of mappings such as spec.containers; each reader's path carries its index."""
        value = self._list(key, required, dict, "mapping")
        return [FieldReader(self.where, self.at(f"{key}[{i}]"), v) for i, v in enumerate(value)]

    def strings(self, key: str) -> tuple[str, ...]:
        return tuple(self._list(key, False, str, "string"))

    def string_map(self, key: str, *, labels: bool) -> dict[str, str]:
        """metadata.labels or .annotations: qualified-name keys to strings (label-shaped ones)."""
        value = {} if (value := self.raw(key)) is None else value
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping of strings to strings, got {_show(value)}")
        for name, item in value.items():
            path = f"{key}[{name}]"
            if not isinstance(name, str) or not isinstance(item, str):
                self.fail(path, f"keys and values must be strings (quote them in YAML), got "
                          f"{_show(name)}: {_show(item)}")
            self.check_name(path, name, qualified_name_problem)
            if labels:
                self.check_name(path, item, label_value_problem)
        return dict(value)


# --- kinds --------------------------------------------------------------------------------------


def _parse_namespace(doc: FieldReader, meta: ObjectMeta) -> Namespace:
    return Namespace(meta)


def _parse_node(doc: FieldReader, meta: ObjectMeta) -> Node:
    spec = doc.mapping("spec")
    try:  # stricter than the API server: host bits set are a typo IPAM must not guess around
        if (pod_cidr := spec.string("podCIDR")) is not None:
            ipaddress.ip_network(pod_cidr, strict=True)
    except ValueError as exc:
        spec.fail("podCIDR", f"must be a valid CIDR ({exc}), got {_show(pod_cidr)}")
    addresses = [NodeAddress(entry.string("type", required=True),
                             entry.string("address", required=True))
                 for entry in doc.mapping("status").mappings("addresses")]
    return Node(meta, pod_cidr=pod_cidr, addresses=tuple(addresses))


def _parse_pod(doc: FieldReader, meta: ObjectMeta) -> Pod:
    return Pod(meta, **_parse_pod_spec(doc.mapping("spec", required=True)))


def _parse_pod_spec(spec: FieldReader) -> dict[str, Any]:
    """A pod spec (a Pod's, or a Deployment's spec.template.spec) as `Pod` keyword arguments."""
    if spec.data.get("hostNetwork") is True:
        spec.fail("hostNetwork", "not supported: podnet gives every pod its own network namespace")
    if spec.data.get("initContainers"):
        spec.fail("initContainers", "not supported: podnet does not run init containers")
    readers = spec.mappings("containers", required=True)
    if not readers:
        spec.fail("containers", "required: a pod needs at least one container")
    containers: list[Container] = []
    first_use: dict[tuple[int, str], str] = {}  # the containers share one network namespace
    for reader in readers:
        container = _parse_container(reader)
        if any(c.name == container.name for c in containers):
            reader.fail("name", f"duplicate value {_show(container.name)}")
        for index, port in enumerate(container.ports):
            here = reader.at(f"ports[{index}]")
            if (first := first_use.setdefault((port.container_port, port.protocol), here)) != here:
                reader.fail(f"ports[{index}]", f"duplicate containerPort "
                            f"{port.container_port}/{port.protocol}, already declared at {first}")
        containers.append(container)
    node_name = spec.string("nodeName")
    if node_name is not None:
        spec.check_name("nodeName", node_name, dns1123_subdomain_problem)
    grace = spec.integer("terminationGracePeriodSeconds", 30, low=0)
    for reader, container in zip(readers, containers):
        hook = container.lifecycle.pre_stop if container.lifecycle else None
        if isinstance(hook, SleepAction) and not 0 <= hook.seconds <= grace:
            # validateSleepAction (sleep 0 allowed since PodLifecycleSleepActionAllowZero)
            reader.fail("lifecycle.preStop.sleep.seconds", "must be non-negative and less than "
                        f"terminationGracePeriodSeconds ({grace}), got {hook.seconds}")
    return {"containers": tuple(containers), "node_name": node_name,
            "restart_policy": spec.string("restartPolicy", "Always", choices=RESTART_POLICIES),
            "termination_grace_period_seconds": grace}


def _parse_container(reader: FieldReader) -> Container:
    name = reader.string("name", required=True)
    reader.check_name("name", name, dns1123_label_problem)
    command = reader.strings("command") or reader.fail(
        "command", "required: podnet runs no images, so there is no entrypoint to fall back on")
    ports: list[ContainerPort] = []
    for port in reader.mappings("ports"):
        port_name = port.string("name")
        if port_name is not None:
            port.check_name("name", port_name, port_name_problem)
            if any(p.name == port_name for p in ports):
                port.fail("name", f"duplicate value {_show(port_name)}")
        number = port.integer("containerPort", required=True, low=1, high=65535)
        ports.append(ContainerPort(number, port_name, port.string("protocol", "TCP",
                                                                  choices=PROTOCOLS)))
    env = []
    for var in reader.mappings("env"):
        if var.data.get("valueFrom") is not None:
            var.fail("valueFrom", "not supported: podnet has no Secrets, ConfigMaps or downward "
                     "API; use value")
        var_name = var.string("name", required=True) or var.fail("name", "must not be empty")
        env.append((var_name, var.string("value", "")))
    probe = reader.mapping("readinessProbe")
    return Container(  # `image` is kept for the record only: podnet runs no images
        name=name,
        image=reader.string("image"),
        command=command,
        args=reader.strings("args"),
        ports=tuple(ports),
        env=tuple(env),
        readiness_probe=(_parse_probe(probe, ports, reader.at("ports"))
                         if reader.raw("readinessProbe") is not None else None),
        working_dir=reader.string("workingDir"),
        lifecycle=_parse_lifecycle(reader.mapping("lifecycle"), ports, reader.at("ports")),
    )


def _parse_lifecycle(lifecycle: FieldReader, ports: list[ContainerPort],
                     ports_path: str) -> Lifecycle | None:
    """lifecycle.preStop with one handler: exec, httpGet or sleep (validateLifecycle)."""
    if lifecycle.data.get("postStart") is not None:
        lifecycle.fail("postStart", "not supported by podnet; only preStop hooks run")
    if lifecycle.raw("preStop") is None:
        return None
    hook = lifecycle.mapping("preStop")
    handlers = [key for key in ("exec", "httpGet", "tcpSocket", "sleep")
                if hook.data.get(key) is not None]
    if len(handlers) != 1:
        hook.fail("", f"may not specify more than 1 handler type, got {', '.join(handlers)}"
                  if handlers else "must specify a handler type (one of exec, httpGet, sleep)")
    action = hook.mapping(kind := handlers[0])
    if kind == "tcpSocket":
        hook.fail("tcpSocket", "not supported: the kubelet never runs a tcpSocket lifecycle "
                  "handler (kept in the API for backward compatibility); use exec, httpGet or sleep")
    if kind == "exec":
        handler = ExecAction(action.strings("command") or action.fail("command", "required"))
    elif kind == "sleep":
        handler = SleepAction(action.integer("seconds", required=True))
    else:
        handler = HTTPGetAction(_probe_port(action, ports, ports_path), action.string("path", "/"),
                                action.string("host"),
                                action.string("scheme", "HTTP", choices=URI_SCHEMES))
    return Lifecycle(pre_stop=handler)


def _parse_probe(probe: FieldReader, ports: list[ContainerPort], ports_path: str) -> Probe:
    handlers = [key for key in ("exec", "httpGet", "tcpSocket", "grpc")
                if probe.data.get(key) is not None]
    if len(handlers) != 1:
        probe.fail("", f"may not specify more than 1 handler type, got {', '.join(handlers)}"
                   if handlers else "must specify a handler type (one of exec, httpGet, tcpSocket)")
    action = probe.mapping(kind := handlers[0])
    if kind == "grpc":
        probe.fail("grpc", "not supported by podnet; use exec, httpGet or tcpSocket")
    elif kind == "exec":
        handler = ExecAction(action.strings("command") or action.fail("command", "required"))
    elif kind == "tcpSocket":
        handler = TCPSocketAction(_probe_port(action, ports, ports_path))
    else:
        handler = HTTPGetAction(_probe_port(action, ports, ports_path), action.string("path", "/"),
                                action.string("host"),
                                action.string("scheme", "HTTP", choices=URI_SCHEMES))
    return Probe(  # 0, like unset, means the default (SetDefaults_Probe)
        handler,
        initial_delay_seconds=probe.integer("initialDelaySeconds", 0, low=0),
        period_seconds=probe.integer("periodSeconds", 0, low=0) or 10,
        timeout_seconds=probe.integer("timeoutSeconds", 0, low=0) or 1,
        success_threshold=probe.integer("successThreshold", 0, low=0) or 1,
        failure_threshold=probe.integer("failureThreshold", 0, low=0) or 3,
    )


def _probe_port(action: FieldReader, ports: list[ContainerPort], ports_path: str) -> int | str:
    """A number, or the name of a port that the same container declares (resolved now)."""
    value = action.raw("port", required=True)
    if isinstance(value, str) and not port_name_problem(value):
        if any(p.name == value for p in ports):
            return value
        declared = ", ".join(_show(p.name) for p in ports if p.name) or "none"
        action.fail("port", f"port name {_show(value)} is not declared in {ports_path} "
                    f"(declared names: {declared})")
    if type(value) is int and 1 <= value <= 65535:
        return value
    action.fail("port", "must be an integer between 1 and 65535 or a port name declared in "
                f"{ports_path}, got {_show(value)}")


_PERCENT = re.compile(r"[0-9]+%")


def _int_or_percent(reader: FieldReader, key: str, default: IntOrPercent) -> IntOrPercent:
    """ValidatePositiveIntOrPercent: a non-negative integer or a string such as "25%"."""
    value = reader.raw(key)
    if value is None:
        return default
    if isinstance(value, str):
        if not _PERCENT.fullmatch(value):
            reader.fail(key, "a valid percent string must be a numeric string followed by an ending "
                        "'%' (e.g. '1%',  or '93%', regex used for validation is '[0-9]+%'), got "
                        f"{_show(value)}")
        return value
    if type(value) is not int or value < 0:
        reader.fail(key, f"must be greater than or equal to 0, got {_show(value)}")
    return value


def _is_zero(value: IntOrPercent) -> bool:
    return value in (0, "0%") or (isinstance(value, str) and int(value[:-1]) == 0)


def _parse_deployment(doc: FieldReader, meta: ObjectMeta) -> Deployment:
    """apps/v1 Deployment as ValidateDeployment checks it; its template through the Pod's parser."""
    spec = doc.mapping("spec", required=True)
    replicas = spec.integer("replicas", 1, low=0)
    if spec.data.get("paused") is True:
        spec.fail("paused", "not supported by podnet: a paused Deployment would silently not roll out")
    selector = spec.mapping("selector", required=True)
    if selector.data.get("matchExpressions"):
        selector.fail("matchExpressions", "not supported by podnet; use matchLabels")
    match_labels = selector.string_map("matchLabels", labels=True)
    if not match_labels:
        spec.fail("selector", "empty selector is invalid for deployment")
    template = spec.mapping("template", required=True)
    template_meta = template.mapping("metadata")
    labels = template_meta.string_map("labels", labels=True)
    if any(labels.get(k) != v for k, v in match_labels.items()):
        template_meta.fail("labels", f"`selector` does not match template `labels` (selector "
                           f"{_show(match_labels)}, labels {_show(labels)})")
    pod = _parse_pod_spec(template.mapping("spec", required=True))
    if pod["restart_policy"] != "Always":
        template.mapping("spec").fail("restartPolicy", 'Unsupported value: '
                                      f'{_show(pod["restart_policy"])}: supported values: "Always"')
    strategy = spec.mapping("strategy")
    kind = strategy.string("type", "RollingUpdate", choices=DEPLOYMENT_STRATEGY_TYPES)
    rolling = None
    if kind == "Recreate":
        if strategy.raw("rollingUpdate") is not None:
            strategy.fail("rollingUpdate", "may not be specified when strategy `type` is 'Recreate'")
    else:
        update = strategy.mapping("rollingUpdate")
        surge = _int_or_percent(update, "maxSurge", "25%")
        unavailable = _int_or_percent(update, "maxUnavailable", "25%")
        if isinstance(unavailable, str) and int(unavailable[:-1]) > 100:
            update.fail("maxUnavailable", f"must not be greater than 100%, got {_show(unavailable)}")
        if _is_zero(surge) and _is_zero(unavailable):
            update.fail("maxUnavailable", f"may not be 0 when `maxSurge` is 0, got {_show(unavailable)}")
        rolling = RollingUpdateDeployment(surge, unavailable)
    min_ready = spec.integer("minReadySeconds", 0, low=0)
    deadline = spec.integer("progressDeadlineSeconds", 600, low=0)
    if deadline <= min_ready:
        spec.fail("progressDeadlineSeconds", f"must be greater than minReadySeconds ({min_ready}), "
                  f"got {deadline}")
    return Deployment(meta, PodTemplate(labels, template_meta.string_map("annotations", labels=False),
                                        **pod),
                      selector=match_labels, replicas=replicas,
                      strategy=DeploymentStrategy(kind, rolling), min_ready_seconds=min_ready,
                      progress_deadline_seconds=deadline)


@dataclass(frozen=True)
class KindSpec:
    """How one kind is read: its apiVersion, scope, name rule and parser. A new kind also needs
    its model class and a `Manifests` field, named in `Manifests.FIELDS`."""

    api_version: str
    namespaced: bool
    name_problem: Callable[[str], str | None]
    parse: Callable[[FieldReader, ObjectMeta], ClusterObject]


KINDS: Mapping[str, KindSpec] = {
    "Namespace": KindSpec("v1", False, dns1123_label_problem, _parse_namespace),
    "Node": KindSpec("v1", False, dns1123_subdomain_problem, _parse_node),
    "Pod": KindSpec("v1", True, dns1123_subdomain_problem, _parse_pod),
    "Service": KindSpec("v1", True, dns1035_label_problem, parse_service),
    "EndpointSlice": KindSpec("discovery.k8s.io/v1", True, dns1123_subdomain_problem,
                              parse_endpoint_slice),
    "Deployment": KindSpec("apps/v1", True, dns1123_subdomain_problem, _parse_deployment),
}


# --- YAML and files -----------------------------------------------------------------------------


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML that rejects a key given twice in one mapping, as kubectl's decoder does
    (PyYAML alone silently keeps the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and not key.tag.endswith(":merge"):
                if (key.tag, key.value) in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {_show(key.value)}", key.start_mark)
                seen.add((key.tag, key.value))
        return super().construct_mapping(node, deep=deep)


def _documents(text: str, source: str) -> list[Any]:
    loader = _StrictLoader(text)
    try:
        documents = []
        while loader.check_node():
            documents.append(loader.construct_document(loader.get_node()))
        return documents
    except yaml.YAMLError as exc:
        mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context", None)
        where = f"{source}: line {mark.line + 1}, column {mark.column + 1}" if mark else source
        problem = (f"{context}: " if context else "") + (getattr(exc, "problem", None) or str(exc))
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()


def _parse_object(data: Any, origin: Origin) -> ClusterObject:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: must be a mapping (a Kubernetes object), got {_show(data)}")
    name = data["metadata"].get("name") if isinstance(data.get("metadata"), dict) else None
    claimed = "/".join(part for part in (data.get("kind"), name) if isinstance(part, str))
    doc = FieldReader(f"{origin} ({claimed})" if claimed else str(origin), "", data)
    kind = doc.string("kind", required=True)
    if (spec := KINDS.get(kind)) is None:
        raise ConfigError(f"{doc.where}: unknown kind {_show(kind)} "
                          f"(supported: {', '.join(sorted(KINDS))})")
    meta = doc.mapping("metadata", required=True)
    name = meta.string("name", required=True)
    namespace = (meta.string("namespace") or DEFAULT_NAMESPACE) if spec.namespaced else ""
    where = f'{origin.source}: {kind} "{namespace + "/" if spec.namespaced else ""}{name}"'
    doc, meta = FieldReader(where, "", data), FieldReader(where, "metadata", meta.data)
    if (api_version := doc.string("apiVersion", required=True)) != spec.api_version:
        doc.fail("apiVersion", f"must be {_show(spec.api_version)} for kind {kind}, got "
                 f"{_show(api_version)}")
    meta.check_name("name", name, spec.name_problem)
    if spec.namespaced:
        meta.check_name("namespace", namespace, dns1123_label_problem)
    labels = meta.string_map("labels", labels=True)
    return spec.parse(doc, ObjectMeta(name, namespace, labels,
                                      meta.string_map("annotations", labels=False)))


def _parse_text(text: str, source: str) -> Iterator[tuple[ClusterObject, Origin]]:
    for number, data in enumerate(_documents(text, source), start=1):
        if data is None:  # an empty document, e.g. after a trailing `---`
            continue
        if not (isinstance(data, dict) and data.get("kind") == "List"):
            yield _parse_object(data, Origin(source, number)), Origin(source, number)
            continue
        doc = FieldReader(f"{source}: document {number} (List)", "", data)
        doc.string("apiVersion", required=True, choices=("v1",))
        if not isinstance(items := doc.raw("items", required=True), list):
            doc.fail("items", f"must be a list, got {_show(items)}")
        for index, item in enumerate(items):
            yield _parse_object(item, Origin(source, number, index)), Origin(source, number, index)


def parse_manifests(text: str, source: str = "<string>") -> Manifests:
    """Parse and validate one YAML stream as a complete set; `source` names it in errors."""
    return Manifests.collect(_parse_text(text, source))


def load_manifests(paths: Iterable[str | Path]) -> Manifests:
    """Read and validate manifest files, or directories of them (like `kubectl apply -f DIR`: its
    .yaml/.yml/.json files, sorted, not recursive), as one set: duplicates and namespaces are
    checked across all files, so a pod may live in a namespace that another file declares."""
    entries: list[tuple[ClusterObject, Origin]] = []
    for path in map(Path, paths):
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        for file in (f for f in files if f == path or f.suffix in MANIFEST_SUFFIXES):
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{file}: cannot read manifest: {exc}") from None
            entries.extend(_parse_text(text, str(file)))
    return Manifests.collect(entries)
