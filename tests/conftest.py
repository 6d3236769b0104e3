"""Suite-wide rules: root tests are marked, and a run that must include them fails if they were skipped;
no podnet namespace or device may be left on the machine when the suite ends (those that another
live podnet run, found through the registry of live journals, claims are not this suite's)."""

from __future__ import annotations

import os
import subprocess

import pytest

PREFIX = "pn-"
# set for the whole session and inherited by every process it starts, daemons reparented to init too
SESSION_ENV = "PODNET_TEST_SESSION"
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


def _of_this_session(pid: int) -> bool:
    """True if `pid` is this pytest process, one of its descendants, or carries this session's mark."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"{SESSION_ENV}={os.environ[SESSION_ENV]}".encode() in f.read().split(b"\0"):
                return True
    except (OSError, KeyError):
        pass
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            return False
    return False


def claimed_elsewhere() -> set[str]:
    """Namespaces and root-netns links that live podnet runs outside this session claim, read from
    the machine's registry of live journals: a bench or another suite running at the same time."""
    from podnet.linux.resources import ResourceKind, Resources, registered_journals

    try:
        pointers = registered_journals()
    except OSError:
        return set()
    claimed = set()
    for pointer in pointers:
        if not pointer.alive or _of_this_session(pointer.pid):
            continue
        try:
            entries = Resources.adopt(pointer.journal).entries
        except (OSError, ValueError, KeyError, TypeError):  # released meanwhile, or unreadable: not excused
            continue
        claimed.update(f"{e.kind.value} {e.name}" for e in entries
                       if e.kind in (ResourceKind.NETNS, ResourceKind.LINK) and e.netns is None)
    return claimed


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    os.environ[SESSION_ENV] = f"{os.getpid()}-{os.urandom(4).hex()}"
    before = set(podnet_leftovers())
    yield
    new = set(podnet_leftovers()) - before
    # what another live run claims is not ours; what this session's processes still hold is
    left = sorted(new - claimed_elsewhere()) if new else []
    os.environ.pop(SESSION_ENV, None)
    assert not left, f"the suite left podnet resources behind: {left}"


@pytest.fixture
def state_dir(tmp_path):
    """A private state dir (journals, logs, IPAM, control socket) per test."""
    path = tmp_path / "state"
    path.mkdir()
    return str(path)
