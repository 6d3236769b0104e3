import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from pyroute2 import IPRoute

from podnet.cluster.model import Container, Manifests, ObjectMeta, Pod
from podnet.lab import LabConfig, run_lab
from podnet.linux.names import tap_name
from podnet.linux.netns import create_netns, delete_netns, netns_exists, popen_in_netns
from podnet.linux.resources import (
    DEFAULT_LIVE_DIR,
    LIVE_DIR_ENV,
    STATE_DIR_ENV,
    Entry,
    ResourceKind,
    Resources,
    clean,
    journal_name,
    pointer_name,
    process_matches,
    process_starttime,
    registered_journals,
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


def _run_child(lab, body: str, ns: str, *, state_dir: str | None = None, live_dir: str | None = None,
               **kw) -> subprocess.Popen:
    script = _RECORD_AND_CREATE + textwrap.dedent(body)
    env = lab.child_env()
    if live_dir is not None:
        env[LIVE_DIR_ENV] = live_dir
    return subprocess.Popen(
        [sys.executable, "-c", script, lab.prefix, state_dir or lab.state_dir, ns],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kw,
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


def test_journal_lives_in_the_state_dir(lab, monkeypatch, tmp_path):
    monkeypatch.setenv(STATE_DIR_ENV, lab.state_dir)
    monkeypatch.setenv(LIVE_DIR_ENV, str(tmp_path / "live"))
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
    # the machine-wide registry points at it
    pointer = tmp_path / "live" / pointer_name(me, start, res.journal_path)
    assert os.readlink(pointer) == res.journal_path and res.registered
    [registered] = registered_journals()
    assert registered.journal == res.journal_path and registered.pid == me and registered.alive
    with pytest.raises(ValueError):
        res.record_netns("pn-elsewhere")
    assert res.forget(Entry(ResourceKind.NETNS, name))
    assert not os.path.exists(res.journal_path)  # nothing left to remember
    assert os.listdir(tmp_path / "live") == [] and not res.registered


def test_two_journals_of_one_process_have_two_pointers(lab, tmp_path):
    live = str(tmp_path / "live")
    first = Resources(prefix=lab.prefix, state_dir=lab.state_dir, live_dir=live)
    second = Resources(prefix=lab.prefix, state_dir=lab.state_dir + "-2", live_dir=live)
    first.record_file(str(tmp_path / "a"))
    second.record_file(str(tmp_path / "b"))
    assert sorted(p.journal for p in registered_journals(live)) == sorted([first.journal_path, second.journal_path])
    first.release_all()
    assert [p.journal for p in registered_journals(live)] == [second.journal_path]
    second.release_all()
    assert registered_journals(live) == []


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


# -- the registry of live journals: runs with other state dirs -------------------------------------


@pytest.fixture
def live(tmp_path, monkeypatch):
    """A private registry for this test (its runs, and the `clean`s it calls, read no other)."""
    path = tmp_path / "live"
    monkeypatch.setenv(LIVE_DIR_ENV, str(path))
    return str(path)


@pytest.mark.root
def test_the_default_registry_is_under_run(lab, monkeypatch):
    monkeypatch.delenv(LIVE_DIR_ENV, raising=False)
    with Resources(prefix=lab.prefix, state_dir=lab.state_dir) as res:
        res.record_netns(lab.name())
        assert res.pointer_path.startswith(DEFAULT_LIVE_DIR + "/")
        assert os.readlink(res.pointer_path) == res.journal_path
    assert not os.path.lexists(res.pointer_path)


@pytest.mark.root
def test_clean_spares_a_live_run_with_another_state_dir(lab, live, tmp_path):
    """`podnet clean` on one state dir while a bench, a test or a second lab runs with another."""
    elsewhere, orphan = lab.name("live"), lab.name("orphan")
    child = _run_child(lab, """
        print("ready", flush=True)
        sys.stdin.readline()
        sys.exit(0 if res.release_all().ok else 1)
    """, elsewhere, state_dir=str(tmp_path / "other-state"), live_dir=live)
    try:
        assert child.stdout.readline().strip() == "ready"
        create_netns(orphan)
        report = clean(lab.prefix, lab.state_dir)
        assert report.ok, report.errors
        assert [e.name for e in report.removed] == [orphan]   # the sweep ran
        assert report.kept == (elsewhere,) and report.journals == ()
        assert netns_exists(elsewhere)
        assert [p.pid for p in registered_journals(live)] == [child.pid]
    finally:
        child.communicate("done\n", timeout=10)
    assert child.returncode == 0
    assert not netns_exists(elsewhere) and registered_journals(live) == []


@pytest.mark.root
def test_clean_releases_a_dead_run_it_finds_through_the_registry(lab, live, tmp_path):
    ns, other_state = lab.name(), tmp_path / "other-state"
    child = _run_child(lab, """
        print(sleeper.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """, ns, state_dir=str(other_state), live_dir=live)
    sleeper = int(child.stdout.readline())
    assert child.wait(timeout=10) == -signal.SIGKILL
    sleeper_start = process_starttime(sleeper)
    [pointer] = registered_journals(live)     # harmless now: its owner is dead
    assert not pointer.alive and os.path.dirname(pointer.journal) == str(other_state)
    # a pointer whose journal went with its state dir, and one of a run with another prefix
    me = os.getpid()
    gone = os.path.join(live, pointer_name(me, 1, "/nonexistent/" + journal_name(me, 1)))
    os.symlink("/nonexistent/" + journal_name(me, 1), gone)
    other_prefix = lab.prefix[:-1] + "x"
    foreign = tmp_path / "foreign" / journal_name(me, 2)
    foreign.parent.mkdir()
    foreign.write_text(json.dumps({"version": 1, "owner": {"pid": me, "starttime": 2}, "prefix": other_prefix,
                                   "entries": [{"kind": "netns", "name": other_prefix + "ns"}]}))
    os.symlink(foreign, os.path.join(live, pointer_name(me, 2, str(foreign))))

    report = clean(lab.prefix, lab.state_dir)
    assert report.ok, report.errors
    assert report.journals == (pointer.journal,)
    assert {(e.kind, e.name) for e in report.removed} == {(ResourceKind.NETNS, ns), (ResourceKind.PROCESS, "sleep")}
    _wait_for(lambda: not process_matches(sleeper, sleeper_start))
    assert not netns_exists(ns) and os.listdir(other_state) == []
    # the released run's pointer and the stale one are gone; the other prefix's waits for its clean
    assert [p.journal for p in registered_journals(live)] == [str(foreign)]
    os.unlink(foreign)


@pytest.mark.root
def test_a_dead_journal_another_user_owns_is_not_released(lab, live, tmp_path):
    """The registry could name any file, and a journal lists files to delete: only our own count."""
    me, victim = os.getpid(), tmp_path / "keep-me"
    victim.write_text("precious")
    planted = tmp_path / "planted" / journal_name(me, 1)
    planted.parent.mkdir()
    planted.write_text(json.dumps({"version": 1, "owner": {"pid": me, "starttime": 1}, "prefix": lab.prefix,
                                   "entries": [{"kind": "file", "name": str(victim)}]}))
    os.chown(planted, 65534, 65534)
    os.makedirs(live)
    os.symlink(planted, os.path.join(live, pointer_name(me, 1, str(planted))))
    report = clean(lab.prefix, lab.state_dir)
    assert not report.ok and "belongs to uid 65534" in report.errors[0]
    assert report.removed == () and victim.read_text() == "precious"
    assert registered_journals(live) == []


@pytest.mark.root
def test_an_unreadable_registry_or_live_pointer_stops_the_sweep(lab, live, tmp_path):
    orphan = lab.name()
    create_netns(orphan)
    os.makedirs(live)
    me, start = os.getpid(), process_starttime(os.getpid())
    half = tmp_path / "half" / journal_name(me, start)
    half.parent.mkdir()
    half.write_text("{half a journ")
    pointer = os.path.join(live, pointer_name(me, start, str(half)))
    os.symlink(half, pointer)
    report = clean(lab.prefix, lab.state_dir)
    assert not report.ok and "prefix sweep skipped" in report.errors[0] and netns_exists(orphan)
    half.unlink()                                   # a live pointer without its journal: claims unknown
    assert not clean(lab.prefix, lab.state_dir).ok and netns_exists(orphan)
    os.unlink(pointer)
    not_a_dir = tmp_path / "not-a-dir"
    not_a_dir.write_text("")
    report = clean(lab.prefix, lab.state_dir, live_dir=str(not_a_dir))
    assert not report.ok and "registry" in report.errors[0] and netns_exists(orphan)
    assert [e.name for e in clean(lab.prefix, lab.state_dir).removed] == [orphan]


def _one_pod() -> Manifests:
    return Manifests(pods=(Pod(ObjectMeta("client"), (Container("main", command=("sleep", "infinity")),),
                               termination_grace_period_seconds=1),))


@pytest.mark.root
def test_a_lab_registers_its_journal_and_drops_the_pointer_on_exit(lab, live, tmp_path):
    state = str(tmp_path / "lab-state")
    config = LabConfig(prefix=lab.prefix, state_dir=state, uplink=False, persist_ipam=False)
    with run_lab(_one_pod(), config) as running:
        [pointer] = registered_journals(live)
        assert pointer.alive and pointer.pid == os.getpid()
        assert pointer.journal == os.path.join(state, journal_name(os.getpid(), process_starttime(os.getpid())))
        with open(pointer.journal) as f:
            assert {"kind": "netns", "name": running.pod("client").netns} in json.load(f)["entries"]
    assert os.listdir(live) == []


@pytest.mark.root
def test_a_lab_runs_when_the_registry_cannot_be_written(lab, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(LIVE_DIR_ENV, str(blocker / "live"))   # under a regular file: ENOTDIR, even for root
    config = LabConfig(prefix=lab.prefix, state_dir=str(tmp_path / "lab-state"), uplink=False, persist_ipam=False)
    with caplog.at_level(logging.WARNING, logger="podnet.linux.resources"):
        with run_lab(_one_pod(), config) as running:
            result = running.exec("client", ["ping", "-c", "1", "-W", "2", "169.254.1.1"])
            assert result.returncode == 0, result.stdout
            assert not running.resources.registered
    said = [r.getMessage() for r in caplog.records if "cannot register journal" in r.getMessage()]
    assert len(said) == 1 and "may delete what this run creates" in said[0]
