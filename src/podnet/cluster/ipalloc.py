"""ClusterIP and NodePort allocation, as the API server's Service registry does it on create.

Layer: cluster (no I/O, no clock). The service CIDR and the node-port range are parameters of the
allocators, never globals; `allocate_services` runs both over a `Manifests`, so its errors name
the file, the Service and the field.

Invariants:
- A value has at most one holder, and a requested value is honoured only if it is inside the range
  and free; otherwise a ConfigError names the object and the field (spec.clusterIP,
  spec.ports[i].nodePort, spec.healthCheckNodePort).
- The network and broadcast addresses are outside the range: never handed out, never requestable.
  The first address of the range is held from the start by Service "default/kubernetes" (the API
  server's own Service), so it is never handed out dynamically and only that Service gets it.
- Dynamic allocation is random but seeded (same seed and same calls give the same answers). As in
  KEP-3070 (ClusterIPs) and KEP-3668 (NodePorts), the range is split: a lower band is left for
  requested (static) values and dynamic picks come from the upper band - a random start, then the
  first free value scanning forward and wrapping within the band. Only when the upper band is full
  does a dynamic pick fall back to the lower band the same way. The lower band has
  min(max(16, size/16), 256) addresses, or min(max(16, size/32), 128) ports; none when the range
  has 16 or fewer values.
- Exhaustion raises IPAMExhausted naming the CIDR or the port range.

Kubernetes behaviour followed: pkg/registry/core/service/ipallocator and portallocator (bitmap
offsets, the random scan with an offset, "provided IP is already allocated", "provided port is not
in the valid range"), the registry's node-port assignment (ports of one Service with the same port
number share a node port; healthCheckNodePort for LoadBalancer + externalTrafficPolicy Local),
kube-apiserver's limit of a /12 on the service CIDR.
Differences: `allocate_services` takes every requested value before any random one, so the order
of manifests cannot make a requested address collide with an earlier random pick; the API server
handles Services one at a time in the order they are created.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from podnet.errors import ConfigError, IPAMExhausted

from .model import Manifests, describe
from .service import CLUSTER_IP_NONE, Service, ServicePort

DEFAULT_SERVICE_CIDR = "10.96.0.0/12"
DEFAULT_NODE_PORT_RANGE = "30000-32767"
KUBERNETES_SERVICE = 'Service "default/kubernetes"'  # holds the first address of the CIDR
MIN_SERVICE_PREFIXLEN = 12  # kube-apiserver: "for 32-bit addresses, the mask must be >= 12"


@dataclass(frozen=True)
class RangeStatistics:
    """How full an allocator is: `size` values, of which `static_band` form the lower band."""

    size: int
    static_band: int
    allocated: int
    free: int


def _static_band(size: int, step: int, most: int) -> int:
    """The lower band kept for requested values: min(max(16, size/step), most); 0 if size <= 16."""
    return 0 if size <= 16 else min(max(16, size // step), most)


class _Bitmap:
    """Offsets 0..size-1 and who holds each; the banded, seeded random scan of both allocators."""

    def __init__(self, size: int, band: int, seed: int | str) -> None:
        self.size, self.band = size, band
        self.holders: dict[int, str] = {}
        self._random = random.Random(seed)

    def next_free(self) -> int | None:
        for low, high in ((self.band, self.size), (0, self.band)):
            if span := high - low:
                start = self._random.randrange(span)
                for step in range(span):
                    if (at := low + (start + step) % span) not in self.holders:
                        return at
        return None

    def statistics(self) -> RangeStatistics:
        return RangeStatistics(self.size, self.band, len(self.holders),
                               self.size - len(self.holders))


class ServiceIPAllocator:
    """ClusterIPs from one IPv4 service CIDR. `owner` names the holder in errors, e.g.
    'Service "default/web"'; `where` (default: owner + ": spec.clusterIP") starts each message."""

    def __init__(self, cidr: str = DEFAULT_SERVICE_CIDR, *, seed: int | str = 0) -> None:
        try:
            network = IPv4Network(cidr)
        except ValueError as exc:
            raise ConfigError(f"service CIDR: must be an IPv4 CIDR ({exc}), got {cidr!r}") from None
        if network.prefixlen < MIN_SERVICE_PREFIXLEN:
            raise ConfigError(f"service CIDR {cidr} is too large: the mask must be >= "
                              f"{MIN_SERVICE_PREFIXLEN}")
        if network.prefixlen > 30:
            raise ConfigError(f"service CIDR {cidr} is too small: it has no usable address")
        self.cidr = network
        # Offset 0 is the address after the network address; the broadcast address is excluded.
        self._base = int(network.network_address) + 1
        size = network.num_addresses - 2
        self._bitmap = _Bitmap(size, _static_band(network.num_addresses, 16, 256), seed)
        self._bitmap.holders[0] = KUBERNETES_SERVICE

    @property
    def first(self) -> str:
        """The first usable address, which the kubernetes Service holds (10.96.0.1 by default)."""
        return str(IPv4Address(self._base))

    def allocate(self, owner: str, requested: str | None = None, *,
                 where: str | None = None) -> str:
        where = where or f"{owner}: spec.clusterIP"
        if requested is None and owner == KUBERNETES_SERVICE:
            requested = self.first
        if requested is None:
            if (offset := self._bitmap.next_free()) is None:
                raise IPAMExhausted(f"{where}: failed to allocate a serviceIP: range is full "
                                    f"(service CIDR {self.cidr}, {self._bitmap.size} addresses)")
        else:
            offset = self._offset(requested, where)
            if (holder := self._bitmap.holders.get(offset)) is not None:
                if holder == owner == KUBERNETES_SERVICE:
                    return requested
                raise ConfigError(f"{where}: provided IP is already allocated: {requested} is "
                                  f"held by {holder}")
        self._bitmap.holders[offset] = owner
        return str(IPv4Address(self._base + offset))

    def release(self, ip: str) -> None:
        """Give an address back; an address not held, or outside the range, is ignored."""
        try:
            offset = int(IPv4Address(ip)) - self._base
        except ValueError:
            return
        self._bitmap.holders.pop(offset, None)

    def holder(self, ip: str) -> str | None:
        return self._bitmap.holders.get(int(IPv4Address(ip)) - self._base)

    def allocated(self) -> dict[str, str]:
        """Address -> owner, in address order."""
        return {str(IPv4Address(self._base + offset)): owner
                for offset, owner in sorted(self._bitmap.holders.items())}

    def statistics(self) -> RangeStatistics:
        return self._bitmap.statistics()

    def _offset(self, requested: str, where: str) -> int:
        try:
            offset = int(IPv4Address(requested)) - self._base
        except ValueError:
            raise ConfigError(f"{where}: must be a valid IPv4 address, got {requested!r}") from None
        if not 0 <= offset < self._bitmap.size:
            raise ConfigError(f"{where}: the provided IP ({requested}) is not in the valid range. "
                              f"The range of valid IPs is {self.cidr} (without its network and "
                              "broadcast addresses)")
        return offset


class NodePortAllocator:
    """Node ports from one range ("30000-32767", kube-apiserver's --service-node-port-range).
    `where` (default: owner + ": nodePort") starts each error message."""

    def __init__(self, port_range: str = DEFAULT_NODE_PORT_RANGE, *, seed: int | str = 0) -> None:
        low, _, high = port_range.partition("-")
        try:
            self.low, self.high = int(low), int(high or low)
        except ValueError:
            self.low = self.high = 0
        if not 1 <= self.low <= self.high <= 65535:
            raise ConfigError("node port range: must be LOW-HIGH with 1 <= LOW <= HIGH <= 65535, "
                              f"got {port_range!r}")
        size = self.high - self.low + 1
        self._bitmap = _Bitmap(size, _static_band(size, 32, 128), seed)

    @property
    def port_range(self) -> str:
        return f"{self.low}-{self.high}"

    def allocate(self, owner: str, requested: int | None = None, *,
                 where: str | None = None) -> int:
        where = where or f"{owner}: nodePort"
        if requested is None:
            if (offset := self._bitmap.next_free()) is None:
                raise IPAMExhausted(f"{where}: failed to allocate a nodePort: range is full "
                                    f"(node port range {self.port_range})")
        else:
            offset = requested - self.low
            if not 0 <= offset < self._bitmap.size:
                raise ConfigError(f"{where}: provided port {requested} is not in the valid range. "
                                  f"The range of valid ports is {self.port_range}")
            if (holder := self._bitmap.holders.get(offset)) is not None:
                raise ConfigError(f"{where}: provided port is already allocated: {requested} is "
                                  f"held by {holder}")
        self._bitmap.holders[offset] = owner
        return self.low + offset

    def release(self, port: int) -> None:
        self._bitmap.holders.pop(port - self.low, None)

    def holder(self, port: int) -> str | None:
        return self._bitmap.holders.get(port - self.low)

    def allocated(self) -> dict[int, str]:
        return {self.low + offset: owner for offset, owner in sorted(self._bitmap.holders.items())}

    def statistics(self) -> RangeStatistics:
        return self._bitmap.statistics()


# --- every Service of a set ----------------------------------------------------------------------


def allocate_services(manifests: Manifests, ips: ServiceIPAllocator | None = None,
                      node_ports: NodePortAllocator | None = None) -> Manifests:
    """The same set with every Service's cluster IP, node ports and health-check node port filled
    in, as the API server fills them on create. Requested values are taken first for all
    Services, then random ones. The allocators (new default ones when not given) keep what they
    handed out; pass the same ones again only for Services they do not already hold values for."""
    ips = ips or ServiceIPAllocator()
    node_ports = node_ports or NodePortAllocator()

    def where(service: Service) -> str:
        origin = manifests.origins.get(service.object_key)
        return f"{origin.source}: {describe(service)}" if origin else describe(service)

    shared: list[dict[int, int]] = []  # per Service: port number -> its node port
    for service in manifests.services:  # first pass: requested values
        owner, prefix = describe(service), where(service)
        if service.cluster_ip not in (None, CLUSTER_IP_NONE):
            ips.allocate(owner, service.cluster_ip, where=f"{prefix}: spec.clusterIP")
        by_number: dict[int, int] = {}
        for index, port in enumerate(service.ports):
            if port.node_port is not None and by_number.get(port.port) != port.node_port:
                node_ports.allocate(owner, port.node_port,
                                    where=f"{prefix}: spec.ports[{index}].nodePort")
                by_number.setdefault(port.port, port.node_port)
        if service.health_check_node_port is not None:
            node_ports.allocate(owner, service.health_check_node_port,
                                where=f"{prefix}: spec.healthCheckNodePort")
        shared.append(by_number)

    services = []
    for service, by_number in zip(manifests.services, shared):  # second pass: random values
        owner, prefix = describe(service), where(service)
        cluster_ip = service.cluster_ip or ips.allocate(owner, where=f"{prefix}: spec.clusterIP")
        wants_node_ports = service.type == "NodePort" or (
            service.type == "LoadBalancer" and service.allocate_load_balancer_node_ports)
        ports: list[ServicePort] = []
        for index, port in enumerate(service.ports):
            node_port = port.node_port
            if node_port is None and wants_node_ports:
                node_port = by_number.get(port.port) or node_ports.allocate(
                    owner, where=f"{prefix}: spec.ports[{index}].nodePort")
                by_number[port.port] = node_port
            ports.append(dataclasses.replace(port, node_port=node_port))
        health_check = service.health_check_node_port
        if (health_check is None and service.type == "LoadBalancer"
                and service.external_traffic_policy == "Local"):
            health_check = node_ports.allocate(owner, where=f"{prefix}: spec.healthCheckNodePort")
        services.append(dataclasses.replace(service, cluster_ip=cluster_ip, ports=tuple(ports),
                                            health_check_node_port=health_check))
    return dataclasses.replace(manifests, services=tuple(services))
