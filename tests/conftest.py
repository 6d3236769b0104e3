"""Suite-wide rules: root tests are marked, and a run that must include them fails if they were skipped;
no podnet namespace or device may be left on the machine when the suite ends."""

from __future__ import annotations

import os
import subprocess

import pytest

PREFIX = "pn-"
IS_ROOT = os.geteuid() == 0 and os.path.exists("/dev/net/tun")


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        return
    if os.environ.get("PODNET_REQUIRE_ROOT_TESTS") == "1":
        raise pytest.UsageError("PODNET_REQUIRE_ROOT_TESTS=1 but this is not root with /dev/net/tun: "
                                "the namespace tests cannot run, and a run without them must not look green")
    skip = pytest.mark.skip(reason="needs root and /dev/net/tun")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def podnet_leftovers() -> list[str]:
    """Namespaces and root-netns links with podnet's prefix that exist right now."""
    if not IS_ROOT:
        return []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout.split("\n")
    found = [f"netns {line.split()[0]}" for line in netns if line.startswith(PREFIX)]
    found += [f"link {line.split(': ')[1].split('@')[0]}" for line in links
              if line.count(": ") >= 2 and line.split(": ")[1].startswith(PREFIX)]
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    before = set(podnet_leftovers())
    yield
    left = sorted(set(podnet_leftovers()) - before)
    assert not left, f"the suite left podnet resources behind: {left}"


@pytest.fixture
def state_dir(tmp_path):
    """A private state dir (journals, logs, IPAM, control socket) per test."""
    path = tmp_path / "state"
    path.mkdir()
    return str(path)
