"""How the slow path runs a frame for real or as a trace, and the text of the steps it records.

Layer: core, sans-IO. Every stage of the slow path (core/datapath, core/conntrack_stage,
core/internode) takes a `_Ctx`: the frame's `now`, whether to `commit` what it decides, and, in a
trace, the list its decisions are recorded in (`TraceStep`, core/stats). `Datapath.trace` runs
the very same code as `process` with commit=False, so a trace cannot drift from what the datapath
does: the stages check `ctx.commit` before every side effect, and `step` records nothing outside
a trace. `_Ctx` is core's own, not podnet's API; core/internode imports it through core.datapath,
where it has always been.

Invariant the stages keep: with commit=False they change nothing: no counter, no conntrack entry or
expiry, no learned MAC or neighbour, no flow-cache entry, and the Service backend decides with
effects=False.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import packet as pk
from .nat import Rewrite
from .stats import TraceStep


@dataclass(slots=True)
class _Ctx:
    """Per-frame state of the slow path: `commit` is False while tracing (no side effects)."""

    now: float
    commit: bool = True
    steps: list[TraceStep] | None = None

    def step(self, stage: str, decision: str, detail: str = "") -> None:
        if self.steps is not None:
            self.steps.append(TraceStep(stage, decision, detail))


def hostport(pair: tuple[int, int] | None) -> str:
    """An (address, port) pair as a step shows it, '-' for none."""
    return "-" if pair is None else f"{pk.ip_str(pair[0])}:{pair[1]}"


def tuple_text(t: tuple) -> str:
    """A conntrack tuple (proto, src, sport, dst, dport) as 'src:sport > dst:dport'."""
    return f"{pk.ip_str(t[1])}:{t[2]} > {pk.ip_str(t[3])}:{t[4]}"


def describe_rewrite(r: Rewrite) -> str:
    """One direction's NAT rewrite (core/nat), '*' for a field it keeps."""
    parts = []
    if r.src is not None or r.sport is not None:
        parts.append(f"src -> {pk.ip_str(r.src) if r.src is not None else '*'}:{r.sport if r.sport is not None else '*'}")
    if r.dst is not None or r.dport is not None:
        parts.append(f"dst -> {pk.ip_str(r.dst) if r.dst is not None else '*'}:{r.dport if r.dport is not None else '*'}")
    return ", ".join(parts)
