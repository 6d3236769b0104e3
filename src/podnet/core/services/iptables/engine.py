"""The iptables chain engine: tables whose built-in chains sit at netfilter's hooks, walked rule by
rule as the kernel's ipt_do_table walks them (core layer, no I/O, no clock).

Rules the walk keeps (the kernel's):
- A built-in chain is walked from its first rule, in order. Every rule looked at counts in
  `Verdict.rules_examined` (the engine's cost measure: it grows with the rules walked; there is no
  index, on purpose). A rule whose header fields and matches all match has its packet/byte counters
  increased before its target runs; a rule without a target just counts.
- `-j CHAIN` pushes a return point and enters CHAIN; `-g CHAIN` enters it without one. RETURN, or
  falling off the end of a user chain, resumes after the most recent jump; with no return point left
  (a built-in chain, or a chain reached only by goto from it) the built-in chain's policy applies and
  its counters increase.
- ACCEPT, DROP, REJECT, DNAT, SNAT and MASQUERADE end the walk of this table at this hook. In the nat
  table ACCEPT means "no NAT here". MARK changes `pkt.mark` and the walk goes on.
- `statistic --mode random` draws from `ctx.rng`; `recent` reads and writes `ctx.recent` (by default
  the ruleset's own lists, which persist across evaluations) at time `ctx.now`; `addrtype LOCAL` uses
  `ctx.local_addresses`.

`evaluate()` changes the packet's mark in place, as the kernel changes skb->mark.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Iterable

from podnet.core.services.packetinfo import PacketInfo

from . import listing
from .restore import run_restore
from .rules import BUILTIN_CHAINS, Chain, ConfigError, Counters, Rule, Table
from .save import save_tables
from .stateful import Recent, RecentTables

VERDICT_KINDS = ("ACCEPT", "DROP", "REJECT", "DNAT", "SNAT", "MASQUERADE")


@dataclass
class EvalContext:
    """What a walk needs besides the packet: the time, the node's own addresses, a random source,
    and the `recent` lists (None: the ruleset's own)."""

    now: float = 0.0
    local_addresses: frozenset[int] = frozenset()
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    recent: RecentTables | None = None


@dataclass
class Verdict:
    kind: str                              # one of VERDICT_KINDS
    to_ip: int | None = None               # DNAT: new destination; SNAT: new source
    to_port: int | None = None             # first port of the range; DNAT without one keeps dport
    reject_with: str | None = None
    random_fully: bool = False
    path: list[str] = field(default_factory=list)
    rules_examined: int = 0
    mark: int = 0                          # the packet's mark when the walk ended


class Walk:
    """One walk's view of the world: the context, whether state may change (counters, nth counters,
    recent lists), and who decides `statistic --mode random` draws."""

    __slots__ = ("ctx", "recent", "effects", "chooser")

    def __init__(self, ctx: EvalContext, recent: RecentTables, *, effects: bool = True,
                 chooser: Callable[[float], bool] | None = None):
        self.ctx = ctx
        self.recent = recent
        self.effects = effects
        self.chooser = chooser

    def chance(self, probability: float) -> bool:
        if self.chooser is not None:
            return self.chooser(probability)
        return self.ctx.rng.random() < probability


class Ruleset:
    """The tables of one network namespace (filter and nat exist from the start; mangle and raw once
    a restore creates them)."""

    def __init__(self, tables: Iterable[str] = ("filter", "nat")):
        self._tables: dict[str, Table] = {name: Table.empty(name) for name in tables}
        self.recent = RecentTables()

    # --- configuration -----------------------------------------------------------------------------

    def restore(self, text: str, *, noflush: bool = False, counters: bool = False,
                test: bool = False) -> None:
        """iptables-restore [--noflush] [--counters] [--test]. Raises IptablesError (a ConfigError)
        naming the line; sections committed before the failing one stay applied."""

        def commit(table: Table) -> None:
            if not test:
                self._tables[table.name] = table
                self._keep_referenced_recent_lists()

        run_restore(self._tables, text, noflush=noflush, counters=counters, commit=commit)

    def _keep_referenced_recent_lists(self) -> None:
        """As xt_recent does: a list exists while rules refer to it (created when the first such rule
        is loaded, kept across a reload that still refers to it, freed with the last rule), and
        keeps as many stamps per address as the largest --hitcount asks for."""
        wanted: dict[str, int] = {}
        for table in self._tables.values():
            for chain in table.chains.values():
                for rule in chain.rules:
                    for match in rule.matches:
                        if isinstance(match, Recent):
                            wanted[match.list_name] = max(wanted.get(match.list_name, 0), match.hitcount)
        self.recent.keep_only(set(wanted))
        for name, hitcount in wanted.items():
            lst = self.recent.table(name)
            lst.max_stamps = max(lst.max_stamps, hitcount)

    def save(self, tables: str | Iterable[str] | None = None, *, counters: bool = False,
             header: str | None = None) -> str:
        """iptables-save [-t TABLE] [-c]; `header` is printed where iptables-save prints the date."""
        names = None
        if tables is not None:
            names = [tables] if isinstance(tables, str) else list(tables)
            for name in names:
                self.table(name)
        return save_tables(self._tables, names, counters=counters, header=header)

    # --- inspection --------------------------------------------------------------------------------

    @property
    def table_names(self) -> list[str]:
        return list(self._tables)

    def table(self, name: str) -> Table:
        try:
            return self._tables[name]
        except KeyError:
            raise ConfigError(f"iptables: table '{name}' does not exist (no restore created it)") from None

    def chain(self, table: str, chain: str) -> Chain:
        try:
            return self.table(table).chains[chain]
        except KeyError:
            raise ConfigError(f"iptables: no chain '{chain}' in table '{table}'") from None

    def chains(self, table: str) -> list[str]:
        return [c.name for c in self.table(table).ordered_chains()]

    def rules(self, table: str, chain: str) -> list[Rule]:
        return list(self.chain(table, chain).rules)

    def rule_count(self) -> int:
        return sum(table.rule_count() for table in self._tables.values())

    def counters(self, table: str, chain: str) -> list[tuple[int, int]]:
        """(packets, bytes) of every rule of the chain, in order."""
        return [(r.counters.packets, r.counters.bytes) for r in self.chain(table, chain).rules]

    def policy_counters(self, table: str, chain: str) -> tuple[int, int]:
        counters = self.chain(table, chain).counters
        return counters.packets, counters.bytes

    def zero(self, table: str | None = None, chain: str | None = None) -> None:
        """iptables -Z [CHAIN]: rule and policy counters back to 0."""
        tables = [self.table(table)] if table is not None else list(self._tables.values())
        for t in tables:
            chains = [self.chain(t.name, chain)] if chain is not None else t.chains.values()
            for c in chains:
                c.counters = Counters()
                for rule in c.rules:
                    rule.counters = Counters()

    def list_chain(self, table: str, chain: str, *, numeric: bool = True, verbose: bool = False,
                   exact: bool = False, line_numbers: bool = False) -> str:
        """`iptables -t TABLE -L CHAIN [-n] [-v] [-x] [--line-numbers]`, as iptables prints it."""
        return listing.list_chain(self.table(table), self.chain(table, chain), numeric=numeric,
                                  verbose=verbose, exact=exact, line_numbers=line_numbers)

    def list_table(self, table: str, *, numeric: bool = True, verbose: bool = False,
                   exact: bool = False, line_numbers: bool = False) -> str:
        """`iptables -t TABLE -L [-n] [-v] ...`: every chain."""
        return listing.list_table(self.table(table), numeric=numeric, verbose=verbose, exact=exact,
                                  line_numbers=line_numbers)

    # --- evaluation --------------------------------------------------------------------------------

    def evaluate(self, table: str, chain: str, pkt: PacketInfo, ctx: EvalContext) -> Verdict:
        """Walk a built-in chain for `pkt`, counting, as the kernel does at that hook."""
        walk = Walk(ctx, ctx.recent if ctx.recent is not None else self.recent)
        return self.walk(table, chain, pkt, walk)

    def walk(self, table_name: str, chain_name: str, pkt: PacketInfo, walk: Walk) -> Verdict:
        table = self.table(table_name)
        base = table.chains.get(chain_name)
        if base is None or not base.builtin:
            raise ConfigError(f"iptables: '{chain_name}' is not a built-in chain of table '{table_name}' "
                              f"(built-in: {', '.join(BUILTIN_CHAINS[table_name])})")
        chains = table.chains
        effects = walk.effects
        stack: list[tuple[Chain, int]] = []
        current, rules, index = base, base.rules, 0
        examined = 0
        path: list[str] = []
        while True:
            if index >= len(rules):
                if stack and current is not base:
                    current, index = stack.pop()
                    rules = current.rules
                    continue
                break                                          # policy
            rule = rules[index]
            index += 1
            examined += 1
            if not rule.matches_packet(pkt, walk):
                continue
            if effects:
                rule.counters.add(pkt.length)
            target = rule.target
            if target is None:
                continue
            path.append(f"{table_name}/{current.name}:{index}")
            kind = target.kind
            if kind == "CONTINUE":
                target.apply(pkt)
                continue
            if kind == "JUMP":
                if not target.goto:
                    stack.append((current, index))
                current = chains[target.chain]
                rules, index = current.rules, 0
                continue
            if kind == "RETURN":
                if stack:
                    current, index = stack.pop()
                    rules = current.rules
                    continue
                break                                          # policy
            return self._verdict(target, pkt, path, examined)
        if effects:
            base.counters.add(pkt.length)
        path.append(f"{table_name}/{base.name}:policy")
        return Verdict(base.policy, path=path, rules_examined=examined, mark=pkt.mark)

    @staticmethod
    def _verdict(target, pkt: PacketInfo, path: list[str], examined: int) -> Verdict:
        kind = target.kind
        verdict = Verdict(kind, path=path, rules_examined=examined, mark=pkt.mark)
        if kind == "REJECT":
            verdict.reject_with = target.reject_with
        elif kind in ("DNAT", "SNAT"):
            to = target.to
            verdict.random_fully = target.random_fully
            if kind == "DNAT":
                verdict.to_ip = to.min_ip if to.min_ip is not None else pkt.dst
                verdict.to_port = to.min_port if to.min_port is not None else pkt.dport
            else:
                verdict.to_ip = to.min_ip
                verdict.to_port = to.min_port
        elif kind == "MASQUERADE":
            verdict.to_port = target.min_port
            verdict.random_fully = target.random_fully
        return verdict
