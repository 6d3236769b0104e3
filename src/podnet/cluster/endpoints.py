"""The EndpointSlice controller: which pods back each Service, on which ports, in which state.

Layer: cluster (plain data in, plain data out; no I/O, no clock). `derive_endpoint_slices` is the
controller as a function: Services, Pods and what the node agents report about each pod
(`PodStatus`) in, EndpointSlices out. `endpoints_for` is the consumer's side, kube-proxy's view of
the slices: per Service port, the backends a service backend may pick from.

Invariants:
- Only a Service with a selector gets derived slices, made of the pods in its own namespace whose
  labels hold every selector pair, that have a status with an IP. A Service without a selector
  gets none: its EndpointSlices are the ones the user wrote, used as they are.
- Conditions follow the controller's podToEndpoint: serving = the pod is ready (readiness probes
  keep running while a pod terminates), terminating = the pod is terminating, ready = serving and
  not terminating - or always, when the Service sets publishNotReadyAddresses.
- A named targetPort is resolved per pod, from the container ports with that name and the Service
  port's protocol; a pod that declares no such port is left out of that port. Endpoints are
  grouped by the port set they resolve to, and each slice holds one group - at most
  `max_endpoints_per_slice` endpoints - so every endpoint of a slice serves every port it lists.
- A Service that selects nothing still gets one slice, with no endpoints and no ports (the
  controller's placeholder), so "no backends" is visible rather than indistinguishable from "not
  derived".
- Output is deterministic: pods are taken in namespace/name order, and slice names
  (`<service>-<5 characters>`, generateName-style with Kubernetes' vowel-free alphabet) come from
  a random generator seeded by (seed, namespace, service, slice index), so deriving again after a
  readiness change keeps the names.

Kubernetes behaviour followed: pkg/controller/endpointslice (reconciler grouping by port set,
podToEndpoint, FindPort for named ports, placeholder slices, the managed-by, service-name and
headless labels, Service labels copied onto its slices) and kube-proxy's EndpointSliceCache for
`endpoints_for` (ports matched by name and protocol, the first address of an endpoint, an
ip:port seen in two slices counted once).
Differences: the real controller updates the slices it made earlier in place and keeps their
names; this one derives the whole set afresh (stable names stand in for the updates). Pods carry no
phase here, so the controller's "skip Succeeded/Failed pods" is the caller's job (give such pods no
status).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple, Sequence

from podnet.errors import ConfigError

from .model import ObjectMeta, Pod
from .service import (CLUSTER_IP_NONE, SERVICE_NAME_LABEL, Endpoint, EndpointPort, EndpointSlice,
                      ObjectReference, Service, ServicePort)

MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
CONTROLLER_NAME = "endpointslice-controller.k8s.io"
HEADLESS_LABEL = "service.kubernetes.io/headless"
_RESERVED_LABELS = frozenset({SERVICE_NAME_LABEL, MANAGED_BY_LABEL, HEADLESS_LABEL})
DEFAULT_MAX_ENDPOINTS_PER_SLICE = 100  # kube-controller-manager --max-endpoints-per-slice
MAX_ENDPOINTS_PER_SLICE = 1000  # the most the flag (and the API) allows

# k8s.io/apimachinery's random strings: no vowels (no words), no 0/1/3 (no look-alikes).
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_NAME_SUFFIX_LENGTH = 5
_MAX_NAME_BASE = 63 - _NAME_SUFFIX_LENGTH  # generateName truncates the prefix to this


@dataclass(frozen=True)
class PodStatus:
    """What the controller needs to know about a running pod: its IP (None while it has none),
    whether it is Ready, whether it is being deleted, its node (None: spec.nodeName) and zone."""

    ip: str | None
    ready: bool = False
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None


class EndpointInfo(NamedTuple):
    """One backend of one Service port, as a proxy sees it."""

    ip: str
    port: int
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None
    zone: str | None


def derive_endpoint_slices(services: Iterable[Service], pods: Iterable[Pod],
                           pod_status: Mapping[str, PodStatus], *,
                           max_endpoints_per_slice: int = DEFAULT_MAX_ENDPOINTS_PER_SLICE,
                           seed: int | str = 0) -> tuple[EndpointSlice, ...]:
    """The EndpointSlices of every Service with a selector. `pod_status` is keyed by `Pod.key`
    ("namespace/name"); a pod without an entry, or without an IP, is not an endpoint yet."""
    if not 1 <= max_endpoints_per_slice <= MAX_ENDPOINTS_PER_SLICE:
        raise ConfigError(f"max_endpoints_per_slice: must be an integer between 1 and "
                          f"{MAX_ENDPOINTS_PER_SLICE}, got {max_endpoints_per_slice!r}")
    pod_index = _PodIndex(pods, pod_status)
    slices: list[EndpointSlice] = []
    taken: set[tuple[str, str]] = set()  # (namespace, slice name)
    for service in services:
        if service.selector is None:
            continue
        groups: dict[tuple[EndpointPort, ...], list[Endpoint]] = {}
        for pod, status in pod_index.candidates(service.namespace, service.selector):
            if all(pod.meta.labels.get(k) == v for k, v in service.selector.items()):
                resolved = (_endpoint_port(service_port, pod) for service_port in service.ports)
                ports = tuple(port for port in resolved if port is not None)
                groups.setdefault(ports, []).append(_endpoint(service, pod, status))
        chunks = [(ports, endpoints[start:start + max_endpoints_per_slice])
                  for ports, endpoints in groups.items()
                  for start in range(0, len(endpoints), max_endpoints_per_slice)]
        for index, (ports, endpoints) in enumerate(chunks or [((), [])]):
            meta = ObjectMeta(_slice_name(service, index, seed, taken), service.namespace,
                              _slice_labels(service))
            slices.append(EndpointSlice(meta, "IPv4", tuple(endpoints), ports))
    return tuple(slices)


class _PodIndex:
    """The pods that can be endpoints (those with an IP), in (namespace, name) order, indexed by
    namespace and by label: a Service's selector is matched against the pods carrying its rarest
    label pair instead of every pod, so deriving every slice is not O(Services x Pods)."""

    def __init__(self, pods: Iterable[Pod], pod_status: Mapping[str, PodStatus]) -> None:
        self.by_namespace: dict[str, list[tuple[Pod, PodStatus]]] = {}
        self.by_label: dict[tuple[str, str, str], list[tuple[Pod, PodStatus]]] = {}
        for pod in sorted(pods, key=lambda pod: (pod.namespace, pod.name)):
            status = pod_status.get(pod.key)
            if status is None or status.ip is None:
                continue
            entry = (pod, status)
            self.by_namespace.setdefault(pod.namespace, []).append(entry)
            for key, value in pod.meta.labels.items():
                self.by_label.setdefault((pod.namespace, key, value), []).append(entry)

    def candidates(self, namespace: str, selector: Mapping[str, str]) -> list[tuple[Pod, PodStatus]]:
        """A superset of the pods `selector` matches in `namespace`, in order (an empty selector
        matches every pod there)."""
        if not selector:
            return self.by_namespace.get(namespace, [])
        return min((self.by_label.get((namespace, key, value), []) for key, value in selector.items()), key=len)


def _endpoint_port(service_port: ServicePort, pod: Pod) -> EndpointPort | None:
    """The Service port as this pod serves it (FindPort): a number is taken as is, a name must be
    a container port of the pod with the same protocol."""
    target = service_port.target_port
    if isinstance(target, str):
        target = next((declared.container_port for container in pod.containers
                       for declared in container.ports
                       if declared.name == target and declared.protocol == service_port.protocol),
                      None)
        if target is None:
            return None
    return EndpointPort(service_port.name, target, service_port.protocol,
                        service_port.app_protocol)


def _endpoint(service: Service, pod: Pod, status: PodStatus) -> Endpoint:
    return Endpoint(
        (status.ip,),
        ready=service.publish_not_ready_addresses or (status.ready and not status.terminating),
        serving=status.ready,
        terminating=status.terminating,
        node_name=status.node_name or pod.node_name,
        zone=status.zone,
        target_ref=ObjectReference("Pod", pod.namespace, pod.name),
    )


def _slice_labels(service: Service) -> dict[str, str]:
    labels = {k: v for k, v in service.meta.labels.items() if k not in _RESERVED_LABELS}
    labels[SERVICE_NAME_LABEL] = service.name
    labels[MANAGED_BY_LABEL] = CONTROLLER_NAME
    if service.cluster_ip == CLUSTER_IP_NONE:
        labels[HEADLESS_LABEL] = ""
    return labels


def _slice_name(service: Service, index: int, seed: int | str,
                taken: set[tuple[str, str]]) -> str:
    base = f"{service.name}-"[:_MAX_NAME_BASE]
    draw = random.Random(f"{seed}/{service.namespace}/{service.name}/{index}")
    while True:  # a clash needs two long names cut to one base and the same draw: retry
        name = base + "".join(draw.choice(_NAME_ALPHABET) for _ in range(_NAME_SUFFIX_LENGTH))
        if (service.namespace, name) not in taken:
            taken.add((service.namespace, name))
            return name


def endpoints_for(service: Service,
                  slices: Sequence[EndpointSlice]) -> dict[ServicePort, tuple[EndpointInfo, ...]]:
    """Per port of `service`, its backends from the slices labelled with its name in its namespace
    (derived or user-written): slices in name order, each endpoint's first address, the slice port
    with the Service port's name and protocol. An ip:port in two slices counts once (the first)."""
    mine = sorted((s for s in slices if s.namespace == service.namespace
                   and s.service_name == service.name), key=lambda s: s.name)
    result: dict[ServicePort, tuple[EndpointInfo, ...]] = {}
    for service_port in service.ports:
        seen: dict[tuple[str, int], EndpointInfo] = {}
        for endpoint_slice in mine:
            port = next((p.port for p in endpoint_slice.ports if p.name == service_port.name
                         and p.protocol == service_port.protocol), None)
            if port is None:
                continue
            for endpoint in endpoint_slice.endpoints:
                info = EndpointInfo(endpoint.addresses[0], port, endpoint.ready, endpoint.serving,
                                    endpoint.terminating, endpoint.node_name, endpoint.zone)
                seen.setdefault((info.ip, port), info)
        result[service_port] = tuple(seen.values())
    return result
