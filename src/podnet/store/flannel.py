"""Flannel's subnet leases: each node leases a /24 of the cluster network from the store.

Layer: store. Follows flanneld's etcd subnet manager (flannel-io/flannel pkg/subnet/config.go,
pkg/subnet/etcd/{local_manager.go,registry.go}, pkg/backend/vxlan): the same keys, JSON and steps,
so a real flanneld pointed at the same etcd would read podnet's leases and podnet would read its.

    /coreos.com/network/config                {"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}
    /coreos.com/network/subnets/10.244.1.0-24 {"PublicIP":"172.18.0.2","BackendType":"vxlan",
                                               "BackendData":{"VNI":1,"VtepMAC":"0e:..."}}

The network config (ParseConfig + CheckNetworkConfig): `Network` is required; `SubnetLen` defaults
to 24 when the network is a /22 or larger, else to its prefix + 2 (a network smaller than /28 is
refused; a given SubnetLen must be at most 30 and leave room for four subnets); `SubnetMin`
defaults to the second subnet (the first is skipped: its address is the network's own),
`SubnetMax` to the last; both must be inside the network and on a subnet boundary; `Backend`
without a Type is "udp".

Acquiring (tryAcquireLease, up to 10 tries when another node wins a race):
1. list the leases; one with this node's PublicIP that still fits the config is reused: its key is
   written again under a new lease of `ttl_s` (flannel: grant + put); one that no longer fits is
   deleted;
2. else the node's previous subnet (flanneld reads it from /run/flannel/subnet.env) if free;
3. else a free subnet from SubnetMin up: flanneld draws at random among the first 100 free ones,
   podnet takes the first free one unless given an `rng` (deterministic addresses by default);
4. create the key with compare-and-swap (create-if-absent) under a new lease; losing the race
   revokes that lease and starts again from 1.
A lease is renewed `margin_s` before it expires (flanneld --subnet-lease-renew-margin, 60 min of
a 24 h lease) by writing the key again under a new lease. flanneld exits when its lease is deleted;
`keep_subnet_lease` raises SubnetLeaseLost. An unreachable store is not a lost lease: flanneld's
watch loop retries, and so does `keep_subnet_lease` (its watch and its renewals), so a node
outlives an etcd restart.

A lease whose key or value cannot be read (`parse_lease`: bad JSON, a PublicIP that is no IPv4
address, BackendData that is no object) is a ConfigError naming the key; a watcher logs and skips
it, as flanneld does, rather than stop.

Differences from flanneld: renewals and reuse write with update-if-revision rather than a blind
put, so a node can never overwrite a subnet that expired and was taken by another node meanwhile;
a lease left without keys by a renewal is revoked at once instead of running out its 24 h, and so
is one granted for a write that then failed (once the store answers again, if need be); a lost
create race is retried, as flanneld's loop means to (in the sources read, its createSubnet reports
the loss as errSubnetAlreadyexists while the loop retries only on etcd's ErrDuplicateKey, so
flanneld gives up instead). IPv4 only (no `&<v6>` key suffix, no IPv6Network).
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import trio

from podnet.errors import ConfigError, IPAMExhausted

from .base import (CompactedError, EventType, KeyExists, KeyValue, LeaseNotFound, RevisionConflict,
                   Store, StoreError, StoreUnavailable, revoke_if_unused)
from .informer import back_off

log = logging.getLogger(__name__)

FLANNEL_PREFIX = "/coreos.com/network"  # flanneld --etcd-prefix
CONFIG_KEY = f"{FLANNEL_PREFIX}/config"
SUBNETS_PREFIX = f"{FLANNEL_PREFIX}/subnets/"
SUBNET_TTL_S = 24 * 3600  # subnetTTL
RENEW_MARGIN_S = 60 * 60  # --subnet-lease-renew-margin=60 (minutes)
RACE_RETRIES = 10  # raceRetries
MAX_CANDIDATES = 100  # allocateSubnet picks among at most this many free subnets
_SUBNET_KEY = re.compile(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")


class SubnetLeaseLost(StoreError):
    """This node's subnet lease was deleted or taken over (flanneld exits on this)."""


# --- network config -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend_type: str
    backend: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def fits(self, subnet: IPv4Network) -> bool:
        """isSubnetConfigCompat: inside SubnetMin..SubnetMax with the configured length."""
        return (subnet.prefixlen == self.subnet_len
                and self.subnet_min <= subnet.network_address <= self.subnet_max)

    def subnets(self) -> Iterator[IPv4Network]:
        """Every leasable subnet, from SubnetMin to SubnetMax."""
        size = 1 << (32 - self.subnet_len)
        for address in range(int(self.subnet_min), int(self.subnet_max) + 1, size):
            yield IPv4Network((address, self.subnet_len))


def parse_network_config(text: str | bytes, source: str = CONFIG_KEY) -> NetworkConfig:
    """flanneld's ParseConfig + CheckNetworkConfig: defaults filled in, ConfigError if invalid."""
    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{source}: {problem}")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise fail(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise fail("must be a JSON object")
    try:
        network = IPv4Network(data["Network"]) if data.get("Network") else None
    except (ValueError, TypeError) as exc:
        raise fail(f"Network: {exc}") from None
    if network is None:
        raise fail("please define a correct Network parameter in the flannel config")
    subnet_len = data.get("SubnetLen") or 0
    if type(subnet_len) is not int:
        raise fail(f"SubnetLen: must be an integer, got {subnet_len!r}")
    if subnet_len:
        if subnet_len > 30:
            raise fail("SubnetLen must be less than /31")
        if subnet_len < network.prefixlen + 2:
            raise fail("network must be able to accommodate at least four subnets")
    elif network.prefixlen > 28:
        raise fail("network is too small. Minimum useful network prefix is /28")
    else:
        subnet_len = 24 if network.prefixlen <= 22 else network.prefixlen + 2
    size = 1 << (32 - subnet_len)
    bounds = {}
    for name, default in (("SubnetMin", int(network.network_address) + size),
                          ("SubnetMax", int(network.broadcast_address) + 1 - size)):
        try:
            value = IPv4Address(data[name]) if data.get(name) else IPv4Address(default)
        except (ValueError, TypeError) as exc:
            raise fail(f"{name}: {exc}") from None
        if value not in network:
            raise fail(f"{name} is not in the range of the Network")
        if int(value) % size:
            raise fail(f"{name} is not on a SubnetLen boundary: {value}")
        bounds[name] = value
    backend = data.get("Backend") or {}
    if not isinstance(backend, dict):
        raise fail("error decoding Backend property of config: must be an object")
    backend_type = backend.get("Type", "udp") if backend else "udp"
    return NetworkConfig(network, subnet_len, bounds["SubnetMin"], bounds["SubnetMax"],
                         backend_type, MappingProxyType(dict(backend)))


def network_config_json(network: str, *, backend_type: str = "vxlan",
                        **backend: Any) -> str:
    """The config flannel's docs show, e.g. {"Network": "10.244.0.0/16", "Backend": {"Type":
    "vxlan"}}; keyword arguments go into Backend (VNI=1, Port=8472...)."""
    return json.dumps({"Network": network, "Backend": {"Type": backend_type, **backend}})


def write_network_config(store: Store, network: str = "10.244.0.0/16", *,
                         backend_type: str = "vxlan", **backend: Any) -> NetworkConfig:
    """Store the network config unless one is there already; the config in force."""
    text = network_config_json(network, backend_type=backend_type, **backend)
    parse_network_config(text)
    try:
        store.create(CONFIG_KEY, text)
    except KeyExists:
        pass
    return read_network_config(store)


def read_network_config(store: Store) -> NetworkConfig:
    kv = store.get(CONFIG_KEY)
    if kv is None:
        raise ConfigError(f"{CONFIG_KEY}: flannel config not found in the store (write one with "
                          "podnet.store.flannel.write_network_config)")
    return parse_network_config(kv.value)


# --- leases -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseAttrs:
    """What a lease tells other nodes: where to send the subnet's traffic (PublicIP) and how
    (BackendType, BackendData: the vxlan backend's VNI and VTEP MAC)."""

    public_ip: str
    backend_type: str = "vxlan"
    backend_data: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def vxlan(cls, public_ip: str, vtep_mac: str, vni: int = 1, *, tunnel_gso: bool = False) -> LeaseAttrs:
        """`tunnel_gso`: add podnet's `"PodnetTunnelGSO":true` (core/overlay/flannel.py), only when true."""
        data: dict[str, Any] = {"VNI": vni, "VtepMAC": vtep_mac}
        if tunnel_gso:
            data["PodnetTunnelGSO"] = True
        return cls(public_ip, "vxlan", MappingProxyType(data))

    @property
    def tunnel_gso(self) -> bool:
        """The node takes whole VXLAN super-frames (podnet's BackendData key; false when absent)."""
        return self.backend_data.get("PodnetTunnelGSO") is True

    @property
    def vtep_mac(self) -> str | None:
        return self.backend_data.get("VtepMAC")

    @property
    def vni(self) -> int | None:
        return self.backend_data.get("VNI")

    def to_json(self) -> str:
        data: dict[str, Any] = {"PublicIP": self.public_ip}
        if self.backend_type:
            data["BackendType"] = self.backend_type
        if self.backend_data:
            data["BackendData"] = dict(self.backend_data)
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> LeaseAttrs:
        """ValueError naming the field for a value flannel's json.Unmarshal would refuse (or a
        PublicIP that is not an IPv4 address)."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if not isinstance(data.get("PublicIP"), str):  # IPv4Address(5) would be 0.0.0.5
            raise ValueError(f"PublicIP missing or not a string: {data.get('PublicIP')!r:.40}")
        try:
            public_ip = str(IPv4Address(data["PublicIP"]))
        except ValueError as exc:
            raise ValueError(f"PublicIP: {exc}") from None
        backend_data = data.get("BackendData") or {}
        if not isinstance(backend_data, dict):
            raise ValueError(f"BackendData is not an object: {backend_data!r:.40}")
        return cls(public_ip, data.get("BackendType", ""), MappingProxyType(dict(backend_data)))


@dataclass(frozen=True)
class SubnetLease:
    subnet: IPv4Network
    attrs: LeaseAttrs
    lease_id: int
    mod_revision: int
    ttl_s: int | None = None
    expires_at: float | None = None  # in the clock of the `now` given when it was written

    @property
    def key(self) -> str:
        return subnet_key(self.subnet)

    def renew_at(self, margin_s: float = RENEW_MARGIN_S) -> float:
        if self.expires_at is None:
            raise ValueError(f"{self.key}: expiry unknown (a lease read, not written, here)")
        return self.expires_at - margin_s


def subnet_key(subnet: IPv4Network | str) -> str:
    """MakeSubnetKey: 10.244.1.0/24 -> /coreos.com/network/subnets/10.244.1.0-24."""
    subnet = IPv4Network(subnet)
    return f"{SUBNETS_PREFIX}{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(key: str) -> IPv4Network | None:
    """ParseSubnetKey (IPv4 part): the subnet a lease key names, or None."""
    if (match := _SUBNET_KEY.search(key)) is None:
        return None
    try:
        return IPv4Network(f"{match.group(1)}/{match.group(2)}")
    except ValueError:
        return None


def parse_lease(kv: KeyValue) -> SubnetLease:
    """The lease stored at `kv`; ConfigError naming the key and what is wrong with it."""
    subnet = parse_subnet_key(kv.key)
    if subnet is None:
        raise ConfigError(f"{kv.key}: not a subnet lease key")
    try:
        attrs = LeaseAttrs.from_json(kv.value)
    except ValueError as exc:
        raise ConfigError(f"{kv.key}: {exc}") from None
    return SubnetLease(subnet, attrs, kv.lease, kv.mod_revision)


def lease_from_kv(kv: KeyValue) -> SubnetLease | None:
    """A lease as stored, or None (logged) for a key or value flannel would skip too."""
    try:
        return parse_lease(kv)
    except ConfigError as exc:
        log.warning("ignoring bad subnet lease %s", exc)
        return None


def list_subnet_leases(store: Store) -> tuple[list[SubnetLease], int]:
    """The valid leases (key order) and the revision to watch SUBNETS_PREFIX from + 1."""
    listing = store.list(SUBNETS_PREFIX)
    leases = [lease for kv in listing if (lease := lease_from_kv(kv)) is not None]
    return leases, listing.revision


def _free_subnets(config: NetworkConfig, leases: list[SubnetLease]) -> list[IPv4Network]:
    taken = [lease.subnet for lease in leases]
    free: list[IPv4Network] = []
    for subnet in config.subnets():
        if not any(subnet.overlaps(other) for other in taken):
            free.append(subnet)
            if len(free) == MAX_CANDIDATES:
                break
    return free


def _write(store: Store, subnet: IPv4Network, attrs: LeaseAttrs, ttl_s: int, now: float,
           mod_revision: int | None, unrevoked: set[int] | None = None) -> SubnetLease:
    """Write the lease key under a new store lease: create-if-absent (mod_revision None) or
    update-if-revision. Raises KeyExists / RevisionConflict after revoking the new lease.

    A write that fails otherwise (the store went away between the grant and the write) leaves
    the new lease with no key, to run out its TTL (24 h) unless revoked: it is revoked if it holds
    no key (the write may have gone through with its answer lost: then the key is on it and stays,
    for a retry to adopt). A revoke that cannot reach the store either adds the lease's id to
    `unrevoked`, for the caller to revoke once the store is back (`revoke_unused`)."""
    lease = store.grant(ttl_s)
    key = subnet_key(subnet)
    try:
        if mod_revision is None:
            revision = store.create(key, attrs.to_json(), lease=lease.id)
        else:
            revision = store.update(key, attrs.to_json(), mod_revision=mod_revision,
                                    lease=lease.id)
    except (KeyExists, RevisionConflict):
        try:
            store.revoke(lease.id)
        except LeaseNotFound:
            pass
        raise
    except StoreError:
        if unrevoked is None:
            unrevoked = set()
        unrevoked.add(lease.id)
        revoke_unused(store, unrevoked)
        raise
    return SubnetLease(subnet, attrs, lease.id, revision, lease.ttl_s, now + lease.ttl_s)


def revoke_unused(store: Store, lease_ids: set[int]) -> None:
    """Revoke each lease of `lease_ids` that holds no key (granted for a write that failed), and
    take it out of the set, with those that hold a key or ended; the ones the store could not be
    asked about stay in the set."""
    for lease_id in sorted(lease_ids):
        try:
            if revoke_if_unused(store, lease_id):
                log.info("lease %x: granted for a write that failed, revoked", lease_id)
        except StoreError as exc:
            log.info("lease %x: granted for a write that failed, not revoked yet: %s", lease_id, exc)
            continue
        lease_ids.discard(lease_id)


def acquire_subnet_lease(store: Store, attrs: LeaseAttrs, *, now: float,
                         ttl_s: int = SUBNET_TTL_S, previous_subnet: IPv4Network | str | None = None,
                         rng: random.Random | None = None) -> SubnetLease:
    """A subnet for the node with `attrs.public_ip`, as flanneld's AcquireLease gets one (see the
    module docstring). `now` is the caller's clock, for `expires_at`."""
    config = read_network_config(store)
    previous = IPv4Network(previous_subnet) if previous_subnet is not None else None
    for _ in range(RACE_RETRIES):
        leases, _ = list_subnet_leases(store)
        mine = next((lease for lease in leases if lease.attrs.public_ip == attrs.public_ip), None)
        try:
            if mine is not None:
                if config.fits(mine.subnet):
                    log.info("found lease %s for %s, reusing", mine.subnet, attrs.public_ip)
                    renewed = _write(store, mine.subnet, attrs, ttl_s, now, mine.mod_revision)
                    if mine.lease_id:
                        revoke_if_unused(store, mine.lease_id)
                    return renewed
                log.info("lease %s for %s does not fit the network config, deleting",
                         mine.subnet, attrs.public_ip)
                store.delete(mine.key, mod_revision=mine.mod_revision)
                leases.remove(mine)
            if previous is not None and config.fits(previous) \
                    and not any(previous.overlaps(lease.subnet) for lease in leases):
                subnet = previous
            else:
                free = _free_subnets(config, leases)
                if not free:
                    raise IPAMExhausted(f"{SUBNETS_PREFIX}: out of subnets: every /"
                                        f"{config.subnet_len} of {config.network} from "
                                        f"{config.subnet_min} to {config.subnet_max} is leased")
                subnet = rng.choice(free) if rng is not None else free[0]
            lease = _write(store, subnet, attrs, ttl_s, now, None)
            log.info("allocated lease %s to %s", subnet, attrs.public_ip)
            return lease
        except (KeyExists, RevisionConflict):
            continue  # another node wrote first: look again
    raise StoreError(f"{SUBNETS_PREFIX}: max retries reached trying to acquire a subnet for "
                     f"{attrs.public_ip}")


def renew_subnet_lease(store: Store, lease: SubnetLease, *, now: float,
                       unrevoked: set[int] | None = None) -> SubnetLease:
    """Write the lease again under a new store lease (RenewLease). SubnetLeaseLost if the key is
    gone or no longer the one this node wrote. A store lease granted for a write that failed and
    that could not be revoked then is added to `unrevoked` (see `_write`)."""
    try:
        renewed = _write(store, lease.subnet, lease.attrs, lease.ttl_s or SUBNET_TTL_S, now,
                         lease.mod_revision, unrevoked)
    except RevisionConflict as exc:
        raise SubnetLeaseLost(f"{lease.key}: lease lost ({exc})") from None
    if lease.lease_id:
        revoke_if_unused(store, lease.lease_id)
    return renewed


def release_subnet_lease(store: Store, lease: SubnetLease) -> None:
    """Give the subnet back now (flanneld never does: its lease waits 24 h for a restart)."""
    try:
        store.revoke(lease.lease_id)
    except LeaseNotFound:
        pass


async def keep_subnet_lease(store: Store, lease: SubnetLease, *,
                            margin_s: float = RENEW_MARGIN_S,
                            on_renew: Callable[[SubnetLease], None] | None = None) -> None:
    """Renew `lease` `margin_s` before each expiry until cancelled (CompleteLease). Raises
    SubnetLeaseLost as soon as the key is deleted, or at the renewal after someone else wrote it.
    `lease.expires_at` is in trio's clock: acquire with now=trio.current_time().

    The store going away (etcd restarting) loses nothing: the lease outlives it. A watch that
    breaks is opened again, after a backoff, from the last revision it saw + 1; one whose history
    was compacted meanwhile reads the key instead, and only a key that is gone or was written by
    someone else is lost. A renewal that cannot reach the store is tried again after a backoff; if
    the first try was written but its answer lost, the retry finds the key moved on with this
    node's own value and adopts it rather than calling the lease lost. A store lease granted for a
    renewal whose write failed is revoked (once the store answers again, if it did not then),
    unless the write went through and the key is on it."""
    current = lease
    lost: SubnetLeaseLost | None = None
    unrevoked: set[int] = set()   # store leases granted for failed writes, not revoked yet
    renewing = trio.Lock()  # while held, `current` is what the store holds (no renewal in flight)

    async def renew_forever(cancel_scope: trio.CancelScope) -> None:
        nonlocal current, lost
        failures, first_try = 0, 0.0
        while True:
            if not failures:
                await trio.sleep_until(current.renew_at(margin_s))
                first_try = trio.current_time()
            held, now, retry = current, trio.current_time(), failures > 0
            try:
                async with renewing:
                    current = await trio.to_thread.run_sync(
                        lambda: _renew(store, held, now=now, retry=retry, first_try=first_try,
                                       unrevoked=unrevoked))
            except StoreUnavailable as exc:
                failures = await back_off(held.key, exc, failures, then="renewing")
                continue
            except SubnetLeaseLost as exc:
                lost = exc
                cancel_scope.cancel()
                return
            failures = 0
            log.info("lease %s renewed, new expiry in %s s", current.subnet, current.ttl_s)
            if on_renew is not None:
                on_renew(current)

    async def watch_forever(cancel_scope: trio.CancelScope) -> None:
        """Renewals are PUTs; a DELETE means the lease is gone."""
        nonlocal lost
        seen, failures = lease.mod_revision, 0
        while True:
            try:
                watch = await trio.to_thread.run_sync(
                    lambda: store.watch(lease.key, start_revision=seen + 1))
            except StoreUnavailable as exc:
                failures = await back_off(lease.key, exc, failures)
                continue
            try:
                async for event in watch:
                    failures, seen = 0, max(seen, event.revision)
                    if event.type is EventType.DELETE:
                        lost = SubnetLeaseLost(f"{lease.key}: lease has been revoked")
                        cancel_scope.cancel()
                        return
                return  # the store was closed
            except StoreUnavailable as exc:
                failures = await back_off(lease.key, exc, failures)
            except CompactedError as exc:
                log.info("%s: %s; reading the key", lease.key, exc)
                try:
                    async with renewing:
                        listing = await trio.to_thread.run_sync(store.list, lease.key)
                        kv = next((kv for kv in listing if kv.key == lease.key), None)
                        if kv is None or kv.mod_revision != current.mod_revision:
                            found = "gone" if kv is None else f"written at revision {kv.mod_revision}"
                            lost = SubnetLeaseLost(f"{lease.key}: lease lost while the watch was "
                                                   f"away ({found}, this node's is "
                                                   f"{current.mod_revision})")
                            cancel_scope.cancel()
                            return
                except StoreUnavailable as unavailable:
                    failures = await back_off(lease.key, unavailable, failures)
                    continue
                seen = listing.revision
            finally:
                watch.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(renew_forever, nursery.cancel_scope)
        nursery.start_soon(watch_forever, nursery.cancel_scope)
    if lost is not None:
        raise lost


def _renew(store: Store, held: SubnetLease, *, now: float, retry: bool,
           first_try: float, unrevoked: set[int]) -> SubnetLease:
    """renew_subnet_lease; on a retry, a key that moved on with this node's own value is the
    earlier try's write, whose answer was lost: adopted (its expiry counted from the first try).
    Then the store leases of failed tries that are still there and hold no key are revoked."""
    renewed = _renew_or_adopt(store, held, now=now, retry=retry, first_try=first_try,
                              unrevoked=unrevoked)
    if unrevoked:
        revoke_unused(store, unrevoked)
    return renewed


def _renew_or_adopt(store: Store, held: SubnetLease, *, now: float, retry: bool,
                    first_try: float, unrevoked: set[int]) -> SubnetLease:
    try:
        return renew_subnet_lease(store, held, now=now, unrevoked=unrevoked)
    except SubnetLeaseLost:
        if not retry:
            raise
        kv = store.get(held.key)
        if kv is None or kv.value != held.attrs.to_json().encode() or not kv.lease \
                or kv.lease == held.lease_id:
            raise
        ttl_s = held.ttl_s or SUBNET_TTL_S
        log.info("lease %s: the renewal before the store went away was written; adopting it",
                 held.subnet)
        if held.lease_id:
            revoke_if_unused(store, held.lease_id)
        return SubnetLease(held.subnet, held.attrs, kv.lease, kv.mod_revision, ttl_s,
                           first_try + ttl_s)
