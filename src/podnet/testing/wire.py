"""An in-memory underlay: a learning L2 switch between the uplinks of several datapaths.

Public: tests (podnet's and users') run a multi-node cluster with no root and no clock. Each node is
a `Datapath` whose underlay uplink (`Datapath.add_uplink`) is plugged into the `Wire`. Frames a
datapath transmits on its uplink cross the switch (learned unicast to one port, broadcast and
unknown unicast flooded, never back where they came from) and are processed by the receiving
datapath at once, until nothing is in flight; frames sent to any other port land in that port's
inbox. Other stations (a kernel stand-in, an attacker) join with `plug`.

    wire = Wire()
    wire.attach("a", dp_a, uplink_a); wire.attach("b", dp_b, uplink_b)
    wire.send("a", pod_port, frame, now=0.0)       # a pod on A sends
    wire.inbox("b", pod_port_b)                    # what reached the pod on B
    wire.run_timers(until=10.0)                    # every node's timers, in deadline order

Every frame is copied when it is handed on, so later in-place rewrites cannot change what was seen.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from podnet.core.datapath import Datapath, Drop


@dataclass(frozen=True)
class Seen:
    """One frame on the underlay: who put it there and who received it."""

    sender: str
    frame: bytes
    vnet: bytes | None
    receivers: tuple[str, ...]


class Wire:
    def __init__(self) -> None:
        self.nodes: dict[str, tuple[Datapath, int]] = {}
        self.stations: dict[str, Callable[[bytes, float], list[bytes]]] = {}
        self.fdb: dict[bytes, str] = {}
        self.log: list[Seen] = []                     # everything that crossed the switch, in order
        self.drops: list[tuple[str, Drop]] = []       # every Drop any node answered, in order
        self._inboxes: dict[tuple[str, int], list[tuple[bytes, bytes | None]]] = defaultdict(list)
        self.unplugged: set[str] = set()             # nodes whose cable is out: they neither send nor receive

    def attach(self, name: str, dp: Datapath, uplink: int) -> None:
        self.nodes[name] = (dp, uplink)

    def plug(self, name: str, station: Callable[[bytes, float], list[bytes]]) -> None:
        """Another station on the segment: called with every frame that reaches it, it answers the
        frames it sends back."""
        self.stations[name] = station

    def inbox(self, node: str, port: int) -> list[tuple[bytes, bytes | None]]:
        """Frames (and vnet headers) node `node` sent to its port `port` (not the uplink), in order."""
        return self._inboxes[(node, port)]

    def send(self, node: str, port: int, frame, now: float, vnet: bytes | None = None) -> list:
        """Node `node` receives `frame` on `port`; everything that follows is delivered. Returns the
        node's own actions for this frame."""
        dp = self.nodes[node][0]
        actions = dp.process(bytearray(frame), port, now, vnet)
        self._deliver(node, actions, now)
        return actions

    def inject(self, sender: str, frame, now: float, vnet: bytes | None = None) -> None:
        """A frame appears on the segment from station `sender` (which need not exist)."""
        self._switch(sender, bytes(frame), vnet, now)

    def run_timers(self, until: float) -> float:
        """Fire every node's timers in deadline order up to `until`; returns the last time fired."""
        last = 0.0
        while True:
            due = [(d, name) for name, (dp, _) in self.nodes.items() if (d := dp.next_deadline()) is not None]
            if not due:
                return last
            deadline, name = min(due)
            if deadline > until:
                return last
            last = deadline
            self._deliver(name, self.nodes[name][0].handle_timer(deadline), deadline)

    # ---- the switch ------------------------------------------------------------------------------

    def _deliver(self, node: str, actions, now: float) -> None:
        dp, uplink = self.nodes[node]
        for action in actions:
            if isinstance(action, Drop):
                self.drops.append((node, action))
            elif action.port == uplink:
                if node not in self.unplugged:
                    self._switch(node, bytes(action.frame), action.vnet, now)
            else:
                self._inboxes[(node, action.port)].append((bytes(action.frame), action.vnet))

    def _switch(self, sender: str, frame: bytes, vnet, now: float) -> None:
        if len(frame) < 14:
            return
        src, dst = frame[6:12], frame[0:6]
        if not src[0] & 1:
            self.fdb[src] = sender
        where = self.fdb.get(dst) if not dst[0] & 1 else None
        everyone = [n for n in (*self.nodes, *self.stations) if n not in self.unplugged]
        receivers = [where] if where is not None and where in everyone else everyone
        receivers = [r for r in receivers if r != sender]
        self.log.append(Seen(sender, frame, vnet, tuple(receivers)))
        for name in receivers:
            if name in self.nodes:
                dp, uplink = self.nodes[name]
                self._deliver(name, dp.process(bytearray(frame), uplink, now, vnet), now)
            else:
                for answer in self.stations[name](frame, now):
                    self._switch(name, bytes(answer), None, now)

    def on_wire(self, since: int = 0) -> list[Seen]:
        return self.log[since:]


__all__ = ["Seen", "Wire"]
