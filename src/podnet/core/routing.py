"""Longest-prefix-match routing table (the node's FIB).

Layer: core. Routes point at a datapath port (a pod's TAP, the uplink, later a tunnel) and
optionally a next-hop address. Lookup walks the prefix lengths present from longest to shortest
and does one dict probe per length, so its cost depends on how many distinct lengths exist (a node
has few: /32 per pod, /24 node CIDRs, /0), not on how many routes.

Invariants: one route per (network, prefix length); a lookup returns the most specific route, or
None when nothing matches (the caller sends ICMP net unreachable, as the kernel does for
`unreachable` / no route).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sortedcontainers import SortedList

from .packet import ip_int


@dataclass(frozen=True, slots=True)
class Route:
    network: int
    prefixlen: int
    port: int
    via: int | None = None  # next-hop address; None means the destination is on-link
    kind: str = "unicast"   # "unicast" | "local" (addressed to the node itself)

    def __str__(self) -> str:
        net = ipaddress.IPv4Network((self.network, self.prefixlen))
        dst = "default" if self.prefixlen == 0 else (str(net.network_address) if self.prefixlen == 32 else str(net))
        via = f" via {ipaddress.IPv4Address(self.via)}" if self.via is not None else ""
        return f"{'local ' if self.kind == 'local' else ''}{dst}{via} port {self.port}"


def _mask(prefixlen: int) -> int:
    return (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF


class RouteTable:
    def __init__(self) -> None:
        self._by_len: dict[int, dict[int, Route]] = {}
        self._lengths = SortedList(key=lambda n: -n)  # longest first
        self.version = 0  # bumped on every change
        self.on_change = None  # called after every change, so a cache of lookups is flushed at once

    def add(self, cidr: str, port: int, via: str | None = None, kind: str = "unicast") -> Route:
        net = ipaddress.IPv4Network(cidr, strict=True)
        route = Route(int(net.network_address), net.prefixlen, port,
                      ip_int(via) if via is not None else None, kind)
        table = self._by_len.get(net.prefixlen)
        if table is None:
            table = self._by_len[net.prefixlen] = {}
            self._lengths.add(net.prefixlen)
        table[route.network] = route
        self._changed()
        return route

    def remove(self, cidr: str) -> Route | None:
        net = ipaddress.IPv4Network(cidr, strict=True)
        table = self._by_len.get(net.prefixlen)
        route = table.pop(int(net.network_address), None) if table else None
        if table is not None and not table:
            del self._by_len[net.prefixlen]
            self._lengths.remove(net.prefixlen)
        if route is not None:
            self._changed()
        return route

    def _changed(self) -> None:
        self.version += 1
        if self.on_change is not None:
            self.on_change()

    def remove_port(self, port: int) -> int:
        gone = [r for r in self.routes() if r.port == port]
        for r in gone:
            self.remove(f"{ipaddress.IPv4Address(r.network)}/{r.prefixlen}")
        return len(gone)

    def lookup(self, dst: int) -> Route | None:
        for length in self._lengths:
            route = self._by_len[length].get(dst & _mask(length))
            if route is not None:
                return route
        return None

    def routes(self) -> list[Route]:
        return [r for length in self._lengths for r in self._by_len[length].values()]

    def __len__(self) -> int:
        return sum(len(t) for t in self._by_len.values())
