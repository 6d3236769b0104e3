"""Flannel's leases and the entries flanneld derives from them, as data and as `ip`/`bridge` print them
(tests/linux/test_overlay_interop.py checks the same lines against a real kernel)."""

from __future__ import annotations

import json

import pytest

from podnet.core.overlay.flannel import (
    ANNOTATION_PREFIX,
    FdbEntry,
    FlannelNode,
    Lease,
    NeighEntry,
    RouteEntry,
    device_name,
)
from podnet.errors import ConfigError

OWN = Lease("10.244.1.0/24", "192.0.2.1", "0a:58:c0:00:02:01")
TWO = Lease("10.244.2.0/24", "192.0.2.2", "0A:58:C0:00:02:02")
THREE = Lease("10.244.3.0/24", "192.0.2.3", "0a:58:c0:00:02:03")


def test_a_lease_is_normalised_as_flanneld_writes_it():
    assert TWO.vtep_mac == "0a:58:c0:00:02:02"  # Go's net.HardwareAddr prints lower case
    assert (TWO.subnet, TWO.public_ip, TWO.gateway, TWO.vni) == ("10.244.2.0/24", "192.0.2.2", "10.244.2.0", 1)


def test_etcd_key_and_value_are_flanneld_s():
    key, value = TWO.to_etcd()
    assert key == "/coreos.com/network/subnets/10.244.2.0-24"
    assert value == ('{"PublicIP":"192.0.2.2","PublicIPv6":null,"BackendType":"vxlan",'
                     '"BackendData":{"VNI":1,"VtepMAC":"0a:58:c0:00:02:02"}}')
    assert TWO.etcd_key("/kube-flannel/network") == "/kube-flannel/network/subnets/10.244.2.0-24"
    assert Lease.from_etcd(key, value) == TWO
    assert Lease.from_etcd(key, value.encode()) == TWO


def test_from_etcd_reads_what_other_flannel_versions_write():
    # older flanneld: no PublicIPv6; dual stack: the key carries the v6 subnet too
    old = '{"PublicIP":"192.0.2.2","BackendType":"vxlan","BackendData":{"VtepMAC":"0A:58:C0:00:02:02","VNI":1}}'
    assert Lease.from_etcd("/coreos.com/network/subnets/10.244.2.0-24", old) == TWO
    dual = Lease.from_etcd("/coreos.com/network/subnets/10.244.2.0-24&fc00:0:0:2::-64", json.loads(old))
    assert dual == TWO


@pytest.mark.parametrize("key, value, message", [
    ("/coreos.com/network/subnets/10.244.2.0", "{}", "expected <network>-<prefixlen>"),
    ("/coreos.com/network/subnets/10.244.2.0-24", "{nope", "not JSON"),
    ("/coreos.com/network/subnets/10.244.2.0-24", "[]", "expected a JSON object"),
    ("/coreos.com/network/subnets/10.244.2.0-24", '{"BackendData":{"VtepMAC":"0a:58:c0:00:02:02"}}', "PublicIP"),
    ("/coreos.com/network/subnets/10.244.2.0-24", '{"PublicIP":"192.0.2.2","BackendData":{}}', "VtepMAC"),
    ("/coreos.com/network/subnets/10.244.2.0-24", '{"PublicIP":"192.0.2.2","BackendData":{"VtepMAC":"zz"}}',
     "VtepMAC 'zz'"),
    ("/coreos.com/network/subnets/10.244.2.9-24", TWO.to_etcd()[1], "subnet '10.244.2.9/24'"),  # host bits
])
def test_bad_leases_are_config_errors_that_say_what(key, value, message):
    with pytest.raises(ConfigError, match=message):
        Lease.from_etcd(key, value)


@pytest.mark.parametrize("kw, field", [
    ({"public_ip": "192.0.2.300"}, "PublicIP"), ({"vtep_mac": "0a:58"}, "VtepMAC"), ({"vni": 1 << 24}, "VNI"),
    # what a lease's JSON may hold where a string or a number belongs (Go's json refuses them too)
    ({"vtep_mac": 5}, "VtepMAC"), ({"vtep_mac": None}, "VtepMAC"), ({"vni": True}, "VNI"), ({"vni": "1"}, "VNI"),
])
def test_bad_fields_are_named(kw, field):
    args = {"subnet": "10.244.2.0/24", "public_ip": "192.0.2.2", "vtep_mac": "0a:58:c0:00:02:02", **kw}
    with pytest.raises(ConfigError, match=field):
        Lease(**args)


def test_kube_subnet_manager_annotations_round_trip():
    notes = TWO.annotations()
    assert notes == {
        ANNOTATION_PREFIX + "backend-data": '{"VNI":1,"VtepMAC":"0a:58:c0:00:02:02"}',
        ANNOTATION_PREFIX + "backend-type": "vxlan",
        ANNOTATION_PREFIX + "kube-subnet-manager": "true",
        ANNOTATION_PREFIX + "public-ip": "192.0.2.2",
    }
    assert Lease.from_node("10.244.2.0/24", notes) == TWO
    with pytest.raises(ConfigError, match="public-ip"):
        Lease.from_node("10.244.2.0/24", {k: v for k, v in notes.items() if not k.endswith("public-ip")})


def node() -> FlannelNode:
    n = FlannelNode(OWN)
    assert n.add_lease(THREE) and n.add_lease(TWO)
    return n


def test_what_flanneld_programs_for_each_remote_lease():
    n = node()
    assert n.device == device_name(1) == "flannel.1" and n.address == "10.244.1.0/32" and n.mtu == 1450
    assert n.neighbours() == (NeighEntry("10.244.2.0", "0a:58:c0:00:02:02", "flannel.1"),
                              NeighEntry("10.244.3.0", "0a:58:c0:00:02:03", "flannel.1"))
    assert n.fdb() == (FdbEntry("0a:58:c0:00:02:02", "192.0.2.2", "flannel.1"),
                       FdbEntry("0a:58:c0:00:02:03", "192.0.2.3", "flannel.1"))
    assert n.routes() == (RouteEntry("10.244.2.0/24", "10.244.2.0", "flannel.1"),
                          RouteEntry("10.244.3.0/24", "10.244.3.0", "flannel.1"))


def test_rendered_as_ip_and_bridge_print_them():
    n = node()
    assert n.show_routes() == ["10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink",
                               "10.244.3.0/24 via 10.244.3.0 dev flannel.1 onlink"]
    assert n.show_neighbours() == ["10.244.2.0 dev flannel.1 lladdr 0a:58:c0:00:02:02 PERMANENT",
                                   "10.244.3.0 dev flannel.1 lladdr 0a:58:c0:00:02:03 PERMANENT"]
    assert n.show_fdb() == ["0a:58:c0:00:02:02 dev flannel.1 dst 192.0.2.2 self permanent",
                            "0a:58:c0:00:02:03 dev flannel.1 dst 192.0.2.3 self permanent"]
    # flanneld's order per lease: ARP, FDB, then the route (the kernel would ARP for .0 otherwise)
    assert n.commands()[:3] == [
        "ip neigh replace 10.244.2.0 lladdr 0a:58:c0:00:02:02 dev flannel.1 nud permanent",
        "bridge fdb replace 0a:58:c0:00:02:02 dev flannel.1 dst 192.0.2.2 self permanent",
        "ip route replace 10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink",
    ]
    assert len(n.commands()) == 6


def test_resolve_walks_route_neighbour_fdb():
    n = node()
    assert n.resolve("10.244.2.7") == ("0a:58:c0:00:02:02", "192.0.2.2")
    assert n.resolve("10.244.3.255") == ("0a:58:c0:00:02:03", "192.0.2.3")
    assert n.resolve("10.244.1.7") is None   # our own subnet: local pods, not the tunnel
    assert n.resolve("10.245.0.1") is None


def test_lease_events():
    n = node()
    assert not n.add_lease(OWN)                                   # our own lease is not a remote
    assert not n.add_lease(TWO)                                   # nothing changed
    assert not n.add_lease(Lease("10.244.4.0/24", "192.0.2.4", "0a:58:c0:00:02:04", backend_type="host-gw"))
    moved = Lease("10.244.2.0/24", "192.0.2.22", "0a:58:c0:00:02:22")  # the node came back elsewhere
    assert n.add_lease(moved)
    assert n.resolve("10.244.2.7") == ("0a:58:c0:00:02:22", "192.0.2.22")
    assert len(n.leases()) == 2
    assert n.remove_lease("10.244.3.0/24") == THREE
    assert n.remove_lease("10.244.3.0/24") is None
    assert n.show_routes() == ["10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink"]


def test_subnet_env_and_mtu():
    n = FlannelNode(OWN, underlay_mtu=9000, ip_masq=True)
    assert n.subnet_env() == ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n"
                              "FLANNEL_MTU=8950\nFLANNEL_IPMASQ=true\n")
    with pytest.raises(ConfigError, match="not inside the network"):
        FlannelNode(OWN, network="10.245.0.0/16")
    assert FlannelNode(Lease("10.244.1.0/24", "192.0.2.1", "0a:58:c0:00:02:01", vni=7)).device == "flannel.7"
