"""Fixtures for the Linux edge: unique names per test, and a check that nothing is left behind.

Every test gets its own prefix (`pn-` + 2 random characters + `-`), so a `clean()` in one test can
never touch what another test, or another podnet user of this machine, created.
"""

from __future__ import annotations

import os
import pathlib
import random
import string
import subprocess

import pytest

import podnet.linux
from plumbing import Plumbing

SRC_DIR = str(pathlib.Path(podnet.linux.__file__).resolve().parents[2])


def _can_run_root_tests() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        reason = _can_run_root_tests()
        if reason:
            pytest.skip(reason)


def root_links(prefix: str) -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return sorted(n for n in names if n.startswith(prefix))


class Lab:
    """Names for one test: everything starts with `prefix`; the journal lives in `state_dir`."""

    def __init__(self, prefix: str, state_dir: str) -> None:
        self.prefix = prefix
        self.state_dir = state_dir
        self._n = 0

    def name(self, what: str = "ns") -> str:
        self._n += 1
        return f"{self.prefix}{what}{self._n}"

    def leftovers(self) -> list[str]:
        from podnet.linux.netns import list_netns

        return list_netns(self.prefix) + root_links(self.prefix)

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = SRC_DIR + os.pathsep + env.get("PYTHONPATH", "")
        return env


@pytest.fixture
def lab(tmp_path: pathlib.Path):
    """A unique prefix and state dir; afterwards, asserts that no netns or link with it remains."""
    tag = "".join(random.choices(string.ascii_lowercase + string.digits, k=2))
    state_dir = tmp_path / "state"
    the_lab = Lab(f"pn-{tag}-", str(state_dir))
    yield the_lab
    left = the_lab.leftovers()
    if left:
        from podnet.linux.resources import clean

        clean(the_lab.prefix, str(state_dir))  # do not leave them on a shared machine
    journals = sorted(p.name for p in state_dir.glob("*")) if state_dir.exists() else []
    assert left == [], f"left behind: {left}"
    assert journals == [], f"journals left behind: {journals}"


@pytest.fixture
def plumbing(lab):
    """Namespaces, bridges, veths and TAPs for one test (plumbing.py); all removed afterwards, on
    failure too, before `lab` checks that nothing with its prefix is left."""
    with Plumbing(lab) as made:
        yield made


def _ip(*argv: str) -> str:
    return subprocess.run(["ip", *argv], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def ip():
    """Ask the real tool: `ip("-n", ns, "route")` returns ip(8)'s output."""
    return _ip
