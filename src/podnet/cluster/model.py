"""The Kubernetes objects podnet understands, as plain immutable data, and sets of them.

Layer: cluster (no I/O, no clock, no trio). `podnet.cluster.manifest` builds these from YAML and
checks every field; the builder that brings a cluster up reads them. Besides the objects this
module holds the name rules they obey (functions that return what is wrong with a name, in
apimachinery's words) and `Manifests`, a set of objects. Service and EndpointSlice live in
`podnet.cluster.service`, which builds on this module.

Invariants:
- Every object is frozen and holds tuples and read-only mappings, so a loaded set can be shared by
  nodes, backends and tests without anyone changing it under the others.
- Field names follow the Kubernetes API (`spec.containers[].ports[].containerPort` becomes
  `Container.ports[].container_port`) and defaults are the API server's, so a reader who knows
  `kubectl explain pod.spec` knows these classes. Only what pod networking needs is modelled.
- Cluster-scoped objects (Namespace, Node) have namespace "", as in the API server's storage keys.
- A `Manifests` built by `collect` (or `+`) holds no two objects with the same kind, namespace and
  name, and every namespaced object's namespace is built in or declared in the set.

Kubernetes behaviour followed: core/v1 `ObjectMeta`, `Namespace`, `Node`, `Pod`, `Container`,
`ContainerPort`, `Probe`, `Lifecycle` (preStop) and their defaulting (`SetDefaults_Probe`,
`SetDefaults_PodSpec`); apps/v1 `Deployment` with `SetDefaults_Deployment` (1 replica,
RollingUpdate 25%/25%, progressDeadlineSeconds 600); k8s.io/apimachinery/pkg/util/validation for
names. One convenience for Python callers: a `Deployment` built without a selector selects its
template's labels (the manifest parser, like apps/v1, requires spec.selector).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from itertools import chain
from types import MappingProxyType
from typing import (TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, Literal, Mapping,
                    Union)

from podnet.errors import ConfigError

if TYPE_CHECKING:  # service.py builds on this module; Manifests only names its classes
    from .service import EndpointSlice, Service

Protocol = Literal["TCP", "UDP", "SCTP"]
PROTOCOLS: tuple[Protocol, ...] = ("TCP", "UDP", "SCTP")

RestartPolicy = Literal["Always", "OnFailure", "Never"]
RESTART_POLICIES: tuple[RestartPolicy, ...] = ("Always", "OnFailure", "Never")

URIScheme = Literal["HTTP", "HTTPS"]
URI_SCHEMES: tuple[URIScheme, ...] = ("HTTP", "HTTPS")

DEFAULT_NAMESPACE = "default"

# (kind, namespace, name): what makes an object unique in a cluster. Cluster-scoped objects have
# namespace "" as in the API server's storage keys.
ObjectKey = tuple[str, str, str]


# --- name rules and messages of k8s.io/apimachinery/pkg/util/validation -------------------------

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = rf"{_LABEL}(\.{_LABEL})*"
_QUALIFIED = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_ENDS = "and must start and end with an alphanumeric character"


def _rule(pattern: str, max_len: int, message: str) -> Callable[[str], str | None]:
    compiled = re.compile(pattern)

    def problem(value: str) -> str | None:
        if len(value) > max_len:
            return f"must be no more than {max_len} characters"
        return None if compiled.fullmatch(value) else message
    return problem


dns1123_label_problem = _rule(_LABEL, 63, (
    f"a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', {_ENDS}"
    f" (e.g. 'my-name', or '123-abc', regex used for validation is '{_LABEL}')"))
dns1035_label_problem = _rule(r"[a-z]([-a-z0-9]*[a-z0-9])?", 63, (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name', or 'abc-123', "
    "regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"))
dns1123_subdomain_problem = _rule(_SUBDOMAIN, 253, (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    f"'.', {_ENDS} (e.g. 'example.com', regex used for validation is '{_SUBDOMAIN}')"))
_qualified_part_problem = _rule(_QUALIFIED, 63, (
    f"name part must consist of alphanumeric characters, '-', '_' or '.', {_ENDS}"))
label_value_problem = _rule(f"({_QUALIFIED})?", 63, (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    f"'.', {_ENDS}"))


def port_name_problem(value: str) -> str | None:
    """Why `value` is not an IANA service name (a container port name), or None."""
    checks = ((len(value) > 15, "must be no more than 15 characters"),
              (not re.fullmatch(r"[-a-z0-9]+", value),
               "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)"),
              ("--" in value, "must not contain consecutive hyphens"),
              (not re.search(r"[a-z]", value), "must contain at least one letter (a-z)"),
              (value[:1] == "-" or value[-1:] == "-", "must not begin or end with a hyphen"))
    return next((message for failed, message in checks if failed), None)


def qualified_name_problem(value: str) -> str | None:
    """Label and annotation keys: `[prefix/]name`, the prefix a DNS subdomain."""
    prefix, slash, name = value.rpartition("/")
    if slash and (problem := dns1123_subdomain_problem(prefix)):
        return f"prefix part {problem}"
    return _qualified_part_problem(name)


def show_value(value: Any) -> str:
    """How error messages quote a value: as JSON, cut at 60 characters."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _frozen_mapping(items: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True)
class ObjectMeta:
    """metadata: name, namespace ("" for cluster-scoped kinds), labels and annotations."""

    name: str
    namespace: str = DEFAULT_NAMESPACE
    # Read-only copies; excluded from hashing because mappings are not hashable.
    labels: Mapping[str, str] = field(default_factory=_frozen_mapping, hash=False)
    annotations: Mapping[str, str] = field(default_factory=_frozen_mapping, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen_mapping(self.labels))
        object.__setattr__(self, "annotations", _frozen_mapping(self.annotations))


class _Named:
    KIND: ClassVar[str]
    meta: ObjectMeta

    @property
    def name(self) -> str:
        return self.meta.name


class _ClusterScoped(_Named):
    """Name and identity of an object that lives outside any namespace (Namespace, Node)."""

    @property
    def object_key(self) -> ObjectKey:
        return (self.KIND, "", self.meta.name)


class _Namespaced(_Named):
    """Name and identity of an object that lives in a namespace (Pod, Service, EndpointSlice)."""

    @property
    def namespace(self) -> str:
        return self.meta.namespace

    @property
    def key(self) -> str:
        """The "namespace/name" form that kubectl and the API server's cache keys use."""
        return f"{self.meta.namespace}/{self.meta.name}"

    @property
    def object_key(self) -> ObjectKey:
        return (self.KIND, self.meta.namespace, self.meta.name)


@dataclass(frozen=True)
class Namespace(_ClusterScoped):
    """A namespace (cluster-scoped); podnet only needs it to exist."""

    KIND: ClassVar[str] = "Namespace"
    meta: ObjectMeta


@dataclass(frozen=True)
class NodeAddress:
    """status.addresses[]; `type` is InternalIP, ExternalIP, Hostname, InternalDNS, ExternalDNS."""

    type: str
    address: str


@dataclass(frozen=True)
class Node(_ClusterScoped):
    """A node (cluster-scoped). `pod_cidr` is spec.podCIDR, None when the manifest sets none."""

    KIND: ClassVar[str] = "Node"
    meta: ObjectMeta
    pod_cidr: str | None = None
    addresses: tuple[NodeAddress, ...] = ()


@dataclass(frozen=True)
class ContainerPort:
    """spec.containers[].ports[]: informational in Kubernetes, but names resolve probe and
    Service targetPorts."""

    container_port: int
    name: str | None = None
    protocol: Protocol = "TCP"


@dataclass(frozen=True)
class TCPSocketAction:
    """Ready when a TCP connection to `port` (a number or a container port name) succeeds."""

    port: int | str


@dataclass(frozen=True)
class HTTPGetAction:
    """Ready on an HTTP status 200-399 from GET `scheme://host:port/path`; host None = pod IP."""

    port: int | str
    path: str = "/"
    host: str | None = None
    scheme: URIScheme = "HTTP"


@dataclass(frozen=True)
class ExecAction:
    """Ready when `command` exits 0; as in Kubernetes it is exec'd directly, not via a shell."""

    command: tuple[str, ...]


ProbeHandler = TCPSocketAction | HTTPGetAction | ExecAction


@dataclass(frozen=True)
class SleepAction:
    """A preStop hook that only waits (PodLifecycleSleepAction, GA in 1.34): `seconds` at most the
    pod's terminationGracePeriodSeconds."""

    seconds: int


LifecycleHandler = ExecAction | HTTPGetAction | SleepAction


@dataclass(frozen=True)
class Lifecycle:
    """lifecycle of a container: the preStop hook the kubelet runs before SIGTERM. Its time counts
    against terminationGracePeriodSeconds; after it the container still gets at least 2 s."""

    pre_stop: LifecycleHandler | None = None


@dataclass(frozen=True)
class Probe:
    """A probe has exactly one handler; timings default as in Kubernetes' SetDefaults_Probe."""

    handler: ProbeHandler
    initial_delay_seconds: int = 0
    period_seconds: int = 10
    timeout_seconds: int = 1
    success_threshold: int = 1
    failure_threshold: int = 3


@dataclass(frozen=True)
class Container:
    """One container of a pod.

    `image` is accepted and ignored: podnet runs `command` + `args` as a process on the host's
    filesystem, inside the pod's network namespace, so there is no image to pull or unpack. This is
    also why a container must have a `command` (there is no image entrypoint to fall back on).
    """

    name: str
    image: str | None = None
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    ports: tuple[ContainerPort, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    readiness_probe: Probe | None = None
    working_dir: str | None = None
    lifecycle: Lifecycle | None = None

    def port_number(self, port: int | str) -> int:
        """Resolve a probe or targetPort value: a number is itself, a name a declared port's."""
        if isinstance(port, int):
            return port
        for declared in self.ports:
            if declared.name == port:
                return declared.container_port
        raise ConfigError(f'container "{self.name}": port name "{port}" is not declared in ports')


@dataclass(frozen=True)
class Pod(_Namespaced):
    """A pod: containers sharing one network namespace, optionally pinned to a node."""

    KIND: ClassVar[str] = "Pod"
    meta: ObjectMeta
    containers: tuple[Container, ...]
    node_name: str | None = None
    restart_policy: RestartPolicy = "Always"
    termination_grace_period_seconds: int = 30

    def container(self, name: str) -> Container:
        for container in self.containers:
            if container.name == name:
                return container
        raise KeyError(f'pod "{self.key}" has no container "{name}"')

    def argv(self, container: Container | str) -> tuple[str, ...]:
        """The process to run: command + args.

        Kubernetes would run the image's entrypoint when `command` is empty; podnet has no image,
        so that is a ConfigError naming the field.
        """
        if isinstance(container, str):
            container = self.container(container)
        if not container.command:
            index = self.containers.index(container)
            raise ConfigError(
                f'Pod "{self.key}": spec.containers[{index}].command: required, podnet runs no '
                "images so there is no entrypoint to fall back on"
            )
        return container.command + container.args


# --- Deployments (apps/v1) ---------------------------------------------------------------------

DeploymentStrategyType = Literal["RollingUpdate", "Recreate"]
DEPLOYMENT_STRATEGY_TYPES: tuple[DeploymentStrategyType, ...] = ("Recreate", "RollingUpdate")
IntOrPercent = Union[int, str]  # 3 or "25%" (intstr.IntOrString)


@dataclass(frozen=True)
class PodTemplate:
    """spec.template of a Deployment: the labels and annotations its pods get, and their spec."""

    labels: Mapping[str, str] = field(default_factory=_frozen_mapping, hash=False)
    annotations: Mapping[str, str] = field(default_factory=_frozen_mapping, hash=False)
    containers: tuple[Container, ...] = ()
    node_name: str | None = None
    restart_policy: RestartPolicy = "Always"
    termination_grace_period_seconds: int = 30

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen_mapping(self.labels))
        object.__setattr__(self, "annotations", _frozen_mapping(self.annotations))

    @classmethod
    def of(cls, pod: Pod) -> PodTemplate:
        """The template a pod spec makes (its labels and annotations included)."""
        return cls(pod.meta.labels, pod.meta.annotations, pod.containers, pod.node_name,
                   pod.restart_policy, pod.termination_grace_period_seconds)

    def pod(self, name: str, namespace: str, extra_labels: Mapping[str, str] | None = None) -> Pod:
        """A pod made from this template (what the ReplicaSet controller creates)."""
        meta = ObjectMeta(name, namespace, {**self.labels, **(extra_labels or {})}, self.annotations)
        return Pod(meta, self.containers, self.node_name, self.restart_policy,
                   self.termination_grace_period_seconds)

    def with_env(self, env: Mapping[str, str], container: str | None = None) -> PodTemplate:
        """`kubectl set env`: set variables in every container (or the one named), keeping order."""
        if container is not None and all(c.name != container for c in self.containers):
            raise ConfigError(f'pod template has no container "{container}"')
        changed = []
        for c in self.containers:
            if container is None or c.name == container:
                kept = tuple((k, v) for k, v in c.env if k not in env)
                c = replace(c, env=kept + tuple((k, str(v)) for k, v in env.items()))
            changed.append(c)
        return replace(self, containers=tuple(changed))


@dataclass(frozen=True)
class RollingUpdateDeployment:
    """spec.strategy.rollingUpdate: how many pods above `replicas` may exist during an update
    (surge, rounded up from a percent) and how many below it may be unavailable (rounded down)."""

    max_surge: IntOrPercent = "25%"
    max_unavailable: IntOrPercent = "25%"


@dataclass(frozen=True)
class DeploymentStrategy:
    type: DeploymentStrategyType = "RollingUpdate"
    rolling_update: RollingUpdateDeployment | None = RollingUpdateDeployment()


@dataclass(frozen=True)
class Deployment(_Namespaced):
    """A Deployment: `replicas` pods from `template`, replaced per `strategy` when it changes.
    `selector` is spec.selector.matchLabels, and it selects the template's labels."""

    KIND: ClassVar[str] = "Deployment"
    meta: ObjectMeta
    template: PodTemplate
    selector: Mapping[str, str] = field(default_factory=_frozen_mapping, hash=False)
    replicas: int = 1
    strategy: DeploymentStrategy = DeploymentStrategy()
    min_ready_seconds: int = 0
    progress_deadline_seconds: int = 600

    def __post_init__(self) -> None:
        object.__setattr__(self, "selector", _frozen_mapping(self.selector))
        if not self.selector:
            object.__setattr__(self, "selector", _frozen_mapping(self.template.labels))


# --- a set of objects ---------------------------------------------------------------------------

# Namespaces every cluster has; objects may live in them without a Namespace manifest.
BUILTIN_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})

ClusterObject = Union[Namespace, Node, Pod, Deployment, "Service", "EndpointSlice"]


def describe(obj: ClusterObject) -> str:
    """How errors name an object: `Pod "default/web-1"`, `Node "node-a"`."""
    _, namespace, name = obj.object_key
    return f'{obj.KIND} "{namespace}/{name}"' if namespace else f'{obj.KIND} "{name}"'


@dataclass(frozen=True)
class Origin:
    """Where an object was read: source (file), 1-based YAML document, index in a List's items."""

    source: str
    document: int
    item: int | None = None

    def __str__(self) -> str:
        where = f"{self.source}: document {self.document}"
        return where if self.item is None else f"{where}, items[{self.item}]"


@dataclass(frozen=True)
class Manifests:
    """A consistent set of objects: no two with the same kind, namespace and name, and every
    namespaced object's namespace exists (built in, or declared in the set). Build one with
    `collect`, which checks that; `a + b` (`a.merge(b)`) combines two sets and checks again.

    Services come as written: a Service without spec.clusterIP has `cluster_ip` None until
    `podnet.cluster.ipalloc.allocate_services` gives it one, as the API server does on create."""

    namespaces: tuple[Namespace, ...] = ()
    nodes: tuple[Node, ...] = ()
    pods: tuple[Pod, ...] = ()
    services: tuple[Service, ...] = ()
    endpoint_slices: tuple[EndpointSlice, ...] = ()
    deployments: tuple[Deployment, ...] = ()
    origins: Mapping[ObjectKey, Origin] = field(default_factory=dict, compare=False, repr=False)

    # kind -> the field holding objects of that kind, in the order `objects()` yields them
    FIELDS: ClassVar[Mapping[str, str]] = MappingProxyType({
        "Namespace": "namespaces", "Node": "nodes", "Pod": "pods", "Service": "services",
        "EndpointSlice": "endpoint_slices", "Deployment": "deployments"})

    def objects(self) -> Iterator[ClusterObject]:
        return chain.from_iterable(getattr(self, name) for name in self.FIELDS.values())

    @classmethod
    def collect(cls, entries: Iterable[tuple[ClusterObject, Origin]]) -> Manifests:
        groups: dict[str, list[ClusterObject]] = {kind: [] for kind in cls.FIELDS}
        origins: dict[ObjectKey, Origin] = {}
        for obj, origin in entries:
            if (first := origins.get(obj.object_key)) is not None:
                raise ConfigError(f"{origin.source}: {describe(obj)}: metadata.name: duplicate "
                                  f'object "{obj.meta.name}", already defined at {first}')
            origins[obj.object_key] = origin
            groups[obj.KIND].append(obj)
        known = BUILTIN_NAMESPACES | {ns.meta.name for ns in groups["Namespace"]}
        for obj in chain.from_iterable(groups.values()):
            if (namespace := obj.object_key[1]) and namespace not in known:
                raise ConfigError(f"{origins[obj.object_key].source}: {describe(obj)}: "
                                  f'metadata.namespace: namespace "{namespace}" not '
                                  "found (declare a Namespace of that name in the manifests)")
        return cls(**{name: tuple(groups[kind]) for kind, name in cls.FIELDS.items()},
                   origins=MappingProxyType(origins))

    def merge(self, other: Manifests) -> Manifests:
        unknown = Origin("<unknown>", 0)
        return Manifests.collect((obj, part.origins.get(obj.object_key, unknown))
                                 for part in (self, other) for obj in part.objects())

    __add__ = merge
