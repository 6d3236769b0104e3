"""What podnet created on this machine, and how it all goes away (linux layer, root only).

Job: every running podnet process keeps a journal of the kernel objects and processes it made;
`Resources.release_all` removes them on exit, error or signal, and `clean` removes what a process
killed with SIGKILL left behind, never what a live podnet run anywhere on the machine claims.

Journal: one JSON document per process in the state dir (`/run/podnet`, or `$PODNET_STATE_DIR`,
or the constructor's `state_dir`), named `podnet-<pid>-<starttime>.json`:

    {"version": 1, "owner": {"pid": 4242, "starttime": 1234567}, "prefix": "pn-",
     "entries": [{"kind": "netns", "name": "pn-web-1"},
                 {"kind": "link", "name": "pn-v1a2b3c4d", "netns": null},
                 {"kind": "process", "name": "iperf3", "pid": 4300, "starttime": 1234600},
                 {"kind": "file", "name": "/run/podnet/lab.pcap"}]}

Registry of live journals: state dirs differ per run (a lab's /run/podnet, the bench's
/run/podnet-bench, a test's tmp dir, any `--state-dir`), so one state dir cannot tell `clean` what
every run on the machine owns. While a journal exists, its owner keeps a pointer to it in
`/run/podnet-live` (or `$PODNET_LIVE_DIR`): a symlink `<pid>-<starttime>-<hash>` whose target is the
journal's absolute path (the hash, of that path, tells apart two journals of one process). `clean`
spares what the journal of every live pointer claims, wherever it lives, and releases the journals
of dead owners it reaches when their prefix is within its own.

Invariants:
- A process is identified by pid AND starttime (field 22 of /proc/<pid>/stat): a recycled pid
  never matches, so podnet never signals a stranger. A zombie counts as dead.
- Record first, then create (write-ahead): a SIGKILL between the two leaves a journal entry for
  something that may not exist, which release tolerates, rather than an object nobody claims.
  TAPs need no entry: they are not persistent and vanish with the fd (or with their netns).
- The journal is rewritten whole with an atomic rename, so a SIGKILL never leaves half a file.
- Netns and link names recorded must carry the prefix; `clean` only ever deletes names with the
  prefix, and never one that a live podnet process's journal claims, nor a TAP still held by an fd.
- The pointer is made (a symlink renamed into place: atomic) after the journal's first write and
  before anything it lists is created, and removed before the journal is: a live pointer always
  finds its journal. A pointer whose owner is dead (SIGKILL) claims nothing; `clean` removes it.
- A registry that cannot be written does not stop a run: it is logged once, and then only a `clean`
  on the run's own state dir knows its claims. If `clean` cannot read the registry, or a live
  pointer's journal, it skips the prefix sweep: some claims are unknown.
- A dead owner's journal reached only through the registry is released only if this user owns the
  file (the registry could name any path; a journal lists files to delete).
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
import hashlib
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
from podnet.linux.netns import create_netns, delete_netns, list_netns, netns_exists, open_iproute

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/run/podnet"
STATE_DIR_ENV = "PODNET_STATE_DIR"
DEFAULT_LIVE_DIR = "/run/podnet-live"
LIVE_DIR_ENV = "PODNET_LIVE_DIR"
JOURNAL_VERSION = 1
DEFAULT_GRACE_S = 2.0
_POLL_S = 0.02
_JOURNAL_RE = re.compile(r"podnet-(\d+)-(\d+)\.json")
_POINTER_RE = re.compile(r"(\d+)-(\d+)-[0-9a-f]{16}")


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


def live_dir_default() -> str:
    return os.environ.get(LIVE_DIR_ENV) or DEFAULT_LIVE_DIR


def pointer_name(pid: int, starttime: int, journal_path: str) -> str:
    digest = hashlib.sha256(os.path.abspath(journal_path).encode()).hexdigest()[:16]
    return f"{pid}-{starttime}-{digest}"


@dataclass(frozen=True)
class Pointer:
    """One entry of the registry: `path` (the symlink) says that the process `pid`+`starttime`
    keeps the journal `journal` (an absolute path)."""

    path: str
    pid: int
    starttime: int
    journal: str

    @property
    def alive(self) -> bool:
        return process_matches(self.pid, self.starttime)


def registered_journals(live_dir: str | None = None) -> list[Pointer]:
    """Every pointer in the registry (none if it does not exist). Names not shaped like a pointer,
    and pointers that are not symlinks, are not podnet's and are left out. Raises OSError if the
    registry exists but cannot be listed."""
    live_dir = live_dir or live_dir_default()
    try:
        names = os.listdir(live_dir)
    except FileNotFoundError:
        return []
    pointers = []
    for name in sorted(names):
        m = _POINTER_RE.fullmatch(name)
        if m is None:
            continue
        path = os.path.join(live_dir, name)
        try:
            target = os.readlink(path)
        except FileNotFoundError:  # released meanwhile
            continue
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # not a symlink
                continue
            raise
        pointers.append(Pointer(path, int(m[1]), int(m[2]), target))
    return pointers


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
        live_dir: str | None = None,
    ) -> None:
        self.prefix = validate_prefix(prefix)
        self.state_dir = state_dir or state_dir_default()
        self.live_dir = live_dir or live_dir_default()
        self.grace_s = grace_s
        self.owner_pid = os.getpid()
        starttime = process_starttime(self.owner_pid)
        assert starttime is not None
        self.owner_starttime = starttime
        # absolute: the registry's pointer names it, and a later chdir must not move it
        self.journal_path = os.path.abspath(os.path.join(self.state_dir, journal_name(self.owner_pid, starttime)))
        self.pointer_path = os.path.join(self.live_dir, pointer_name(self.owner_pid, starttime, self.journal_path))
        self._entries: list[Entry] = []
        self._lock = threading.RLock()
        self._adopted = False       # another process's journal: never registered by us
        self._registered = False    # our pointer is in the registry
        self._register_warned = False

    @classmethod
    def adopt(
        cls,
        journal_path: str,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        live_dir: str | None = None,
        owner_uid: int | None = None,
    ) -> Resources:
        """Load a journal written by another process: to release what it lists if that process is
        dead, or only to read its claims. Releasing it to the end also drops its owner's pointer.
        `owner_uid`: refuse (PermissionError) a journal file that another user owns."""
        with open(journal_path) as f:
            if owner_uid is not None and (uid := os.fstat(f.fileno()).st_uid) != owner_uid:
                raise PermissionError(f"journal {journal_path} belongs to uid {uid}")
            doc = json.load(f)
        res = cls(prefix=doc["prefix"], state_dir=os.path.dirname(journal_path), grace_s=grace_s,
                  live_dir=live_dir)
        res.owner_pid = int(doc["owner"]["pid"])
        res.owner_starttime = int(doc["owner"]["starttime"])
        res.journal_path = os.path.abspath(journal_path)
        res.pointer_path = os.path.join(
            res.live_dir, pointer_name(res.owner_pid, res.owner_starttime, res.journal_path))
        res._entries = [Entry.from_json(e) for e in doc["entries"]]
        res._adopted = True
        return res

    @property
    def registered(self) -> bool:
        """True while the registry points at this journal (False when there is nothing to journal,
        and when the registry could not be written: see the log)."""
        with self._lock:
            return self._registered

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

    def create_netns(self, name: str, *, ipv6: bool = True) -> Entry:
        """Journal netns `name`, then make it (netns.create_netns). If it already exists it is
        someone else's (another run with the same prefix): FileExistsError, and it is neither
        claimed nor touched. A namespace half made is removed by create_netns itself."""
        entry = self.record_netns(name)
        try:
            create_netns(name, ipv6=ipv6)
        except BaseException:
            self.forget(entry)
            raise
        return entry

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
            self._unregister()
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
        if not self._registered and not self._adopted:
            self._register()

    def _register(self) -> None:
        """Point the registry at the journal, so that a `clean` on any state dir spares its claims.
        A failure is logged (once) and retried at the next write: the run goes on without it."""
        tmp = os.path.join(self.live_dir, "." + os.path.basename(self.pointer_path) + ".tmp")
        try:
            os.makedirs(self.live_dir, mode=0o755, exist_ok=True)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            os.symlink(self.journal_path, tmp)
            os.replace(tmp, self.pointer_path)
        except OSError as exc:
            if not self._register_warned:
                self._register_warned = True
                log.warning("cannot register journal %s in %s (%s): a `podnet clean` with another "
                            "state dir than %s may delete what this run creates", self.journal_path,
                            self.live_dir, exc, self.state_dir)
            return
        self._registered = True

    def _unregister(self) -> None:
        if not (self._registered or self._adopted):
            return
        try:
            os.unlink(self.pointer_path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # harmless once the owner is dead: a later clean removes it
            log.warning("cannot remove registry pointer %s: %s", self.pointer_path, exc)
        self._registered = False

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


def clean(
    prefix: str = DEFAULT_PREFIX, state_dir: str | None = None, *, live_dir: str | None = None
) -> CleanReport:
    """Remove what dead podnet processes left: first what their journals list, then any netns or
    root-netns link whose name starts with `prefix`. Whatever a live process's journal claims
    stays, even if a dead journal lists it too: the journals in `state_dir` (with its cluster
    nodes', under `<state_dir>/nodes/<node>/`) and every one the registry points at, wherever it is.

    Dead owners' journals are released when their own prefix starts with `prefix` (so every name
    they hold does too): those in `state_dir`, and those the registry reaches if this user owns
    them. A dead owner's pointer goes with its journal (at once if the journal is gone). If the
    registry or a live journal cannot be read, the prefix sweep is skipped: its claims are unknown.
    """
    validate_prefix(prefix)
    state_dir = state_dir or state_dir_default()
    live_dir = live_dir or live_dir_default()
    removed: list[Entry] = []
    journals: list[str] = []
    kept: list[str] = []
    errors: list[str] = []
    claimed: set[tuple[ResourceKind, str, str | None]] = set()
    dead: list[Resources] = []
    seen: set[str] = set()  # journals read already, by real path
    sweep = True

    # a cluster's nodes journal under <state_dir>/nodes/<node>/ (podnet.cluster_node)
    journal_paths = glob.glob(os.path.join(state_dir, "podnet-*.json")) + glob.glob(
        os.path.join(state_dir, "nodes", "*", "podnet-*.json"))
    for path in sorted(journal_paths):
        owner = _journal_owner(path)
        if owner is None:
            continue
        seen.add(os.path.realpath(path))
        alive = process_matches(*owner)
        try:
            journal = Resources.adopt(path, live_dir=live_dir)
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

    # every other run on the machine, whatever its state dir: a lab's, the bench's, a test's
    try:
        pointers = registered_journals(live_dir)
    except OSError as exc:
        errors.append(f"registry {live_dir} unreadable, prefix sweep skipped: {exc!r}")
        pointers, sweep = [], False
    for pointer in pointers:
        if os.path.realpath(pointer.journal) in seen:
            continue
        seen.add(os.path.realpath(pointer.journal))
        alive = pointer.alive
        if alive:
            try:
                claimed.update(_claim(e) for e in _live_entries(pointer))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                errors.append(f"live journal {pointer.journal} (registry {pointer.path}) unreadable, "
                              f"prefix sweep skipped: {exc!r}")
                sweep = False
        elif (journal := _dead_journal(pointer, prefix, live_dir, errors)) is not None:
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
    for tmp in glob.glob(os.path.join(live_dir, ".*.tmp")):  # a pointer's, SIGKILLed while made
        m = _POINTER_RE.fullmatch(os.path.basename(tmp)[1:-4])
        if m is not None and not process_matches(int(m[1]), int(m[2])):
            _unlink_pointer(tmp, errors)

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


def _live_entries(pointer: Pointer) -> tuple[Entry, ...]:
    """What the journal of a live pointer claims. Its owner writes the journal before the pointer
    and drops the pointer before the journal, so a journal missing while the pointer is gone too
    was just released (nothing claimed); one read again covers a release and a new record between."""
    if _journal_owner(pointer.journal) != (pointer.pid, pointer.starttime):
        raise ValueError(f"the pointer names {pointer.journal}, not a journal of its owner")
    for _ in range(2):
        try:
            return Resources.adopt(pointer.journal).entries
        except FileNotFoundError:
            if not os.path.lexists(pointer.path):
                return ()
    raise FileNotFoundError(errno.ENOENT, "journal missing while its owner's pointer stays", pointer.journal)


def _dead_journal(pointer: Pointer, prefix: str, live_dir: str, errors: list[str]) -> Resources | None:
    """The journal of a dead owner's pointer, to release if its prefix is within `prefix`; None
    (the pointer removed) if it is gone or cannot be trusted, None (the pointer kept, for a `clean`
    with a wider prefix) if its prefix is another's."""
    if _journal_owner(pointer.journal) != (pointer.pid, pointer.starttime):
        errors.append(f"registry {pointer.path} names {pointer.journal}, not a journal of its owner: removed")
        _unlink_pointer(pointer.path, errors)
        return None
    try:
        journal = Resources.adopt(pointer.journal, live_dir=live_dir, owner_uid=os.geteuid())
    except FileNotFoundError:  # released, or removed with its state dir
        _unlink_pointer(pointer.path, errors)
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        errors.append(f"journal {pointer.journal} of a dead process not released (left for a clean on its "
                      f"state dir), its pointer removed: {exc!r}")
        _unlink_pointer(pointer.path, errors)
        return None
    if not journal.prefix.startswith(prefix):
        return None
    journal.pointer_path = pointer.path
    return journal


def _unlink_pointer(path: str, errors: list[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        errors.append(f"registry pointer {path}: {exc!r}")


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
