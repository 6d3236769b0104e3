"""What a node would program for a set of manifests, computed without bringing anything up.

Layer: lab (cluster model + core; no namespaces, no TAPs, no root, no clock). `build_offline_node`
runs, in memory, the parts of `podnet.lab` that decide the Service rules:

    allocate_services (the API server's ClusterIPs and node ports)
    → IPAM in host-local's order (a `core.ipam.Pool` on the node CIDR, pods in manifest order, then
      each Deployment's first `replicas` pods, named as its controller names them; owner
      "namespace/name", interface eth0: what `Lab._plumb` asks of it)
    → every pod Ready → the EndpointSlice controller, plus the manifests' own EndpointSlices
    → kube-proxy's view for this node (`proxier.proxy_service_ports`)
    → the Service backend, synced once in full

Invariant: for the same manifests and the same `LabConfig`, the rules equal those of a lab brought
up from a fresh state directory once every pod is Ready (`podnet iptables-save` live and
`podnet iptables-save -f` agree, counters and the date line aside). A pod that a live lab never
gets Ready (a failing probe, a container that exits) is one way they differ; the other is a
Deployment's pods, which the lab plumbs as its controller creates them, so they get the same names
but their addresses can come in another order.

    node = build_offline_node(load_manifests(["pods.yaml"]))
    print(node.ruleset.save())
    node.trace(src="10.244.0.2", dst="10.96.0.10", proto="tcp", dport=80, all_branches=True)
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

from podnet.cluster.endpoints import PodStatus, derive_endpoint_slices
from podnet.cluster.ipalloc import ServiceIPAllocator, allocate_services
from podnet.cluster.manifest import load_manifests
from podnet.cluster.model import Manifests
from podnet.cluster.rollout import name_draws, new_pod, template_hash
from podnet.cluster.service import EndpointSlice
from podnet.core.datapath import Datapath
from podnet.core.ipam import MemoryStore, Pool
from podnet.core.services.base import ProxyServicePort, ServiceBackend, SyncReport
from podnet.core.services.iptables import Outcome, Ruleset
from podnet.core.services.registry import backend_class
from podnet.deployments import check_deployment
from podnet.errors import ConfigError
from podnet.inspection import trace_connection
from podnet.lab import LabConfig
from podnet.proxier import proxy_service_ports


@dataclass
class OfflineNode:
    """One node's Service state for a set of manifests, as plain data to read."""

    config: LabConfig
    manifests: Manifests                      # with ClusterIPs and node ports filled in
    pod_ips: dict[str, str]                   # "namespace/name" -> IP, in allocation order
    endpoint_slices: tuple[EndpointSlice, ...]
    service_ports: list[ProxyServicePort]
    backend: ServiceBackend                   # synced once, in full (iptables: has .ruleset)
    local_addresses: frozenset[int]           # the node's own addresses (addrtype LOCAL)
    sync: SyncReport

    @property
    def ruleset(self) -> Ruleset:
        ruleset = getattr(self.backend, "ruleset", None)
        if ruleset is None:
            raise ConfigError(f"the {self.config.backend} backend has no iptables rules")
        return ruleset

    def trace(self, *, src: str, dst: str, proto: str | int = "tcp", sport: int = 32768, dport: int = 0,
              all_branches: bool = False, local_ips: Sequence[str] | None = None) -> list[Outcome]:
        """The first packet of a connection through this node's rules (see `inspection`)."""
        rng = random.Random()
        rng.setstate(self.backend.rng.getstate())  # what the node's first draw would be
        local = self.local_addresses if local_ips is None else local_ips
        return trace_connection(self.ruleset, src=src, dst=dst, proto=proto, sport=sport, dport=dport,
                                local_addresses=local, all_branches=all_branches, rng=rng)


def build_offline_node(manifests: Manifests | Sequence[str | os.PathLike],
                       config: LabConfig | None = None) -> OfflineNode:
    """The Service rules `config`'s node would program for `manifests`, every pod Ready."""
    if not isinstance(manifests, Manifests):
        manifests = load_manifests(manifests)
    config = config or LabConfig()
    manifests = allocate_services(manifests, ServiceIPAllocator(config.service_cidr, seed=config.seed))
    ipam = Pool(config.node_cidr, name=config.node_name, store=MemoryStore())
    pods = list(manifests.pods)
    for deployment in manifests.deployments:  # the pods its controller creates first, named as the lab names them
        check_deployment(deployment)
        rng, pod_hash = name_draws(config.seed, deployment), template_hash(deployment.template)
        taken = {p.name for p in pods if p.namespace == deployment.namespace}
        for _ in range(deployment.replicas):
            pods.append(pod := new_pod(deployment, pod_hash, rng, taken))
            taken.add(pod.name)
    pod_ips = {f"{pod.meta.namespace}/{pod.meta.name}":
               str(ipam.allocate(f"{pod.meta.namespace}/{pod.meta.name}", "eth0").ip)
               for pod in pods}
    status = {key: PodStatus(ip=ip, ready=True, node_name=config.node_name) for key, ip in pod_ips.items()}
    slices = derive_endpoint_slices(manifests.services, pods, status, seed=config.seed)
    slices += tuple(manifests.endpoint_slices)
    ports = proxy_service_ports(manifests.services, slices, config.node_name)
    # the datapath decides which addresses are the node's own; ask it rather than repeat its rule
    local = Datapath(mode=config.mode, node_cidr=config.node_cidr, node_ip=config.node_ip).local_addresses
    backend = backend_class(config.backend)(
        cluster_cidr=config.cluster_cidr, node_ips=[config.node_ip], local_addresses=local,
        partial_sync=config.partial_sync, seed=config.seed)
    report = backend.sync(ports, full=True)
    return OfflineNode(config, manifests, pod_ips, slices, ports, backend, local, report)
