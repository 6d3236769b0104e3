"""The interface every Service backend implements, and the registry of backends by name.

Layer: core, sans-IO. A backend turns Services (as `ProxyServicePort`, kube-proxy's own view of a
Service port and its endpoints) into its native form — iptables rules, IPVS virtual services,
BPF maps — and answers one question per NEW flow: `decide(pkt, now)`. It never rewrites a byte:
its `Decision` (DNAT to ip:port, masquerade or not, ACCEPT/DROP/REJECT) is pinned by conntrack and
applied by `core.nat`, and replies are reverse-NATed from the conntrack entry, never by asking the
backend again.

Rules the backends keep:
- `decide` is called only for the first packet of a connection (no conntrack entry yet), with the
  packet as it arrived, and returns where it goes; it may keep state (statistic counters, recent
  lists, IPVS connection counts) but must not depend on the wall clock: `now` is passed in.
- `sync` replaces the whole set of Services; the backend reports what it did and how long the
  datapath had to wait, in its own terms (a full or partial iptables-restore, map updates).
- `dump()` shows the native form the way the real tool shows it.
- The registry (`services.registry.BACKENDS`) is an explicit dict, never filled by import side effects.
"""

from __future__ import annotations

import abc
import enum
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from .kubeproxy import ProxyEndpoint, ProxyServicePort
from .packetinfo import PacketInfo

__all__ = ["DecideContext", "Decision", "NO_SERVICE", "ProxyEndpoint", "ProxyServicePort", "ServiceBackend",
           "SyncReport", "Verdict"]


class Verdict(enum.Enum):
    ACCEPT = "ACCEPT"
    DROP = "DROP"
    REJECT = "REJECT"


@dataclass(frozen=True, slots=True)
class Decision:
    """What happens to a NEW flow. `dnat` is (ip, port) as ints; `path` names each rule or map entry
    that decided, for traces (e.g. "nat/KUBE-SVC-XPGD46QRK7WJZT7O:2")."""

    verdict: Verdict = Verdict.ACCEPT
    dnat: tuple[int, int] | None = None
    masquerade: bool = False
    random_fully: bool = False
    reject_with: str | None = None
    path: tuple[str, ...] = ()
    cost: int = 0  # rules examined or map lookups made: the backend's own unit of work
    mark: int = 0

    @property
    def is_service(self) -> bool:
        return self.dnat is not None


NO_SERVICE = Decision()


@dataclass(frozen=True, slots=True)
class SyncReport:
    full: bool
    services: int
    objects_written: int     # rules, or entries, written in this sync
    objects_total: int       # rules, or entries, installed after it
    build_s: float = 0.0     # generating the change (filled in by the caller, who owns the clock)
    apply_s: float = 0.0     # applying it while the datapath waits
    detail: dict = field(default_factory=dict)


@dataclass
class DecideContext:
    """What a backend may consult besides the packet: the node's own addresses and a seeded RNG."""

    local_addresses: frozenset[int]
    rng: random.Random


class ServiceBackend(abc.ABC):
    """One way of load-balancing Services. Construct with the node's view of the cluster."""

    name: str = ""

    @abc.abstractmethod
    def sync(self, services: Iterable[ProxyServicePort], *, full: bool = True) -> SyncReport:
        """Program the backend for exactly `services` (a full resync or a partial one)."""

    @abc.abstractmethod
    def decide(self, pkt: PacketInfo, now: float, *, local_source: bool = False,
               effects: bool = True) -> Decision:
        """The fate of the first packet of a connection. With effects=False (a trace) nothing may
        change: no counters, no affinity or connection records, no random draws from the backend's
        own generator."""

    @abc.abstractmethod
    def dump(self) -> str:
        """The native form, as the real tool prints it."""

    def flow_closed(self, decision: Decision, now: float) -> None:
        """Told when a flow this backend decided leaves conntrack (IPVS counts connections)."""

    def handle_timer(self, now: float) -> None:
        """Expire the backend's own state (recent lists, affinity entries)."""

    def next_deadline(self) -> float | None:
        return None

    def statistics(self) -> dict:
        return {}
