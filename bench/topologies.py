"""How the benchmarks' namespaces are joined, and the clients that measure traffic between them.

Layer: bench (root only). Each topology is a context manager that yields a `Pair`: a client
netns, the server's address, and the pid of the forwarder process (None for the kernel). On exit,
error or Ctrl-C it removes everything it made; every netns, link and process is journalled first
in a `podnet.linux.resources.Resources` (state dir `STATE_DIR`), so if pytest itself is killed,
`podnet --state-dir /run/podnet-bench clean --prefix pn-b-` removes what is left.

    kernel-veth       A:eth0 ── veth ── B:eth0                       10.99.0.1/24 ↔ 10.99.0.2/24
    raw-forwarder     A:eth0=TAP ── rawfwd.py ── TAP=B:eth0          /32 + default via 169.254.1.1 onlink
    podnet            A:eth0=TAP ── podnet_node.py (open_lab) ── TAP=B:eth0

`service_lab` is a podnet node with Services (`service_node.py`, its own process) for the data-plane
groups; `iperf3_stream`, `iperf3_udp` and `connect_burst` (`connect_client.py`) are the clients, run
in a client namespace, that test_forwarding.py, test_dataplane.py and test_kernel.py share.

The raw pair is plumbed with podnet's own `open_tap` and `plumb_pod`, so its pods look exactly like
podnet's; the one difference is a static neighbour entry 169.254.1.1 → ee:ee:ee:ee:ee:ee in each
pod (the raw forwarder answers no ARP; podnet's proxy-ARP does).

Invariants: every name starts with `PREFIX` and carries a per-run token, so two runs (or another
lab on this shared machine) never collide; traffic only flows between namespaces made here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from podnet.linux import names
from podnet.linux.netns import create_netns, open_iproute, popen_in_netns, run_in_netns
from podnet.linux.pod import DEFAULT_GATEWAY, plumb_pod
from podnet.linux.resources import Resources, journal_name, process_starttime
from podnet.linux.tap import open_tap

PREFIX = "pn-b-"
STATE_DIR = os.environ.get("PODNET_BENCH_STATE_DIR", "/run/podnet-bench")
GATEWAY_MAC = "ee:ee:ee:ee:ee:ee"
IPERF_PORT = 5201
NUD_PERMANENT = 0x80  # include/uapi/linux/neighbour.h
BENCH_DIR = Path(__file__).resolve().parent


@dataclass
class Pair:
    """Two namespaces that can talk: iperf3 -c runs in `client_netns`, the server listens at `server_ip`."""

    client_netns: str
    server_ip: str
    forwarder_pid: int | None = None
    info: dict = field(default_factory=dict)   # what the forwarder reported when it stopped


def new_token() -> str:
    return secrets.token_hex(2)


def open_resources() -> Resources:
    return Resources(prefix=PREFIX, state_dir=STATE_DIR)


# ---- helpers ---------------------------------------------------------------------------------


def _make_netns(res: Resources, name: str) -> str:
    res.record_netns(name)
    create_netns(name)
    return name


def _static_gateway_neighbour(netns: str) -> None:
    """169.254.1.1 is-at ee:ee:ee:ee:ee:ee, permanently: what podnet's proxy-ARP would answer."""
    with open_iproute(netns) as ipr:
        index = ipr.link_lookup(ifname="eth0")[0]
        ipr.neigh("add", dst=DEFAULT_GATEWAY, lladdr=GATEWAY_MAC, ifindex=index, state=NUD_PERMANENT)


def _listening(netns: str, port: int) -> bool:
    done = run_in_netns(netns, subprocess.run, ["ss", "-Hltn", f"sport = :{port}"],
                        capture_output=True, text=True, timeout=5)
    return bool(done.stdout.strip())


def _wait_listening(netns: str, port: int, proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not _listening(netns, port):
        if proc.poll() is not None:
            raise RuntimeError(f"iperf3 -s in {netns} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"iperf3 -s in {netns} not listening after {timeout_s:.0f} s")
        time.sleep(0.05)


@contextlib.contextmanager
def _iperf3_server(res: Resources, netns: str) -> Iterator[None]:
    proc = popen_in_netns(netns, ["iperf3", "-s", "-p", str(IPERF_PORT)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        res.record_process(proc.pid, name="iperf3-server")
        _wait_listening(netns, IPERF_PORT, proc)
        yield
    finally:
        _stop(proc, grace_s=2.0)


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM a child we started (and its session), SIGKILL after `grace_s`; reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _read_json_line(proc: subprocess.Popen, timeout_s: float, what: str) -> dict:
    """The next line the child prints on stdout, as JSON; fail if it dies or stays silent."""
    deadline = time.monotonic() + timeout_s
    fd = proc.stdout.fileno()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{what}: nothing on stdout after {timeout_s:.0f} s")
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{what} exited with {proc.wait()} before reporting")
            return json.loads(line)


# ---- kernel-veth -----------------------------------------------------------------------------


@contextlib.contextmanager
def veth_pair(res: Resources, token: str) -> Iterator[Pair]:
    """Two namespaces joined by a kernel veth pair, 10.99.0.1/24 ↔ 10.99.0.2/24: the baseline."""
    ends = []
    for side, ip in (("a", "10.99.0.1"), ("b", "10.99.0.2")):
        netns = _make_netns(res, f"{PREFIX}{token}-veth-{side}")
        ends.append((netns, names.link_name(f"{token}/veth-{side}", kind=names.KIND_VETH, prefix=PREFIX), ip))
    (ns_a, link_a, _), (ns_b, link_b, _) = ends
    res.record_link(link_a)
    res.record_link(link_b)
    with open_iproute() as ipr:
        ipr.link("add", ifname=link_a, kind="veth", peer=link_b)
        for netns, link, _ip in ends:
            ipr.link("set", index=ipr.link_lookup(ifname=link)[0], net_ns_fd=netns)
    for netns, link, ip in ends:
        with open_iproute(netns) as ipr:
            index = ipr.link_lookup(ifname=link)[0]
            ipr.link("set", index=index, ifname="eth0", state="up")
            ipr.addr("add", index=index, address=ip, prefixlen=24)
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    with _iperf3_server(res, ns_b):
        yield Pair(ns_a, "10.99.0.2")


# ---- raw-forwarder ---------------------------------------------------------------------------


@contextlib.contextmanager
def raw_tap_pair(res: Resources, token: str, *, offloads: bool) -> Iterator[Pair]:
    """Two podnet-style pods (TAP eth0, /32, default via 169.254.1.1 onlink) joined by rawfwd.py."""
    with contextlib.ExitStack() as stack:
        pods = []
        for side, ip in (("a", "10.244.0.2"), ("b", "10.244.0.3")):
            netns = _make_netns(res, f"{PREFIX}{token}-raw-{side}")
            tap = stack.enter_context(open_tap(names.tap_name(f"{token}/raw-{side}", PREFIX), offloads=offloads))
            mac = plumb_pod(tap, netns, ip)
            _static_gateway_neighbour(netns)
            pods.append((netns, tap, mac, ip))
        (ns_a, tap_a, mac_a, _), (ns_b, tap_b, mac_b, ip_b) = pods
        argv = [sys.executable, str(BENCH_DIR / "rawfwd.py"), "--fd-a", str(tap_a.fd), "--mac-a", mac_a,
                "--fd-b", str(tap_b.fd), "--mac-b", mac_b]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                                pass_fds=(tap_a.fd, tap_b.fd), start_new_session=True)
        stack.callback(proc.stdout.close)
        stack.callback(_stop, proc, 5.0)
        res.record_process(proc.pid, name="rawfwd")
        _read_json_line(proc, 10.0, "rawfwd.py")
        pair = Pair(ns_a, ip_b, proc.pid, {"tap_offloads": tap_a.offloads})
        with _iperf3_server(res, ns_b):
            yield pair
        proc.send_signal(signal.SIGTERM)
        pair.info.update(_read_json_line(proc, 5.0, "rawfwd.py"))
        proc.wait(timeout=5.0)


# ---- podnet ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _node_process(res: Resources, argv: list[str], what: str, ready_timeout_s: float = 60.0
                  ) -> Iterator[tuple[subprocess.Popen, dict, dict]]:
    """A podnet node script in its own process (its own session, journalled): yields the process,
    its ready line and a dict that gets the line it prints after SIGTERM. On the way out it stops
    the node, releases whatever the node's own journal still lists, and removes the node's
    container logs when it stopped cleanly (they stay for debugging otherwise). The node's stderr
    is kept aside and shown only when something went wrong."""
    errors = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors, text=True,
                            start_new_session=True)
    starttime = process_starttime(proc.pid)
    ok = False
    final: dict = {}
    try:
        res.record_process(proc.pid, name=what)
        try:
            ready = _read_json_line(proc, ready_timeout_s, what)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; its stderr ends with:\n{_tail(errors)}") from exc
        yield proc, ready, final
        proc.send_signal(signal.SIGTERM)
        final.update(_read_json_line(proc, 20.0, what))
        ok = proc.wait(timeout=20) == 0
    finally:
        _stop(proc, grace_s=20.0)
        proc.stdout.close()
        # a node that did not finish its own teardown: release what its journal still lists
        journal = Path(STATE_DIR) / journal_name(proc.pid, starttime or 0)
        if journal.exists():
            Resources.adopt(str(journal)).release_all()
        if ok:
            logs = Path(STATE_DIR) / "logs"
            shutil.rmtree(logs / str(proc.pid), ignore_errors=True)
            with contextlib.suppress(OSError):
                logs.rmdir()  # only if no other run's logs are left in it
        else:
            sys.stderr.write(f"{what} (pid {proc.pid}) stderr:\n{_tail(errors)}\n")
        errors.close()


def _tail(file, chars: int = 3000) -> str:
    file.flush()
    file.seek(0)
    return file.read()[-chars:]


@contextlib.contextmanager
def podnet_pair(res: Resources, token: str, *, offloads: bool, profile: str | None = None) -> Iterator[Pair]:
    """A podnet lab (bench/podnet_node.py, its own process) with an iperf3 server and a client pod."""
    argv = [sys.executable, str(BENCH_DIR / "podnet_node.py"), "--token", token, "--prefix", PREFIX,
            "--state-dir", STATE_DIR]
    argv += [] if offloads else ["--no-offloads"]
    argv += ["--profile", profile] if profile else []
    with _node_process(res, argv, "podnet-node") as (proc, ready, final):
        client, server = ready["pods"]["client"], ready["pods"]["server"]
        pair = Pair(client["netns"], server["ip"], proc.pid, {"tap_offloads": client["tap_offloads"]})
        yield pair
    pair.info.update(final)


# ---- a podnet node with Services (bench/service_node.py) -------------------------------------


@dataclass
class ServiceLab:
    """A running `service_node.py`: its pid, its ready line, and a way to ask for its counters."""

    proc: subprocess.Popen
    ready: dict

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def client_netns(self) -> str:
        return self.ready["pods"]["client"]["netns"]

    @property
    def tap_offloads(self) -> bool:
        return bool(self.ready["pods"]["client"]["tap_offloads"])

    def service_ip(self, name: str) -> str:
        return self.ready["services"][name]["ip"]

    def pair(self, service: str = "iperf") -> Pair:
        """iperf3 from the client pod to a Service's ClusterIP (port 5201)."""
        return Pair(self.client_netns, self.service_ip(service), self.pid, {"tap_offloads": self.tap_offloads})

    def stats(self) -> dict:
        """The node's datapath counters now (SIGUSR1 → one JSON line)."""
        self.proc.send_signal(signal.SIGUSR1)
        return _read_json_line(self.proc, 30.0, "service_node.py")["stats"]


@contextlib.contextmanager
def service_lab(res: Resources, token: str, *, backend: str, fillers: int = 0, servers: int = 0,
                iperf: bool = False, offloads: bool = True, backend_options: dict | None = None
                ) -> Iterator[ServiceLab]:
    """A podnet node (bench/service_node.py, its own process): `fillers` Services without pods,
    `servers` accept-and-close pods behind default/target (the last Service in kube-proxy's order),
    an iperf3 pod behind default/iperf when `iperf`, and a client pod."""
    argv = [sys.executable, str(BENCH_DIR / "service_node.py"), "--token", token, "--prefix", PREFIX,
            "--state-dir", STATE_DIR, "--backend", backend, "--fillers", str(fillers),
            "--servers", str(servers), "--backend-options", json.dumps(backend_options or {})]
    argv += ["--iperf"] if iperf else []
    argv += [] if offloads else ["--no-offloads"]
    with _node_process(res, argv, "service-node", ready_timeout_s=300.0) as (proc, ready, _final):
        yield ServiceLab(proc, ready)


# ---- measuring -------------------------------------------------------------------------------


def cpu_times(pid: int | None) -> tuple[float, float]:
    """(user, system) CPU seconds of process `pid`, all its threads, so far; zeros for None."""
    if pid is None:
        return 0.0, 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick  # utime, stime: fields 14 and 15 of proc(5)


def iperf3_stream(pair: Pair, seconds: float, omit_s: int = 1) -> dict:
    """One TCP stream client → server for `seconds` (after `omit_s` of slow start); iperf3's JSON."""
    argv = ["iperf3", "-c", pair.server_ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-O", str(omit_s), "-J"]
    done = run_in_netns(pair.client_netns, subprocess.run, argv, capture_output=True, text=True,
                        timeout=seconds + omit_s + 30)
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 -c exited with {done.returncode}: {done.stdout[-500:]} {done.stderr[-500:]}")
    if "error" in result:
        raise RuntimeError(f"iperf3 -c: {result['error']}")
    return result


def iperf3_udp(pair: Pair, seconds: float, length: int = 18) -> dict:
    """UDP datagrams of `length` payload bytes client → server as fast as iperf3 can send them
    (`-u -b 0 -l length`) for `seconds`, no omit interval (iperf3's UDP loss counting with -O is
    unreliable across versions); iperf3's JSON. With 18 bytes each datagram is a 64-byte Ethernet
    frame counting the FCS (14 + 20 + 8 + 18 + 4). iperf3 refuses payloads under 16 bytes."""
    argv = ["iperf3", "-c", pair.server_ip, "-p", str(IPERF_PORT), "-u", "-b", "0", "-l", str(length),
            "-t", str(seconds), "-J"]
    done = run_in_netns(pair.client_netns, subprocess.run, argv, capture_output=True, text=True,
                        timeout=seconds + 30)
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 -c -u exited with {done.returncode}: {done.stdout[-500:]} {done.stderr[-500:]}")
    if "error" in result:
        raise RuntimeError(f"iperf3 -c -u: {result['error']}")
    return result


def udp_received(result: dict, length: int = 18) -> dict:
    """The receiver's side of an iperf3 UDP run: packets that arrived (the server's highest sequence
    number seen minus the gaps, i.e. packets - lost_packets) per second of its interval."""
    received = result["end"]["sum_received"]
    sent = result["end"]["sum_sent"]
    arrived = received["packets"] - received["lost_packets"]
    return {"pps": arrived / received["seconds"] if received["seconds"] else 0.0,
            "packets_received": arrived, "packets_sent": sent["packets"],
            "sent_pps": sent["packets"] / sent["seconds"] if sent["seconds"] else 0.0,
            "lost_percent": received["lost_percent"], "bytes": received["bytes"],
            "payload_bytes": length, "seconds": received["seconds"]}


def connect_burst(netns: str, ip: str, port: int, *, count: int, seconds: float = 0.0,
                  concurrency: int = 4, warmup: int = 5) -> dict:
    """bench/connect_client.py in `netns`: `count` new TCP connections to ip:port one at a time,
    each connect() timed, then `seconds` of back-to-back connects `concurrency` at a time."""
    argv = [sys.executable, str(BENCH_DIR / "connect_client.py"), ip, str(port), "--count", str(count),
            "--warmup", str(warmup), "--seconds", str(seconds), "--concurrency", str(concurrency)]
    done = run_in_netns(netns, subprocess.run, argv, capture_output=True, text=True,
                        timeout=30 + seconds + 6 * (count + warmup))
    if done.returncode:
        raise RuntimeError(f"connect_client.py exited with {done.returncode}: {done.stderr[-1000:]}")
    return json.loads(done.stdout)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank (rounded) of the sorted values: q=0.5 is the median of an odd count."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def latency_ms(times_s: list[float]) -> dict:
    """p50 / p90 / p99 / mean of connect() times, in ms."""
    return {"p50": percentile(times_s, 0.50) * 1e3, "p90": percentile(times_s, 0.90) * 1e3,
            "p99": percentile(times_s, 0.99) * 1e3, "mean": sum(times_s) / len(times_s) * 1e3}
