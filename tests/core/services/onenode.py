"""A one-node datapath with a Service backend, a client pod and one web pod, for the tests that run
a backend inside podnet's datapath without root."""

from __future__ import annotations

import dpkt

from podnet.core.datapath import Datapath, PortKind, Transmit
from podnet.core.services.kubeproxy import ProxyEndpoint, ProxyServicePort

CLIENT_MAC, WEB_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def one_node(backend_class, **kw):
    """(datapath, backend, client port, web port): web 10.96.0.10:80 -> 10.244.0.5:8080, and
    empty 10.96.0.99:80 with no endpoints; the client pod is 10.244.0.9."""
    dp = Datapath(node_cidr="10.244.0.0/24", node_ip="192.168.1.10")
    backend = backend_class(node_ips=["192.168.1.10"], local_addresses=dp.local_addresses, **kw)
    dp.set_backend(backend)
    client = dp.add_port("client", PortKind.POD, CLIENT_MAC, "10.244.0.9")
    web = dp.add_port("web", PortKind.POD, WEB_MAC, "10.244.0.5")
    backend.sync([
        ProxyServicePort("default", "web", "http", "TCP", "10.96.0.10", 80,
                         endpoints=(ProxyEndpoint("10.244.0.5", 8080, is_local=True),)),
        ProxyServicePort("default", "empty", "http", "TCP", "10.96.0.99", 80),
    ])
    return dp, backend, client, web


def ip_layer(action: Transmit) -> dpkt.ip.IP:
    return dpkt.ethernet.Ethernet(bytes(action.frame)).data
