"""One node in namespaces: real frames from real TAPs, real clients, through the Python datapath."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys

import pytest

from podnet.lab import LabConfig, run_lab

from .pods import BLOB_BYTES, BLOB_SEED, CLIENT, two_pods

pytestmark = pytest.mark.root

# Sends one Ethernet frame from the pod's eth0 with an AF_PACKET socket: argv = hex of the frame
RAW_SEND = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
s.send(bytes.fromhex(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    config = LabConfig(prefix="pn-e2", state_dir=str(tmp_path_factory.mktemp("state")))
    with run_lab(two_pods(), config) as lab:
        yield lab


def _port(stats, name):
    return next(p for p in stats.ports if p.name == name)


def test_pods_get_addresses_in_order_and_the_calico_style_route(lab):
    assert [lab.pod("client").ip, lab.pod("server").ip] == ["10.244.0.2", "10.244.0.3"]
    for name in ("client", "server"):
        netns = lab.pod(name).netns
        route = subprocess.run(["ip", "-n", netns, "route"], capture_output=True, text=True, check=True).stdout
        assert route.strip() == "default via 169.254.1.1 dev eth0 onlink"
        addr = subprocess.run(["ip", "-n", netns, "-4", "-o", "addr", "show", "eth0"], capture_output=True,
                              text=True, check=True).stdout
        assert f"inet {lab.pod(name).ip}/32" in addr


def test_20mb_over_tcp_bytes_verified_source_preserved_counted_by_podnet(lab):
    before = lab.statistics()
    server_ip, client_ip = lab.pod("server").ip, lab.pod("client").ip
    result = lab.exec("client", [sys.executable, "-c", CLIENT, server_ip], timeout_s=120)
    assert result.returncode == 0, result.stderr.decode()
    peer, length, digest = result.stdout.decode().split()
    expected = hashlib.sha256(random.Random(BLOB_SEED).randbytes(BLOB_BYTES)).hexdigest()
    assert (peer, int(length), digest) == (f"peer={client_ip}", BLOB_BYTES, expected)
    after = lab.statistics()
    # every byte reached the client through podnet's port for it (plus TCP/IP/Ethernet headers)
    delivered = _port(after, "default/client").tx_bytes - _port(before, "default/client").tx_bytes
    assert delivered > BLOB_BYTES
    assert after.fast_path_packets > before.fast_path_packets


def test_ping_the_gateway_and_between_pods(lab):
    before = lab.statistics()
    for target in ("169.254.1.1", lab.pod("server").ip):
        result = lab.exec("client", ["ping", "-c", "3", "-i", "0.2", "-W", "2", target])
        assert " 3 received" in result.stdout.decode(), result.stdout.decode()
    after = lab.statistics()
    assert after.icmp_sent - before.icmp_sent == 3  # the gateway's echo replies; pod-to-pod ones are forwarded


def test_no_route_and_ttl_expiry_answered_with_icmp(lab):
    before = lab.statistics()
    unreachable = lab.exec("client", ["ping", "-c", "1", "-W", "2", "10.99.0.1"]).stdout.decode()
    assert "Destination Net Unreachable" in unreachable and "From 169.254.1.1" in unreachable
    expired = lab.exec("client", ["ping", "-c", "1", "-W", "2", "-t", "1", lab.pod("server").ip]).stdout.decode()
    assert "Time to live exceeded" in expired
    drops = lab.statistics().drops
    assert drops.get("no_route", 0) - before.drops.get("no_route", 0) == 1
    assert drops.get("ttl_exceeded", 0) - before.drops.get("ttl_exceeded", 0) == 1


def test_a_bad_ipv4_checksum_is_a_counted_drop_not_forwarded(lab):
    from podnet.testing import frames
    client, server = lab.pod("client"), lab.pod("server")
    good = frames.udp(client.ip, server.ip, 40000, 9999, b"bad checksum", src_mac=client.mac)
    bad = frames.corrupt_ipv4_checksum(good)
    before = lab.statistics()
    result = lab.exec("client", [sys.executable, "-c", RAW_SEND, bad.hex()])
    assert result.returncode == 0, result.stderr.decode()
    for _ in range(100):  # the frame crosses the TAP asynchronously
        after = lab.statistics()
        if after.drops.get("ipv4_bad_checksum", 0) > before.drops.get("ipv4_bad_checksum", 0):
            break
        subprocess.run(["sleep", "0.02"])
    assert after.drops.get("ipv4_bad_checksum", 0) - before.drops.get("ipv4_bad_checksum", 0) == 1
    assert _port(after, "default/server").tx_packets == _port(before, "default/server").tx_packets
    # and the same frame with a good checksum does go through (the test can tell the difference)
    lab.exec("client", [sys.executable, "-c", RAW_SEND, good.hex()])
    for _ in range(100):
        if _port(lab.statistics(), "default/server").tx_packets > _port(before, "default/server").tx_packets:
            break
        subprocess.run(["sleep", "0.02"])
    assert _port(lab.statistics(), "default/server").tx_packets == _port(before, "default/server").tx_packets + 1


def test_status_reports_running_and_ready(lab):
    rows = {row["name"]: row for row in lab.status()}
    assert {r["phase"] for r in rows.values()} == {"Running"}
    assert rows["server"]["ready"] == "1/1" and rows["server"]["node"] == "node-1"
    assert rows["client"]["netns"] == "pn-e2client"


def test_a_trace_walks_the_first_packet_and_changes_nothing(lab):
    """podnet trace on one node: the SYN from the client is routed to the server's TAP; a port
    nobody routes, and a pod that does not exist, are answered as such."""
    import trio

    from podnet.errors import ConfigError
    from podnet.packet_trace import format_hops, trace_from_pod

    def trace(*args, **kw):
        return trio.from_thread.run_sync(lambda: trace_from_pod(lab.lab, *args, **kw), trio_token=lab._token)

    server, client = lab.pod("server"), lab.pod("client")
    before = lab.statistics()
    for proto in ("tcp", "udp", "icmp"):
        hops = trace("client", server.ip, dport=8080, proto=proto)
        assert len(hops) == 1 and hops[0].node == lab.config.node_name
        assert len(hops[0].outputs) == 1, format_hops(hops)
        assert hops[0].outputs[0].startswith(f"delivered to default/server (eth0, {server.mac}): IP {client.ip}")
        assert [s.stage for s in hops[0].trace.steps][:2] == ["eth", "ipv4"]
        assert hops[0].trace.steps[1].detail.startswith(f"{client.ip} > {server.ip} ")
    unroutable = trace("client", "10.250.0.1", dport=80)[0].outputs
    assert unroutable[-1] == "dropped: no_route (10.250.0.1)"
    # and the client is told so: ICMP destination unreachable from the gateway
    assert unroutable[0].startswith(f"delivered to default/client (eth0, {client.mac}): IP 169.254.1.1 > {client.ip}")
    with pytest.raises(ConfigError, match="no pod 'nosuch'"):
        trace("nosuch", server.ip)
    after = lab.statistics()
    assert (after.flows, after.slow_path_packets, after.dropped) == (before.flows, before.slow_path_packets,
                                                                     before.dropped)
