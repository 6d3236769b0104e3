"""What podnet created on this machine, and how it all goes away (linux layer, root only).

Job: every running podnet process keeps a journal of the kernel objects and processes it made;
`Resources.release_all` removes them on exit, error or signal, and `clean` removes what a process
killed with SIGKILL left behind.

Journal: one JSON document per process in the state dir (`/run/podnet`, or `$PODNET_STATE_DIR`,
or the constructor's `state_dir`), named `podnet-<pid>-<starttime>.json`:

    {"version": 1, "owner": {"pid": 4242, "starttime": 1234567}, "prefix": "pn-",
     "entries": [{"kind": "netns", "name": "pn-web-1"},
                 {"kind": "link", "name": "pn-v1a2b3c4d", "netns": null},
                 {"kind": "process", "name": "iperf3", "pid": 4300, "starttime": 1234600},
                 {"kind": "file", "name": "/run/podnet/lab.pcap"}]}

Invariants:
- A process is identified by pid AND starttime (field 22 of /proc/<pid>/stat): a recycled pid
  never matches, so podnet never signals a stranger. A zombie counts as dead.
- Record first, then create (write-ahead): a SIGKILL between the two leaves a journal entry for
  something that may not exist, which release tolerates, rather than an object nobody claims.
  TAPs need no entry: they are not persistent and vanish with the fd (or with their netns).
- The journal is rewritten whole with an atomic rename, so a SIGKILL never leaves half a file.
- Netns and link names recorded must carry the prefix; `clean` only ever deletes names with the
  prefix, and never one that a live podnet process's journal claims, nor a TAP still held by an fd.
- Release continues past errors and reports them; what could not be released stays in the journal
  for a later `clean`. Releasing twice is harmless.

Signals: `with Resources() as res:` releases on normal exit and on exceptions. For SIGTERM/SIGHUP in
a plain program call `install_signal_handlers(res)`. Under trio, let trio own the signals and
release from the task that receives them (or cancel, and let the `with` block release):

    with Resources() as res, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        ...
        async for _ in signals:
            res.release_all()
            break
"""

from __future__ import annotations

import enum
import errno
import glob
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from podnet.linux.names import DEFAULT_PREFIX, validate_prefix
from podnet.linux.netns import delete_netns, list_netns, netns_exists, open_iproute

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/run/podnet"
STATE_DIR_ENV = "PODNET_STATE_DIR"
JOURNAL_VERSION = 1
DEFAULT_GRACE_S = 2.0
_POLL_S = 0.02
_JOURNAL_RE = re.compile(r"podnet-(\d+)-(\d+)\.json")


class ResourceKind(str, enum.Enum):
    NETNS = "netns"
    LINK = "link"
    PROCESS = "process"
    FILE = "file"


@dataclass(frozen=True)
class Entry:
    """One recorded resource. `netns` only for links (None: the root netns); pid/starttime only
    for processes, whose `name` is a label for people."""

    kind: ResourceKind
    name: str
    netns: str | None = None
    pid: int | None = None
    starttime: int | None = None

    def to_json(self) -> dict:
        # not dataclasses.asdict: the whole journal is rewritten on every change, and a lab whose
        # pods churn writes it a few times per pod
        doc = {"kind": self.kind.value, "name": self.name}
        for key in ("netns", "pid", "starttime"):
            if (value := getattr(self, key)) is not None:
                doc[key] = value
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> Entry:
        return cls(
            kind=ResourceKind(doc["kind"]),
            name=str(doc["name"]),
            netns=doc.get("netns"),
            pid=doc.get("pid"),
            starttime=doc.get("starttime"),
        )


@dataclass(frozen=True)
class ReleaseReport:
    removed: tuple[Entry, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(frozen=True)
class CleanReport:
    """What `clean` did: `removed` resources, `journals` of dead owners it released, `kept` names
    with the prefix it left alone (claimed by a live process, or a TAP held open), `errors`."""

    removed: tuple[Entry, ...] = ()
    journals: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


# -- processes ---------------------------------------------------------------------------------


def _read_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the command name, which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def process_starttime(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot), or None if there is no such process."""
    fields = _read_stat(pid)
    return int(fields[22 - 3]) if fields else None


def process_matches(pid: int, starttime: int) -> bool:
    """True if `pid` is still the process that started at `starttime` and is not a zombie."""
    fields = _read_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return int(fields[22 - 3]) == starttime


def _group_members(pgid: int) -> list[tuple[int, int]]:
    """(pid, starttime) of the live processes whose process group is `pgid`."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _read_stat(int(name))
        if fields and fields[0] not in ("Z", "X") and int(fields[5 - 3]) == pgid:
            members.append((int(name), int(fields[22 - 3])))
    return members


def _signal_each(targets: Iterable[tuple[int, int]], signum: int) -> None:
    for pid, starttime in targets:
        if process_matches(pid, starttime):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def _wait_dead(targets: list[tuple[int, int]], timeout_s: float) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [t for t in targets if process_matches(*t)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(_POLL_S)


def terminate_processes(entries: Iterable[Entry], grace_s: float) -> list[tuple[int, int]]:
    """SIGTERM each matching process and its group, SIGKILL what is left after `grace_s`.

    The group's members are listed while the leader is known to match, so even members that
    outlive their leader are signalled by pid+starttime, never by a possibly recycled pgid.
    Returns the (pid, starttime) of survivors.
    """
    targets: list[tuple[int, int]] = []
    for e in entries:
        if e.pid is None or e.starttime is None or not process_matches(e.pid, e.starttime):
            continue
        targets.append((e.pid, e.starttime))
        try:
            if os.getpgid(e.pid) == e.pid:
                targets.extend(m for m in _group_members(e.pid) if m[0] != e.pid)
        except ProcessLookupError:
            pass
    targets = list(dict.fromkeys(targets))
    _signal_each(targets, signal.SIGTERM)
    alive = _wait_dead(targets, grace_s)
    if alive:
        _signal_each(alive, signal.SIGKILL)
        alive = _wait_dead(alive, max(grace_s, 1.0))
    return alive


# -- links -------------------------------------------------------------------------------------


def _delete_link(name: str, netns: str | None) -> bool:
    """Delete link `name` in `netns` (root for None); False if it (or its netns) is gone."""
    if netns is not None and not netns_exists(netns):
        return False
    with open_iproute(netns) as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:  # went with its peer or its netns meanwhile
                return False
            raise
    return True


def _held_tap(link) -> bool:
    """A non-persistent TUN/TAP exists only while some process holds its fd: it is never leftover."""
    info = link.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "tun":
        return False
    data = info.get_attr("IFLA_INFO_DATA")
    return data is None or not data.get_attr("IFLA_TUN_PERSIST")


# -- the journal -------------------------------------------------------------------------------


def state_dir_default() -> str:
    return os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


def journal_name(pid: int, starttime: int) -> str:
    return f"podnet-{pid}-{starttime}.json"


class Resources:
    """The journal of one podnet process and the release of what it lists.

    Thread-safe, and safe to call from a signal handler in the main thread (re-entrant lock).
    """

    def __init__(
        self,
        *,
        prefix: str = DEFAULT_PREFIX,
        state_dir: str | None = None,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        self.prefix = validate_prefix(prefix)
        self.state_dir = state_dir or state_dir_default()
        self.grace_s = grace_s
        self.owner_pid = os.getpid()
        starttime = process_starttime(self.owner_pid)
        assert starttime is not None
        self.owner_starttime = starttime
        self.journal_path = os.path.join(self.state_dir, journal_name(self.owner_pid, starttime))
        self._entries: list[Entry] = []
        self._lock = threading.RLock()

    @classmethod
    def adopt(cls, journal_path: str, *, grace_s: float = DEFAULT_GRACE_S) -> Resources:
        """Load a journal written by another (dead) process, to release what it lists."""
        with open(journal_path) as f:
            doc = json.load(f)
        res = cls(prefix=doc["prefix"], state_dir=os.path.dirname(journal_path), grace_s=grace_s)
        res.owner_pid = int(doc["owner"]["pid"])
        res.owner_starttime = int(doc["owner"]["starttime"])
        res.journal_path = journal_path
        res._entries = [Entry.from_json(e) for e in doc["entries"]]
        return res

    @property
    def entries(self) -> tuple[Entry, ...]:
        with self._lock:
            return tuple(self._entries)

    # -- recording -----------------------------------------------------------------------------

    def _check_name(self, kind: ResourceKind, name: str) -> None:
        if not name.startswith(self.prefix):
            raise ValueError(f"{kind.value} {name!r} does not start with the prefix {self.prefix!r}")

    def _add(self, entry: Entry) -> Entry:
        with self._lock:
            if entry not in self._entries:
                self._entries.append(entry)
                self._write()
        return entry

    def record_netns(self, name: str) -> Entry:
        self._check_name(ResourceKind.NETNS, name)
        return self._add(Entry(ResourceKind.NETNS, name))

    def record_link(self, name: str, netns: str | None = None) -> Entry:
        self._check_name(ResourceKind.LINK, name)
        return self._add(Entry(ResourceKind.LINK, name, netns=netns))

    def record_process(self, pid: int, name: str | None = None) -> Entry:
        """Record a running process (ideally a session leader: its whole group is killed)."""
        starttime = process_starttime(pid)
        if starttime is None:
            raise ProcessLookupError(f"no process {pid}")
        label = name or str(pid)
        return self._add(Entry(ResourceKind.PROCESS, label, pid=pid, starttime=starttime))

    def record_file(self, path: str) -> Entry:
        return self._add(Entry(ResourceKind.FILE, os.path.abspath(path)))

    def forget(self, entry: Entry) -> bool:
        """Drop `entry` (someone else removed it); True if it was recorded."""
        with self._lock:
            if entry not in self._entries:
                return False
            self._entries.remove(entry)
            self._write()
            return True

    def _write(self) -> None:
        if not self._entries:
            self._remove_journal()
            return
        doc = {
            "version": JOURNAL_VERSION,
            "owner": {"pid": self.owner_pid, "starttime": self.owner_starttime},
            "prefix": self.prefix,
            "entries": [e.to_json() for e in self._entries],
        }
        os.makedirs(self.state_dir, mode=0o755, exist_ok=True)
        tmp = os.path.join(self.state_dir, "." + os.path.basename(self.journal_path) + ".tmp")
        entries = doc.pop("entries")
        with open(tmp, "w") as f:
            # one entry per line, each by the C encoder (indent= would make json use its Python one)
            f.write(json.dumps(doc)[:-1] + ', "entries": [\n ' + ",\n ".join(map(json.dumps, entries)) + "\n]}\n")
        os.replace(tmp, self.journal_path)

    def _remove_journal(self) -> None:
        try:
            os.unlink(self.journal_path)
        except FileNotFoundError:
            pass

    # -- release -------------------------------------------------------------------------------

    def _release_one(self, entry: Entry) -> bool:
        """Remove one non-process entry; False if it was already gone."""
        if entry.kind is ResourceKind.LINK:
            self._check_name(entry.kind, entry.name)
            return _delete_link(entry.name, entry.netns)
        if entry.kind is ResourceKind.NETNS:
            self._check_name(entry.kind, entry.name)
            return delete_netns(entry.name)
        if entry.kind is ResourceKind.FILE:
            try:
                os.unlink(entry.name)
            except FileNotFoundError:
                return False
            return True
        raise ValueError(f"cannot release {entry.kind}")

    def release_all(self) -> ReleaseReport:
        """Kill recorded processes (SIGTERM, then SIGKILL after the grace period), then delete
        links, netns and files; drop the journal. Continues past errors and returns them."""
        with self._lock:
            entries = list(self._entries)
            removed: list[Entry] = []
            errors: list[str] = []
            failed: list[Entry] = []
            procs = [e for e in entries if e.kind is ResourceKind.PROCESS]
            live = [e for e in procs if process_matches(e.pid, e.starttime)]
            try:
                survivors = set(terminate_processes(live, self.grace_s))
            except Exception as exc:  # noqa: BLE001 - keep releasing the rest
                errors.append(f"processes: {exc!r}")
                failed += live
            else:
                for e in live:
                    if (e.pid, e.starttime) in survivors:
                        errors.append(f"process {e.name} (pid {e.pid}) survived SIGKILL")
                        failed.append(e)
                    else:
                        removed.append(e)
            order = (ResourceKind.LINK, ResourceKind.NETNS, ResourceKind.FILE)
            for kind in order:
                for entry in (e for e in entries if e.kind is kind):
                    try:
                        if self._release_one(entry):
                            removed.append(entry)
                    except Exception as exc:  # noqa: BLE001
                        errors.append(f"{entry.kind.value} {entry.name}: {exc!r}")
                        failed.append(entry)
            for message in errors:
                log.warning("release: %s", message)
            self._entries = [e for e in entries if e in failed]
            self._write()
            return ReleaseReport(removed=tuple(removed), errors=tuple(errors))

    def __enter__(self) -> Resources:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release_all()


def install_signal_handlers(
    resources: Resources, signums: Iterable[int] = (signal.SIGTERM, signal.SIGHUP)
) -> Callable[[], None]:
    """On any of `signums`: release_all, restore the previous handlers, and deliver the signal
    again, so the process ends (or the earlier handler runs) as it would have without us.

    Call from the main thread. Returns a function that puts the previous handlers back.
    """
    signums = tuple(signums)
    previous = {s: signal.getsignal(s) for s in signums}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    def handler(signum: int, frame: object) -> None:
        try:
            resources.release_all()
        finally:
            restore()
            signal.raise_signal(signum)

    for s in signums:
        signal.signal(s, handler)
    return restore


# -- clean -------------------------------------------------------------------------------------


def _journal_owner(path: str) -> tuple[int, int] | None:
    m = _JOURNAL_RE.fullmatch(os.path.basename(path))
    return (int(m[1]), int(m[2])) if m else None


def _claim(entry: Entry) -> tuple[ResourceKind, str, str | None]:
    return (entry.kind, entry.name, entry.netns)


def clean(prefix: str = DEFAULT_PREFIX, state_dir: str | None = None) -> CleanReport:
    """Remove what dead podnet processes left: first what their journals list, then any netns or
    root-netns link whose name starts with `prefix`. Whatever a live process's journal claims
    stays, even if a dead journal lists it too.

    Journals are released when their own prefix starts with `prefix` (so every name they hold
    does too). If a live journal cannot be read, the prefix sweep is skipped: its claims are unknown.
    The journals of a cluster's node processes, under `<state_dir>/nodes/<node>/`, count as well.
    """
    validate_prefix(prefix)
    state_dir = state_dir or state_dir_default()
    removed: list[Entry] = []
    journals: list[str] = []
    kept: list[str] = []
    errors: list[str] = []
    claimed: set[tuple[ResourceKind, str, str | None]] = set()
    dead: list[Resources] = []
    sweep = True

    # a cluster's nodes journal under <state_dir>/nodes/<node>/ (podnet.cluster_node)
    journal_paths = glob.glob(os.path.join(state_dir, "podnet-*.json")) + glob.glob(
        os.path.join(state_dir, "nodes", "*", "podnet-*.json"))
    for path in sorted(journal_paths):
        owner = _journal_owner(path)
        if owner is None:
            continue
        alive = process_matches(*owner)
        try:
            journal = Resources.adopt(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if alive:
                errors.append(f"live journal {path} unreadable, prefix sweep skipped: {exc!r}")
                sweep = False
            else:
                errors.append(f"journal {path} of a dead process unreadable, removed: {exc!r}")
                os.unlink(path)
            continue
        if alive:
            claimed.update(_claim(e) for e in journal.entries)
        elif journal.prefix.startswith(prefix):
            dead.append(journal)

    for journal in dead:
        for entry in journal.entries:
            if _claim(entry) in claimed:
                kept.append(entry.name)
                journal.forget(entry)
        report = journal.release_all()
        removed += report.removed
        errors += report.errors
        journals.append(journal.journal_path)

    for tmp in glob.glob(os.path.join(state_dir, ".podnet-*.json.tmp")) + glob.glob(
            os.path.join(state_dir, "nodes", "*", ".podnet-*.json.tmp")):
        owner = _journal_owner(os.path.basename(tmp)[1:-4])
        if owner is not None and not process_matches(*owner):
            os.unlink(tmp)

    if sweep:
        swept, sweep_kept, sweep_errors = _sweep(prefix, claimed)
        removed += swept
        kept += sweep_kept
        errors += sweep_errors

    for message in errors:
        log.warning("clean: %s", message)
    return CleanReport(
        removed=tuple(removed), journals=tuple(journals), kept=tuple(kept), errors=tuple(errors)
    )


def _sweep(
    prefix: str, claimed: set[tuple[ResourceKind, str, str | None]]
) -> tuple[list[Entry], list[str], list[str]]:
    """Delete unclaimed netns and root-netns links named with `prefix`: (removed, kept, errors)."""
    removed: list[Entry] = []
    kept: list[str] = []
    errors: list[str] = []
    for name in list_netns(prefix):
        if (ResourceKind.NETNS, name, None) in claimed:
            kept.append(name)
            continue
        try:
            if delete_netns(name):
                removed.append(Entry(ResourceKind.NETNS, name))
        except Exception as exc:  # noqa: BLE001 - keep cleaning the rest
            errors.append(f"netns {name}: {exc!r}")
    with open_iproute() as ipr:
        links = [
            (link.get_attr("IFLA_IFNAME"), link)
            for link in ipr.get_links()
            if link.get_attr("IFLA_IFNAME", "").startswith(prefix)
        ]
    for name, link in links:
        if (ResourceKind.LINK, name, None) in claimed or _held_tap(link):
            kept.append(name)
            continue
        try:
            if _delete_link(name, None):
                removed.append(Entry(ResourceKind.LINK, name))
        except Exception as exc:  # noqa: BLE001
            errors.append(f"link {name}: {exc!r}")
    return removed, kept, errors
