"""Reading one iptables-restore line: splitting it into words and turning a rule specification
(`-s ... -p tcp -m tcp --dport 80 -j ACCEPT`) into `Rule`s (core layer, no I/O).

It follows iptables' command-line parser where the difference shows:
- Words are split as iptables-restore splits them: double quotes group (with `\\` escaping the next
  character inside them), single quotes are ordinary characters, an unterminated quote runs to the end.
- Options are read in order. An extension option (`--dport`) goes to the most recently loaded match
  or target that has it; failing that, `-p tcp|udp|sctp` given earlier loads that protocol's match
  implicitly, appended where the option appears (so `-p tcp -m comment --comment x --dport 80` saves
  as `-p tcp -m comment --comment x -m tcp --dport 80`).
- `-s a,b -d c` stands for one rule per address pair, as iptables expands it.

The match and target registries are explicit dicts; an unknown name is an error, never a no-op.
"""

from __future__ import annotations

import copy

from .matches import AddrType, Comment, Conntrack, Mark, Multiport, Sctp, State, Tcp, Udp
from .rules import (
    MAX_CHAIN_NAME, MAX_IFNAME, STANDARD_VERDICTS, Extension, Match, ParseError, Rule, Table,
    Target, parse_address, parse_protocol, protocol_name,
)
from .stateful import Recent, Statistic
from .targets import Dnat, Jump, Masquerade, MarkTarget, Reject, Snat, Standard

MATCHES: dict[str, type[Match]] = {
    "comment": Comment, "tcp": Tcp, "udp": Udp, "sctp": Sctp, "multiport": Multiport, "mark": Mark,
    "addrtype": AddrType, "conntrack": Conntrack, "state": State, "statistic": Statistic,
    "recent": Recent,
}
TARGETS: dict[str, type[Target]] = {
    "REJECT": Reject, "DNAT": Dnat, "SNAT": Snat, "MASQUERADE": Masquerade, "MARK": MarkTarget,
}
# names a user chain may not take (iptables: "chain name may not clash with target name")
RESERVED_CHAIN_NAMES = frozenset(STANDARD_VERDICTS) | {"QUEUE"} | frozenset(TARGETS)

BUILTIN_OPTIONS = {
    "-s": "s", "--source": "s", "--src": "s",
    "-d": "d", "--destination": "d", "--dst": "d",
    "-p": "p", "--protocol": "p",
    "-i": "i", "--in-interface": "i",
    "-o": "o", "--out-interface": "o",
    "-j": "j", "--jump": "j",
    "-g": "g", "--goto": "g",
    "-m": "m", "--match": "m",
    "-c": "c", "--set-counters": "c",
    "-f": "f", "--fragment": "f",
}
INVERTIBLE_BUILTINS = frozenset("sdpiof")


def split_words(line: str) -> list[str]:
    """iptables-restore's add_param_to_argv."""
    words: list[str] = []
    buf: list[str] = []
    quoted = escaped = False
    have = False
    for ch in line:
        if quoted:
            if escaped:
                buf.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
                words.append("".join(buf))
                buf, have = [], False
            else:
                buf.append(ch)
            continue
        if ch == '"':
            quoted, have = True, True
        elif ch in " \t\n\r":
            if buf or have:
                words.append("".join(buf))
                buf, have = [], False
        else:
            buf.append(ch)
    if buf or have:
        words.append("".join(buf))
    return words


def check_chain_name(name: str) -> None:
    if not name:
        raise ParseError("empty chain name")
    if name.startswith("-"):
        raise ParseError("chain name not allowed to start with `-'")
    if name.startswith("!"):
        raise ParseError("chain name not allowed to start with `!'")
    if len(name) > MAX_CHAIN_NAME:
        raise ParseError(f"chain name `{name}' too long (must be under {MAX_CHAIN_NAME + 1} chars)")
    if name in RESERVED_CHAIN_NAMES:
        raise ParseError("chain name may not clash with target name")
    if any(ch.isspace() for ch in name):
        raise ParseError(f"Invalid chain name `{name}'")


class _RuleReader:
    """One rule specification, read word by word."""

    def __init__(self, words: list[str], table: Table, chain: str):
        self.words = words
        self.table = table
        self.chain = chain
        self.rule = Rule()
        self.loaded: list[Extension] = []      # matches and target, in load order
        self.matches: list[Match] = []
        self.target: Target | None = None
        self.sources: list[tuple[int, int]] | None = None
        self.destinations: list[tuple[int, int]] | None = None
        self.counters: tuple[int, int] | None = None
        self.proto_given = False
        self.implicit_loaded = False
        self.pos = 0

    def take(self, option: str, count: int, inline: str | None = None) -> list[str]:
        args = [] if inline is None else [inline]
        while len(args) < count:
            if self.pos >= len(self.words):
                raise ParseError(f'option "{option}" requires an argument')
            args.append(self.words[self.pos])
            self.pos += 1
        return args

    def read(self) -> tuple[list[Rule], tuple[int, int] | None]:
        invert = False
        while self.pos < len(self.words):
            word = self.words[self.pos]
            self.pos += 1
            if word == "!":
                if invert:
                    raise ParseError("multiple consecutive ! not allowed")
                invert = True
                continue
            inline = None
            if word.startswith("--") and "=" in word:
                word, inline = word.split("=", 1)
            key = BUILTIN_OPTIONS.get(word)
            if key is not None:
                if invert and key not in INVERTIBLE_BUILTINS:
                    raise ParseError(f"cannot have ! before {word}")
                self.builtin(key, word, invert, inline)
            elif word.startswith("--") and len(word) > 2:
                self.extension(word[2:], invert, inline)
            elif word.startswith("-") and len(word) > 1:
                raise ParseError(f'unknown option "{word}"')
            else:
                raise ParseError(f"Bad argument `{word}'")
            invert = False
        if invert:
            raise ParseError("trailing `!' without an option")
        return self.finish()

    def builtin(self, key: str, option: str, invert: bool, inline: str | None) -> None:
        rule = self.rule
        if key == "f":
            raise ParseError("fragment matching (-f) is not supported")
        if key == "c":
            packets, nbytes = self.take(option, 2, inline)
            if not (packets.isdigit() and nbytes.isdigit()):
                raise ParseError("-c packet counter not numeric")
            self.counters = (int(packets), int(nbytes))
            return
        (value,) = self.take(option, 1, inline)
        if key in "sd":
            current = self.sources if key == "s" else self.destinations
            if current is not None:
                raise ParseError(f"multiple -{key} flags not allowed")
            parsed = [parse_address(item) for item in value.split(",")]
            if key == "s":
                self.sources, rule.src_inv = parsed, invert
            else:
                self.destinations, rule.dst_inv = parsed, invert
        elif key == "p":
            if self.proto_given:
                raise ParseError("multiple -p flags not allowed")
            self.proto_given = True
            rule.proto, rule.proto_inv = parse_protocol(value), invert
        elif key in "io":
            if (rule.in_iface if key == "i" else rule.out_iface):
                raise ParseError(f"multiple -{key} flags not allowed")
            if len(value) > MAX_IFNAME:
                raise ParseError(f"interface name `{value}' must be shorter than IFNAMSIZ ({MAX_IFNAME})")
            if key == "i":
                rule.in_iface, rule.in_inv = value, invert
            else:
                rule.out_iface, rule.out_inv = value, invert
        elif key == "m":
            cls = MATCHES.get(value)
            if cls is None:
                raise ParseError(f"Couldn't load match `{value}':No such file or directory")
            self.load_match(cls)
        else:
            if self.target is not None:
                raise ParseError("multiple -j flags not allowed")
            self.target = self.resolve_target(value, goto=(key == "g"))
            self.loaded.append(self.target)

    def resolve_target(self, name: str, *, goto: bool) -> Target:
        chain = self.table.chains.get(name)
        if goto:
            if chain is None or chain.builtin:
                raise ParseError(f"Chain '{name}' does not exist")
            return Jump(name, goto=True)
        if name in STANDARD_VERDICTS:
            return Standard(name)
        if name in TARGETS:
            return TARGETS[name]()
        if chain is not None and not chain.builtin:
            return Jump(name)
        raise ParseError(f"Couldn't load target `{name}':No such file or directory")

    def load_match(self, cls: type[Match]) -> Match:
        match = cls()
        self.matches.append(match)
        self.loaded.append(match)
        return match

    def extension(self, option: str, invert: bool, inline: str | None) -> None:
        owner = next((ext for ext in reversed(self.loaded) if option in ext.options), None)
        if owner is None and self.proto_given and not self.rule.proto_inv and not self.implicit_loaded:
            cls = MATCHES.get(protocol_name(self.rule.proto))
            if cls is not None and option in cls.options:
                self.implicit_loaded = True
                owner = self.load_match(cls)
        if owner is None:
            raise ParseError(f'unknown option "--{option}"')
        if invert and option not in owner.invertible:
            raise ParseError(f"{owner.name}: option \"--{option}\" cannot be inverted.")
        owner.parse(option, self.take("--" + option, owner.options[option], inline), invert, self.rule)

    def finish(self) -> tuple[list[Rule], tuple[int, int] | None]:
        rule = self.rule
        if rule.proto == 0 and rule.proto_inv:
            raise ParseError("rule would never match protocol")
        if self.chain in ("PREROUTING", "INPUT") and rule.out_iface and self.is_builtin():
            raise ParseError(f"Can't use -o with {self.chain}")
        if self.chain in ("OUTPUT", "POSTROUTING") and rule.in_iface and self.is_builtin():
            raise ParseError(f"Can't use -i with {self.chain}")
        for match in self.matches:
            match.finish(rule)
        target = self.target
        if target is not None:
            target.finish(rule)
            if self.table.name == "nat" and target.label == "DROP":
                raise ParseError('The "nat" table is not intended for filtering, the use of DROP is '
                                 'therefore inhibited.')
            if target.tables is not None and self.table.name not in target.tables:
                raise ParseError(f"RULE_APPEND failed (Invalid argument): {target.name} is only valid "
                                 f"in the {', '.join(sorted(target.tables))} table")
        rule.matches = tuple(self.matches)
        rule.target = target
        rules = []
        for src, src_mask in self.sources or [(0, 0)]:
            for dst, dst_mask in self.destinations or [(0, 0)]:
                one = copy.deepcopy(rule) if rules else rule
                one.src, one.src_mask, one.dst, one.dst_mask = src, src_mask, dst, dst_mask
                rules.append(one)
        return rules, self.counters

    def is_builtin(self) -> bool:
        chain = self.table.chains.get(self.chain)
        return chain is not None and chain.builtin


def parse_rule(words: list[str], table: Table, chain: str) -> tuple[list[Rule], tuple[int, int] | None]:
    """A rule specification → the rules it stands for, and `-c packets bytes` if given."""
    return _RuleReader(words, table, chain).read()
