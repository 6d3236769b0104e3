"""conntrack-tools' output for podnet's conntrack table: `conntrack -L`, `-S` and `-C`.

Layer: core. Formats only; the table and its rules are in `conntrack`. Checked against
conntrack-tools 1.4.7 on Linux 6.18 (see the tests).
"""

from __future__ import annotations

from .conntrack import (_ASSURED, _SEEN_REPLY, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Conntrack,
                        ConntrackStatistics, Entry, TcpState)
from .packet import ip_str

_PROTO_NAMES = {IPPROTO_ICMP: "icmp", IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}


def _tuple_text(t: tuple) -> str:
    proto, src, sport, dst, dport = t
    text = f"src={ip_str(src)} dst={ip_str(dst)} "
    if proto == IPPROTO_TCP or proto == IPPROTO_UDP:
        return text + f"sport={sport} dport={dport} "
    if proto == IPPROTO_ICMP:
        return text + f"type={dport >> 8} code={dport & 0xFF} id={sport} "
    return text


def format_conntrack_L(entry: Entry, now: float, *, accounting: bool = False, extended: bool = False) -> str:
    """One line of `conntrack -L` (conntrack-tools 1.4.7), e.g.

    tcp      6 431999 ESTABLISHED src=10.244.0.2 dst=10.96.0.10 sport=40000 dport=80 src=10.244.0.5
    dst=10.244.0.2 sport=8080 dport=40000 [ASSURED] mark=0 use=1

    (one line). The number after the protocol is the whole seconds left; `accounting` adds
    packets= / bytes= after each tuple as with nf_conntrack_acct=1; `extended` adds the
    `ipv4     2 ` prefix of -o extended."""
    proto = entry.orig[0]
    name = _PROTO_NAMES.get(proto, "unknown")
    parts = ["ipv4     2 " if extended else "", f"{name:<8} {proto} {entry.remaining(now)} "]
    if proto == IPPROTO_TCP:
        parts.append(f"{TcpState(entry._tcp).name} ")
    parts.append(_tuple_text(entry.orig))
    if accounting:
        parts.append(f"packets={entry.packets[0]} bytes={entry.bytes[0]} ")
    if not entry._status & _SEEN_REPLY:
        parts.append("[UNREPLIED] ")
    parts.append(_tuple_text(entry.reply))
    if accounting:
        parts.append(f"packets={entry.packets[1]} bytes={entry.bytes[1]} ")
    if entry._status & _ASSURED:
        parts.append("[ASSURED] ")
    parts.append(f"mark={entry.mark} use=1")
    return "".join(parts)


def format_conntrack_S(stats: ConntrackStatistics, cpu: int = 0) -> str:
    """The `conntrack -S` line of one CPU, as conntrack-tools 1.4.7 prints it on Linux 6.x."""
    return (f"cpu={cpu:<4}\tfound={stats.found} invalid={stats.invalid} insert={stats.insert} "
            f"insert_failed={stats.insert_failed} drop={stats.drop} early_drop={stats.early_drop} "
            f"error={stats.error} search_restart={stats.search_restart} "
            f"clash_resolve={stats.clash_resolve} chaintoolong={stats.chaintoolong} ")


def format_conntrack_C(conntrack: Conntrack) -> str:
    """`conntrack -C`: the number of entries."""
    return str(len(conntrack))
