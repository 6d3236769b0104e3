"""iptables-restore: applying restore text to tables (core layer, no I/O).

Semantics (checked against iptables 1.8.9, nf_tables backend, in a scratch network namespace):
- A `*table` section is built on a working copy and applied at its `COMMIT`, all or nothing; sections
  committed before a failing one stay applied (each COMMIT is its own transaction).
- Without noflush, `*table` starts from an empty table: user chains are gone and the built-in chains
  are back to policy ACCEPT with zero counters. With noflush the section starts from the current
  table; a chain line flushes a user chain (or creates it) and leaves other chains alone; a chain
  line for a built-in chain sets its policy (`-` keeps it) and never flushes it.
- Chain-line counters `[p:b]` and rule prefixes `[p:b] -A ...` are applied only with counters=True
  (iptables-restore -c); without it a chain line zeroes the policy counters.
- Commands: -A, -I [n], -D (n | spec), -R n, -F, -X, -N, -P, -Z, -E, executed in order. -X refuses a
  chain that still has rules or is still referenced (nft's EBUSY). A jump to a chain that does not
  exist yet is an error, so chain lines come first, as iptables-save writes them.
- At COMMIT the table is checked as the kernel checks it: no jump loop reachable from a built-in
  chain ("Too many links"), and targets only reachable from the hooks they allow (DNAT from
  PREROUTING/OUTPUT, ...: "Invalid argument").
Every error is an IptablesError naming the line and its text; COMMIT missing at the end is an error.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from .rules import BUILTIN_CHAINS, Chain, Counters, IptablesError, ParseError, Rule, Table
from .ruleparse import check_chain_name, parse_rule, split_words

COMMANDS = {
    "-A": "A", "--append": "A", "-I": "I", "--insert": "I", "-D": "D", "--delete": "D",
    "-R": "R", "--replace": "R", "-F": "F", "--flush": "F", "-X": "X", "--delete-chain": "X",
    "-N": "N", "--new-chain": "N", "-P": "P", "--policy": "P", "-Z": "Z", "--zero": "Z",
    "-E": "E", "--rename-chain": "E",
}


class _Section:
    """One `*table` ... COMMIT section being applied to a working copy."""

    def __init__(self, table: Table, counters: bool):
        self.table = table
        self.counters = counters
        self.new_lines: dict[int, int] = {}       # id(rule) -> line, for rules added by this input

    # --- chain lines -------------------------------------------------------------------------------

    def chain_line(self, text: str) -> None:
        parts = text[1:].split()
        if len(parts) < 2:
            raise ParseError("need a chain name and a policy")
        name, policy = parts[0], parts[1]
        chain = self.table.chains.get(name)
        if chain is not None and chain.builtin:
            if policy != "-":
                if policy not in ("ACCEPT", "DROP"):
                    raise ParseError(f"Can't set policy `{policy}' on `{name}': Bad policy name")
                chain.policy = policy
            chain.counters = self.parse_counters(parts[2] if len(parts) > 2 else None)
        elif chain is not None:
            chain.rules = []
        else:
            check_chain_name(name)
            self.table.chains[name] = Chain(name)

    def parse_counters(self, text: str | None) -> Counters:
        if not self.counters or text is None:
            return Counters()
        packets, colon, nbytes = text.strip("[]").partition(":")
        if not (text.startswith("[") and text.endswith("]") and colon
                and packets.isdigit() and nbytes.isdigit()):
            raise ParseError(f"invalid counters `{text}'")
        return Counters(int(packets), int(nbytes))

    # --- commands ----------------------------------------------------------------------------------

    def command(self, words: list[str], line: int, prefix_counters: Counters | None) -> None:
        if not words:
            raise ParseError("empty command")
        if words[0] in ("-t", "--table"):
            raise ParseError("The -t option cannot be used in iptables-restore.")
        cmd = COMMANDS.get(words[0])
        if cmd is None:
            raise ParseError(f"Bad argument `{words[0]}'")
        args = words[1:]
        getattr(self, "cmd_" + cmd)(args, line, prefix_counters)

    def chain(self, name: str | None, *, user: bool = False) -> Chain:
        if name is None:
            raise ParseError("a chain name is needed")
        chain = self.table.chains.get(name)
        if chain is None:
            raise ParseError(f"Chain '{name}' does not exist")
        if user and chain.builtin:
            raise ParseError(f"Cannot use a built-in chain here: {name}")
        return chain

    def rules(self, chain: str, words: list[str], line: int, prefix: Counters | None) -> list[Rule]:
        rules, spec_counters = parse_rule(words, self.table, chain)
        for rule in rules:
            rule.line = line
            if spec_counters is not None:
                rule.counters = Counters(*spec_counters)
            elif prefix is not None:
                rule.counters = Counters(prefix.packets, prefix.bytes)
            self.new_lines[id(rule)] = line
        return rules

    @staticmethod
    def number(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise ParseError(f"Invalid rule number `{text}'")
        return int(text)

    def cmd_A(self, args, line, prefix):
        chain = self.chain(args[0] if args else None)
        chain.rules.extend(self.rules(chain.name, args[1:], line, prefix))

    def cmd_I(self, args, line, prefix):
        chain = self.chain(args[0] if args else None)
        rest = args[1:]
        position = 1
        if rest and rest[0].isdigit():
            position = self.number(rest[0])
            rest = rest[1:]
        if position > len(chain.rules) + 1:
            raise ParseError("Index of insertion too big.")
        chain.rules[position - 1:position - 1] = self.rules(chain.name, rest, line, prefix)

    def cmd_D(self, args, line, prefix):
        chain = self.chain(args[0] if args else None)
        rest = args[1:]
        if len(rest) == 1 and rest[0].isdigit():
            position = self.number(rest[0])
            if position > len(chain.rules):
                raise ParseError("Index of deletion too big.")
            del chain.rules[position - 1]
            return
        for wanted in self.rules(chain.name, rest, line, None):
            for i, rule in enumerate(chain.rules):
                if rule == wanted:
                    del chain.rules[i]
                    break
            else:
                raise ParseError("Bad rule (does a matching rule exist in that chain?).")

    def cmd_R(self, args, line, prefix):
        chain = self.chain(args[0] if args else None)
        if len(args) < 2 or not args[1].isdigit():
            raise ParseError("-R needs a rule number")
        position = self.number(args[1])
        if position > len(chain.rules):
            raise ParseError("Index of replacement too big.")
        rules = self.rules(chain.name, args[2:], line, prefix)
        if len(rules) != 1:
            raise ParseError("-R with more than one source or destination address")
        chain.rules[position - 1] = rules[0]

    def cmd_F(self, args, line, prefix):
        chains = [self.chain(args[0])] if args else list(self.table.chains.values())
        for chain in chains:
            chain.rules = []

    def cmd_X(self, args, line, prefix):
        if args:
            victims = [self.chain(args[0], user=True)]
        else:
            victims = [c for c in self.table.chains.values() if not c.builtin]
        names = {c.name for c in victims}
        for chain in victims:
            referenced = any(rule.jump_chain == chain.name
                             for other in self.table.chains.values() if other.name not in names
                             for rule in other.rules)
            if chain.rules or referenced:
                raise ParseError(f"CHAIN_DEL failed (Device or resource busy): chain {chain.name}")
        for name in names:
            del self.table.chains[name]

    def cmd_N(self, args, line, prefix):
        if not args:
            raise ParseError("-N needs a chain name")
        if args[0] in self.table.chains:
            raise ParseError("Chain already exists.")
        check_chain_name(args[0])
        self.table.chains[args[0]] = Chain(args[0])

    def cmd_P(self, args, line, prefix):
        if len(args) != 2:
            raise ParseError("-P needs a chain and a policy")
        chain = self.table.chains.get(args[0])
        if chain is None or not chain.builtin:
            raise ParseError("Bad built-in chain name")
        if args[1] not in ("ACCEPT", "DROP"):
            raise ParseError("Bad policy name")
        if self.table.name == "nat" and args[1] == "DROP":
            raise ParseError('The "nat" table is not intended for filtering, the use of DROP is '
                             'therefore inhibited.')
        chain.policy = args[1]

    def cmd_Z(self, args, line, prefix):
        chains = [self.chain(args[0])] if args else list(self.table.chains.values())
        for chain in chains:
            chain.counters = Counters()
            # rules are shared with the live table until COMMIT: zero copies, not the originals
            chain.rules = [dataclasses.replace(rule, counters=Counters()) for rule in chain.rules]

    def cmd_E(self, args, line, prefix):
        if len(args) != 2:
            raise ParseError("-E needs the old and the new chain name")
        chain = self.chain(args[0], user=True)
        if args[1] in self.table.chains:
            raise ParseError("File exists: the new chain name is taken")
        check_chain_name(args[1])
        old, new = args[0], args[1]
        del self.table.chains[old]
        chain.name = new
        self.table.chains[new] = chain
        for other in self.table.chains.values():
            other.rules = [dataclasses.replace(rule, target=dataclasses.replace(rule.target, chain=new))
                           if rule.jump_chain == old else rule for rule in other.rules]

    # --- COMMIT ------------------------------------------------------------------------------------

    def validate(self, commit_line: int) -> None:
        """The kernel's checks when the table is loaded: jump loops reachable from a hook, and
        targets used from hooks they do not support."""
        table = self.table
        chains = table.chains
        reach: dict[str, set[str]] = {name: set() for name in chains}
        for hook in BUILTIN_CHAINS[table.name]:
            self._walk_from(hook, reach, commit_line)
        for chain in chains.values():
            hooks = reach[chain.name]
            for rule in chain.rules:
                target = rule.target
                if target is None or target.hooks is None or hooks <= target.hooks:
                    continue
                bad = ", ".join(sorted(hooks - target.hooks))
                raise IptablesError(
                    f"RULE_APPEND failed (Invalid argument): {target.name} in chain {chain.name} is "
                    f"used from {bad}, but is only valid from {', '.join(sorted(target.hooks))}",
                    line=self.new_lines.get(id(rule), commit_line), text=None)

    def _walk_from(self, hook: str, reach: dict[str, set[str]], commit_line: int) -> None:
        """Depth-first from one built-in chain (iteratively: chains can be deep); a jump to a chain
        that is still on the path is a loop."""
        chains = self.table.chains
        on_path = {hook}
        reach[hook].add(hook)
        stack = [(hook, iter(chains[hook].rules))]
        done: set[str] = set()
        while stack:
            name, rules = stack[-1]
            for rule in rules:
                child = rule.jump_chain
                if child is None:
                    continue
                if child in on_path:
                    raise IptablesError(
                        f"RULE_APPEND failed (Too many links): chain {name} jumps to {child}, "
                        f"which leads back to it (loop)",
                        line=self.new_lines.get(id(rule), commit_line), text=None)
                if child in done:
                    continue
                reach[child].add(hook)
                on_path.add(child)
                stack.append((child, iter(chains[child].rules)))
                break
            else:
                stack.pop()
                on_path.discard(name)
                done.add(name)


def run_restore(current: dict[str, Table], text: str, *, noflush: bool, counters: bool,
                commit: Callable[[Table], None]) -> None:
    """Apply restore text. `current` holds the live tables by name; `commit(table)` swaps one in."""
    lines = text.split("\n")
    section: _Section | None = None
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            if stripped.startswith("*"):
                if section is not None:
                    raise ParseError(f"COMMIT expected before `{stripped}'")
                name = stripped[1:]
                if name not in BUILTIN_CHAINS:
                    raise ParseError(f"table '{name}' does not exist")
                base = current.get(name)
                section = _Section(base.clone() if noflush and base is not None else Table.empty(name),
                                   counters)
            elif section is None:
                raise ParseError("not inside a *table section")
            elif stripped == "COMMIT":
                section.validate(number)
                commit(section.table)
                section = None
            elif stripped.startswith(":"):
                section.chain_line(stripped)
            else:
                prefix = None
                if stripped.startswith("["):
                    end = stripped.find("]")
                    if end < 0:
                        raise ParseError(f"Bad line {number}: need ]")
                    if counters:
                        prefix = section.parse_counters(stripped[:end + 1])
                    stripped = stripped[end + 1:]
                section.command(split_words(stripped), number, prefix)
        except ParseError as exc:
            raise IptablesError(str(exc), line=number, text=line) from None
        except IptablesError as exc:
            if exc.text is None:
                raise IptablesError(exc.reason, line=exc.line, text=_line_text(lines, exc.line)) from None
            raise
    if section is not None:
        raise IptablesError(f"COMMIT expected at line {len(lines)}", line=len(lines), text="")


def _line_text(lines: list[str], number: int | None) -> str:
    if number is None or not 1 <= number <= len(lines):
        return ""
    return lines[number - 1]
