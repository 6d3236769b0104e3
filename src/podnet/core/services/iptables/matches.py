"""Stateless match extensions: comment, tcp, udp, sctp, multiport, mark, addrtype, conntrack, state
(core layer, no I/O).

Each class reads its options the way the iptables extension (libxt_<name>) does, prints them the way
iptables-save and `iptables -L` print them (normalised forms checked against iptables 1.8.9), and
tests a packet the way the kernel module (xt_<name>) does. The stateful matches (statistic, recent)
are in stateful.py.

Invariants: a match never changes the packet; print forms are normalised, so that reading what
`save()` printed gives an equal match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from podnet.core.services.packetinfo import CtState, PacketInfo

from .rules import Match, ParseError, Rule, parse_value_mask

# --- ports -----------------------------------------------------------------------------------------

FULL_RANGE = (0, 0xFFFF)


def parse_port(text: str) -> int:
    if text.isdigit() and int(text) <= 0xFFFF:
        return int(text)
    raise ParseError(f"invalid port/service `{text}' specified")


def parse_port_range(text: str) -> tuple[int, int]:
    """`p`, `p:q`, `p:` (to 65535) or `:q` (from 0)."""
    low, colon, high = text.partition(":")
    if not colon:
        port = parse_port(text)
        return port, port
    first = parse_port(low) if low else 0
    last = parse_port(high) if high else 0xFFFF
    if first > last:
        raise ParseError("invalid portrange (min > max)")
    return first, last


def in_range(port: int, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= port <= bounds[1]


def save_range(option: str, bounds: tuple[int, int], invert: bool) -> str:
    text = str(bounds[0]) if bounds[0] == bounds[1] else f"{bounds[0]}:{bounds[1]}"
    return f"{' !' if invert else ''} --{option} {text}"


def list_range(name: str, bounds: tuple[int, int], invert: bool) -> str:
    """libxt_tcp/udp print_ports: `dpt:80`, `dpt:!80`, `spts:1000:2000`."""
    if bounds == FULL_RANGE and not invert:
        return ""
    bang = "!" if invert else ""
    if bounds[0] == bounds[1]:
        return f" {name}:{bang}{bounds[0]}"
    return f" {name}s:{bang}{bounds[0]}:{bounds[1]}"


def require_protocol(rule: Rule, proto: int, message: str) -> None:
    if rule.proto != proto or rule.proto_inv:
        raise ParseError(message)


# --- comment ---------------------------------------------------------------------------------------

NO_QUOTE = frozenset("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def save_string(value: str) -> str:
    """xtables_save_string: bare when only [A-Za-z0-9_-] (and not empty), else double-quoted with
    `"`, `\\` and `'` escaped by a backslash."""
    if value and all(ch in NO_QUOTE for ch in value):
        return " " + value
    escaped = "".join("\\" + ch if ch in "\"\\'" else ch for ch in value)
    return f' "{escaped}"'


@dataclass(eq=True)
class Comment(Match):
    name: ClassVar[str] = "comment"
    options: ClassVar[dict[str, int]] = {"comment": 1}
    text: str | None = None

    def parse(self, option, args, invert, rule):
        if len(args[0]) > 255:
            raise ParseError("comment may not exceed 255 characters")
        self.text = args[0]

    def finish(self, rule):
        if self.text is None:
            raise ParseError('comment: option "--comment" must be specified')

    def save(self):
        return " --comment" + save_string(self.text or "")

    def describe(self, numeric):
        return f" /* {self.text} */"

    def matches(self, pkt, walk):
        return True


# --- tcp / udp / sctp ------------------------------------------------------------------------------

TCP_FLAG_NAMES = (("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08), ("ACK", 0x10),
                  ("URG", 0x20), ("ALL", 0x3F), ("NONE", 0x00))


def parse_tcp_flags(text: str) -> int:
    flags = 0
    for word in text.split(","):
        for name, bits in TCP_FLAG_NAMES:
            if word.upper() == name:
                flags |= bits
                break
        else:
            raise ParseError(f"Unknown TCP flag `{word}'")
    return flags


def format_tcp_flags(flags: int) -> str:
    """libxt_tcp print_tcpf: the first name (in table order) sharing a bit, repeatedly."""
    names = []
    while flags:
        name, bits = next((n, b) for n, b in TCP_FLAG_NAMES if flags & b)
        names.append(name)
        flags &= ~bits
    return ",".join(names) or "NONE"


@dataclass(eq=True)
class PortMatch(Match):
    """Shared by tcp and udp: --sport/--dport with ranges and `!`."""

    protocol: ClassVar[int]
    options: ClassVar[dict[str, int]] = {"sport": 1, "source-port": 1, "dport": 1,
                                         "destination-port": 1}
    invertible: ClassVar[frozenset[str]] = frozenset(options)
    sport: tuple[int, int] = FULL_RANGE
    sport_inv: bool = False
    dport: tuple[int, int] = FULL_RANGE
    dport_inv: bool = False
    _seen: set = field(default_factory=set, compare=False, repr=False)

    def _once(self, key: str) -> None:
        if key in self._seen:
            raise ParseError(f'{self.name}: "--{key}" option may only be specified once')
        self._seen.add(key)

    def parse(self, option, args, invert, rule):
        if option in ("sport", "source-port"):
            self._once("sport")
            self.sport, self.sport_inv = parse_port_range(args[0]), invert
        else:
            self._once("dport")
            self.dport, self.dport_inv = parse_port_range(args[0]), invert

    def finish(self, rule):
        require_protocol(rule, self.protocol, f"{self.name.upper()} match requires '-p {self.name}'")

    def save(self):
        out = ""
        if self.sport != FULL_RANGE:
            out += save_range("sport", self.sport, self.sport_inv)
        if self.dport != FULL_RANGE:
            out += save_range("dport", self.dport, self.dport_inv)
        return out

    def describe(self, numeric):
        return (f" {self.name}" + list_range("spt", self.sport, self.sport_inv)
                + list_range("dpt", self.dport, self.dport_inv))

    def matches(self, pkt, walk):
        return (in_range(pkt.sport, self.sport) != self.sport_inv
                and in_range(pkt.dport, self.dport) != self.dport_inv)


@dataclass(eq=True)
class Tcp(PortMatch):
    name: ClassVar[str] = "tcp"
    protocol: ClassVar[int] = 6
    options: ClassVar[dict[str, int]] = {**PortMatch.options, "tcp-flags": 2, "syn": 0}
    invertible: ClassVar[frozenset[str]] = frozenset(options)
    flags_mask: int = 0
    flags_cmp: int = 0
    flags_inv: bool = False

    def parse(self, option, args, invert, rule):
        if option == "tcp-flags":
            self._once("tcp-flags")
            self.flags_mask, self.flags_cmp = parse_tcp_flags(args[0]), parse_tcp_flags(args[1])
            self.flags_inv = invert
        elif option == "syn":
            self._once("tcp-flags")
            self.flags_mask, self.flags_cmp, self.flags_inv = 0x17, 0x02, invert   # FIN,SYN,RST,ACK SYN
        else:
            super().parse(option, args, invert, rule)

    def save(self):
        out = super().save()
        if self.flags_mask or self.flags_inv:
            out += (f"{' !' if self.flags_inv else ''} --tcp-flags {format_tcp_flags(self.flags_mask)}"
                    f" {format_tcp_flags(self.flags_cmp)}")
        return out

    def describe(self, numeric):
        out = super().describe(numeric)
        if self.flags_mask or self.flags_inv:
            bang = "!" if self.flags_inv else ""
            if numeric:
                out += f" flags:{bang}0x{self.flags_mask:02X}/0x{self.flags_cmp:02X}"
            else:
                out += f" flags:{bang}{format_tcp_flags(self.flags_mask)}/{format_tcp_flags(self.flags_cmp)}"
        return out

    def matches(self, pkt, walk):
        if not super().matches(pkt, walk):
            return False
        return ((pkt.tcp_flags & self.flags_mask) == self.flags_cmp) != self.flags_inv


@dataclass(eq=True)
class Udp(PortMatch):
    name: ClassVar[str] = "udp"
    protocol: ClassVar[int] = 17


@dataclass(eq=True)
class Sctp(PortMatch):
    """Unlike tcp/udp, sctp remembers which ports were given and prints them even when they are the
    full range (`! --dport 0:65535` stays)."""

    name: ClassVar[str] = "sctp"
    protocol: ClassVar[int] = 132
    sport_given: bool = False
    dport_given: bool = False

    def parse(self, option, args, invert, rule):
        super().parse(option, args, invert, rule)
        if option in ("sport", "source-port"):
            self.sport_given = True
        else:
            self.dport_given = True

    def finish(self, rule):
        require_protocol(rule, self.protocol, "SCTP match requires '-p sctp'")

    def save(self):
        out = ""
        if self.sport_given:
            out += save_range("sport", self.sport, self.sport_inv)
        if self.dport_given:
            out += save_range("dport", self.dport, self.dport_inv)
        return out


# --- multiport -------------------------------------------------------------------------------------

MULTIPORT_PROTOCOLS = frozenset({6, 17, 33, 132, 136})   # tcp udp dccp sctp udplite


@dataclass(eq=True)
class Multiport(Match):
    name: ClassVar[str] = "multiport"
    options: ClassVar[dict[str, int]] = {"sports": 1, "source-ports": 1, "dports": 1,
                                         "destination-ports": 1, "ports": 1}
    invertible: ClassVar[frozenset[str]] = frozenset(options)
    kind: str = ""                                     # "sports", "dports" or "ports"
    ports: tuple[tuple[int, int, bool], ...] = ()       # (first, last, written as a range)
    invert: bool = False

    def parse(self, option, args, invert, rule):
        if self.kind:
            raise ParseError("multiport can only have one option")
        self.kind = {"source-ports": "sports", "destination-ports": "dports"}.get(option, option)
        entries = []
        slots = 0
        for item in args[0].split(","):
            first, last = parse_port_range(item)
            is_range = ":" in item
            entries.append((first, last, is_range))
            slots += 2 if is_range else 1
        if slots > 15:
            raise ParseError("too many ports specified")
        self.ports, self.invert = tuple(entries), invert

    def finish(self, rule):
        if not self.kind:
            raise ParseError("multiport expects an option")
        if rule.proto not in MULTIPORT_PROTOCOLS or rule.proto_inv:
            raise ParseError("multiport needs `-p tcp', `-p udp', `-p udplite', `-p sctp' or `-p dccp'")

    def _ports_text(self) -> str:
        return ",".join(f"{a}:{b}" if r else str(a) for a, b, r in self.ports)

    def save(self):
        return f"{' !' if self.invert else ''} --{self.kind} {self._ports_text()}"

    def describe(self, numeric):
        return f" multiport {self.kind} {' !' if self.invert else ''}{self._ports_text()}"

    def matches(self, pkt, walk):
        for first, last, _ in self.ports:
            if self.kind == "sports":
                hit = first <= pkt.sport <= last
            elif self.kind == "dports":
                hit = first <= pkt.dport <= last
            else:
                hit = first <= pkt.sport <= last or first <= pkt.dport <= last
            if hit:
                return not self.invert
        return self.invert


# --- mark ------------------------------------------------------------------------------------------

@dataclass(eq=True)
class Mark(Match):
    name: ClassVar[str] = "mark"
    options: ClassVar[dict[str, int]] = {"mark": 1}
    invertible: ClassVar[frozenset[str]] = frozenset({"mark"})
    value: int | None = None
    mask: int = 0xFFFFFFFF
    invert: bool = False

    def parse(self, option, args, invert, rule):
        value, mask = parse_value_mask(args[0], "--mark")
        self.value, self.mask, self.invert = value, 0xFFFFFFFF if mask is None else mask, invert

    def finish(self, rule):
        if self.value is None:
            raise ParseError('mark: option "--mark" must be specified')

    def _text(self) -> str:
        return f"0x{self.value:x}" + ("" if self.mask == 0xFFFFFFFF else f"/0x{self.mask:x}")

    def save(self):
        return f"{' !' if self.invert else ''} --mark {self._text()}"

    def describe(self, numeric):
        return f" mark match{' !' if self.invert else ''} {self._text()}"

    def matches(self, pkt, walk):
        return ((pkt.mark & self.mask) == self.value) != self.invert


# --- addrtype --------------------------------------------------------------------------------------

ADDRESS_TYPES = ("UNSPEC", "UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST", "BLACKHOLE",
                 "UNREACHABLE", "PROHIBIT", "THROW", "NAT", "XRESOLVE")   # bit i = RTN_<name>


def parse_address_types(text: str) -> int:
    mask = 0
    for word in text.split(","):
        if word.upper() not in ADDRESS_TYPES:
            raise ParseError(f'addrtype: bad type "{word}"')
        mask |= 1 << ADDRESS_TYPES.index(word.upper())
    return mask


def format_address_types(mask: int) -> str:
    return ",".join(name for i, name in enumerate(ADDRESS_TYPES) if mask & (1 << i))


def address_type(addr: int, local_addresses: frozenset[int]) -> int:
    """inet_addr_type as the node's local routing table answers it: 0.0.0.0/8 and 255.255.255.255
    are BROADCAST, 224.0.0.0/4 MULTICAST, the node's addresses and 127.0.0.0/8 (lo's local route)
    LOCAL, anything else UNICAST. Subnet broadcast addresses are not known here (counted UNICAST)."""
    if addr >> 24 == 0 or addr == 0xFFFFFFFF:
        return ADDRESS_TYPES.index("BROADCAST")
    if addr >> 28 == 0xE:
        return ADDRESS_TYPES.index("MULTICAST")
    if addr in local_addresses or addr >> 24 == 127:
        return ADDRESS_TYPES.index("LOCAL")
    return ADDRESS_TYPES.index("UNICAST")


@dataclass(eq=True)
class AddrType(Match):
    name: ClassVar[str] = "addrtype"
    options: ClassVar[dict[str, int]] = {"src-type": 1, "dst-type": 1}
    invertible: ClassVar[frozenset[str]] = frozenset(options)
    src_types: int = 0
    src_inv: bool = False
    dst_types: int = 0
    dst_inv: bool = False

    def parse(self, option, args, invert, rule):
        if option == "src-type":
            self.src_types, self.src_inv = parse_address_types(args[0]), invert
        else:
            self.dst_types, self.dst_inv = parse_address_types(args[0]), invert

    def finish(self, rule):
        if not (self.src_types or self.dst_types):
            raise ParseError("addrtype: you must specify --src-type or --dst-type")

    def save(self):
        out = ""
        if self.src_types:
            out += f"{' !' if self.src_inv else ''} --src-type {format_address_types(self.src_types)}"
        if self.dst_types:
            out += f"{' !' if self.dst_inv else ''} --dst-type {format_address_types(self.dst_types)}"
        return out

    def describe(self, numeric):
        out = " ADDRTYPE match"
        if self.src_types:
            out += f" src-type {'!' if self.src_inv else ''}{format_address_types(self.src_types)}"
        if self.dst_types:
            out += f" dst-type {'!' if self.dst_inv else ''}{format_address_types(self.dst_types)}"
        return out

    def matches(self, pkt, walk):
        local = walk.ctx.local_addresses
        if self.src_types and bool(self.src_types & (1 << address_type(pkt.src, local))) == self.src_inv:
            return False
        if self.dst_types and bool(self.dst_types & (1 << address_type(pkt.dst, local))) == self.dst_inv:
            return False
        return True


# --- conntrack / state -----------------------------------------------------------------------------

CONNTRACK_ORDER = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT")
STATE_ORDER = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED")


def parse_states(text: str, allowed: tuple[str, ...], error: str) -> CtState:
    states = CtState(0)
    for word in text.split(","):
        if word.upper() not in allowed:
            raise ParseError(f'{error} "{word}"')
        states |= CtState[word.upper()]
    return states


def format_states(states: CtState, order: tuple[str, ...]) -> str:
    return ",".join(name for name in order if states & CtState[name])


@dataclass(eq=True)
class Conntrack(Match):
    """--ctstate only: a packet matches when any of its PacketInfo.ct_state bits is listed."""

    name: ClassVar[str] = "conntrack"
    options: ClassVar[dict[str, int]] = {"ctstate": 1}
    invertible: ClassVar[frozenset[str]] = frozenset({"ctstate"})
    states: CtState | None = None
    invert: bool = False

    def parse(self, option, args, invert, rule):
        self.states, self.invert = parse_states(args[0], CONNTRACK_ORDER, "Bad ctstate"), invert

    def finish(self, rule):
        if self.states is None:
            raise ParseError("conntrack: At least one option is required")

    def save(self):
        return f"{' !' if self.invert else ''} --ctstate {format_states(self.states, CONNTRACK_ORDER)}"

    def describe(self, numeric):
        return f"{' !' if self.invert else ''} ctstate {format_states(self.states, CONNTRACK_ORDER)}"

    def matches(self, pkt, walk):
        return bool(pkt.ct_state & self.states) != self.invert


@dataclass(eq=True)
class State(Match):
    name: ClassVar[str] = "state"
    options: ClassVar[dict[str, int]] = {"state": 1}
    invertible: ClassVar[frozenset[str]] = frozenset({"state"})
    states: CtState | None = None
    invert: bool = False

    def parse(self, option, args, invert, rule):
        self.states, self.invert = parse_states(args[0], STATE_ORDER, "Bad state"), invert

    def finish(self, rule):
        if self.states is None:
            raise ParseError('state: option "--state" must be specified')

    def save(self):
        return f"{' !' if self.invert else ''} --state {format_states(self.states, STATE_ORDER)}"

    def describe(self, numeric):
        return f"{' !' if self.invert else ''} state {format_states(self.states, STATE_ORDER)}"

    def matches(self, pkt: PacketInfo, walk: Any) -> bool:
        # xt_state sees the connection state only; the SNAT/DNAT status bits are not states.
        return bool(pkt.ct_state & self.states) != self.invert
