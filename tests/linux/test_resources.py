import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from pyroute2 import IPRoute

from podnet.linux.names import tap_name
from podnet.linux.netns import create_netns, delete_netns, netns_exists, popen_in_netns
from podnet.linux.resources import (
    STATE_DIR_ENV,
    Entry,
    ResourceKind,
    Resources,
    clean,
    journal_name,
    process_matches,
    process_starttime,
)
from podnet.linux.tap import open_tap

# What a podnet process does before it dies; argv: prefix state_dir netns
_RECORD_AND_CREATE = """
import os, signal, sys
from podnet.linux.netns import create_netns, popen_in_netns
from podnet.linux.resources import Resources, install_signal_handlers
prefix, state_dir, ns = sys.argv[1:4]
res = Resources(prefix=prefix, state_dir=state_dir, grace_s=0.5)
res.record_netns(ns)
create_netns(ns)
sleeper = popen_in_netns(ns, ["sleep", "600"])
res.record_process(sleeper.pid, "sleep")
"""


def _run_child(lab, body: str, ns: str, **kw) -> subprocess.Popen:
    script = _RECORD_AND_CREATE + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", script, lab.prefix, lab.state_dir, ns],
        env=lab.child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kw,
    )


def _group(pgid: int) -> list[int]:
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(name))
    return found


def _wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _add_veth(name: str, peer: str) -> None:
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="veth", peer=peer)


def test_journal_lives_in_the_state_dir(lab, monkeypatch):
    monkeypatch.setenv(STATE_DIR_ENV, lab.state_dir)
    res = Resources(prefix=lab.prefix)
    name = lab.name()
    assert res.record_netns(name) == Entry(ResourceKind.NETNS, name)
    res.record_netns(name)  # recorded once
    me, start = os.getpid(), process_starttime(os.getpid())
    assert res.journal_path == os.path.join(lab.state_dir, journal_name(me, start))
    with open(res.journal_path) as f:
        doc = json.load(f)
    assert doc["owner"] == {"pid": me, "starttime": start}
    assert doc["prefix"] == lab.prefix
    assert doc["entries"] == [{"kind": "netns", "name": name}]
    with pytest.raises(ValueError):
        res.record_netns("pn-elsewhere")
    assert res.forget(Entry(ResourceKind.NETNS, name))
    assert not os.path.exists(res.journal_path)  # nothing left to remember


@pytest.mark.root
def test_release_all_removes_everything(lab, ip, tmp_path):
    ns, veth, peer = lab.name("ns"), lab.name("va"), lab.name("vb")
    scratch = tmp_path / "scratch.pcap"
    with Resources(prefix=lab.prefix, state_dir=lab.state_dir, grace_s=2) as res:
        res.record_netns(ns)
        create_netns(ns)
        res.record_link(veth)
        _add_veth(veth, peer)
        res.record_file(str(scratch))
        scratch.write_bytes(b"")
        shell = popen_in_netns(ns, ["sh", "-c", "sleep 600 & sleep 600"])
        res.record_process(shell.pid, "sleeps")
        _wait_for(lambda: len(_group(shell.pid)) == 3)
        with open(res.journal_path) as f:
            kinds = sorted(e["kind"] for e in json.load(f)["entries"])
        assert kinds == ["file", "link", "netns", "process"]

        report = res.release_all()
        assert report.ok, report.errors
        assert {e.kind for e in report.removed} == set(ResourceKind)
        assert shell.wait(timeout=5) == -signal.SIGTERM
        _wait_for(lambda: _group(shell.pid) == [])  # the background sleep too
        assert not netns_exists(ns)
        assert veth not in ip("link") and peer not in ip("link")
        assert not scratch.exists()
        assert not os.path.exists(res.journal_path)
        assert res.release_all().removed == ()  # again: nothing to do


@pytest.mark.root
def test_a_process_ignoring_sigterm_gets_sigkill(lab):
    ns = lab.name()
    with Resources(prefix=lab.prefix, state_dir=lab.state_dir, grace_s=0.3) as res:
        res.record_netns(ns)
        create_netns(ns)
        stubborn = popen_in_netns(ns, ["sh", "-c", "trap '' TERM; sleep 600"])
        res.record_process(stubborn.pid)
        time.sleep(0.1)  # let sh install its trap
        assert res.release_all().ok
        assert stubborn.wait(timeout=5) == -signal.SIGKILL


@pytest.mark.root
def test_clean_after_sigkill_removes_what_the_journal_lists(lab):
    ns = lab.name()
    child = _run_child(lab, """
        print(sleeper.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """, ns)
    sleeper = int(child.stdout.readline())
    assert child.wait(timeout=10) == -signal.SIGKILL
    sleeper_start = process_starttime(sleeper)
    assert netns_exists(ns) and process_matches(sleeper, sleeper_start)
    assert len(os.listdir(lab.state_dir)) == 1

    report = clean(lab.prefix, lab.state_dir)
    assert report.ok, report.errors
    assert len(report.journals) == 1
    assert {(e.kind, e.name) for e in report.removed} == {
        (ResourceKind.NETNS, ns), (ResourceKind.PROCESS, "sleep")
    }
    _wait_for(lambda: not process_matches(sleeper, sleeper_start))
    assert not netns_exists(ns)
    assert os.listdir(lab.state_dir) == []


@pytest.mark.root
def test_clean_spares_what_a_live_process_claims(lab, ip):
    claimed, orphan, veth, peer = lab.name("ns"), lab.name("ns"), lab.name("va"), lab.name("vb")
    child = _run_child(lab, """
        print("ready", flush=True)
        sys.stdin.readline()
        sys.exit(0 if res.release_all().ok else 1)
    """, claimed)
    try:
        assert child.stdout.readline().strip() == "ready"
        create_netns(orphan)
        _add_veth(veth, peer)
        # a dead process once had the same name: the live claim wins
        me = os.getpid()
        with open(os.path.join(lab.state_dir, journal_name(me, 1)), "w") as f:
            json.dump({"version": 1, "owner": {"pid": me, "starttime": 1}, "prefix": lab.prefix,
                       "entries": [{"kind": "netns", "name": claimed}]}, f)
        with open_tap(tap_name("held", prefix=lab.prefix)) as tap:
            report = clean(lab.prefix, lab.state_dir)
            assert report.ok, report.errors
            assert len(report.journals) == 1
            # one end of the pair is removed, the other goes with it
            removed = {e.name for e in report.removed}
            assert orphan in removed and len(removed & {veth, peer}) == 1
            assert set(report.kept) == {claimed, tap.name}
            assert netns_exists(claimed) and tap.name in ip("link")
            assert veth not in ip("link") and peer not in ip("link")
            assert not netns_exists(orphan)
    finally:
        child.communicate("done\n", timeout=10)
    assert child.returncode == 0
    assert not netns_exists(claimed)


@pytest.mark.root
def test_clean_never_touches_names_without_the_prefix(lab, ip):
    other_prefix = lab.prefix[:-1] + "x"  # "pn-ab-" -> "pn-abx": podnet's, but not this lab's
    outside, outside_link = other_prefix + "ns", other_prefix + "v"
    me = os.getpid()
    foreign_journal = os.path.join(lab.state_dir, journal_name(me, 1))  # owner dead
    try:
        create_netns(outside)
        _add_veth(outside_link, other_prefix + "w")
        os.makedirs(lab.state_dir, exist_ok=True)
        with open(foreign_journal, "w") as f:
            json.dump({"version": 1, "owner": {"pid": me, "starttime": 1}, "prefix": other_prefix,
                       "entries": [{"kind": "netns", "name": outside}]}, f)
        report = clean(lab.prefix, lab.state_dir)
        assert report.ok and report.removed == () and report.journals == ()
        assert netns_exists(outside) and outside_link in ip("link")
        assert os.path.exists(foreign_journal)
    finally:
        delete_netns(outside)
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=outside_link):
                ipr.link("del", index=index)
        if os.path.exists(foreign_journal):
            os.unlink(foreign_journal)


@pytest.mark.root
def test_clean_never_signals_a_recycled_pid(lab):
    me = os.getpid()
    bystander = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        os.makedirs(lab.state_dir, exist_ok=True)
        start = process_starttime(bystander.pid)
        with open(os.path.join(lab.state_dir, journal_name(me, 1)), "w") as f:
            json.dump({"version": 1, "owner": {"pid": me, "starttime": 1}, "prefix": lab.prefix,
                       "entries": [{"kind": "process", "name": "old", "pid": bystander.pid,
                                    "starttime": start - 1}]}, f)
        report = clean(lab.prefix, lab.state_dir)
        assert report.ok and report.removed == () and len(report.journals) == 1
        time.sleep(0.1)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.root
def test_an_unreadable_live_journal_stops_the_sweep(lab):
    orphan = lab.name()
    live = os.path.join(lab.state_dir, journal_name(os.getpid(), process_starttime(os.getpid())))
    os.makedirs(lab.state_dir, exist_ok=True)
    create_netns(orphan)
    with open(live, "w") as f:
        f.write("{half a journ")
    try:
        report = clean(lab.prefix, lab.state_dir)
        assert not report.ok and netns_exists(orphan)
    finally:
        os.unlink(live)
    assert [e.name for e in clean(lab.prefix, lab.state_dir).removed] == [orphan]


@pytest.mark.root
def test_sigterm_releases_through_the_installed_handlers(lab):
    ns = lab.name()
    child = _run_child(lab, """
        install_signal_handlers(res)
        print("ready", flush=True)
        signal.pause()
    """, ns)
    assert child.stdout.readline().strip() == "ready"
    assert netns_exists(ns)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=10) == -signal.SIGTERM
    assert not netns_exists(ns)
    assert os.listdir(lab.state_dir) == []
