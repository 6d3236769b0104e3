import os
import subprocess
import threading

import pytest

from podnet.linux.netns import (
    create_netns,
    delete_netns,
    get_sysctl,
    list_netns,
    netns_exists,
    netns_path,
    popen_in_netns,
    run_in_netns,
    set_sysctl,
)

pytestmark = pytest.mark.root


def _ns_inode(path: str) -> int:
    return os.stat(path).st_ino


def test_create_list_delete_is_idempotent(lab, ip):
    name = lab.name()
    create_netns(name)
    try:
        assert list_netns(lab.prefix) == [name]
        assert netns_path(name) == f"/var/run/netns/{name}"
        assert name in ip("netns", "list")
        with pytest.raises(FileExistsError):
            create_netns(name)
    finally:
        assert delete_netns(name) is True
    assert delete_netns(name) is False
    assert not netns_exists(name)
    assert list_netns(lab.prefix) == []


def test_run_in_netns_leaves_the_callers_thread_alone(lab):
    name = lab.name()
    create_netns(name)
    try:
        before = os.readlink("/proc/thread-self/ns/net")
        inside = run_in_netns(name, os.readlink, "/proc/thread-self/ns/net")
        assert inside == f"net:[{_ns_inode(netns_path(name))}]"
        assert os.readlink("/proc/thread-self/ns/net") == before
        assert run_in_netns(name, threading.current_thread) is not threading.current_thread()
        with pytest.raises(ZeroDivisionError):
            run_in_netns(name, lambda: 1 / 0)
    finally:
        delete_netns(name)


def test_proc_sys_net_is_per_thread(lab):
    name = lab.name()
    create_netns(name)
    try:
        key = "net/ipv4/ip_forward"
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            root_value = f.read().strip()
        wanted = "0" if root_value == "1" else "1"
        set_sysctl(name, key, wanted)
        assert get_sysctl(name, key) == wanted
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            assert f.read().strip() == root_value
        with pytest.raises(ValueError):
            set_sysctl(name, "../etc/passwd", 1)
    finally:
        delete_netns(name)


def test_popen_in_netns_runs_there_in_its_own_session(lab):
    name = lab.name()
    create_netns(name)
    try:
        proc = popen_in_netns(
            name, ["sh", "-c", "readlink /proc/self/ns/net; ps -o sid= -p $$"],
            stdout=subprocess.PIPE, text=True,
        )
        out, _ = proc.communicate(timeout=10)
        ns_line, sid_line = out.split()
        assert ns_line == f"net:[{_ns_inode(netns_path(name))}]"
        assert int(sid_line) == proc.pid
        # what ip(8) sees from inside: only lo
        proc = popen_in_netns(name, ["ip", "-o", "link"], stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=10)
        assert [line.split(":")[1].strip() for line in out.splitlines()] == ["lo"]
    finally:
        delete_netns(name)


def test_create_netns_can_turn_ipv6_off_for_every_device(lab):
    off, on = lab.name(), lab.name()
    create_netns(off, ipv6=False)
    try:
        create_netns(on)
        for scope in ("all", "default", "lo"):
            assert get_sysctl(off, f"net/ipv6/conf/{scope}/disable_ipv6") == "1", scope
            assert get_sysctl(on, f"net/ipv6/conf/{scope}/disable_ipv6") == "0", scope
        # a device made (or moved in) afterwards takes `default`: no router solicitation from it
        run_in_netns(off, subprocess.run, ["ip", "link", "add", "v0", "type", "veth", "peer", "v1"], check=True)
        assert get_sysctl(off, "net/ipv6/conf/v0/disable_ipv6") == "1"
    finally:
        delete_netns(off)
        delete_netns(on)
