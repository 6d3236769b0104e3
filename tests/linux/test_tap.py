import errno
import os
import subprocess

import pytest

from podnet.linux.names import tap_name
from podnet.linux.tap import (
    OFFLOAD_PROBE_ORDER,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    open_tap,
    probe_offloads,
)

pytestmark = pytest.mark.root

UNKNOWN_OFFLOAD_BIT = 0x4000_0000  # no kernel knows it: TUNSETOFFLOAD says EINVAL


def _details(ip, name: str) -> str:
    return ip("-d", "link", "show", "dev", name)


def test_open_tap_with_offloads(lab, ip):
    name = tap_name("pod-a", prefix=lab.prefix)
    with open_tap(name, mtu=1400) as tap:
        details = _details(ip, name)
        assert "tun type tap pi off vnet_hdr on persist off" in details
        assert "mtu 1400" in details
        assert f"link/ether {tap.mac} " in details
        assert tap.vnet_hdr and tap.header_len == 10
        assert tap.offloads in OFFLOAD_PROBE_ORDER
        # any kernel since 2.6.27 takes the whole set
        assert tap.offloads == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        with pytest.raises(BlockingIOError):
            os.read(tap.fd, 65536)
    assert tap.closed
    with pytest.raises(subprocess.CalledProcessError):
        _details(ip, name)  # not persistent: gone with the fd


def test_open_tap_without_offloads_keeps_the_vnet_header(lab, ip):
    name = tap_name("pod-b", prefix=lab.prefix)
    with open_tap(name, offloads=False) as tap:
        assert "vnet_hdr on" in _details(ip, name)
        assert tap.offloads == 0 and tap.header_len == 10


def test_open_tap_without_vnet_header_requests_no_offloads(lab, ip):
    name = tap_name("pod-c", prefix=lab.prefix)
    with open_tap(name, vnet_hdr=False) as tap:
        assert "vnet_hdr off" in _details(ip, name)
        assert tap.offloads == 0 and tap.header_len == 0


def test_offloads_are_probed_past_einval(lab):
    with open_tap(tap_name("pod-d", prefix=lab.prefix)) as tap:
        wanted = TUN_F_CSUM | TUN_F_TSO4
        assert probe_offloads(tap.fd, (UNKNOWN_OFFLOAD_BIT | wanted, wanted, 0)) == wanted
        with pytest.raises(OSError) as info:
            probe_offloads(tap.fd, (UNKNOWN_OFFLOAD_BIT,))
        assert info.value.errno == errno.EINVAL


def test_open_never_attaches_to_an_existing_device(lab):
    name = tap_name("pod-e", prefix=lab.prefix)
    with open_tap(name):
        with pytest.raises(Exception) as info:
            open_tap(name)
        assert "busy" in str(info.value).lower()
