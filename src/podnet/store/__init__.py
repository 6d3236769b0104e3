"""podnet's cluster state store: nodes, subnet leases, Services, EndpointSlices and pods, kept where
every node can read and watch them, as kube-proxy watches the API server.

Layer: store, beside `cluster` (it imports the cluster model to serialise it) and below the lab,
which it never imports. Modules:

    base        the interface: revisions, compare-and-swap, leases, watches, compaction
    embedded    EmbeddedStore, in-process (the default: all nodes in one process)
    etcd        EtcdStore, a real etcd v3 over its JSON gateway (nodes in separate processes or hosts)
    etcd_server run_etcd(): a private one-member etcd on loopback (tests, local clusters)
    objects     Kubernetes' key layout (/registry/...) and the JSON of podnet's model objects
    nodes       node registration under a lease, kept by a heartbeat
    flannel     Flannel's network config and subnet leases (/coreos.com/network/...)
    informer    Reflector: list, then watch from the list's revision + 1, relist on compaction

`open_store("embedded")` or `open_store("etcd://127.0.0.1:2379")` picks an implementation from
the explicit `STORES` registry.
"""

from __future__ import annotations

from typing import Callable

from podnet.errors import ConfigError

from .base import (CompactedError, Event, EventType, KeyExists, KeyValue, Lease, LeaseNotFound,
                   Listing, RevisionConflict, Store, StoreError, StoreUnavailable, Watch)
from .embedded import EmbeddedStore


def _etcd(address: str) -> Store:
    from .etcd import EtcdStore
    return EtcdStore(address)


def _embedded(address: str) -> Store:
    if address not in ("", "//"):
        raise ConfigError(f"--store: embedded takes no address, got {address!r}")
    return EmbeddedStore()


# scheme of the --store value -> how to open it
STORES: dict[str, Callable[[str], Store]] = {"embedded": _embedded, "etcd": _etcd}
DEFAULT_STORE = "embedded"


def open_store(url: str = DEFAULT_STORE) -> Store:
    """A store from a `--store` value: `embedded`, or `etcd://HOST:PORT`."""
    scheme, _, rest = url.partition(":")
    if scheme in ("http", "https"):
        scheme, rest = "etcd", url
    if (opener := STORES.get(scheme)) is None:
        raise ConfigError(f"--store: unknown store {url!r} (use {DEFAULT_STORE} or "
                          "etcd://HOST:PORT)")
    return opener(url if scheme == "etcd" else rest)


__all__ = ["CompactedError", "DEFAULT_STORE", "EmbeddedStore", "Event", "EventType", "KeyExists",
           "KeyValue", "Lease", "LeaseNotFound", "Listing", "RevisionConflict", "STORES", "Store",
           "StoreError", "StoreUnavailable", "Watch", "open_store"]
