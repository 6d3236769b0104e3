"""What netfilter-style matching sees of one packet at one hook (core layer, no I/O).

Built by the datapath from a parsed frame and its conntrack entry, handed to a service backend's
decision for a NEW flow and to the iptables chain engine. Fields keep the kernel's meaning:
`mark` is skb->mark (the MARK target changes it, later rules and hooks see the change);
`ct_state` holds the conntrack state bits iptables' conntrack match tests (NEW, ESTABLISHED,
RELATED, INVALID, UNTRACKED) plus the status bits DNAT and SNAT.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CtState(enum.IntFlag):
    """`-m conntrack --ctstate` names, as bits."""

    INVALID = 1
    NEW = 2
    ESTABLISHED = 4
    RELATED = 8
    UNTRACKED = 16
    SNAT = 32
    DNAT = 64


@dataclass(slots=True)
class PacketInfo:
    src: int                 # IPv4 addresses as ints (host order)
    dst: int
    proto: int               # 6 tcp, 17 udp, 132 sctp, 1 icmp
    sport: int = 0
    dport: int = 0
    in_iface: str | None = None    # -i (None at OUTPUT)
    out_iface: str | None = None   # -o (None at PREROUTING / INPUT)
    mark: int = 0
    ct_state: CtState = CtState.NEW
    tcp_flags: int = 0
    length: int = 0          # IP total length, for counters
