"""core/neighbor.py against the kernel: the default ARP parameters of a fresh namespace, and the
INCOMPLETE → FAILED timeline of an address nobody answers, side by side with the kernel's."""

from __future__ import annotations

import subprocess
import time

import pytest

from podnet.core import neighbor
from podnet.core.neighbor import NeighborTable, Nud
from podnet.core.packet import ip_int
from podnet.linux.netns import get_sysctl

pytestmark = pytest.mark.root


def test_default_parameters_are_the_kernels(plumbing):
    ns = plumbing.add_netns("ns", ipv6=True)
    # neigh/default exists only in the initial namespace; a new link starts from those defaults
    subprocess.run(["ip", "-n", ns, "link", "add", "va", "type", "veth", "peer", "name", "vb"], check=True)

    def sysctl(key: str) -> int:
        return int(get_sysctl(ns, f"net/ipv4/neigh/va/{key}"))

    assert sysctl("base_reachable_time_ms") / 1000 == neighbor.BASE_REACHABLE_TIME_S
    assert sysctl("retrans_time_ms") / 1000 == neighbor.RETRANS_TIME_S
    assert sysctl("delay_first_probe_time") == neighbor.DELAY_FIRST_PROBE_TIME_S
    assert sysctl("mcast_solicit") == neighbor.MCAST_SOLICIT
    assert sysctl("ucast_solicit") == neighbor.UCAST_SOLICIT
    assert sysctl("gc_stale_time") == neighbor.GC_STALE_TIME_S
    assert sysctl("unres_qlen_bytes") == neighbor.UNRES_QLEN_BYTES


def _kernel_state(ns: str, dev: str, ip: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "neigh", "show", "dev", dev, ip], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[-1] if out else "none"


def test_an_unanswered_address_fails_when_the_kernels_does(plumbing):
    ns = plumbing.add_netns("ns", ipv6=True)
    run = lambda *a: subprocess.run(["ip", "-n", ns, *a], check=True, capture_output=True)  # noqa: E731
    # a veth pair inside one namespace: the requests leave on va, reach vb, and nobody answers
    run("link", "add", "va", "type", "veth", "peer", "name", "vb")
    run("addr", "add", "10.77.0.1/24", "dev", "va")
    run("link", "set", "va", "up")
    run("link", "set", "vb", "up")
    ours = NeighborTable(device="va")
    start = time.monotonic()
    subprocess.run(["ip", "netns", "exec", ns, "ping", "-c1", "-W1", "10.77.0.9"], capture_output=True)
    ours.resolve(ip_int("10.77.0.9"), b"echo request", now=0.0)
    seen = []
    for at in (1.5, 4.0):
        time.sleep(max(0.0, start + at - time.monotonic()))
        while (deadline := ours.next_deadline()) is not None and deadline <= at:
            ours.handle_timer(deadline)
        seen.append((at, _kernel_state(ns, "va", "10.77.0.9"), ours.get(ip_int("10.77.0.9")).state.value))
    assert seen == [(1.5, "INCOMPLETE", "INCOMPLETE"), (4.0, "FAILED", "FAILED")], seen
    assert ours.statistics().dropped_unresolved == 1
    assert Nud.FAILED.value in ours.show()[0]
