"""Service and EndpointSlice as plain immutable data, and how their manifests are read.

Layer: cluster (no I/O, no clock). `podnet.cluster.manifest` hands each Service and EndpointSlice
document to `parse_service` / `parse_endpoint_slice` through its `KINDS` registry; they check the
fields the way the API server's validation does, apply its defaults, and fail with a ConfigError
naming the file, the object and the field (`FieldReader.fail`).

Invariants:
- A parsed Service passed ValidateService as far as podnet models it: ports present (a headless
  Service may have none), named and uniquely named when there are several, no two with the same
  port and protocol; nodePorts only on NodePort and LoadBalancer Services; externalTrafficPolicy
  only where traffic can come from outside (NodePort, LoadBalancer, or externalIPs);
  loadBalancerSourceRanges, allocateLoadBalancerNodePorts and status.loadBalancer.ingress only on
  LoadBalancer Services; healthCheckNodePort only with LoadBalancer and externalTrafficPolicy Local.
- Defaults are the API server's (SetDefaults_Service): protocol TCP, targetPort = port,
  sessionAffinity None, ClientIP timeout 10800 s, both traffic policies Cluster (for Services where
  the API server leaves externalTrafficPolicy empty, Cluster is what kube-proxy does with it),
  allocateLoadBalancerNodePorts true.
- What depends on the cluster - clusterIP inside the service CIDR, nodePort inside the node-port
  range, no address or port held twice - is checked when `podnet.cluster.ipalloc` allocates, with
  the CIDR and the range as parameters, as the API server's registry does on create. A parsed
  Service's `cluster_ip` is the requested one, "None" (headless) or None (not allocated yet).
- IPv4 only: IPv6 and dual-stack values, and EndpointSlice address types other than IPv4, are
  errors that say "not supported" rather than being dropped.
- EndpointSlice conditions are resolved when read, per the discovery/v1 API docs: ready unset is
  true, serving unset follows ready, terminating unset is false.

Kubernetes behaviour followed: core/v1 Service (pkg/apis/core/validation ValidateService,
validateServicePort, SetDefaults_Service) and discovery.k8s.io/v1 EndpointSlice
(pkg/apis/discovery/validation). ExternalName Services are refused: they are a DNS CNAME only,
kube-proxy programs nothing for them and podnet has no cluster DNS, so accepting one would do
nothing without saying so.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar, Literal, Mapping

from .model import (PROTOCOLS, ObjectMeta, Protocol, _Namespaced, dns1123_label_problem,
                    dns1123_subdomain_problem, port_name_problem, qualified_name_problem)
from .model import show_value as _show

if TYPE_CHECKING:  # manifest.py imports this module for its KINDS registry
    from .manifest import FieldReader

ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]
SERVICE_TYPES: tuple[ServiceType, ...] = ("ClusterIP", "NodePort", "LoadBalancer")
SessionAffinity = Literal["None", "ClientIP"]
SESSION_AFFINITIES: tuple[SessionAffinity, ...] = ("None", "ClientIP")
TrafficPolicy = Literal["Cluster", "Local"]
TRAFFIC_POLICIES: tuple[TrafficPolicy, ...] = ("Cluster", "Local")
AddressType = Literal["IPv4"]

CLUSTER_IP_NONE = "None"  # spec.clusterIP of a headless Service
DEFAULT_CLIENT_IP_TIMEOUT_S = 10800  # v1.DefaultClientIPServiceAffinitySeconds
MAX_CLIENT_IP_TIMEOUT_S = 86400  # core.MaxClientIPServiceAffinitySeconds
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # ties an EndpointSlice to its Service
# The annotation form of spec.loadBalancerSourceRanges, still honoured when the field is empty.
SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"
MAX_ENDPOINTS = 1000  # per EndpointSlice, discovery validation's maxEndpoints
MAX_ADDRESSES = 100  # per endpoint, maxAddresses

_IPV4_ONLY = "not supported: podnet is IPv4-only"
_LINK_LOCAL_MULTICAST = ipaddress.IPv4Network("224.0.0.0/24")


# --- objects ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServicePort:
    """spec.ports[]. `name` is "" for the one port of a single-port Service; `target_port` is a
    number or a container port name (resolved per pod by the EndpointSlice controller) and is the
    port itself when not given; `node_port` is None until allocated (NodePort, LoadBalancer)."""

    name: str
    port: int
    protocol: Protocol = "TCP"
    target_port: int | str | None = None  # never None after construction: defaults to `port`
    node_port: int | None = None
    app_protocol: str | None = None

    def __post_init__(self) -> None:
        if self.target_port is None:
            object.__setattr__(self, "target_port", self.port)


@dataclass(frozen=True)
class Service(_Namespaced):
    """A Service: a stable virtual address for the pods its selector picks (or for the endpoints
    someone else writes into EndpointSlices, when it has no selector)."""

    KIND: ClassVar[str] = "Service"
    meta: ObjectMeta
    ports: tuple[ServicePort, ...] = ()
    type: ServiceType = "ClusterIP"
    # None: no selector, so no derived EndpointSlices. Read-only; not part of the hash.
    selector: Mapping[str, str] | None = field(default=None, hash=False)
    cluster_ip: str | None = None  # requested or allocated IPv4, "None" (headless) or None
    session_affinity: SessionAffinity = "None"
    session_affinity_timeout_s: int = DEFAULT_CLIENT_IP_TIMEOUT_S
    external_traffic_policy: TrafficPolicy = "Cluster"
    internal_traffic_policy: TrafficPolicy = "Cluster"
    external_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()  # normalised CIDRs
    load_balancer_ingress: tuple[str, ...] = ()  # status.loadBalancer.ingress[].ip
    health_check_node_port: int | None = None
    allocate_load_balancer_node_ports: bool = True
    publish_not_ready_addresses: bool = False

    def __post_init__(self) -> None:
        if self.selector is not None:
            object.__setattr__(self, "selector", MappingProxyType(dict(self.selector)))

    @property
    def headless(self) -> bool:
        return self.cluster_ip == CLUSTER_IP_NONE

    def port(self, name: str) -> ServicePort:
        for port in self.ports:
            if port.name == name:
                return port
        raise KeyError(f'Service "{self.key}" has no port named "{name}"')


@dataclass(frozen=True)
class ObjectReference:
    """An endpoint's targetRef: the object behind it, usually a Pod."""

    kind: str
    namespace: str
    name: str


@dataclass(frozen=True)
class Endpoint:
    """endpoints[] of an EndpointSlice, conditions resolved (see the module's invariants).
    Consumers such as kube-proxy use the first address only."""

    addresses: tuple[str, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    target_ref: ObjectReference | None = None


@dataclass(frozen=True)
class EndpointPort:
    """ports[] of an EndpointSlice: matched to a Service port by name and protocol."""

    name: str
    port: int
    protocol: Protocol = "TCP"
    app_protocol: str | None = None


@dataclass(frozen=True)
class EndpointSlice(_Namespaced):
    """A discovery.k8s.io/v1 EndpointSlice: endpoints that share one set of ports."""

    KIND: ClassVar[str] = "EndpointSlice"
    meta: ObjectMeta
    address_type: AddressType = "IPv4"
    endpoints: tuple[Endpoint, ...] = ()
    ports: tuple[EndpointPort, ...] = ()

    @property
    def service_name(self) -> str | None:
        """The kubernetes.io/service-name label; every slice read or derived by podnet has it."""
        return self.meta.labels.get(SERVICE_NAME_LABEL)


# --- checks -------------------------------------------------------------------------------------


def ipv4_problem(value: str, *, special: bool = False) -> str | None:
    """Why `value` is not a usable IPv4 address, or None. Unless `special`, also refuse the
    addresses the API server refuses for externalIPs and endpoints (validateNonSpecialIP)."""
    try:
        ip = ipaddress.IPv4Address(value)
    except ValueError:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            return "must be a valid IPv4 address"
        return _IPV4_ONLY
    checks = ((ip.is_unspecified, "may not be unspecified (0.0.0.0)"),
              (ip.is_loopback, "may not be in the loopback range (127.0.0.0/8)"),
              (ip.is_link_local, "may not be in the link-local range (169.254.0.0/16)"),
              (ip in _LINK_LOCAL_MULTICAST,
               "may not be in the link-local multicast range (224.0.0.0/24)"))
    return None if special else next((message for bad, message in checks if bad), None)


def _check_ipv4(reader: FieldReader, key: str, value: str, *, special: bool = False) -> None:
    if problem := ipv4_problem(value, special=special):
        reader.fail(key, f"{problem}, got {_show(value)}")


def _cidr(reader: FieldReader, key: str, value: str) -> str:
    """A source range: like the API server, host bits may be set; kept in normalised form."""
    try:
        network = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        reader.fail(key, f"must be a CIDR such as 10.0.0.0/8, got {_show(value)}")
    if network.version != 4:
        reader.fail(key, f"{_IPV4_ONLY}, got {_show(value)}")
    return str(network)


# --- Service ------------------------------------------------------------------------------------


def parse_service(doc: FieldReader, meta: ObjectMeta) -> Service:
    spec = doc.mapping("spec", required=True)
    kind = spec.string("type", "ClusterIP", choices=SERVICE_TYPES + ("ExternalName",))
    if kind == "ExternalName":
        spec.fail("type", "ExternalName is not supported: it is a DNS CNAME only, kube-proxy "
                  "programs nothing for it and podnet has no cluster DNS")
    cluster_ip = _cluster_ip(spec, kind)
    external = kind != "ClusterIP"  # NodePort or LoadBalancer: reachable from outside the cluster
    ports = _service_ports(spec, kind, headless=cluster_ip == CLUSTER_IP_NONE)
    selector = spec.string_map("selector", labels=True) or None  # {} selects nothing, like nil

    affinity = spec.string("sessionAffinity", "None", choices=SESSION_AFFINITIES)
    timeout_s = DEFAULT_CLIENT_IP_TIMEOUT_S
    if affinity == "None" and spec.raw("sessionAffinityConfig") is not None:
        spec.fail("sessionAffinityConfig", "must not be set when session affinity is None")
    if affinity == "ClientIP":
        client_ip = spec.mapping("sessionAffinityConfig").mapping("clientIP")
        timeout_s = client_ip.integer("timeoutSeconds", DEFAULT_CLIENT_IP_TIMEOUT_S, low=1,
                                      high=MAX_CLIENT_IP_TIMEOUT_S)

    external_ips = spec.strings("externalIPs")
    for index, ip in enumerate(external_ips):
        _check_ipv4(spec, f"externalIPs[{index}]", ip)
    external_policy = spec.string("externalTrafficPolicy", choices=TRAFFIC_POLICIES)
    if external_policy is not None and not (external or external_ips):
        spec.fail("externalTrafficPolicy", "may only be set for externally-accessible services "
                  "(type NodePort or LoadBalancer, or with externalIPs), got "
                  f"{_show(external_policy)}")
    external_policy = external_policy or "Cluster"

    load_balancer = kind == "LoadBalancer"
    health_check_node_port = spec.integer("healthCheckNodePort", 0, low=0, high=65535) or None
    if health_check_node_port and not (load_balancer and external_policy == "Local"):
        spec.fail("healthCheckNodePort", "may only be set when `type` is 'LoadBalancer' and "
                  "`externalTrafficPolicy` is 'Local'")
    allocate_node_ports = spec.boolean("allocateLoadBalancerNodePorts")
    if allocate_node_ports is not None and not load_balancer:
        spec.fail("allocateLoadBalancerNodePorts", "may only be used when `type` is "
                  "'LoadBalancer'")

    return Service(
        meta, ports, kind, selector, cluster_ip,
        session_affinity=affinity,
        session_affinity_timeout_s=timeout_s,
        external_traffic_policy=external_policy,
        internal_traffic_policy=spec.string("internalTrafficPolicy", "Cluster",
                                            choices=TRAFFIC_POLICIES),
        external_ips=external_ips,
        load_balancer_source_ranges=_source_ranges(doc, spec, load_balancer),
        load_balancer_ingress=_ingress(doc, load_balancer),
        health_check_node_port=health_check_node_port,
        allocate_load_balancer_node_ports=True if allocate_node_ports is None
        else allocate_node_ports,
        publish_not_ready_addresses=spec.boolean("publishNotReadyAddresses", False),
    )


def _cluster_ip(spec: FieldReader, kind: str) -> str | None:
    """spec.clusterIP, with clusterIPs, ipFamilies and ipFamilyPolicy held to one IPv4 family."""
    cluster_ip = spec.string("clusterIP") or None  # "" is "allocate one", as in the API server
    cluster_ips = spec.strings("clusterIPs")
    if len(cluster_ips) > 1:
        spec.fail("clusterIPs", f"a second (dual-stack) cluster IP is {_IPV4_ONLY}, got "
                  f"{_show(list(cluster_ips))}")
    if cluster_ips and cluster_ip is not None and cluster_ips[0] != cluster_ip:
        spec.fail("clusterIPs[0]", f"must match spec.clusterIP {_show(cluster_ip)}, got "
                  f"{_show(cluster_ips[0])}")
    if cluster_ip is None and cluster_ips:
        cluster_ip = cluster_ips[0] or None
    key = "clusterIP" if spec.raw("clusterIP") else "clusterIPs[0]"
    if cluster_ip == CLUSTER_IP_NONE:
        if kind != "ClusterIP":
            spec.fail(key, f"may not be set to 'None' for {kind} services")
    elif cluster_ip is not None and (problem := ipv4_problem(cluster_ip, special=True)):
        spec.fail(key, f"must be empty, 'None', or a valid IPv4 address ({problem}), got "
                  f"{_show(cluster_ip)}")
    for index, family in enumerate(spec.strings("ipFamilies")):
        if family != "IPv4":
            spec.fail(f"ipFamilies[{index}]", f"{_IPV4_ONLY}, got {_show(family)}")
    policy = spec.string("ipFamilyPolicy", choices=("SingleStack", "PreferDualStack",
                                                    "RequireDualStack"))
    if policy == "RequireDualStack":
        spec.fail("ipFamilyPolicy", f"RequireDualStack is {_IPV4_ONLY}")
    return cluster_ip


def _service_ports(spec: FieldReader, kind: str, *, headless: bool) -> tuple[ServicePort, ...]:
    readers = spec.mappings("ports")
    if not readers and not headless:
        spec.fail("ports", "required: a Service needs at least one port (only a headless "
                  "Service, clusterIP None, may have none)")
    ports: list[ServicePort] = []
    first_use: dict[tuple[int, str], str] = {}
    first_node_port: dict[tuple[int, str], str] = {}
    for reader in readers:
        name = reader.string("name", "")
        if name:
            reader.check_name("name", name, dns1123_label_problem)
            if any(p.name == name for p in ports):
                reader.fail("name", f"duplicate value {_show(name)}")
        elif len(readers) > 1:
            reader.fail("name", "required when a Service has more than one port")
        number = reader.integer("port", required=True, low=1, high=65535)
        protocol = reader.string("protocol", "TCP", choices=PROTOCOLS)
        here = reader.at("")
        if (first := first_use.setdefault((number, protocol), here)) != here:
            reader.fail("", f"duplicate port {number}/{protocol}, already declared at {first}")
        node_port = None if reader.raw("nodePort") == 0 else reader.integer("nodePort", low=1,
                                                                             high=65535)
        if node_port is not None:
            if kind == "ClusterIP":
                reader.fail("nodePort", "may not be used when `type` is 'ClusterIP'")
            here = reader.at("nodePort")
            if (first := first_node_port.setdefault((node_port, protocol), here)) != here:
                reader.fail("nodePort", f"duplicate nodePort {node_port}/{protocol}, already "
                            f"declared at {first}")
        app_protocol = reader.string("appProtocol")
        if app_protocol is not None:
            reader.check_name("appProtocol", app_protocol, qualified_name_problem)
        ports.append(ServicePort(name, number, protocol, _target_port(reader, number), node_port,
                                 app_protocol))
    return tuple(ports)


def _target_port(reader: FieldReader, port: int) -> int | str:
    """targetPort: a number or a container port name (IANA_SVC_NAME); 0, "" or unset: `port`."""
    value = reader.raw("targetPort")
    if value is None or value == "" or (type(value) is int and value == 0):
        return port
    if type(value) is int and 1 <= value <= 65535:
        return value
    if isinstance(value, str) and not (problem := port_name_problem(value)):
        return value
    why = f" ({problem})" if isinstance(value, str) else ""
    reader.fail("targetPort", f"must be an integer between 1 and 65535 or a port name{why}, "
                f"got {_show(value)}")


def _source_ranges(doc: FieldReader, spec: FieldReader, load_balancer: bool) -> tuple[str, ...]:
    ranges = spec.strings("loadBalancerSourceRanges")
    reader, key = spec, "loadBalancerSourceRanges"
    if not ranges and (annotation := doc.mapping("metadata").mapping("annotations")
                       .string(SOURCE_RANGES_ANNOTATION)) is not None:
        ranges = tuple(part for part in annotation.split(",") if part.strip())
        reader, key = doc, f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"
    if ranges and not load_balancer:
        reader.fail(key, "may only be used when `type` is 'LoadBalancer'")
    indexed = key == "loadBalancerSourceRanges"
    return tuple(_cidr(reader, f"{key}[{index}]" if indexed else key, value)
                 for index, value in enumerate(ranges))


def _ingress(doc: FieldReader, load_balancer: bool) -> tuple[str, ...]:
    """status.loadBalancer.ingress[].ip. Hostname-only entries carry nothing kube-proxy programs,
    so they are checked and left out, as kube-proxy leaves them out."""
    status = doc.mapping("status").mapping("loadBalancer")
    entries = status.mappings("ingress")
    if entries and not load_balancer:
        status.fail("ingress", "may only be used when `spec.type` is 'LoadBalancer'")
    ips = []
    for entry in entries:
        if (hostname := entry.string("hostname")) is not None:
            entry.check_name("hostname", hostname, dns1123_subdomain_problem)
        if entry.string("ipMode", choices=("VIP", "Proxy")) == "Proxy":
            entry.fail("ipMode", "Proxy is not supported: podnet has no external load balancer "
                       "to leave the traffic to; use VIP")
        if (ip := entry.string("ip")) is not None:
            _check_ipv4(entry, "ip", ip, special=True)
            ips.append(ip)
    return tuple(ips)


# --- EndpointSlice ------------------------------------------------------------------------------


def parse_endpoint_slice(doc: FieldReader, meta: ObjectMeta) -> EndpointSlice:
    if SERVICE_NAME_LABEL not in meta.labels:
        doc.fail(f"metadata.labels[{SERVICE_NAME_LABEL}]", "required: it names the Service "
                 "whose endpoints these are (kube-proxy ignores slices without it)")
    address_type = doc.string("addressType", required=True, choices=("IPv4", "IPv6", "FQDN"))
    if address_type != "IPv4":
        doc.fail("addressType", f"{_show(address_type)} is {_IPV4_ONLY}")
    readers = doc.mappings("endpoints")
    if len(readers) > MAX_ENDPOINTS:
        doc.fail("endpoints", f"must have at most {MAX_ENDPOINTS} items, got {len(readers)}")
    endpoints = tuple(_endpoint(reader, meta.namespace) for reader in readers)
    ports: list[EndpointPort] = []
    for reader in doc.mappings("ports"):
        name = reader.string("name", "")
        if name:
            reader.check_name("name", name, dns1123_label_problem)
        if any(p.name == name for p in ports):
            reader.fail("name", f"duplicate value {_show(name)}")
        app_protocol = reader.string("appProtocol")
        if app_protocol is not None:
            reader.check_name("appProtocol", app_protocol, qualified_name_problem)
        if reader.raw("port") is None:  # valid in the API ("all ports"), useless to a proxy
            reader.fail("port", "required: podnet needs a port number (kube-proxy ignores "
                        "ports without one)")
        ports.append(EndpointPort(name, reader.integer("port", low=1, high=65535),
                                  reader.string("protocol", "TCP", choices=PROTOCOLS),
                                  app_protocol))
    return EndpointSlice(meta, "IPv4", endpoints, tuple(ports))


def _endpoint(reader: FieldReader, namespace: str) -> Endpoint:
    addresses = reader.strings("addresses")
    if not addresses:
        reader.fail("addresses", "required: must contain at least 1 address")
    if len(addresses) > MAX_ADDRESSES:
        reader.fail("addresses", f"must contain at most {MAX_ADDRESSES} addresses")
    for index, address in enumerate(addresses):
        _check_ipv4(reader, f"addresses[{index}]", address)
    conditions = reader.mapping("conditions")
    ready = conditions.boolean("ready", True)
    node_name = reader.string("nodeName")
    if node_name is not None:
        reader.check_name("nodeName", node_name, dns1123_subdomain_problem)
    target_ref = None
    if reader.raw("targetRef") is not None:
        ref = reader.mapping("targetRef")
        target_ref = ObjectReference(ref.string("kind", ""), ref.string("namespace", namespace),
                                     ref.string("name", required=True))
    return Endpoint(addresses, ready,
                    serving=conditions.boolean("serving", ready),
                    terminating=conditions.boolean("terminating", False),
                    node_name=node_name, zone=reader.string("zone"), target_ref=target_ref)
