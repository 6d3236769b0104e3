"""Targets: the standard verdicts and jumps, REJECT, DNAT, SNAT, MASQUERADE and MARK (core layer).

Each target reads its options like the iptables extension, prints them like iptables-save /
`iptables -L`, and says what the engine does with a packet that reached it (`kind`). Where the kernel
restricts a target to a table or to hooks (ipt_REJECT: filter, INPUT/FORWARD/OUTPUT; xt_nat DNAT:
PREROUTING/OUTPUT, SNAT: POSTROUTING/INPUT; MASQUERADE: POSTROUTING), `tables`/`hooks` say so and
the engine refuses the table at COMMIT, as the kernel refuses the rule ("Invalid argument").

MARK normalises like iptables: every form is stored as xmark (value, mask) and applied as
mark = (mark & ~mask) ^ value; iptables-save prints all of them as `--set-xmark value/mask`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .rules import ParseError, Rule, Target, format_ipv4, parse_ipv4, parse_value_mask


@dataclass(eq=True)
class Standard(Target):
    """ACCEPT, DROP or RETURN."""

    verdict: str = "ACCEPT"
    name: ClassVar[str] = "standard"

    @property
    def kind(self) -> str:          # type: ignore[override]
        return self.verdict

    @property
    def label(self) -> str:
        return self.verdict


@dataclass(eq=True)
class Jump(Target):
    """-j USER-CHAIN (pushes a return point) or -g USER-CHAIN (does not)."""

    chain: str = ""
    goto: bool = False
    name: ClassVar[str] = "jump"
    kind: ClassVar[str] = "JUMP"

    @property
    def label(self) -> str:
        return self.chain


# --- REJECT ----------------------------------------------------------------------------------------

REJECT_TYPES = {
    "icmp-net-unreachable": "net-unreach",
    "icmp-host-unreachable": "host-unreach",
    "icmp-proto-unreachable": "proto-unreach",
    "icmp-port-unreachable": "port-unreach",
    "icmp-net-prohibited": "net-prohib",
    "icmp-host-prohibited": "host-prohib",
    "tcp-reset": "tcp-rst",
    "icmp-admin-prohibited": "admin-prohib",
}


@dataclass(eq=True)
class Reject(Target):
    name: ClassVar[str] = "REJECT"
    kind: ClassVar[str] = "REJECT"
    options: ClassVar[dict[str, int]] = {"reject-with": 1}
    tables: ClassVar[frozenset[str] | None] = frozenset({"filter"})
    hooks: ClassVar[frozenset[str] | None] = frozenset({"INPUT", "FORWARD", "OUTPUT"})
    reject_with: str = "icmp-port-unreachable"

    def parse(self, option, args, invert, rule):
        wanted = args[0].lower()
        for full, alias in REJECT_TYPES.items():
            if wanted in (full, alias):
                self.reject_with = full
                return
        raise ParseError(f"unknown reject type \"{args[0]}\"")

    def finish(self, rule):
        if self.reject_with == "tcp-reset" and (rule.proto != 6 or rule.proto_inv):
            raise ParseError("RULE_APPEND failed (Invalid argument): REJECT --reject-with tcp-reset "
                             "needs -p tcp")

    def save(self):
        return f" --reject-with {self.reject_with}"

    def describe(self, numeric):
        return f" reject-with {self.reject_with}"


# --- NAT -------------------------------------------------------------------------------------------

PORT_PROTOCOLS = frozenset({6, 17, 33, 132})      # tcp udp dccp sctp


@dataclass(frozen=True)
class NatRange:
    """`ip[-ip][:port[-port]]`; an absent part keeps the packet's own value."""

    min_ip: int | None = None
    max_ip: int | None = None
    min_port: int | None = None
    max_port: int | None = None

    @classmethod
    def parse(cls, text: str) -> "NatRange":
        ip_text, colon, port_text = text.partition(":")
        min_ip = max_ip = min_port = max_port = None
        if ip_text:
            first, dash, last = ip_text.partition("-")
            min_ip = parse_ipv4(first)
            max_ip = parse_ipv4(last) if dash else min_ip
            if max_ip < min_ip:
                raise ParseError(f"Bad IP address \"{ip_text}\"")
        if colon:
            first, dash, last = port_text.partition("-")
            if not first.isdigit() or (dash and not last.isdigit()):
                raise ParseError(f"Port \"{port_text}\" not valid")
            min_port = int(first)
            max_port = int(last) if dash else min_port
            if not (0 < min_port <= max_port <= 0xFFFF):
                raise ParseError(f"Port \"{port_text}\" not valid")
        if min_ip is None and min_port is None:
            raise ParseError(f"Bad IP address \"{text}\"")
        return cls(min_ip, max_ip, min_port, max_port)

    def text(self) -> str:
        out = ""
        if self.min_ip is not None:
            out = format_ipv4(self.min_ip)
            if self.max_ip != self.min_ip:
                out += "-" + format_ipv4(self.max_ip)
        if self.min_port is not None:
            out += f":{self.min_port}"
            if self.max_port != self.min_port:
                out += f"-{self.max_port}"
        return out


def check_port_protocol(rule: Rule, has_port: bool) -> None:
    if has_port and (rule.proto not in PORT_PROTOCOLS or rule.proto_inv):
        raise ParseError("Need TCP, UDP, SCTP or DCCP with port specification")


@dataclass(eq=True)
class Nat(Target):
    """DNAT and SNAT: one address/port range and the --random/--random-fully/--persistent flags."""

    range_option: ClassVar[str]
    to: NatRange | None = None
    random: bool = False
    random_fully: bool = False
    persistent: bool = False

    def parse(self, option, args, invert, rule):
        if option == self.range_option:
            if self.to is not None:
                raise ParseError(f"{self.name}: Multiple --{option} not supported")
            self.to = NatRange.parse(args[0])
        else:
            setattr(self, option.replace("-", "_"), True)

    def finish(self, rule):
        if self.to is None:
            raise ParseError(f"{self.name}: option \"--{self.range_option}\" must be specified")
        check_port_protocol(rule, self.to.min_port is not None)

    def _flags(self) -> list[str]:
        return [flag for flag, on in (("random", self.random), ("random-fully", self.random_fully),
                                      ("persistent", self.persistent)) if on]

    def save(self):
        return f" --{self.range_option} {self.to.text()}" + "".join(f" --{f}" for f in self._flags())

    def describe(self, numeric):
        return f" to:{self.to.text()}" + "".join(f" {f}" for f in self._flags())


@dataclass(eq=True)
class Dnat(Nat):
    name: ClassVar[str] = "DNAT"
    kind: ClassVar[str] = "DNAT"
    range_option: ClassVar[str] = "to-destination"
    options: ClassVar[dict[str, int]] = {"to-destination": 1, "random": 0, "persistent": 0}
    tables: ClassVar[frozenset[str] | None] = frozenset({"nat"})
    hooks: ClassVar[frozenset[str] | None] = frozenset({"PREROUTING", "OUTPUT"})


@dataclass(eq=True)
class Snat(Nat):
    name: ClassVar[str] = "SNAT"
    kind: ClassVar[str] = "SNAT"
    range_option: ClassVar[str] = "to-source"
    options: ClassVar[dict[str, int]] = {"to-source": 1, "random": 0, "random-fully": 0,
                                         "persistent": 0}
    tables: ClassVar[frozenset[str] | None] = frozenset({"nat"})
    hooks: ClassVar[frozenset[str] | None] = frozenset({"POSTROUTING", "INPUT"})


@dataclass(eq=True)
class Masquerade(Target):
    name: ClassVar[str] = "MASQUERADE"
    kind: ClassVar[str] = "MASQUERADE"
    options: ClassVar[dict[str, int]] = {"to-ports": 1, "random": 0, "random-fully": 0}
    tables: ClassVar[frozenset[str] | None] = frozenset({"nat"})
    hooks: ClassVar[frozenset[str] | None] = frozenset({"POSTROUTING"})
    min_port: int | None = None
    max_port: int | None = None
    random: bool = False
    random_fully: bool = False

    def parse(self, option, args, invert, rule):
        if option == "to-ports":
            ports = NatRange.parse(":" + args[0])
            self.min_port, self.max_port = ports.min_port, ports.max_port
        else:
            setattr(self, option.replace("-", "_"), True)

    def finish(self, rule):
        check_port_protocol(rule, self.min_port is not None)

    def _ports(self) -> str:
        if self.min_port is None:
            return ""
        return str(self.min_port) + ("" if self.max_port == self.min_port else f"-{self.max_port}")

    def save(self):
        out = f" --to-ports {self._ports()}" if self.min_port is not None else ""
        return out + (" --random" if self.random else "") + (" --random-fully" if self.random_fully else "")

    def describe(self, numeric):
        out = f" masq ports: {self._ports()}" if self.min_port is not None else ""
        return out + (" random" if self.random else "") + (" random-fully" if self.random_fully else "")


# --- MARK ------------------------------------------------------------------------------------------

@dataclass(eq=True)
class MarkTarget(Target):
    name: ClassVar[str] = "MARK"
    kind: ClassVar[str] = "CONTINUE"
    options: ClassVar[dict[str, int]] = {"set-xmark": 1, "set-mark": 1, "and-mark": 1, "or-mark": 1,
                                         "xor-mark": 1}
    value: int | None = None
    mask: int = 0
    _option: str | None = field(default=None, compare=False, repr=False)   # the option as written

    def parse(self, option, args, invert, rule):
        if self._option is not None:
            raise ParseError(f'MARK: option "--{self._option}" cannot be used together with "--{option}".')
        self._option = option
        value, mask = parse_value_mask(args[0], f"--{option}")
        if option in ("and-mark", "or-mark", "xor-mark") and mask is not None:
            raise ParseError(f'MARK: trailing garbage after value for option "--{option}".')
        if option == "set-xmark":
            self.value, self.mask = value, 0xFFFFFFFF if mask is None else mask
        elif option == "set-mark":
            self.value, self.mask = value, value | (0xFFFFFFFF if mask is None else mask)
        elif option == "and-mark":
            self.value, self.mask = 0, ~value & 0xFFFFFFFF
        elif option == "or-mark":
            self.value, self.mask = value, value
        else:
            self.value, self.mask = value, 0

    def finish(self, rule):
        if self.value is None:
            raise ParseError("MARK: One of the --set-xmark, --{and,or,xor,set}-mark options is required")

    def save(self):
        return f" --set-xmark 0x{self.value:x}/0x{self.mask:x}"

    def describe(self, numeric):
        value, mask = self.value, self.mask
        if value == 0:
            return f" MARK and 0x{~mask & 0xFFFFFFFF:x}"
        if value == mask:
            return f" MARK or 0x{value:x}"
        if mask == 0:
            return f" MARK xor 0x{value:x}"
        if mask == 0xFFFFFFFF:
            return f" MARK set 0x{value:x}"
        return f" MARK xset 0x{value:x}/0x{mask:x}"

    def apply(self, pkt):
        pkt.mark = ((pkt.mark & ~self.mask) ^ self.value) & 0xFFFFFFFF
