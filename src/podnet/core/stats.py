"""What the datapath reports about itself: a frame's trace and the node's counters.

Layer: core, plain data. `Datapath.trace()` returns a `Trace` (every decision of the slow path for
one frame, as `podnet trace` prints it); `Datapath.statistics()` returns `DatapathStatistics`, a
frozen snapshot (trio style) whose per-port counters include the packets of flows still in the
flow cache. Both are re-exported by core.datapath, where they have always been imported from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .neighbor import NeighborStatistics
    from .overlay.vxlan import VtepStatistics


@dataclass(frozen=True, slots=True)
class TraceStep:
    stage: str
    decision: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.stage:<8} {self.decision}{'  ' + self.detail if self.detail else ''}"


@dataclass(frozen=True, slots=True)
class Trace:
    frame: str
    in_port: str
    steps: tuple[TraceStep, ...]
    actions: tuple  # the Transmit and Drop actions the frame would cause

    def __str__(self) -> str:
        lines = [f"{self.frame}  (in {self.in_port})"]
        lines += [f"  {step}" for step in self.steps]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class PortStatistics:
    name: str
    kind: str
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int


@dataclass(frozen=True, slots=True)
class DatapathStatistics:
    ports: tuple[PortStatistics, ...]
    drops: dict[str, int]
    stages: dict[str, int]
    fast_path_packets: int
    slow_path_packets: int
    flows: int
    flows_installed: int
    flow_table_full: int
    arp_replies: int
    icmp_sent: int
    decisions: int = 0          # NEW flows the Service backend decided
    decision_cost: int = 0      # what deciding them cost, in the backend's unit (rules walked)
    resets_sent: int = 0        # REJECT --reject-with tcp-reset
    conntrack_entries: int = 0
    neighbors: NeighborStatistics | None = None  # the underlay's neighbour table (`ip -s ntable`), if any
    tunnel: VtepStatistics | None = None         # the VXLAN device (`ip -s link show flannel.1`), if any

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())


__all__ = ["DatapathStatistics", "PortStatistics", "Trace", "TraceStep"]
