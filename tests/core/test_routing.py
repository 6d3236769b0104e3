"""Longest-prefix match, checked against a brute-force search over the route list with `ipaddress`."""

from __future__ import annotations

import ipaddress
import random

import pytest

from podnet.core.packet import ip_int
from podnet.core.routing import Route, RouteTable


def table_with_four_lengths() -> RouteTable:
    rt = RouteTable()
    rt.add("0.0.0.0/0", 1)
    rt.add("10.244.0.0/16", 2)
    rt.add("10.244.0.0/24", 3)
    rt.add("10.244.0.5/32", 4)
    return rt


def port_of(rt: RouteTable, dst: str) -> int | None:
    route = rt.lookup(ip_int(dst))
    return None if route is None else route.port


@pytest.mark.parametrize("dst, port", [
    ("10.244.0.5", 4),
    ("10.244.0.6", 3),
    ("10.244.0.0", 3),
    ("10.244.0.255", 3),
    ("10.244.1.5", 2),
    ("10.244.255.255", 2),
    ("10.245.0.5", 1),
    ("8.8.8.8", 1),
    ("0.0.0.0", 1),
    ("255.255.255.255", 1),
])
def test_most_specific_route_wins(dst, port):
    assert port_of(table_with_four_lengths(), dst) == port


def test_insertion_order_does_not_matter():
    rt = RouteTable()
    rt.add("10.244.0.5/32", 4)
    rt.add("10.244.0.0/24", 3)
    rt.add("0.0.0.0/0", 1)
    rt.add("10.244.0.0/16", 2)
    assert [port_of(rt, d) for d in ("10.244.0.5", "10.244.0.6", "10.244.9.9", "1.1.1.1")] == [4, 3, 2, 1]


def test_lookup_returns_the_route():
    rt = RouteTable()
    added = rt.add("10.96.0.0/12", 7, via="192.168.1.1")
    route = rt.lookup(ip_int("10.100.3.4"))
    assert route == added == Route(ip_int("10.96.0.0"), 12, 7, ip_int("192.168.1.1"), "unicast")
    assert rt.lookup(ip_int("10.112.0.0")) is None        # just past the /12


def test_empty_table_and_no_match():
    rt = RouteTable()
    assert rt.lookup(ip_int("10.0.0.1")) is None
    rt.add("10.244.0.0/24", 1)
    assert rt.lookup(ip_int("10.244.1.0")) is None
    assert len(rt) == 1


def test_remove_falls_back_to_the_next_most_specific():
    rt = table_with_four_lengths()
    removed = rt.remove("10.244.0.5/32")
    assert removed.port == 4
    assert port_of(rt, "10.244.0.5") == 3
    rt.remove("10.244.0.0/24")
    assert port_of(rt, "10.244.0.5") == 2
    rt.remove("10.244.0.0/16")
    assert port_of(rt, "10.244.0.5") == 1
    rt.remove("0.0.0.0/0")
    assert port_of(rt, "10.244.0.5") is None
    assert len(rt) == 0 and rt.routes() == []


def test_remove_one_of_several_routes_of_a_length():
    rt = RouteTable()
    rt.add("10.244.0.0/24", 1)
    rt.add("10.244.1.0/24", 2)
    rt.remove("10.244.0.0/24")
    assert port_of(rt, "10.244.1.9") == 2 and port_of(rt, "10.244.0.9") is None


def test_remove_a_missing_route():
    rt = table_with_four_lengths()
    version = rt.version
    assert rt.remove("10.244.0.6/32") is None       # a length that exists, a network that does not
    assert rt.remove("10.0.0.0/8") is None          # a length that does not exist
    assert rt.version == version and len(rt) == 4


def test_add_replaces_the_route_of_the_same_prefix():
    rt = RouteTable()
    rt.add("10.244.0.0/24", 1)
    rt.add("10.244.0.0/24", 2, via="10.0.0.1")
    assert len(rt) == 1
    assert rt.lookup(ip_int("10.244.0.1")) == Route(ip_int("10.244.0.0"), 24, 2, ip_int("10.0.0.1"))


def test_remove_port():
    rt = table_with_four_lengths()
    rt.add("10.244.0.7/32", 4)
    rt.add("10.96.0.0/12", 3)
    assert rt.remove_port(4) == 2
    assert port_of(rt, "10.244.0.5") == 3 and port_of(rt, "10.244.0.7") == 3
    assert sorted((r.prefixlen, r.port) for r in rt.routes()) == [(0, 1), (12, 3), (16, 2), (24, 3)]
    assert rt.remove_port(4) == 0
    assert rt.remove_port(3) == 2
    assert port_of(rt, "10.244.0.5") == 2 and port_of(rt, "10.100.0.1") == 1


def test_version_bumps_on_every_change():
    rt = RouteTable()
    versions = [rt.version]
    rt.add("10.0.0.0/8", 1)
    versions.append(rt.version)
    rt.add("10.0.0.0/8", 2)                   # a replacement is a change
    versions.append(rt.version)
    rt.remove("10.0.0.0/8")
    versions.append(rt.version)
    rt.add("10.1.0.0/16", 1)
    rt.add("10.2.0.0/16", 1)
    before = rt.version
    rt.remove_port(1)
    versions.append(rt.version)
    assert versions[:4] == [0, 1, 2, 3]
    assert rt.version > before
    rt.lookup(ip_int("10.1.0.1"))
    rt.routes()
    assert rt.version == versions[-1]         # reads do not bump


def test_non_network_cidr_is_rejected():
    rt = RouteTable()
    with pytest.raises(ValueError):
        rt.add("10.244.0.1/24", 1)
    assert len(rt) == 0 and rt.version == 0


def test_routes_are_listed_longest_prefix_first():
    rt = table_with_four_lengths()
    assert [r.prefixlen for r in rt.routes()] == [32, 24, 16, 0]


def test_route_str_reads_like_ip_route():
    assert str(Route(0, 0, 1)) == "default port 1"
    assert str(Route(ip_int("10.244.0.5"), 32, 4)) == "10.244.0.5 port 4"
    assert str(Route(ip_int("10.244.0.0"), 24, 3, ip_int("10.0.0.1"))) == "10.244.0.0/24 via 10.0.0.1 port 3"
    assert str(Route(ip_int("169.254.1.1"), 32, 0, kind="local")) == "local 169.254.1.1 port 0"


# --- randomized cross-check against brute force ---------------------------------------------------

def brute_force(model: dict[ipaddress.IPv4Network, int], dst: int) -> tuple[ipaddress.IPv4Network, int] | None:
    addr = ipaddress.IPv4Address(dst)
    matches = [(net, port) for net, port in model.items() if addr in net]
    return max(matches, key=lambda m: m[0].prefixlen, default=None)


def random_network(rng: random.Random) -> ipaddress.IPv4Network:
    # few distinct lengths, as on a node, plus some odd ones; addresses clustered so prefixes nest
    length = rng.choice([0, 8, 12, 16, 16, 20, 24, 24, 24, 25, 28, 31, 32, 32, 32, rng.randrange(33)])
    base = rng.choice([0x0AF40000, 0x0A600000, 0xC0A80000, rng.getrandbits(32)])
    addr = base | rng.getrandbits(16) if rng.random() < 0.8 else rng.getrandbits(32)
    return ipaddress.IPv4Network((addr & ((0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF), length))


def probe_addresses(rng: random.Random, model) -> list[int]:
    nets = list(model)
    probes = []
    for _ in range(1500):
        if nets and rng.random() < 0.7:
            net = rng.choice(nets)    # inside some route, often inside several nested ones
            probes.append(int(net.network_address) + rng.randrange(net.num_addresses))
        else:
            probes.append(rng.getrandbits(32))
    return probes


@pytest.mark.parametrize("seed", range(5))
def test_lookup_agrees_with_brute_force(seed):
    rng = random.Random(seed)
    rt = RouteTable()
    model: dict[ipaddress.IPv4Network, int] = {}
    for step in range(6):
        for _ in range(rng.randrange(20, 120)):
            net = random_network(rng)
            port = rng.randrange(1, 50)
            rt.add(str(net), port)
            model[net] = port
        for net in rng.sample(list(model), k=len(model) // 3):   # remove a third, some twice
            assert rt.remove(str(net)).port == model.pop(net)
            assert rt.remove(str(net)) is None
        if step == 3 and model:                                  # and a whole port
            port = rng.choice(list(model.values()))
            gone = [n for n, p in model.items() if p == port]
            assert rt.remove_port(port) == len(gone)
            for n in gone:
                del model[n]
        assert len(rt) == len(model)
        assert {(ipaddress.IPv4Network((r.network, r.prefixlen)), r.port) for r in rt.routes()} == set(model.items())
        for dst in probe_addresses(rng, model):
            expected = brute_force(model, dst)
            route = rt.lookup(dst)
            if expected is None:
                assert route is None, ipaddress.IPv4Address(dst)
            else:
                net, port = expected
                assert route is not None, ipaddress.IPv4Address(dst)
                assert (route.network, route.prefixlen, route.port) == (int(net.network_address), net.prefixlen, port)
