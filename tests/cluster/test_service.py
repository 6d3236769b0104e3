"""Service and EndpointSlice manifests: good ones become model objects with the API server's
defaults, bad ones a ConfigError naming the file, the object and the field. No root; the only I/O
is reading tests/cluster/data."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from podnet.cluster.ipalloc import ServiceIPAllocator, allocate_services
from podnet.cluster.manifest import load_manifests, parse_manifests
from podnet.cluster.model import Manifests, ObjectMeta
from podnet.cluster.service import (Endpoint, EndpointPort, EndpointSlice, ObjectReference,
                                    Service, ServicePort)
from podnet.errors import ConfigError

DATA = Path(__file__).parent / "data"


def service_yaml(spec: str, name: str = "web", extra: str = "") -> str:
    """A Service in namespace default; `spec` and `extra` (top-level keys) are YAML."""
    return ("apiVersion: v1\nkind: Service\n"
            f"metadata: {{name: {name}}}\nspec:\n{textwrap.indent(textwrap.dedent(spec), '  ')}"
            f"{textwrap.dedent(extra)}")


def slice_yaml(body: str, labels: str = "{kubernetes.io/service-name: web}") -> str:
    return ("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
            f"metadata: {{name: web-abcde, labels: {labels}}}\n{textwrap.dedent(body)}")


def parse(text: str) -> Manifests:
    return parse_manifests(text, "svc.yaml")


# --- good manifests ----------------------------------------------------------------------------


def test_example_services_load():
    manifests = load_manifests([DATA / "services.yaml"])
    dns, web, shop, legacy = manifests.services

    assert dns.key == "kube-system/kube-dns"
    assert (dns.type, dns.cluster_ip, dict(dns.selector)) == (
        "ClusterIP", "10.96.0.10", {"k8s-app": "kube-dns"})
    assert dns.ports == (ServicePort("dns", 53, "UDP", 53),
                         ServicePort("dns-tcp", 53, "TCP", "dns-tcp"),
                         ServicePort("metrics", 9153, "TCP", 9153))
    assert dns.port("dns-tcp").target_port == "dns-tcp"
    assert (dns.session_affinity, dns.external_traffic_policy, dns.internal_traffic_policy) == (
        "None", "Cluster", "Cluster")

    assert web.type == "NodePort" and web.external_traffic_policy == "Local"
    assert web.ports == (ServicePort("http", 80, "TCP", "http", node_port=30080),)
    assert (web.session_affinity, web.session_affinity_timeout_s) == ("ClientIP", 600)
    assert web.cluster_ip is None  # allocated later, see test_ipalloc

    assert shop.type == "LoadBalancer"
    assert shop.ports == (ServicePort("", 443, "TCP", 8443, app_protocol="https"),)
    assert shop.load_balancer_source_ranges == ("203.0.113.0/24", "198.51.100.7/32")
    assert shop.load_balancer_ingress == ("198.51.100.20",)  # the hostname entry carries no IP
    assert shop.external_ips == ("192.0.2.10",)
    assert shop.allocate_load_balancer_node_ports is True

    assert legacy.selector is None
    (slice_,) = manifests.endpoint_slices
    assert slice_.service_name == "legacy-db" and slice_.key == "demo/legacy-db-1"
    assert slice_.ports == (EndpointPort("pg", 5432, "TCP"),)
    assert slice_.endpoints == (
        Endpoint(("10.244.1.5",), True, True, False, "node-a", "zone-a",
                 ObjectReference("Pod", "demo", "db-0")),
        Endpoint(("10.244.2.7",), ready=False, serving=True, terminating=True, node_name="node-b"),
        # serving unset follows ready; terminating unset is false
        Endpoint(("10.244.3.9",), ready=False, serving=False, terminating=False),
        # no conditions at all: ready and serving
        Endpoint(("10.244.3.10",), ready=True, serving=True, terminating=False),
    )


def test_service_defaults_follow_the_api_server():
    service = parse(service_yaml("ports: [{port: 8080}]\nsessionAffinity: ClientIP\n")).services[0]
    assert service == Service(ObjectMeta("web"), (ServicePort("", 8080, "TCP", 8080),),
                              session_affinity="ClientIP")
    assert service.session_affinity_timeout_s == 10800
    assert service.selector is None and not service.headless
    # targetPort 0 and "" mean "the port", as in SetDefaults_Service; nodePort 0 means unset
    port = parse(service_yaml("type: NodePort\nports: [{port: 80, targetPort: 0, nodePort: 0}]\n")
                 ).services[0].ports[0]
    assert (port.target_port, port.node_port) == (80, None)


def test_headless_service_may_have_no_ports_and_empty_selector_means_none():
    service = parse(service_yaml("clusterIP: None\nselector: {}\n")).services[0]
    assert service.headless and service.ports == () and service.selector is None


def test_externalips_make_a_clusterip_service_externally_accessible():
    service = parse(service_yaml("externalIPs: [192.0.2.1]\nexternalTrafficPolicy: Local\n"
                                 "ports: [{port: 80}]\n")).services[0]
    assert service.external_traffic_policy == "Local"


def test_source_ranges_annotation_is_honoured():
    text = service_yaml("type: LoadBalancer\nports: [{port: 80}]\n").replace(
        "metadata: {name: web}", "metadata: {name: web, annotations: "
        "{service.beta.kubernetes.io/load-balancer-source-ranges: '10.0.0.0/8, 192.168.1.1/24'}}")
    assert parse(text).services[0].load_balancer_source_ranges == ("10.0.0.0/8", "192.168.1.0/24")


def test_objects_are_immutable_and_hashable():
    service = load_manifests([DATA / "services.yaml"]).services[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        service.cluster_ip = "10.96.0.11"  # type: ignore[misc]
    with pytest.raises(TypeError):
        service.selector["k8s-app"] = "other"  # type: ignore[index]
    assert len({service, dataclasses.replace(service)}) == 1
    assert EndpointSlice(ObjectMeta("s")).service_name is None


def test_services_and_slices_merge_and_keep_their_origins():
    a = load_manifests([DATA / "services.yaml"])
    b = parse(service_yaml("ports: [{port: 80}]", name="other"))
    merged = a + b
    assert [s.name for s in merged.services] == ["kube-dns", "web", "shop", "legacy-db", "other"]
    assert merged.endpoint_slices == a.endpoint_slices
    assert merged.origins[b.services[0].object_key].source == "svc.yaml"
    with pytest.raises(ConfigError, match=r'Service "default/other": metadata\.name: duplicate'):
        merged + b


# --- bad manifests ------------------------------------------------------------------------------

LB = "type: LoadBalancer\n"
BAD = [
    # (id, manifest text, what the message must contain after "svc.yaml: ")
    ("service name is a DNS-1035 label", service_yaml("ports: [{port: 80}]", name="1web"),
     'Service "default/1web": metadata.name: a DNS-1035 label must consist of'),
    ("no spec", "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n",
     'Service "default/web": spec: required'),
    ("no ports", service_yaml("selector: {app: web}\n"),
     'Service "default/web": spec.ports: required'),
    ("port 0", service_yaml("ports: [{port: 0}]\n"),
     'Service "default/web": spec.ports[0].port: must be an integer between 1 and 65535, got 0'),
    ("port missing", service_yaml("ports: [{targetPort: 80}]\n"),
     "spec.ports[0].port: required"),
    ("unnamed ports when several", service_yaml("ports: [{name: a, port: 80}, {port: 81}]\n"),
     'Service "default/web": spec.ports[1].name: required when a Service has more than one port'),
    ("duplicate port name", service_yaml("ports: [{name: a, port: 80}, {name: a, port: 81}]\n"),
     'spec.ports[1].name: duplicate value "a"'),
    ("port name not a DNS label", service_yaml("ports: [{name: Http, port: 80}]\n"),
     "spec.ports[0].name: a lowercase RFC 1123 label must consist of"),
    ("duplicate port and protocol",
     service_yaml("ports: [{name: a, port: 80}, {name: b, port: 80, protocol: TCP}]\n"),
     'Service "default/web": spec.ports[1]: duplicate port 80/TCP, already declared at '
     "spec.ports[0]"),
    ("bad protocol", service_yaml("ports: [{port: 80, protocol: tcp}]\n"),
     'spec.ports[0].protocol: must be one of "TCP", "UDP", "SCTP", got "tcp"'),
    ("bad targetPort name", service_yaml("ports: [{port: 80, targetPort: http_alt}]\n"),
     'Service "default/web": spec.ports[0].targetPort: must be an integer between 1 and 65535 or '
     'a port name (must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)), got '
     '"http_alt"'),
    ("targetPort name too long", service_yaml("ports: [{port: 80, targetPort: http-alternative}]"),
     "spec.ports[0].targetPort: must be an integer between 1 and 65535 or a port name (must be "
     "no more than 15 characters)"),
    ("targetPort name without a letter", service_yaml("ports: [{port: 80, targetPort: '8080'}]\n"),
     "(must contain at least one letter (a-z)), got \"8080\""),
    ("targetPort out of range", service_yaml("ports: [{port: 80, targetPort: 65536}]\n"),
     "spec.ports[0].targetPort: must be an integer between 1 and 65535 or a port name, got 65536"),
    ("nodePort on ClusterIP", service_yaml("ports: [{port: 80, nodePort: 30080}]\n"),
     "Service \"default/web\": spec.ports[0].nodePort: may not be used when `type` is "
     "'ClusterIP'"),
    ("duplicate nodePort", service_yaml("type: NodePort\nports: [{name: a, port: 80, nodePort: "
                                        "30080}, {name: b, port: 81, nodePort: 30080}]\n"),
     "spec.ports[1].nodePort: duplicate nodePort 30080/TCP, already declared at "
     "spec.ports[0].nodePort"),
    ("ExternalName", service_yaml("type: ExternalName\nexternalName: db.example.com\n"),
     'spec.type: ExternalName is not supported'),
    ("unknown type", service_yaml("type: Ingress\nports: [{port: 80}]\n"),
     'spec.type: must be one of "ClusterIP", "NodePort", "LoadBalancer", "ExternalName", got '
     '"Ingress"'),
    ("clusterIP not an IP", service_yaml("clusterIP: 10.96.0.300\nports: [{port: 80}]\n"),
     "spec.clusterIP: must be empty, 'None', or a valid IPv4 address (must be a valid IPv4 "
     'address), got "10.96.0.300"'),
    ("IPv6 clusterIP", service_yaml("clusterIP: 'fd00::10'\nports: [{port: 80}]\n"),
     "spec.clusterIP: must be empty, 'None', or a valid IPv4 address (not supported: podnet is "
     "IPv4-only)"),
    ("headless NodePort", service_yaml("type: NodePort\nclusterIP: None\nports: [{port: 80}]\n"),
     "spec.clusterIP: may not be set to 'None' for NodePort services"),
    ("dual stack", service_yaml("ipFamilyPolicy: RequireDualStack\nports: [{port: 80}]\n"),
     "spec.ipFamilyPolicy: RequireDualStack is not supported: podnet is IPv4-only"),
    ("clusterIPs disagree", service_yaml("clusterIP: 10.96.0.5\nclusterIPs: [10.96.0.6]\n"
                                         "ports: [{port: 80}]\n"),
     'spec.clusterIPs[0]: must match spec.clusterIP "10.96.0.5", got "10.96.0.6"'),
    ("externalTrafficPolicy on ClusterIP",
     service_yaml("externalTrafficPolicy: Local\nports: [{port: 80}]\n"),
     'Service "default/web": spec.externalTrafficPolicy: may only be set for '
     'externally-accessible services (type NodePort or LoadBalancer, or with externalIPs), got '
     '"Local"'),
    ("bad externalTrafficPolicy", service_yaml("type: NodePort\nexternalTrafficPolicy: local\n"
                                               "ports: [{port: 80}]\n"),
     'spec.externalTrafficPolicy: must be one of "Cluster", "Local", got "local"'),
    ("bad internalTrafficPolicy", service_yaml("internalTrafficPolicy: Node\nports: [{port: 80}]"),
     'spec.internalTrafficPolicy: must be one of "Cluster", "Local", got "Node"'),
    ("timeout 0", service_yaml("sessionAffinity: ClientIP\nsessionAffinityConfig: "
                               "{clientIP: {timeoutSeconds: 0}}\nports: [{port: 80}]\n"),
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds: must be an integer between 1 and "
     "86400, got 0"),
    ("timeout too long", service_yaml("sessionAffinity: ClientIP\nsessionAffinityConfig: "
                                      "{clientIP: {timeoutSeconds: 86401}}\nports: [{port: 80}]"),
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds: must be an integer between 1 and 86400"),
    ("affinity config without ClientIP",
     service_yaml("sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}\nports: [{port: 80}]"),
     "spec.sessionAffinityConfig: must not be set when session affinity is None"),
    ("bad sessionAffinity", service_yaml("sessionAffinity: Cookie\nports: [{port: 80}]\n"),
     'spec.sessionAffinity: must be one of "None", "ClientIP", got "Cookie"'),
    ("bad sourceRange", service_yaml(LB + "loadBalancerSourceRanges: [10.0.0.0/33]\n"
                                          "ports: [{port: 80}]\n"),
     'Service "default/web": spec.loadBalancerSourceRanges[0]: must be a CIDR such as '
     '10.0.0.0/8, got "10.0.0.0/33"'),
    ("sourceRanges on NodePort", service_yaml("type: NodePort\nloadBalancerSourceRanges: "
                                              "[10.0.0.0/8]\nports: [{port: 80}]\n"),
     "spec.loadBalancerSourceRanges: may only be used when `type` is 'LoadBalancer'"),
    ("bad sourceRange annotation",
     service_yaml(LB + "ports: [{port: 80}]\n").replace(
         "metadata: {name: web}", "metadata: {name: web, annotations: "
         "{service.beta.kubernetes.io/load-balancer-source-ranges: 'ten/8'}}"),
     "metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges]: must be a "
     'CIDR such as 10.0.0.0/8, got "ten/8"'),
    ("loopback externalIP", service_yaml("externalIPs: [127.0.0.1]\nports: [{port: 80}]\n"),
     'spec.externalIPs[0]: may not be in the loopback range (127.0.0.0/8), got "127.0.0.1"'),
    ("healthCheckNodePort without Local", service_yaml(LB + "healthCheckNodePort: 30999\n"
                                                            "ports: [{port: 80}]\n"),
     "spec.healthCheckNodePort: may only be set when `type` is 'LoadBalancer' and "
     "`externalTrafficPolicy` is 'Local'"),
    ("allocateLoadBalancerNodePorts on NodePort",
     service_yaml("type: NodePort\nallocateLoadBalancerNodePorts: false\nports: [{port: 80}]\n"),
     "spec.allocateLoadBalancerNodePorts: may only be used when `type` is 'LoadBalancer'"),
    ("allocateLoadBalancerNodePorts not a bool",
     service_yaml(LB + "allocateLoadBalancerNodePorts: 'false'\nports: [{port: 80}]\n"),
     'spec.allocateLoadBalancerNodePorts: must be true or false (unquote it in YAML), got "false"'),
    ("ingress on ClusterIP",
     service_yaml("ports: [{port: 80}]\n",
                  extra="status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}\n"),
     "status.loadBalancer.ingress: may only be used when `spec.type` is 'LoadBalancer'"),
    ("bad ingress ip", service_yaml(LB + "ports: [{port: 80}]\n",
                                    extra="status: {loadBalancer: {ingress: [{ip: lb}]}}\n"),
     'status.loadBalancer.ingress[0].ip: must be a valid IPv4 address, got "lb"'),
    ("ingress ipMode Proxy", service_yaml(
        LB + "ports: [{port: 80}]\n",
        extra="status: {loadBalancer: {ingress: [{ip: 1.2.3.4, ipMode: Proxy}]}}\n"),
     "status.loadBalancer.ingress[0].ipMode: Proxy is not supported"),
    ("bad selector", service_yaml("selector: {app: -web}\nports: [{port: 80}]\n"),
     "spec.selector[app]: a valid label must be an empty string or consist of"),
    ("EndpointSlice with the wrong apiVersion",
     slice_yaml("addressType: IPv4\n").replace("discovery.k8s.io/v1", "v1"),
     'EndpointSlice "default/web-abcde": apiVersion: must be "discovery.k8s.io/v1" for kind '
     'EndpointSlice, got "v1"'),
    ("addressType IPv6", slice_yaml("addressType: IPv6\n"),
     'EndpointSlice "default/web-abcde": addressType: "IPv6" is not supported: podnet is '
     "IPv4-only"),
    ("addressType FQDN", slice_yaml("addressType: FQDN\n"),
     'addressType: "FQDN" is not supported'),
    ("addressType missing", slice_yaml("endpoints: []\n"),
     'EndpointSlice "default/web-abcde": addressType: required'),
    ("slice without service-name label", slice_yaml("addressType: IPv4\n", labels="{}"),
     'EndpointSlice "default/web-abcde": metadata.labels[kubernetes.io/service-name]: required'),
    ("endpoint without addresses", slice_yaml("addressType: IPv4\nendpoints: [{nodeName: a}]\n"),
     "endpoints[0].addresses: required: must contain at least 1 address"),
    ("endpoint address not IPv4",
     slice_yaml("addressType: IPv4\nendpoints: [{addresses: [10.0.0.1, 'fd00::1']}]\n"),
     'endpoints[0].addresses[1]: not supported: podnet is IPv4-only, got "fd00::1"'),
    ("endpoint address link-local",
     slice_yaml("addressType: IPv4\nendpoints: [{addresses: [169.254.1.1]}]\n"),
     "endpoints[0].addresses[0]: may not be in the link-local range (169.254.0.0/16)"),
    ("condition not a bool",
     slice_yaml("addressType: IPv4\nendpoints: [{addresses: [10.0.0.1], "
                "conditions: {ready: 'yes'}}]\n"),
     'endpoints[0].conditions.ready: must be true or false, got "yes"'),
    ("slice port without number", slice_yaml("addressType: IPv4\nports: [{name: http}]\n"),
     "ports[0].port: required: podnet needs a port number"),
    ("slice port duplicate name",
     slice_yaml("addressType: IPv4\nports: [{name: a, port: 1}, {name: a, port: 2}]\n"),
     'ports[1].name: duplicate value "a"'),
    ("slice port out of range", slice_yaml("addressType: IPv4\nports: [{port: 0}]\n"),
     "ports[0].port: must be an integer between 1 and 65535, got 0"),
]


@pytest.mark.parametrize(("text", "expected"), [pytest.param(t, e, id=i) for i, t, e in BAD])
def test_bad_manifest_names_file_object_and_field(text, expected):
    with pytest.raises(ConfigError) as raised:
        parse(text)
    assert str(raised.value).startswith("svc.yaml: ")
    assert expected in str(raised.value)


# --- errors found when addresses are allocated (they depend on the cluster's CIDR and range) ----


def test_cluster_ip_outside_the_cidr_names_file_object_and_field():
    manifests = parse(service_yaml("clusterIP: 10.0.0.10\nports: [{port: 80}]\n"))
    with pytest.raises(ConfigError) as raised:
        allocate_services(manifests)
    assert str(raised.value) == (
        'svc.yaml: Service "default/web": spec.clusterIP: the provided IP (10.0.0.10) is not in '
        "the valid range. The range of valid IPs is 10.96.0.0/12 (without its network and "
        "broadcast addresses)")
    # the CIDR is a parameter, not a global
    ok = allocate_services(manifests, ServiceIPAllocator("10.0.0.0/24"))
    assert ok.services[0].cluster_ip == "10.0.0.10"


def test_node_port_outside_the_range_names_file_object_and_field():
    manifests = parse(service_yaml("type: NodePort\nports: [{port: 80, nodePort: 8080}]\n"))
    with pytest.raises(ConfigError, match=(
            r'^svc\.yaml: Service "default/web": spec\.ports\[0\]\.nodePort: provided port 8080 '
            r"is not in the valid range\. The range of valid ports is 30000-32767$")):
        allocate_services(manifests)


def test_cluster_ip_taken_in_another_file_names_both(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(
            service_yaml("clusterIP: 10.96.0.50\nports: [{port: 80}]\n", name=name))
    with pytest.raises(ConfigError) as raised:
        allocate_services(load_manifests([tmp_path]))
    assert str(raised.value) == (
        f'{tmp_path / "b.yaml"}: Service "default/b": spec.clusterIP: provided IP is already '
        'allocated: 10.96.0.50 is held by Service "default/a"')
