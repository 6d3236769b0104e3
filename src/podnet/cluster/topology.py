"""A cluster of nodes as data: which nodes, their underlay addresses, and which pod runs where.

Layer: cluster (plain data, no I/O). The Node objects of the manifests are the cluster's nodes, in
manifest order; `plan_cluster` gives each one its place on the underlay and places every pod, as
the scheduler would, before anything is brought up:

    node i (1-based)   underlay address: its status.addresses InternalIP, else <underlay>.(10 + i)
                       uplink MAC 02:00:<address>; VTEP MAC 0e:00:<address> (locally administered,
                       derived so that a restarted node comes back with the same ones - flanneld
                       draws a random VtepMAC and reuses its lease's)
                       pod CIDR: the subnet it asks the Flannel subnet manager for (as flanneld asks
                       for the one in its subnet.env): its spec.podCIDR if set, else the i-th /24 of
                       the cluster CIDR (10.244.i.0/24); the store leases another if that is taken
    a pod              spec.nodeName if set (it must name a Node of the manifests); else the node
                       with the fewest pods so far, the first such in manifest order (the
                       scheduler's spreading, without resources or affinities)
    a Deployment       not here: its controller in the control plane (podnet.cluster_deployments)
                       creates its pods as the cluster runs, each on the template's nodeName, else
                       on the registered node with the fewest pods then; a nodeName is checked here
    the external       a host outside the cluster on the underlay segment, where NodePort and
    client             LoadBalancer traffic comes from: ClusterConfig.external_ip, else the lowest
                       host address no node holds (<underlay>.1); never a node's address, a
                       LoadBalancer ingress IP or an externalIP of the manifests; MAC 02:00:<address>

`ClusterConfig` is what every node of one cluster shares: the pod network (vxlan as Flannel's
vxlan backend, or direct as Flannel's host-gw: each node routes the others' pod CIDRs via their
underlay addresses), the Service backend, the store and the naming.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field

from podnet.errors import ConfigError

from .model import Manifests, Node, Pod, describe

NETWORKS = ("vxlan", "direct")
# the Flannel backend type each network is: a lease's BackendType and the network config's Backend
FLANNEL_BACKENDS = {"vxlan": "vxlan", "direct": "host-gw"}
FIRST_HOST = 10   # node i holds <underlay network> + 10 + i


@dataclass(frozen=True)
class ClusterConfig:
    """What the nodes of one cluster share. `store` None is the embedded store (every node in this
    process); `etcd://HOST:PORT` is a real etcd (one process per node, `podnet node join`)."""

    network: str = "vxlan"
    backend: str = "iptables"
    store: str | None = None
    prefix: str = "pn-"
    state_dir: str | None = None        # per node: <state_dir>/nodes/<node>/ (journal, IPAM, logs)
    persist_ipam: bool = True           # host-local's files: a restarted node's pods keep their addresses
    offloads: bool = True
    vnet_hdr: bool = True
    udp_tunnel_gso: bool = True         # vxlan: whole super-frames between podnet nodes when the kernel can
    underlay_cidr: str = "172.18.0.0/24"
    underlay_mtu: int = 1500
    cluster_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/12"
    vxlan_port: int = 4789               # IANA's; Flannel's (the kernel's default) is 8472
    vni: int = 1
    external_ip: str | None = None       # the external client on the underlay (default: its lowest free host)
    node_lease_ttl_s: int = 40           # the kubelet's node lease, renewed every ttl / 4
    min_sync_period_s: float = 1.0
    grace_period_s: float | None = None
    seed: int = 0
    backend_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise ConfigError(f"--network: must be one of {', '.join(NETWORKS)}, got {self.network!r}")
        try:
            ipaddress.IPv4Network(self.underlay_cidr, strict=True)
        except ValueError as exc:
            raise ConfigError(f"ClusterConfig.underlay_cidr {self.underlay_cidr!r}: {exc}") from None
        if self.external_ip is not None:
            try:
                ipaddress.IPv4Address(self.external_ip)
            except ValueError:
                raise ConfigError(f"ClusterConfig.external_ip: not an IPv4 address, got {self.external_ip!r}") from None

    @property
    def flannel_backend(self) -> str:
        return FLANNEL_BACKENDS[self.network]

    @property
    def heartbeat_s(self) -> float:
        return self.node_lease_ttl_s / 4


@dataclass(frozen=True)
class NodeSpec:
    """One node as the cluster plan has it."""

    name: str
    ip: str                      # on the underlay: the node's address, Flannel's PublicIP
    uplink_mac: str
    vtep_mac: str
    pod_cidr: str | None = None  # the subnet it asks for (spec.podCIDR)
    index: int = 1

    def node_object(self, pod_cidr: str | None = None) -> Node:
        """The Node object it registers: its leased pod CIDR and its InternalIP."""
        from .model import NodeAddress, ObjectMeta
        return Node(ObjectMeta(self.name, ""), pod_cidr=pod_cidr or self.pod_cidr,
                    addresses=(NodeAddress("InternalIP", self.ip),))


def _mac(first: int, ip: str) -> str:
    return ":".join(f"{b:02x}" for b in (first, 0, *ipaddress.IPv4Address(ip).packed))


def node_specs(nodes: tuple[Node, ...], underlay_cidr: str, cluster_cidr: str = ClusterConfig.cluster_cidr,
               subnet_len: int = 24) -> list[NodeSpec]:
    net = ipaddress.IPv4Network(underlay_cidr)
    pod_net = ipaddress.IPv4Network(cluster_cidr)
    subnets = list(pod_net.subnets(new_prefix=subnet_len)) if subnet_len >= pod_net.prefixlen else []
    specs: list[NodeSpec] = []
    seen: dict[str, str] = {}
    for index, node in enumerate(nodes, start=1):
        internal = [a.address for a in node.addresses if a.type == "InternalIP"]
        ip = internal[0] if internal else str(net.network_address + FIRST_HOST + index)
        where = f'Node "{node.name}"'
        try:
            address = ipaddress.IPv4Address(ip)
        except ValueError:
            raise ConfigError(f"{where}: status.addresses InternalIP: not an IPv4 address, got {ip!r}") from None
        if address not in net or address in (net.network_address, net.broadcast_address):
            raise ConfigError(f"{where}: underlay address {ip} is not a host address of the underlay {net}")
        if ip in seen:
            raise ConfigError(f'{where}: underlay address {ip} is also Node "{seen[ip]}"\'s')
        seen[ip] = node.name
        wanted = node.pod_cidr or (str(subnets[index]) if index < len(subnets) else None)
        specs.append(NodeSpec(node.name, ip, _mac(0x02, ip), _mac(0x0E, ip), wanted, index))
    return specs


@dataclass(frozen=True)
class ExternalSpec:
    """The external client as the plan has it: a host on the underlay segment, outside the cluster."""

    ip: str
    mac: str
    prefixlen: int            # the underlay's: node addresses and LoadBalancer IPs are on-link


def external_spec(specs: list[NodeSpec] | tuple[NodeSpec, ...], manifests: Manifests, underlay_cidr: str,
                  wanted: str | None = None) -> ExternalSpec:
    """The external client's address (see the module): `wanted`, else the lowest host address of
    the underlay that no node, LoadBalancer ingress IP or externalIP holds."""
    net = ipaddress.IPv4Network(underlay_cidr)
    taken = {spec.ip: f'Node "{spec.name}"\'s address' for spec in specs}
    for svc in manifests.services:
        for ip in svc.load_balancer_ingress:
            taken.setdefault(ip, f"a LoadBalancer ingress IP of Service {svc.key}")
        for ip in svc.external_ips:
            taken.setdefault(ip, f"an externalIP of Service {svc.key}")
    if wanted is not None:
        address = ipaddress.IPv4Address(wanted)
        if address not in net or address in (net.network_address, net.broadcast_address):
            raise ConfigError(f"ClusterConfig.external_ip {wanted} is not a host address of the underlay {net}")
        if wanted in taken:
            raise ConfigError(f"ClusterConfig.external_ip {wanted} is {taken[wanted]}")
        ip = wanted
    else:
        ip = next((str(a) for a in net.hosts() if str(a) not in taken), None)
        if ip is None:
            raise ConfigError(f"the underlay {net} has no address left for the external client")
    return ExternalSpec(ip, _mac(0x02, ip), net.prefixlen)


@dataclass(frozen=True)
class ClusterPlan:
    nodes: tuple[NodeSpec, ...]
    manifests: Manifests                     # every pod with spec.nodeName set
    external: ExternalSpec | None = None     # the external client on the underlay

    def node(self, name: str) -> NodeSpec:
        for spec in self.nodes:
            if spec.name == name:
                return spec
        raise KeyError(f"no node {name!r} (nodes: {', '.join(n.name for n in self.nodes)})")

    def pods_of(self, node: str) -> tuple[Pod, ...]:
        return tuple(p for p in self.manifests.pods if p.node_name == node)


def plan_cluster(manifests: Manifests, underlay_cidr: str = ClusterConfig.underlay_cidr,
                 cluster_cidr: str = ClusterConfig.cluster_cidr, *, external_ip: str | None = None) -> ClusterPlan:
    """Addresses for the Nodes of `manifests` and the external client, and a node for every pod
    (see the module)."""
    if not manifests.nodes:
        raise ConfigError("a cluster needs Node objects in the manifests (kind: Node, one per node)")
    specs = node_specs(manifests.nodes, underlay_cidr, cluster_cidr)
    names = [s.name for s in specs]
    load = {name: 0 for name in names}

    def where(obj) -> str:
        origin = manifests.origins.get(obj.object_key)
        return f"{origin.source}: {describe(obj)}" if origin else describe(obj)

    def check(obj, node_name: str) -> str:
        if node_name not in load:
            raise ConfigError(f'{where(obj)}: spec.nodeName: node "{node_name}" not found '
                              f"(the manifests' Nodes: {', '.join(names)})")
        return node_name

    def least() -> str:
        return min(names, key=lambda name: load[name])   # min keeps the first of equals

    pods = []
    for pod in manifests.pods:
        node = check(pod, pod.node_name) if pod.node_name else least()
        load[node] += 1
        pods.append(pod if pod.node_name == node else dataclasses.replace(pod, node_name=node))
    for deployment in manifests.deployments:
        if deployment.template.node_name:
            check(deployment, deployment.template.node_name)
    placed_manifests = dataclasses.replace(manifests, pods=tuple(pods))
    external = external_spec(specs, manifests, underlay_cidr, external_ip)
    return ClusterPlan(tuple(specs), placed_manifests, external)


__all__ = ["ClusterConfig", "ClusterPlan", "ExternalSpec", "FLANNEL_BACKENDS", "NETWORKS", "NodeSpec",
           "external_spec", "node_specs", "plan_cluster"]
