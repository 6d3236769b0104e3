"""The iptables data model: rules, chains and tables (core layer, no I/O).

A `Rule` is what one `-A CHAIN ...` line becomes: the fixed IPv4 header part the kernel's
`ip_packet_match` tests (source, destination, interfaces, protocol, each with its own `!`), an ordered
tuple of match extensions, and at most one target. A `Chain` is an ordered list of rules; a built-in
chain also has a policy and policy counters. A `Table` holds its built-in chains (in hook order) and
its user chains.

Invariants:
- Rules compare by specification only: counters, the source line and the per-rule state of stateful
  matches (`statistic --mode nth`) never take part in `==`. `iptables -D CHAIN rule-spec` and the
  round-trip property `parse(save(parse(x))) == parse(x)` rely on this.
- Addresses are host-order ints and are stored already masked (`-s 10.1.2.3/8` is `10.0.0.0/8`), as
  iptables normalises them when it parses.
- A table is never changed in place by a restore: `iptables-restore` works on a `clone()` and swaps it
  in at COMMIT, so a failing restore changes nothing (rule objects are shared, never mutated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from podnet.errors import ConfigError

if TYPE_CHECKING:
    from podnet.core.services.packetinfo import PacketInfo


class IptablesError(ConfigError):
    """iptables-restore refused its input. Like iptables-restore's "line N failed", the message names
    the line number and the line's text; `line`, `text` and `reason` are also kept as attributes."""

    def __init__(self, reason: str, *, line: int | None = None, text: str | None = None):
        self.reason = reason
        self.line = line
        self.text = text
        where = f"line {line} failed" if line is not None else "failed"
        shown = f": {text.strip()}" if text and text.strip() else ""
        super().__init__(f"iptables-restore: {where}{shown}: {reason}")


class ParseError(ValueError):
    """Raised by option parsers; the restore code turns it into an IptablesError with the line."""


# --- tables and hooks ------------------------------------------------------------------------------

BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}
# iptables-nft prints the tables it finds in this fixed order (its table array), whatever the order
# in which they were created.
SAVE_ORDER = ("mangle", "raw", "filter", "nat")

STANDARD_VERDICTS = ("ACCEPT", "DROP", "RETURN")
MAX_CHAIN_NAME = 28          # XT_EXTENSION_MAXNAMELEN - 1
MAX_IFNAME = 15              # IFNAMSIZ - 1

# IANA protocol keywords as /etc/protocols spells them (iptables prints these names).
PROTOCOL_NAMES: dict[int, str] = {
    1: "icmp", 2: "igmp", 3: "ggp", 4: "ipencap", 5: "st", 6: "tcp", 8: "egp", 9: "igp", 12: "pup",
    17: "udp", 20: "hmp", 22: "xns-idp", 27: "rdp", 29: "iso-tp4", 33: "dccp", 36: "xtp", 37: "ddp",
    38: "idpr-cmtp", 41: "ipv6", 43: "ipv6-route", 44: "ipv6-frag", 45: "idrp", 46: "rsvp", 47: "gre",
    50: "esp", 51: "ah", 57: "skip", 58: "ipv6-icmp", 59: "ipv6-nonxt", 60: "ipv6-opts", 73: "rspf",
    81: "vmtp", 88: "eigrp", 89: "ospf", 93: "ax.25", 94: "ipip", 97: "etherip", 98: "encap",
    103: "pim", 108: "ipcomp", 112: "vrrp", 115: "l2tp", 124: "isis", 132: "sctp", 133: "fc",
    135: "mobility-header", 136: "udplite", 137: "mpls-in-ip", 138: "manet", 139: "hip", 140: "shim6",
    141: "wesp", 142: "rohc", 143: "ethernet",
}
PROTOCOL_NUMBERS: dict[str, int] = {name: num for num, name in PROTOCOL_NAMES.items()}
PROTOCOL_NUMBERS.update({"all": 0, "ip": 0, "icmpv6": 58, "mh": 135})


def parse_protocol(text: str) -> int:
    lowered = text.lower()
    if lowered.isdigit() and int(lowered) <= 255:
        return int(lowered)
    if lowered in PROTOCOL_NUMBERS:
        return PROTOCOL_NUMBERS[lowered]
    raise ParseError(f'unknown protocol "{text}" specified')


def protocol_name(proto: int) -> str:
    """The name iptables-save and `iptables -L` (without -n) print for a protocol number."""
    if proto == 0:
        return "all"
    return PROTOCOL_NAMES.get(proto, str(proto))


# --- addresses -------------------------------------------------------------------------------------

def parse_ipv4(text: str) -> int:
    """Dotted quad as iptables reads it: one to four decimal parts, missing trailing parts are 0
    ("10.1" is 10.1.0.0, not inet_aton's 10.0.0.1). Host names are not resolved."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        raise ParseError(f"host/network `{text}' not found")
    value = 0
    for i in range(4):
        value = (value << 8) | (int(parts[i]) if i < len(parts) else 0)
    return value


def format_ipv4(value: int) -> str:
    return f"{value >> 24 & 255}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}"


def prefix_mask(length: int) -> int:
    return (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF if length else 0


def mask_length(mask: int) -> int | None:
    """The prefix length of a contiguous mask, None for a non-contiguous one."""
    length = bin(mask).count("1")
    return length if prefix_mask(length) == mask else None


def parse_address(text: str) -> tuple[int, int]:
    """`addr[/len|/dotted-mask]` → (masked address, mask)."""
    addr_text, slash, mask_text = text.partition("/")
    if slash:
        if mask_text.isdigit():
            if int(mask_text) > 32:
                raise ParseError(f"invalid mask `{mask_text}' specified")
            mask = prefix_mask(int(mask_text))
        elif "." in mask_text:
            mask = parse_ipv4(mask_text)
        else:
            raise ParseError(f"invalid mask `{mask_text}' specified")
    else:
        mask = 0xFFFFFFFF
    addr = parse_ipv4(addr_text) if addr_text else 0
    return addr & mask, mask


def save_mask(mask: int) -> str:
    length = mask_length(mask)
    return f"/{length}" if length is not None else f"/{format_ipv4(mask)}"


def list_mask(mask: int) -> str:
    """`iptables -L` omits /32 (xtables_ipmask_to_numeric)."""
    return "" if mask == 0xFFFFFFFF else save_mask(mask)


def parse_uint32(text: str, what: str) -> int:
    """strtoul(..., 0) as the mark options read numbers: 0x hex, 0 octal, else decimal."""
    try:
        if text.lower().startswith("0x"):
            value = int(text[2:], 16)
        elif len(text) > 1 and text.startswith("0"):
            value = int(text[1:], 8)
        else:
            value = int(text, 10)
    except ValueError:
        raise ParseError(f'bad integer value for option "{what}", or out of range.') from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise ParseError(f'bad integer value for option "{what}", or out of range.')
    return value


def parse_value_mask(text: str, what: str) -> tuple[int, int | None]:
    value_text, slash, mask_text = text.partition("/")
    if slash and "/" in mask_text:
        raise ParseError(f'trailing garbage after value for option "{what}".')
    return parse_uint32(value_text, what), (parse_uint32(mask_text, what) if slash else None)


# --- extensions (implemented in matches.py / targets.py) --------------------------------------------

class Extension:
    """A match or target module: its options, how it reads them and how iptables prints it.

    `options` maps a long option (without the leading --) to its number of arguments; an option in
    `invertible` accepts a preceding `!`. Subclasses are dataclasses so that `==` compares the
    specification.
    """

    name: ClassVar[str]
    options: ClassVar[dict[str, int]] = {}
    invertible: ClassVar[frozenset[str]] = frozenset()

    def parse(self, option: str, args: list[str], invert: bool, rule: "Rule") -> None:
        raise ParseError(f'unknown option "--{option}"')

    def finish(self, rule: "Rule") -> None:
        """Checks once the whole line is read (iptables' final_check)."""

    def save(self) -> str:
        """Options as iptables-save prints them, each preceded by a space."""
        return ""

    def describe(self, numeric: bool) -> str:
        """What `iptables -L` prints in the last column, each part preceded by a space."""
        return ""


class Match(Extension):
    def matches(self, pkt: "PacketInfo", walk: Any) -> bool:
        raise NotImplementedError


class Target(Extension):
    """`kind` is what the engine does: "ACCEPT"/"DROP"/"RETURN"/"JUMP" (standard), "REJECT", "DNAT",
    "SNAT", "MASQUERADE" (terminal) or "CONTINUE" (MARK: change the packet, go on)."""

    kind: ClassVar[str] = "CONTINUE"
    tables: ClassVar[frozenset[str] | None] = None      # None: valid in every table
    hooks: ClassVar[frozenset[str] | None] = None       # None: valid from every hook

    @property
    def label(self) -> str:
        """The name in the `target` column and after -j."""
        return self.name

    def apply(self, pkt: "PacketInfo") -> None:
        """Non-terminal targets change the packet here."""


# --- rules, chains, tables -------------------------------------------------------------------------

@dataclass(slots=True)
class Counters:
    packets: int = 0
    bytes: int = 0

    def add(self, length: int) -> None:
        self.packets += 1
        self.bytes += length


@dataclass(eq=True)
class Rule:
    src: int = 0
    src_mask: int = 0
    src_inv: bool = False
    dst: int = 0
    dst_mask: int = 0
    dst_inv: bool = False
    in_iface: str = ""
    in_inv: bool = False
    out_iface: str = ""
    out_inv: bool = False
    proto: int = 0
    proto_inv: bool = False
    matches: tuple[Match, ...] = ()
    target: Target | None = None
    counters: Counters = field(default_factory=Counters, compare=False, repr=False)
    line: int = field(default=0, compare=False, repr=False)

    def matches_packet(self, pkt: "PacketInfo", walk: Any) -> bool:
        """ip_packet_match, then every match in order, stopping at the first that fails (so a later
        `statistic --mode nth` or `recent --set` is not reached when an earlier match fails)."""
        if (self.src_mask or self.src_inv) and ((pkt.src & self.src_mask) == self.src) == self.src_inv:
            return False
        if (self.dst_mask or self.dst_inv) and ((pkt.dst & self.dst_mask) == self.dst) == self.dst_inv:
            return False
        if self.in_iface and iface_matches(self.in_iface, pkt.in_iface) == self.in_inv:
            return False
        if self.out_iface and iface_matches(self.out_iface, pkt.out_iface) == self.out_inv:
            return False
        if self.proto and (pkt.proto == self.proto) == self.proto_inv:
            return False
        for match in self.matches:
            if not match.matches(pkt, walk):
                return False
        return True

    @property
    def jump_chain(self) -> str | None:
        target = self.target
        return getattr(target, "chain", None) if target is not None and target.kind == "JUMP" else None


def iface_matches(pattern: str, name: str | None) -> bool:
    """`eth0` matches exactly; `veth+` matches every name starting with `veth` (and `+` everything).
    A packet without that interface (no input device at OUTPUT) compares as the empty name."""
    name = name or ""
    if pattern.endswith("+"):
        return name.startswith(pattern[:-1])
    return name == pattern


@dataclass(eq=True)
class Chain:
    name: str
    builtin: bool = False
    policy: str | None = None          # built-in chains only
    rules: list[Rule] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters, compare=False)   # policy counters

    def clone(self) -> "Chain":
        return Chain(self.name, self.builtin, self.policy, list(self.rules),
                     Counters(self.counters.packets, self.counters.bytes))


@dataclass(eq=True)
class Table:
    name: str
    chains: dict[str, Chain] = field(default_factory=dict)

    @classmethod
    def empty(cls, name: str) -> "Table":
        if name not in BUILTIN_CHAINS:
            raise ConfigError(f"iptables: table '{name}' does not exist")
        return cls(name, {chain: Chain(chain, True, "ACCEPT") for chain in BUILTIN_CHAINS[name]})

    def clone(self) -> "Table":
        return Table(self.name, {name: chain.clone() for name, chain in self.chains.items()})

    def ordered_chains(self) -> list[Chain]:
        """Built-in chains in hook order, then user chains sorted by name (strcmp), as iptables-save
        and `iptables -L` print them."""
        builtins = [c for c in self.chains.values() if c.builtin]
        users = sorted((c for c in self.chains.values() if not c.builtin),
                       key=lambda c: c.name.encode())
        return builtins + users

    def references(self, name: str) -> int:
        return sum(1 for chain in self.chains.values() for rule in chain.rules if rule.jump_chain == name)

    def rule_count(self) -> int:
        return sum(len(chain.rules) for chain in self.chains.values())
