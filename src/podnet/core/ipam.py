"""Per-node pod address pools, following containernetworking/plugins host-local IPAM (1.1.1).

Layer: core. No sockets, no clock; the only I/O is `DiskStore`, which keeps host-local's files
with plain `open`/`os` (one podnet process owns a node, so nothing is flock'ed). Job: give each
(owner, ifname) - a sandbox's container id and interface - one IPv4 address from the node's range,
take it back on release, and keep both across a restart of the node.

Invariants:
- The network address, the broadcast address and the gateway are never handed out.
- An address has at most one holder; the store's `reserve` (O_EXCL on disk) decides.
- Allocation walks round-robin from `last_reserved_ip + 1`, wrapping once from `range_end` to
  `range_start`, so a released address is not reused until the cursor comes round. Every
  reservation moves the cursor and persists it; a release does not move it.
- The store holds everything: a new `Pool` over the same store has the same allocations and cursor.

Differences from host-local 1.1.1: allocating again for an (owner, ifname) that holds an address
returns it, where host-local fails with "<ip> has been allocated to <id>, duplicate allocation is
not allowed": a restarted node re-runs ADD for pods it already knows, and they must keep their
addresses. Like newer host-local, a gateway outside the subnet is a ConfigError; a subnet with
host bits set is rejected, not masked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Iterator, Protocol

from podnet.errors import ConfigError, IPAMExhausted

LINE_BREAK = "\r\n"  # host-local joins the id and the interface name with CRLF
LEGACY_IFNAME = ""  # what a record in host-local's older one-line format (id only) loads as
Records = dict[IPv4Address, tuple[str, str]]  # ip -> (owner, ifname)
Address = str | IPv4Address


class IPAMStore(Protocol):
    """Where reservations and the cursor live; `reserve` is the arbiter of who holds an address."""

    def load(self) -> tuple[Records, IPv4Address | None]: ...
    def reserve(self, ip: IPv4Address, owner: str, ifname: str) -> bool: ...
    def release(self, ip: IPv4Address) -> None: ...
    def set_last_reserved(self, ip: IPv4Address) -> None: ...


@dataclass
class MemoryStore:
    """A store that lives as long as the object; share one between pools to simulate a restart."""

    records: Records = field(default_factory=dict)
    last_reserved: IPv4Address | None = None

    def load(self) -> tuple[Records, IPv4Address | None]:
        return dict(self.records), self.last_reserved

    def reserve(self, ip: IPv4Address, owner: str, ifname: str) -> bool:
        if ip in self.records:
            return False
        self.records[ip] = (owner.strip(), ifname)
        return True

    def release(self, ip: IPv4Address) -> None:
        self.records.pop(ip, None)

    def set_last_reserved(self, ip: IPv4Address) -> None:
        self.last_reserved = ip


class DiskStore:
    """host-local's files under `<data_dir>/<network>/`, so the reference plugin can read them."""

    def __init__(self, data_dir: str | os.PathLike, network: str, range_index: int = 0) -> None:
        if network in ("", ".", "..") or "/" in network or "\0" in network:
            raise ConfigError(f"ipam: network name {network!r} cannot be used as a directory name")
        self.path = Path(data_dir) / network
        self.last_reserved_path = self.path / f"last_reserved_ip.{range_index}"
        os.makedirs(self.path, mode=0o755, exist_ok=True)
        # host-local flocks this file; podnet (one process per node) keeps it so the directory
        # looks the same. 0750 is the mode observed from the 1.1.1 build.
        os.close(os.open(self.path / "lock", os.O_RDONLY | os.O_CREAT, 0o750))

    def load(self) -> tuple[Records, IPv4Address | None]:
        records: Records = {}
        with os.scandir(self.path) as entries:
            for entry in entries:
                ip = _parse_ip(entry.name)
                # Only regular files named by an address are reservations; the lock, the
                # cursors and whatever else an operator left there are not.
                if ip is None or not entry.is_file(follow_symlinks=False):
                    continue
                text = Path(entry.path).read_bytes().decode("utf-8", "replace").strip()
                owner, sep, ifname = text.partition(LINE_BREAK)
                records[ip] = (owner.strip(), ifname if sep else LEGACY_IFNAME)
        cursor = self.last_reserved_path
        # As in host-local, a missing or unreadable cursor only costs round-robin order.
        last = _parse_ip(cursor.read_text("ascii", "replace").strip()) if cursor.exists() else None
        return records, last

    def reserve(self, ip: IPv4Address, owner: str, ifname: str) -> bool:
        try:
            _write(self.path / str(ip), f"{owner.strip()}{LINE_BREAK}{ifname}", os.O_EXCL)
        except FileExistsError:
            return False
        return True

    def release(self, ip: IPv4Address) -> None:
        (self.path / str(ip)).unlink(missing_ok=True)

    def set_last_reserved(self, ip: IPv4Address) -> None:
        # Write then rename, so a crash never leaves a truncated cursor behind.
        tmp = self.path / f".{self.last_reserved_path.name}.tmp"
        _write(tmp, str(ip), os.O_TRUNC)
        os.replace(tmp, self.last_reserved_path)


def _write(path: Path, text: str, flag: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flag, 0o644)
    try:
        os.write(fd, text.encode())
    except OSError:
        os.unlink(path)  # a half-written reservation would hold the address for nobody
        raise
    finally:
        os.close(fd)


def _parse_ip(text: str) -> IPv4Address | None:
    try:
        return IPv4Address(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class Allocation:
    ip: IPv4Address
    prefixlen: int
    gateway: IPv4Address
    owner: str
    ifname: str


@dataclass(frozen=True)
class IPAMStatistics:
    """A snapshot; the `*_total` counters count since this Pool object was built."""

    capacity: int  # addresses in range_start..range_end, less the gateway
    allocated: int
    free: int
    allocations_total: int  # new reservations; an idempotent repeat is not counted
    releases_total: int
    exhausted_total: int  # IPAMExhausted raised: pool full, or the requested address taken


class Pool:
    """One node's range set 0. See the module docstring for the rules it keeps."""

    def __init__(self, subnet: str | IPv4Network, *, name: str = "podnet",
                 range_start: Address | None = None, range_end: Address | None = None,
                 gateway: Address | None = None, store: IPAMStore | None = None) -> None:
        self.name = name
        try:
            self.subnet = IPv4Network(subnet)
        except ValueError as exc:
            raise ConfigError(f'pool "{name}": invalid subnet {subnet!r}: {exc}') from None
        if self.subnet.prefixlen > 30:
            raise ConfigError(f'pool "{name}": invalid range set 0: '
                              f"Network {self.subnet} too small to allocate from")
        net, bcast = self.subnet.network_address, self.subnet.broadcast_address
        self.gateway = self._usable("gateway", gateway, net + 1)
        self.range_start = self._usable("range_start", range_start, net + 1)
        self.range_end = self._usable("range_end", range_end, bcast - 1)
        if self.range_start > self.range_end:
            raise self._error(ConfigError, f"range_start {self.range_start} is after "
                                           f"range_end {self.range_end}")
        self._store: IPAMStore = store if store is not None else MemoryStore()
        records, self._last = self._store.load()
        # Addresses of other range sets may share host-local's directory; they are not ours.
        self._records = {ip: rec for ip, rec in records.items() if ip in self.subnet}
        self._allocations_total = self._releases_total = self._exhausted_total = 0

    @property
    def range_text(self) -> str:
        return f"{self.range_start}-{self.range_end}"

    def allocate(self, owner: str, ifname: str = "eth0", *,
                 requested: Address | None = None) -> Allocation:
        """Reserve an address for (owner, ifname), or return the one it already holds.

        Raises IPAMExhausted when the range is full or `requested` is taken, with host-local's
        text after the pool's name. The kubelet shows that text in a FailedCreatePodSandBox event
        and the pod stays ContainerCreating; it is not NetworkPluginNotReady, which is the node
        condition for a missing CNI config.
        """
        if not owner.strip() or not ifname or any(c in owner + ifname for c in LINE_BREAK):
            raise self._error(ConfigError, f"invalid owner {owner!r} / ifname {ifname!r}")
        want = None if requested is None else self._parse("requested", requested)
        if held := self._held_by(owner, ifname):
            if want in (None, held[0]):
                return self._allocation(held[0])
            raise self._error(ConfigError, f"{owner}/{ifname} already holds {held[0]}, "
                                           f"cannot also take requested IP address {want}")
        if want is not None:
            if not self.range_start <= want <= self.range_end:
                raise self._error(ConfigError, "failed to allocate for range 0: "
                                               f"{want} not in range set {self.range_text}")
            if want == self.gateway or want in self._records or not self._store.reserve(
                    want, owner, ifname):
                self._exhausted_total += 1
                raise self._error(IPAMExhausted, "failed to allocate for range 0: requested IP "
                                  f"address {want} is not available in range set {self.range_text}")
            return self._commit(want, owner, ifname)
        for ip in self._candidates():
            # The store is asked even when our view says free: it is the arbiter (O_EXCL).
            if ip not in self._records and self._store.reserve(ip, owner, ifname):
                return self._commit(ip, owner, ifname)
        self._exhausted_total += 1
        raise self._error(IPAMExhausted, "failed to allocate for range 0: no IP addresses "
                                         f"available in range set: {self.range_text}")

    def release(self, owner: str, ifname: str = "eth0") -> IPv4Address | None:
        """Free what (owner, ifname) holds; None if it holds nothing. The cursor does not move."""
        held = self._held_by(owner, ifname)
        for ip in held:
            self._store.release(ip)
            del self._records[ip]
            self._releases_total += 1
        return held[0] if held else None

    def lookup(self, owner: str, ifname: str = "eth0") -> Allocation | None:
        held = self._held_by(owner, ifname)
        return self._allocation(held[0]) if held else None

    def allocations(self) -> list[Allocation]:
        return [self._allocation(ip) for ip in sorted(self._records)]

    def statistics(self) -> IPAMStatistics:
        size = int(self.range_end) - int(self.range_start) + 1
        capacity = size - (self.range_start <= self.gateway <= self.range_end)
        in_range = sum(1 for ip in self._records if self.range_start <= ip <= self.range_end)
        return IPAMStatistics(capacity, len(self._records), capacity - in_range,
                              self._allocations_total, self._releases_total, self._exhausted_total)

    def _candidates(self) -> Iterator[IPv4Address]:
        first, size = int(self.range_start), int(self.range_end) - int(self.range_start) + 1
        # A cursor outside the range (the range was changed) restarts at range_start.
        in_range = self._last is not None and self.range_start <= self._last <= self.range_end
        offset = int(self._last) - first + 1 if in_range else 0
        ips = (IPv4Address(first + (offset + i) % size) for i in range(size))
        return (ip for ip in ips if ip != self.gateway)

    def _commit(self, ip: IPv4Address, owner: str, ifname: str) -> Allocation:
        self._records[ip] = (owner.strip(), ifname)
        self._store.set_last_reserved(ip)
        self._last = ip
        self._allocations_total += 1
        return self._allocation(ip)

    def _held_by(self, owner: str, ifname: str) -> list[IPv4Address]:
        # Records in host-local's older one-line format name no interface; like host-local,
        # they match on the owner alone, and only when no exact record exists.
        owner = owner.strip()
        exact = sorted(ip for ip, rec in self._records.items() if rec == (owner, ifname))
        return exact or sorted(ip for ip, rec in self._records.items()
                               if rec == (owner, LEGACY_IFNAME))

    def _allocation(self, ip: IPv4Address) -> Allocation:
        owner, ifname = self._records[ip]
        return Allocation(ip, self.subnet.prefixlen, self.gateway, owner, ifname)

    def _parse(self, field: str, value: Address) -> IPv4Address:
        try:
            return IPv4Address(value)
        except ValueError:
            raise self._error(ConfigError, f"{field} {value!r} is not an IPv4 address") from None

    def _usable(self, field: str, value: Address | None, default: IPv4Address) -> IPv4Address:
        ip = default if value is None else self._parse(field, value)
        if not self.subnet.network_address < ip < self.subnet.broadcast_address:
            raise self._error(ConfigError, f"{field} {ip} not a usable address in {self.subnet}")
        return ip

    def _error(self, kind: type[Exception], text: str) -> Exception:
        return kind(f'pool "{self.name}" ({self.subnet}): {text}')


def node_pool_cidr(node_index: int, cluster_cidr: str | IPv4Network = "10.244.0.0/16",
                   prefixlen: int = 24) -> IPv4Network:
    """The node's slice of the cluster CIDR, as kube-controller-manager assigns podCIDRs."""
    cluster = IPv4Network(cluster_cidr)
    if not cluster.prefixlen <= prefixlen <= 32:
        raise ConfigError(f"node prefixlen /{prefixlen} does not fit in cluster CIDR {cluster}")
    count = 1 << (prefixlen - cluster.prefixlen)
    if not 0 <= node_index < count:
        raise ConfigError(f"node index {node_index} outside 0..{count - 1} in {cluster}")
    return IPv4Network((int(cluster.network_address) + (node_index << (32 - prefixlen)), prefixlen))
