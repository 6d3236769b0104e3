"""kube-proxy's view for a node (`podnet.proxier.proxy_service_ports`): each Service gets the slices
labelled with its name in its own namespace, and nothing else, however many Services there are."""

from __future__ import annotations

from podnet.cluster.model import ObjectMeta
from podnet.cluster.service import (SERVICE_NAME_LABEL, Endpoint, EndpointPort, EndpointSlice,
                                    Service, ServicePort)
from podnet.proxier import proxy_service_ports


def _service(name: str, namespace: str, ip: str) -> Service:
    return Service(ObjectMeta(name, namespace), (ServicePort("http", 80, "TCP", 8080),), cluster_ip=ip)


def _slice(name: str, namespace: str, service: str | None, *addresses: str) -> EndpointSlice:
    labels = {SERVICE_NAME_LABEL: service} if service else {}
    return EndpointSlice(ObjectMeta(name, namespace, labels),
                         endpoints=tuple(Endpoint((a,), node_name="node-1") for a in addresses),
                         ports=(EndpointPort("http", 8080, "TCP"),))


def test_each_service_gets_only_its_own_slices():
    services = [_service("web", "default", "10.96.0.10"), _service("web", "shop", "10.96.0.11"),
                _service("db", "default", "10.96.0.12")]
    slices = [_slice("web-b", "default", "web", "10.244.0.3"), _slice("web-a", "default", "web", "10.244.0.2"),
              _slice("web-x", "shop", "web", "10.244.0.4"),
              _slice("stray", "default", None, "10.244.0.9"),          # no service-name label: nobody's
              _slice("db-a", "other", "db", "10.244.0.8")]             # another namespace's "db"
    ports = {(p.namespace, p.name): p for p in proxy_service_ports(services, iter(slices), "node-1")}
    assert [(e.ip, e.port, e.is_local) for e in ports["default", "web"].endpoints] == [
        ("10.244.0.2", 8080, True), ("10.244.0.3", 8080, True)]
    assert [e.ip for e in ports["shop", "web"].endpoints] == ["10.244.0.4"]
    assert ports["default", "db"].endpoints == ()


def test_many_services_each_get_their_own_slice():
    # 5,000 Services with a slice each (the grouping keeps this linear; no time is asserted)
    n = 5000
    services = [_service(f"svc-{i}", "bench", f"10.96.{i // 250}.{i % 250 + 1}") for i in range(n)]
    slices = [_slice(f"svc-{i}-a", "bench", f"svc-{i}", f"10.245.{i // 250}.{i % 250 + 1}") for i in range(n)]
    ports = proxy_service_ports(services, slices, "node-1")
    assert [p.endpoints[0].ip for p in ports[:2]] == ["10.245.0.1", "10.245.0.2"]
    assert all(len(p.endpoints) == 1 for p in ports)
