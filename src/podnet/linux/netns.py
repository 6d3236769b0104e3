"""Named network namespaces (linux layer, root only).

Job: create, list and delete the netns files under /var/run/netns the way `ip netns` does (through
pyroute2), and run code or commands inside one.

Invariants:
- The caller's thread never changes namespace. Code that must run inside a netns runs in a fresh
  thread that calls setns(2) first and ends when the code returns; the kernel keeps a namespace
  per thread, so the rest of the process is untouched.
- Inside that thread, /proc/sys/net shows the netns of the thread (sysctl tables are looked up with
  the calling task's namespace), which is what `set_sysctl` relies on. /proc/net is NOT per thread:
  it follows /proc/self, the thread group leader.
- A child process inherits the namespace of the thread that forks it, so `popen_in_netns` forks from
  such a thread: no preexec_fn, no nsenter.
- `delete_netns` is idempotent; `create_netns` refuses an existing name rather than adopt it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import config as _pr_config
from pyroute2 import netns as _pr_netns

from podnet.linux.names import validate_netns

# pyroute2 makes a netns socket (IPRoute(netns=...), netns.create) in a child it forks from the
# calling thread, and ends that child with SIGTERM. A child forked from a multi-threaded process
# under trio.open_signal_receiver (`podnet up`, the bench nodes) inherits trio's Python handler,
# which can block forever on a lock another thread held at the fork: the child never exits and
# the thread waiting for it hangs. With this, the child first puts SIGTERM/SIGINT back to default.
_pr_config.disable_mp_signal = True

NETNS_RUN_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def netns_path(name: str) -> str:
    """The bind-mounted netns file of `name`, as `ip netns` names it."""
    return os.path.join(NETNS_RUN_DIR, validate_netns(name))


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def list_netns(prefix: str = "") -> list[str]:
    """Sorted names of the named netns that start with `prefix` (all of them for "")."""
    return sorted(n for n in _pr_netns.listnetns() if n.startswith(prefix))


def create_netns(name: str, *, ipv6: bool = True) -> None:
    """Create netns `name`; FileExistsError if it exists (it may belong to another lab).

    `ipv6=False`: IPv6 is off in it before any device is (`all` and `default` disable_ipv6, so lo
    and every device made or moved in later): no router solicitations or MLD reports on its links.
    """
    if netns_exists(name):
        raise FileExistsError(
            f"netns {name!r} already exists (a running lab, or leftovers for `podnet clean`)"
        )
    try:
        _pr_netns.create(name)
        if not ipv6:
            _disable_ipv6(name)
    except FileExistsError:
        raise
    except BaseException:
        # a half-made netns (file without mount) would block the next create; one with IPv6 still
        # on is not what was asked for
        delete_netns(name)
        raise


def _disable_ipv6(name: str) -> None:
    for scope in ("all", "default"):
        try:
            set_sysctl(name, f"net/ipv6/conf/{scope}/disable_ipv6", 1)
        except FileNotFoundError:
            return  # a kernel without IPv6: nothing to turn off


def delete_netns(name: str) -> bool:
    """Delete netns `name` if it exists; True if there was something to delete.

    The namespace itself dies once no process is left in it; its interfaces (TAPs included, even
    with their fd still open) are destroyed with it.
    """
    path = netns_path(name)
    if not os.path.lexists(path):
        return False
    try:
        _pr_netns.remove(name)
    except FileNotFoundError:
        return False
    return True


def setns(fd: int) -> None:
    """setns(2) the calling thread into the network namespace open at `fd`."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run_in_netns(name: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Run `fn(*args, **kw)` in a fresh thread inside netns `name`; return its result or raise its error."""
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            setns(fd)
            outcome["result"] = fn(*args, **kw)
        except BaseException as exc:  # handed back to the caller's thread
            outcome["error"] = exc

    try:
        thread = threading.Thread(target=body, name=f"netns:{name}", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _sysctl_path(key: str) -> str:
    parts = key.split("/")
    if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"sysctl key {key!r} must look like 'net/ipv6/conf/eth0/disable_ipv6'")
    return os.path.join("/proc/sys", key)


def set_sysctl(netns: str, key: str, value: str | int) -> None:
    """Write `value` to /proc/sys/<key> as seen from inside `netns`."""
    path = _sysctl_path(key)

    def write() -> None:
        with open(path, "w") as f:
            f.write(f"{value}\n")

    run_in_netns(netns, write)


def get_sysctl(netns: str, key: str) -> str:
    """Read /proc/sys/<key> as seen from inside `netns`, without the trailing newline."""
    path = _sysctl_path(key)

    def read() -> str:
        with open(path) as f:
            return f.read().strip()

    return run_in_netns(netns, read)


def popen_in_netns(name: str, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen:
    """Start `argv` inside netns `name`, in a new session (kill it with its process group).

    Only the network namespace changes: the child shares the mount namespace, so /sys still
    shows the root netns (unlike `ip netns exec`, which remounts it).
    """
    popen_kw.setdefault("start_new_session", True)
    return run_in_netns(name, subprocess.Popen, list(argv), **popen_kw)


def open_iproute(netns: str | None = None) -> IPRoute:
    """A pyroute2 IPRoute bound to `netns` (the caller's own netns for None); never creates one."""
    if netns is None:
        return IPRoute()
    validate_netns(netns)
    # flags=0: pyroute2's default O_CREAT would silently create a missing netns
    return IPRoute(netns=netns, flags=0)
