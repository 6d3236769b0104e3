"""The EndpointSlice controller and kube-proxy's view of its slices. Pure data in and out: no
root, no clock."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from podnet.cluster.endpoints import (CONTROLLER_NAME, EndpointInfo, PodStatus,
                                      derive_endpoint_slices, endpoints_for)
from podnet.cluster.manifest import load_manifests
from podnet.cluster.model import (Container, ContainerPort, ObjectMeta, Pod,
                                  dns1123_subdomain_problem)
from podnet.cluster.service import (Endpoint, EndpointPort, EndpointSlice, ObjectReference,
                                    Service, ServicePort)
from podnet.errors import ConfigError

DATA = Path(__file__).parent / "data"


def pod(name: str, labels: dict[str, str] | None = None, *, namespace: str = "default",
        ports: tuple[ContainerPort, ...] = (), node: str | None = None) -> Pod:
    return Pod(ObjectMeta(name, namespace, labels or {}),
               (Container("app", command=("sleep", "infinity"), ports=ports),), node_name=node)


def web_service(*ports: ServicePort, namespace: str = "default", **fields) -> Service:
    return Service(ObjectMeta("web", namespace, {"team": "a"}),
                   ports or (ServicePort("http", 80, "TCP", 8080),),
                   selector={"app": "web"}, **fields)


HTTP = (ContainerPort(8080, "http"),)
WEB = {"app": "web"}


def derive(services, pods, status, **kwargs):
    return derive_endpoint_slices(services, pods, status, **kwargs)


# --- selection ----------------------------------------------------------------------------------


def test_label_selection_namespace_and_ip():
    pods = [pod("web-2", {"app": "web", "tier": "x"}), pod("web-1", WEB),
            pod("other", {"app": "db"}), pod("elsewhere", WEB, namespace="shop"),
            pod("no-ip", WEB), pod("no-status", WEB)]
    status = {"default/web-1": PodStatus("10.244.0.3", ready=True, node_name="node-a",
                                         zone="z1"),
              "default/web-2": PodStatus("10.244.0.2", ready=True),
              "default/other": PodStatus("10.244.0.4", ready=True),
              "shop/elsewhere": PodStatus("10.244.0.5", ready=True),
              "default/no-ip": PodStatus(None, ready=True)}
    (slice_,) = derive([web_service()], pods, status)
    assert slice_.namespace == "default" and slice_.address_type == "IPv4"
    assert slice_.ports == (EndpointPort("http", 8080, "TCP"),)
    # namespace/name order; node from the status, else from the pod's spec.nodeName
    assert slice_.endpoints == (
        Endpoint(("10.244.0.3",), True, True, False, "node-a", "z1",
                 ObjectReference("Pod", "default", "web-1")),
        Endpoint(("10.244.0.2",), True, True, False, None, None,
                 ObjectReference("Pod", "default", "web-2")),
    )
    (shop,) = derive([web_service(namespace="shop")], pods, status)
    assert [e.target_ref.name for e in shop.endpoints] == ["elsewhere"]


def test_node_name_falls_back_to_the_pod_spec():
    (slice_,) = derive([web_service()], [pod("w", WEB, node="node-b")],
                       {"default/w": PodStatus("10.244.1.2", ready=True)})
    assert slice_.endpoints[0].node_name == "node-b"


def test_service_without_selector_gets_no_slices():
    service = Service(ObjectMeta("db"), (ServicePort("", 5432),))
    assert derive([service], [pod("db", WEB)], {"default/db": PodStatus("10.0.0.1", True)}) == ()


# --- conditions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("ready", "terminating", "expected"), [
    (True, False, (True, True, False)),
    (False, False, (False, False, False)),
    (True, True, (False, True, True)),    # still passing its readiness probe while it drains
    (False, True, (False, False, True)),
])
def test_conditions_follow_readiness_and_termination(ready, terminating, expected):
    (slice_,) = derive([web_service()], [pod("w", WEB)],
                       {"default/w": PodStatus("10.244.0.2", ready, terminating)})
    endpoint = slice_.endpoints[0]
    assert (endpoint.ready, endpoint.serving, endpoint.terminating) == expected


def test_readiness_change_flips_conditions_and_keeps_slice_names():
    service, pods = web_service(), [pod("w", WEB)]
    before = derive([service], pods, {"default/w": PodStatus("10.244.0.2", ready=False)})
    after = derive([service], pods, {"default/w": PodStatus("10.244.0.2", ready=True)})
    assert (before[0].endpoints[0].ready, after[0].endpoints[0].ready) == (False, True)
    assert (before[0].endpoints[0].serving, after[0].endpoints[0].serving) == (False, True)
    assert before[0].name == after[0].name


def test_publish_not_ready_addresses_marks_everything_ready():
    (slice_,) = derive([web_service(publish_not_ready_addresses=True)], [pod("w", WEB)],
                       {"default/w": PodStatus("10.244.0.2", ready=False, terminating=True)})
    endpoint = slice_.endpoints[0]
    assert (endpoint.ready, endpoint.serving, endpoint.terminating) == (True, False, True)


# --- ports --------------------------------------------------------------------------------------


def test_named_target_port_is_resolved_per_pod_and_grouped():
    service = web_service(ServicePort("http", 80, "TCP", "http"),
                          ServicePort("metrics", 9090, "TCP", "metrics"),
                          ServicePort("raw", 7000, "TCP", 7000))
    pods = [pod("a", WEB, ports=(ContainerPort(8080, "http"), ContainerPort(9100, "metrics"))),
            pod("b", WEB, ports=(ContainerPort(8080, "http"), ContainerPort(9100, "metrics"))),
            pod("c", WEB, ports=(ContainerPort(8081, "http"), ContainerPort(9100, "metrics"))),
            pod("d", WEB, ports=(ContainerPort(8080, "http"),)),  # no metrics port
            pod("e", WEB, ports=(ContainerPort(8080, "http", "UDP"),))]  # wrong protocol
    status = {f"default/{p.name}": PodStatus(f"10.244.0.{i}", True) for i, p in enumerate(pods)}
    slices = derive([service], pods, status)
    grouped = {s.ports: [e.target_ref.name for e in s.endpoints] for s in slices}
    raw = EndpointPort("raw", 7000)
    assert grouped == {
        (EndpointPort("http", 8080), EndpointPort("metrics", 9100), raw): ["a", "b"],
        (EndpointPort("http", 8081), EndpointPort("metrics", 9100), raw): ["c"],
        (EndpointPort("http", 8080), raw): ["d"],
        (raw,): ["e"],  # a numeric targetPort needs no declaration
    }
    # kube-proxy's view: each port gets exactly the pods that serve it, on their own number.
    view = endpoints_for(service, slices)
    assert sorted((e.ip, e.port) for e in view[service.port("http")]) == [
        ("10.244.0.0", 8080), ("10.244.0.1", 8080), ("10.244.0.2", 8081), ("10.244.0.3", 8080)]
    assert len(view[service.port("metrics")]) == 3
    assert len(view[service.port("raw")]) == 5


def test_ports_carry_the_service_port_name_protocol_and_app_protocol():
    service = web_service(ServicePort("dns", 53, "UDP", "dns", app_protocol="dns"))
    pods = [pod("w", WEB, ports=(ContainerPort(5353, "dns", "UDP"),))]
    (slice_,) = derive([service], pods, {"default/w": PodStatus("10.244.0.2", True)})
    assert slice_.ports == (EndpointPort("dns", 5353, "UDP", "dns"),)


def test_max_endpoints_per_slice_splits_a_group():
    pods = [pod(f"w{i:02}", WEB) for i in range(5)]
    status = {p.key: PodStatus(f"10.244.0.{i + 2}", True) for i, p in enumerate(pods)}
    slices = derive([web_service()], pods, status, max_endpoints_per_slice=2)
    assert [len(s.endpoints) for s in slices] == [2, 2, 1]
    assert len({s.name for s in slices}) == 3
    with pytest.raises(ConfigError, match="max_endpoints_per_slice"):
        derive([web_service()], pods, status, max_endpoints_per_slice=0)


def test_service_selecting_nothing_gets_a_placeholder_slice():
    (slice_,) = derive([web_service()], [], {})
    assert (slice_.endpoints, slice_.ports) == ((), ())
    assert endpoints_for(web_service(), [slice_]) == {web_service().ports[0]: ()}


# --- names and labels ---------------------------------------------------------------------------


def test_slice_names_and_labels():
    headless = Service(ObjectMeta("db", labels={"team": "a", "kubernetes.io/service-name": "x"}),
                       (), selector={"app": "db"}, cluster_ip="None")
    long_name = Service(ObjectMeta("s" * 63), (ServicePort("", 80),), selector=WEB)
    slices = derive([web_service(), headless, long_name], [], {}, seed=42)
    web, db, long_slice = slices
    assert re.fullmatch(r"web-[bcdfghjklmnpqrstvwxz2456789]{5}", web.name)
    assert dict(web.meta.labels) == {"team": "a", "kubernetes.io/service-name": "web",
                                     "endpointslice.kubernetes.io/managed-by": CONTROLLER_NAME}
    assert web.service_name == "web"
    assert dict(db.meta.labels) == {"team": "a", "kubernetes.io/service-name": "db",
                                    "endpointslice.kubernetes.io/managed-by": CONTROLLER_NAME,
                                    "service.kubernetes.io/headless": ""}
    assert len(long_slice.name) == 63 and long_slice.name.startswith("s" * 58)
    assert all(dns1123_subdomain_problem(s.name) is None for s in slices)
    assert derive([web_service()], [], {}, seed=42)[0].name == web.name
    assert derive([web_service()], [], {}, seed=43)[0].name != web.name


# --- kube-proxy's view ----------------------------------------------------------------------------


def test_endpoints_for_user_written_slices():
    manifests = load_manifests([DATA / "services.yaml"])
    legacy = next(s for s in manifests.services if s.name == "legacy-db")
    view = endpoints_for(legacy, manifests.endpoint_slices)
    assert view == {legacy.ports[0]: (
        EndpointInfo("10.244.1.5", 5432, True, True, False, "node-a", "zone-a"),
        EndpointInfo("10.244.2.7", 5432, False, True, True, "node-b", None),
        EndpointInfo("10.244.3.9", 5432, False, False, False, None, None),
        EndpointInfo("10.244.3.10", 5432, True, True, False, None, None),
    )}


def test_endpoints_for_matches_name_protocol_namespace_and_deduplicates():
    service = Service(ObjectMeta("dns", "kube-system"),
                      (ServicePort("dns", 53, "UDP"), ServicePort("dns-tcp", 53, "TCP")))
    labels = {"kubernetes.io/service-name": "dns"}

    def slice_(name, namespace, ports, *addresses):
        return EndpointSlice(ObjectMeta(name, namespace, labels),
                             endpoints=tuple(Endpoint((a, "10.9.9.9")) for a in addresses),
                             ports=ports)
    slices = [
        slice_("dns-b", "kube-system", (EndpointPort("dns", 53, "UDP"),), "10.0.0.2", "10.0.0.3"),
        slice_("dns-a", "kube-system", (EndpointPort("dns", 53, "UDP"),), "10.0.0.2"),
        # the wrong protocol, then another namespace
        slice_("dns-c", "kube-system", (EndpointPort("dns", 53, "TCP"),), "10.0.0.4"),
        slice_("dns-d", "default", (EndpointPort("dns", 53, "UDP"),), "10.0.0.5"),
        slice_("dns-e", "kube-system", (EndpointPort("dns-tcp", 5353, "TCP"),), "10.0.0.6"),
    ]
    view = endpoints_for(service, slices)
    assert [(e.ip, e.port) for e in view[service.port("dns")]] == [("10.0.0.2", 53),
                                                                   ("10.0.0.3", 53)]
    assert [(e.ip, e.port) for e in view[service.port("dns-tcp")]] == [("10.0.0.6", 5353)]
