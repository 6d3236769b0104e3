import errno
import ipaddress
import os
import select
import struct
import time

import pytest

from podnet.linux.names import tap_name
from podnet.linux.netns import create_netns, delete_netns, get_sysctl, popen_in_netns
from podnet.linux.pod import plumb_pod, unplumb_pod
from podnet.linux.tap import VIRTIO_NET_HDR_LEN, open_tap

pytestmark = pytest.mark.root

POD_IP = "10.244.0.7"
GATEWAY = "169.254.1.1"
GATEWAY_MAC = bytes.fromhex("eeeeeeeeeeee")
ETH_P_ARP, ETH_P_IP, ETH_P_IPV6 = 0x0806, 0x0800, 0x86DD
ARP_REQUEST, ARP_REPLY = 1, 2


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _ip4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def _read_frames(fd: int, header_len: int, want, timeout_s: float = 5.0):
    """Read frames until `want(frame)` is true; return (vnet header, frame, all frames seen)."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        data = os.read(fd, 65536)
        header, frame = data[:header_len], data[header_len:]
        seen.append(frame)
        if want(frame):
            return header, frame, seen
    raise AssertionError(f"no wanted frame in {len(seen)} frames read")


def _ethertype(frame: bytes) -> int:
    return struct.unpack_from("!H", frame, 12)[0]


def _is_arp_request_for_gateway(frame: bytes) -> bool:
    if _ethertype(frame) != ETH_P_ARP:
        return False
    op = struct.unpack_from("!H", frame, 14 + 6)[0]
    return op == ARP_REQUEST and frame[14 + 24 : 14 + 28] == _ip4(GATEWAY)


def _arp_reply(pod_mac: bytes) -> bytes:
    eth = pod_mac + GATEWAY_MAC + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, ARP_REPLY)
    arp += GATEWAY_MAC + _ip4(GATEWAY) + pod_mac + _ip4(POD_IP)
    return eth + arp


@pytest.fixture
def pod(lab):
    """A netns and a TAP for one pod; both gone afterwards."""
    created = []

    def make(*, offloads: bool = True):
        ns = lab.name("pod")
        create_netns(ns)
        tap = open_tap(tap_name(ns, prefix=lab.prefix), offloads=offloads)
        created.append((ns, tap))
        return ns, tap

    yield make
    for ns, tap in created:
        unplumb_pod(ns)
        tap.close()


def test_plumb_pod_is_what_calico_would_do(pod, ip):
    ns, tap = pod()
    mac = plumb_pod(tap, ns, POD_IP, mtu=1450)
    assert mac == tap.mac
    addr = ip("-n", ns, "-4", "addr", "show", "eth0")
    assert f"inet {POD_IP}/32 scope global eth0" in addr
    assert "mtu 1450" in addr
    assert ip("-n", ns, "route").strip() == f"default via {GATEWAY} dev eth0 onlink"
    assert "proto boot scope global onlink" in ip("-n", ns, "-d", "route", "show", "default")
    assert "<LOOPBACK,UP,LOWER_UP>" in ip("-n", ns, "link", "show", "lo")
    assert f"link/ether {mac} " in ip("-n", ns, "link", "show", "eth0")
    assert get_sysctl(ns, "net/ipv6/conf/eth0/disable_ipv6") == "1"
    assert "inet6" not in ip("-n", ns, "addr", "show", "eth0")
    assert tap.name not in ip("link")  # moved out of the root netns


@pytest.mark.parametrize("offloads", [True, False], ids=["offloads", "no-offloads"])
def test_frames_round_trip_through_the_fd(pod, ip, offloads):
    ns, tap = pod(offloads=offloads)
    mac = plumb_pod(tap, ns, POD_IP)
    ping = popen_in_netns(ns, ["ping", "-c1", "-W5", GATEWAY], stdout=-3, stderr=-3)
    try:
        # the fd keeps working after the device moved into the pod's netns
        header, frame, seen = _read_frames(tap.fd, tap.header_len, _is_arp_request_for_gateway)
        assert header == bytes(VIRTIO_NET_HDR_LEN)
        assert frame[:6] == b"\xff" * 6 and frame[6:12] == _mac(mac)
        assert frame[14 + 14 : 14 + 18] == _ip4(POD_IP)  # sender protocol address
        # disable_ipv6 before up: no router solicitation or MLD ahead of the ARP
        assert ETH_P_IPV6 not in {_ethertype(f) for f in seen}

        os.write(tap.fd, bytes(tap.header_len) + _arp_reply(_mac(mac)))
        # the pod now sends its echo request to the gateway's MAC
        _, echo, _ = _read_frames(
            tap.fd, tap.header_len,
            lambda f: _ethertype(f) == ETH_P_IP and f[14 + 9] == 1,  # ICMP
        )
        assert echo[:6] == GATEWAY_MAC and echo[14 + 16 : 14 + 20] == _ip4(GATEWAY)
        neigh = ip("-n", ns, "neigh", "show", GATEWAY)
        assert "lladdr ee:ee:ee:ee:ee:ee" in neigh
    finally:
        ping.kill()
        ping.wait()


def test_deleting_the_netns_takes_the_tap_with_it(pod, ip):
    ns, tap = pod()
    plumb_pod(tap, ns, POD_IP)
    unplumb_pod(ns)
    unplumb_pod(ns)  # idempotent
    with pytest.raises(OSError) as info:
        for _ in range(100):  # the netns is torn down by a kernel worker, soon after
            os.write(tap.fd, bytes(tap.header_len) + _arp_reply(b"\x02" * 6))
            time.sleep(0.02)
    assert info.value.errno == errno.EBADFD
    tap.close()


def test_plumb_pod_never_creates_a_netns(lab):
    missing = lab.name("missing")
    with open_tap(tap_name("x", prefix=lab.prefix)) as tap:
        with pytest.raises(FileNotFoundError):
            plumb_pod(tap, missing, POD_IP)
    assert delete_netns(missing) is False
