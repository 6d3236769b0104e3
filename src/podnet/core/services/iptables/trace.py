"""Where the first packet of a connection goes through the tables, hook by hook (core layer).

The hooks and the order of the tables at each (netfilter priorities: raw -300, mangle -150,
nat DNAT -100, filter 0, nat SNAT +100); raw and mangle are walked only when a restore created them:

    from elsewhere:  PREROUTING (raw, mangle, nat)
                       → destination (after DNAT) local?  INPUT (mangle, filter, nat)
                       → otherwise                         FORWARD (mangle, filter) → POSTROUTING (mangle, nat)
    locally sent:    OUTPUT (raw, mangle, nat, filter) → POSTROUTING (mangle, nat)
                       → destination local (over lo)?      INPUT (mangle, filter, nat)

A packet is "locally sent" when its source is one of `ctx.local_addresses`. After a DNAT the later
hooks see the new destination and the conntrack DNAT status bit; the mark carries across hooks.

A trace changes nothing: no counters, no nth counters, no recent lists (it reads them: an
`--rcheck` matches only if the list already holds the address). With all_branches=True every
`statistic --mode random` match is explored both ways, and every distinct outcome is returned with
the product of the branch probabilities; the probabilities of all outcomes add up to 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from podnet.core.services.packetinfo import CtState, PacketInfo

from .engine import EvalContext, Ruleset, Walk
from .rules import format_ipv4

HOOK_TABLES = {
    "PREROUTING": ("raw", "mangle", "nat"),
    "INPUT": ("mangle", "filter", "nat"),
    "FORWARD": ("mangle", "filter"),
    "OUTPUT": ("raw", "mangle", "nat", "filter"),
    "POSTROUTING": ("mangle", "nat"),
}


@dataclass
class Outcome:
    verdict: str                        # "ACCEPT" | "DROP" | "REJECT" | "DNAT"
    destination: str | None             # "ip:port" after DNAT, else None
    masquerade: bool                    # SNAT or MASQUERADE was applied
    path: list[str] = field(default_factory=list)
    probability: float = 1.0
    # for the datapath's own use (not in the JSON form): the numbers behind the text above
    dnat: tuple[int, int] | None = None
    reject_with: str | None = None
    random_fully: bool = False
    rules_examined: int = 0

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "destination": self.destination,
                "masquerade": self.masquerade, "path": list(self.path),
                "probability": self.probability}


def outcomes_json(outcomes: list[Outcome]) -> dict:
    """The JSON form: {"outcomes": [{"verdict", "destination", "masquerade", "path", "probability"}]}."""
    return {"outcomes": [o.to_dict() for o in outcomes]}


class _Chooser:
    """Replays a prefix of statistic decisions, then takes the likelier-first default branch and
    remembers every decision point so the explorer can come back for the other branch."""

    def __init__(self, prefix: list[bool], rng=None):
        self.prefix = prefix
        self.taken: list[tuple[bool, float]] = []     # (decision, probability of the True branch)
        self.rng = rng
        self.probability = 1.0

    def __call__(self, p: float) -> bool:
        i = len(self.taken)
        if i < len(self.prefix):
            decision = self.prefix[i]
        elif self.rng is not None:
            decision = self.rng.random() < p
        else:
            decision = p > 0.0
        self.taken.append((decision, p))
        self.probability *= p if decision else 1.0 - p
        return decision


def _run(ruleset: Ruleset, pkt: PacketInfo, ctx: EvalContext, chooser: _Chooser | None,
         effects: bool = False) -> Outcome:
    pkt = dataclasses.replace(pkt)
    recent = ctx.recent if ctx.recent is not None else ruleset.recent
    walk = Walk(ctx, recent, effects=effects, chooser=chooser)
    local = ctx.local_addresses
    path: list[str] = []
    destination: str | None = None
    masquerade = False
    present = set(ruleset.table_names)
    extra = {"dnat": None, "reject_with": None, "random_fully": False, "rules_examined": 0}

    def hook(name: str) -> str | None:
        """Walk the hook's tables; a non-ACCEPT final verdict is returned, else None."""
        nonlocal destination, masquerade
        for table in HOOK_TABLES[name]:
            if table not in present:
                continue
            verdict = ruleset.walk(table, name, pkt, walk)
            path.extend(verdict.path)
            extra["rules_examined"] += verdict.rules_examined
            if verdict.kind in ("DROP", "REJECT"):
                extra["reject_with"] = verdict.reject_with
                return verdict.kind
            if verdict.kind == "DNAT":
                pkt.dst, pkt.dport = verdict.to_ip, verdict.to_port
                pkt.ct_state |= CtState.DNAT
                destination = f"{format_ipv4(pkt.dst)}:{pkt.dport}"
                extra["dnat"] = (pkt.dst, pkt.dport)
            elif verdict.kind in ("SNAT", "MASQUERADE"):
                masquerade = True
                extra["random_fully"] = verdict.random_fully
                pkt.ct_state |= CtState.SNAT
        return None

    if pkt.src in local:
        stages = ["OUTPUT", "POSTROUTING", "INPUT?"]
    else:
        stages = ["PREROUTING", "INPUT|FORWARD"]
    final = None
    for stage in stages:
        if stage == "INPUT?":
            name = "INPUT" if pkt.dst in local else None
        elif stage == "INPUT|FORWARD":
            name = "INPUT" if pkt.dst in local else "FORWARD"
        else:
            name = stage
        if name is None:
            continue
        final = hook(name)
        if final is not None:
            break
        if name == "FORWARD":
            final = hook("POSTROUTING")
            if final is not None:
                break
    if final is None:
        final = "DNAT" if destination is not None else "ACCEPT"
    return Outcome(final, destination, masquerade, path, chooser.probability if chooser else 1.0, **extra)


def decide_first_packet(ruleset: Ruleset, pkt: PacketInfo, ctx: EvalContext) -> Outcome:
    """The same walk as a trace, for real: counters count, nth counters advance, `recent --set`
    records, and `statistic` draws come from ctx.rng. What the iptables backend does per NEW flow."""
    return _run(ruleset, pkt, ctx, None, effects=True)


def trace_first_packet(ruleset: Ruleset, pkt: PacketInfo, ctx: EvalContext, *,
                       all_branches: bool = False) -> list[Outcome]:
    """The outcome(s) of the first packet of `pkt`'s connection. Without all_branches, one walk
    whose random draws come from ctx.rng (its probability is that of the branches it took)."""
    if not all_branches:
        return [_run(ruleset, pkt, ctx, _Chooser([], rng=ctx.rng))]
    found: dict[tuple, Outcome] = {}
    pending: list[list[bool]] = [[]]
    while pending:
        prefix = pending.pop()
        chooser = _Chooser(prefix)
        outcome = _run(ruleset, pkt, ctx, chooser)
        # every decision made past the prefix is a branch point whose other side is still to do
        alternatives = []
        for i in range(len(prefix), len(chooser.taken)):
            decision, p = chooser.taken[i]
            other_p = 1.0 - p if decision else p
            if other_p > 0.0:
                alternatives.append([d for d, _ in chooser.taken[:i]] + [not decision])
        pending.extend(alternatives)       # popped deepest first: depth-first, "match" side first
        if outcome.probability <= 0.0:
            continue
        key = (outcome.verdict, outcome.destination, outcome.masquerade, tuple(outcome.path))
        if key in found:
            found[key].probability += outcome.probability
        else:
            found[key] = outcome
    return list(found.values())
