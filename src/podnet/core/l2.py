"""Layer 2: the proxy-ARP gateway of a routed node and the learning bridge of a bridge-mode node.

Layer: core. Two ways a node can attach its pods, as real CNI plugins do:

- Routed (Calico style, the default): every pod has a /32 and `default via 169.254.1.1 dev eth0
  onlink`. The pod ARPs for 169.254.1.1 and the host side answers with ee:ee:ee:ee:ee:ee through
  proxy-ARP (reference/cni-and-overlays.md §5). Every IP frame from a pod is then addressed to
  the gateway MAC and routed; pods never see each other's MACs.
- Bridge (kubenet's cbr0 / the bridge plugin): pods share the node's /24 and talk to each other
  directly at L2 through a learning bridge; the bridge itself holds the gateway address (.1) and
  routes what is addressed to its own MAC.

Invariants: a learned MAC belongs to exactly one port; an entry not refreshed for `aging_time_s`
(300 s, the Linux bridge default) is forgotten on the next `expire(now)`; group addresses are never
learned.
"""

from __future__ import annotations

from dataclasses import dataclass

from .packet import ArpInfo

GATEWAY_IP = "169.254.1.1"
GATEWAY_MAC = "ee:ee:ee:ee:ee:ee"
BRIDGE_AGING_TIME_S = 300.0


class ProxyArp:
    """Answers ARP requests for the addresses the node answers for.

    Like Calico's host veth with proxy_arp=1 and the 169.254.1.1 route, the only address a pod ever
    asks for is the gateway; a request for anything else is not proxied (a counted drop), which is
    what a pod with a /32 and an onlink default route never sends anyway.
    """

    def __init__(self, mac: bytes, addresses: set[int]) -> None:
        self.mac = mac
        self.addresses = set(addresses)

    def answers(self, arp: ArpInfo) -> bool:
        return arp.op == 1 and arp.tpa in self.addresses


@dataclass(slots=True)
class FdbEntry:
    port: int
    last_seen: float


@dataclass(frozen=True, slots=True)
class BridgeStatistics:
    entries: int
    learned_total: int
    moved_total: int
    aged_total: int
    flooded_total: int


class LearningBridge:
    """An IEEE 802.1D-style learning bridge: learn source MACs, forward known unicast, flood the rest."""

    def __init__(self, ports: set[int] | None = None, aging_time_s: float = BRIDGE_AGING_TIME_S) -> None:
        self.ports: set[int] = set(ports or ())
        self.aging_time_s = aging_time_s
        self.fdb: dict[bytes, FdbEntry] = {}
        self._learned = self._moved = self._aged = self._flooded = 0

    def add_port(self, port: int) -> None:
        self.ports.add(port)

    def remove_port(self, port: int) -> None:
        self.ports.discard(port)
        for mac in [m for m, e in self.fdb.items() if e.port == port]:
            del self.fdb[mac]

    def learn(self, src_mac: bytes, port: int, now: float) -> None:
        if src_mac[0] & 1:  # group address: never a source we can learn
            return
        entry = self.fdb.get(src_mac)
        if entry is None:
            self.fdb[src_mac] = FdbEntry(port, now)
            self._learned += 1
        else:
            if entry.port != port:
                self._moved += 1
                entry.port = port
            # refreshes from the flow cache may report a time older than a frame already seen
            entry.last_seen = max(entry.last_seen, now)

    def lookup(self, dst_mac: bytes, now: float) -> int | None:
        entry = self.fdb.get(dst_mac)
        if entry is None or now - entry.last_seen >= self.aging_time_s:
            return None
        return entry.port

    def output_ports(self, dst_mac: bytes, in_port: int, now: float, count: bool = True) -> list[int]:
        """Where a frame goes: the learned port, or every other port (flood) when unknown or group.

        A frame for a MAC learned on the port it came in on goes nowhere (802.1D filtering, Linux's
        should_deliver): both ends are on the same segment and already saw it.
        """
        if not dst_mac[0] & 1:
            port = self.lookup(dst_mac, now)
            if port is not None:
                return [] if port == in_port else [port]
        if count:
            self._flooded += 1
        return sorted(p for p in self.ports if p != in_port)

    def expire(self, now: float) -> int:
        stale = [m for m, e in self.fdb.items() if now - e.last_seen >= self.aging_time_s]
        for mac in stale:
            del self.fdb[mac]
        self._aged += len(stale)
        return len(stale)

    def next_deadline(self) -> float | None:
        if not self.fdb:
            return None
        return min(e.last_seen for e in self.fdb.values()) + self.aging_time_s

    def statistics(self) -> BridgeStatistics:
        return BridgeStatistics(len(self.fdb), self._learned, self._moved, self._aged, self._flooded)
