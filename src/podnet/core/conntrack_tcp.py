"""The TCP state table of podnet's conntrack: Linux's tcp_conntracks[][][] and tcp_error()'s flag check.

Layer: core. Data only, used by `conntrack`: the next state for each (direction, packet class,
current state), and each flags byte's packet class (-1 where the kernel refuses the combination).
"""

from __future__ import annotations

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR = (1 << i for i in range(8))

_NO, _SS, _SR, _ES, _FW, _CW, _LA, _TW, _CL, _S2 = range(10)
_IV = 10   # invalid packet
_IG = 11   # ignored packet: accepted, no state change, no refresh
_SYN_SET, _SYNACK_SET, _FIN_SET, _ACK_SET, _RST_SET, _NONE_SET = range(6)

_CODES = {"NO": _NO, "SS": _SS, "SR": _SR, "ES": _ES, "FW": _FW, "CW": _CW, "LA": _LA, "TW": _TW,
          "CL": _CL, "S2": _S2, "IV": _IV, "IG": _IG}


def _row(text: str) -> tuple[int, ...]:
    return tuple(_CODES[code] for code in text.split())


# Next state for a packet class, one column per current state in TcpState order:
#                    NO SS SR ES FW CW LA TW CL S2
_TCP_NEXT = (
    (  # original direction (the side that sent the first SYN)
        _row("SS SS IG IG IG IG IG SS SS S2"),   # SYN: opens; reopens after TIME_WAIT/CLOSE
        _row("IV IV SR IV IV IV IV IV IV SR"),   # SYN+ACK: only in a simultaneous open
        _row("IV IV FW FW LA LA LA TW CL IV"),   # FIN: starts or completes a close
        _row("ES IV ES ES CW CW TW TW CL IV"),   # ACK: mid-stream pickup from NONE; not before SYN+ACK
        _row("IV CL CL CL CL CL CL CL CL CL"),   # RST
        _row("IV IV IV IV IV IV IV IV IV IV"),   # no SYN/FIN/ACK/RST
    ),
    (  # reply direction
        _row("IV S2 IV IV IV IV IV SS IV S2"),   # SYN: simultaneous open; the server reopening
        _row("IV SR IG IG IG IG IG IG IG SR"),   # SYN+ACK: the answer; late copies ignored
        _row("IV IV FW FW LA LA LA TW CL IV"),
        _row("IV IG SR ES CW CW TW TW CL IG"),   # ACK before the SYN+ACK: maybe half-open, ignored
        _row("IV CL CL CL CL CL CL CL CL CL"),
        _row("IV IV IV IV IV IV IV IV IV IV"),
    ),
)


def _tcp_class(flags: int) -> int:
    if flags & TCP_RST:
        return _RST_SET
    if flags & TCP_SYN:
        return _SYNACK_SET if flags & TCP_ACK else _SYN_SET
    if flags & TCP_FIN:
        return _FIN_SET
    if flags & TCP_ACK:
        return _ACK_SET
    return _NONE_SET


# the combinations tcp_error() lets through (PSH, ECE and CWR may be added to any of them)
_TCP_VALID = frozenset({TCP_SYN, TCP_SYN | TCP_URG, TCP_SYN | TCP_ACK, TCP_RST, TCP_RST | TCP_ACK,
                        TCP_FIN | TCP_ACK, TCP_FIN | TCP_ACK | TCP_URG, TCP_ACK, TCP_ACK | TCP_URG})
# per flags byte: the packet class, or -1 for a combination tcp_error() refuses
_TCP_CLASS = tuple(_tcp_class(f) if f & ~(TCP_PSH | TCP_ECE | TCP_CWR) in _TCP_VALID else -1
                   for f in range(256))

