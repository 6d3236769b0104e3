"""`ipvsadm` output (core layer, pure functions of the tables).

The format strings are ipvsadm 1.31's (ipvsadm.c: list_all, print_title, print_service_entry,
print_sched_flags, print_largenum, list_conn/print_conn, list_timeout), with -n: podnet never
resolves names. What the real tool does that matters here:

- `IP Virtual Server version 1.2.1 (size=4096)` heads every listing but -S; the version is
  IP_VS_VERSION_CODE 0x010201, the size the connection table's (2^conn_tab_bits).
- Services are sorted by (fwmark, protocol number, address, port) and destinations by (address,
  port), comparing addresses as `ntohl(a) - ntohl(b)` in a C int (ipvs_cmp_services /
  ipvs_cmp_dests). For addresses more than 2^31 apart that difference wraps: 172.16.1.7 sorts
  before 10.96.0.1, as real listings show. podnet sorts with glibc's merge sort (qsort's msort),
  starting from the order the kernel hands the entries over: destinations in list order, services
  in ip_vs_svc_table bucket order, newest first in a bucket. That bucket hash mixes in the address
  of the netns's IPVS state (random per boot), taken as 0 here; it only matters when the wrapped
  comparison is inconsistent (addresses spread over more than half the address space).
- The service name is `"%-4s %s"` of the protocol and address:port, cut to 33 characters; a
  destination's address:port is cut to 28. Columns are printf-padded, so lines keep their
  trailing spaces.
- Counters over 10^8 print with K/M/G/T suffixes unless --exact.
- `-Lnc` lists /proc/net/ip_vs_conn's entries, templates included; the kernel walks its hash
  buckets, podnet lists connections in the order they were made. `expire` is the whole seconds
  left, as mm:ss.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable

from .schedulers import scheduler_flag_names
from .table import (
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, PROTO_NAMES, SVC_F_ONEPACKET, SVC_F_PERSISTENT, SVC_F_SCHED1,
    SVC_F_SCHED2, SVC_F_SCHED3, ConnectionTable, Dest, IpvsTimeouts, VirtualService,
)

__all__ = ["list_connections", "list_services", "list_timeout", "print_largenum", "save_rules"]

IP_VS_VERSION = "1.2.1"
FORMATS = ("default", "stats", "rate", "thresholds", "persistent-conn")
_SCHED_FLAGS = SVC_F_SCHED1 | SVC_F_SCHED2 | SVC_F_SCHED3
_RULE_OPTION = {IPPROTO_TCP: "-t", IPPROTO_UDP: "-u", IPPROTO_SCTP: "--sctp-service"}


def _ip(addr: int) -> str:
    return str(ipaddress.IPv4Address(addr))


def _c_int_diff(a: int, b: int) -> int:
    """`ntohl(a) - ntohl(b)` stored in a C int."""
    r = (a - b) & 0xFFFFFFFF
    return r - (1 << 32) if r >= 1 << 31 else r


def _cmp_services(s1: VirtualService, s2: VirtualService) -> int:
    return (s1.protocol - s2.protocol) or _c_int_diff(s1.addr, s2.addr) or (s1.port - s2.port)


def _cmp_dests(d1: Dest, d2: Dest) -> int:
    return _c_int_diff(d1.addr, d2.addr) or (d1.port - d2.port)


def _msort(items: list, cmp) -> list:
    """glibc's msort_with_tmp: split in n/2 and n - n/2, sort both, merge taking the left on <= 0."""
    n = len(items)
    if n <= 1:
        return list(items)
    n1 = n // 2
    left, right = _msort(items[:n1], cmp), _msort(items[n1:], cmp)
    out: list = []
    i = j = 0
    while i < len(left) and j < len(right):
        if cmp(left[i], right[j]) <= 0:
            out.append(left[i])
            i += 1
        else:
            out.append(right[j])
            j += 1
    return out + left[i:] + right[j:]


def _svc_bucket(vs: VirtualService) -> int:
    """ip_vs_svc_hashkey() with the netns pointer term taken as 0 (IP_VS_SVC_TAB_BITS = 8)."""
    return (vs.protocol ^ vs.addr ^ (vs.port >> 8) ^ vs.port) & 0xFF


def sorted_services(services: Iterable[VirtualService]) -> list[VirtualService]:
    kernel_order = sorted(services, key=lambda vs: (_svc_bucket(vs), -vs.serial))
    return _msort(kernel_order, _cmp_services)


def sorted_dests(dests: Iterable[Dest]) -> list[Dest]:
    return _msort(list(dests), _cmp_dests)


def print_largenum(value: int, exact: bool = False) -> str:
    """print_largenum(): 9 columns, or 8 plus a K/M/G/T suffix from 10^8 on."""
    if exact:
        text = str(value)
        return text.rjust(9 if len(text) <= 8 else len(text) + 1)
    if value < 100_000_000:
        return f"{value:9d}"
    if value < 1_000_000_000:
        return f"{value // 1000:8d}K"
    if value < 100_000_000_000:
        return f"{value // 1_000_000:8d}M"
    if value < 100_000_000_000_000:
        return f"{value // 1_000_000_000:8d}G"
    return f"{value // 1_000_000_000_000:8d}T"


def _title(fmt: str) -> str:
    if fmt == "stats":
        return (f"{'Prot LocalAddress:Port':<33} {'Conns':>8} {'InPkts':>8} {'OutPkts':>8} {'InBytes':>8} "
                f"{'OutBytes':>8}\n  -> RemoteAddress:Port\n")
    if fmt == "rate":
        return (f"{'Prot LocalAddress:Port':<33} {'CPS':>8} {'InPPS':>8} {'OutPPS':>8} {'InBPS':>8} "
                f"{'OutBPS':>8}\n  -> RemoteAddress:Port\n")
    if fmt == "thresholds":
        return (f"{'Prot LocalAddress:Port':<33} {'Uthreshold':<10} {'Lthreshold':<10} {'ActiveConn':<10} "
                f"{'InActConn':<10}\n  -> RemoteAddress:Port\n")
    if fmt == "persistent-conn":
        return (f"{'Prot LocalAddress:Port':<33} {'Weight':<9} {'PersistConn':<11} {'ActiveConn':<10} "
                f"{'InActConn':<10}\n  -> RemoteAddress:Port\n")
    return ("Prot LocalAddress:Port Scheduler Flags\n"
            "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n")


def _service_name(vs: VirtualService) -> str:
    return f"{PROTO_NAMES.get(vs.protocol, '?'):<4} {_ip(vs.addr)}:{vs.port}"[:33]


def _service_line(vs: VirtualService, fmt: str, now: float | None, exact: bool) -> str:
    name = _service_name(vs)
    if fmt == "stats":
        return f"{name:<33}" + "".join(print_largenum(v, exact) for v in vs.stats.counters())
    if fmt == "rate":
        return f"{name:<33}" + "".join(print_largenum(v, exact) for v in vs.stats.rates(now))
    line = f"{name} {vs.sched_name}"
    if vs.flags & _SCHED_FLAGS:
        line += f" ({','.join(scheduler_flag_names(vs.sched_name, vs.flags))})"
    if vs.flags & SVC_F_PERSISTENT:
        line += f" persistent {vs.timeout}"
        if vs.netmask != 0xFFFFFFFF:
            line += f" mask {_ip(vs.netmask)}"
    if vs.flags & SVC_F_ONEPACKET:
        line += " ops"
    return line


def _dest_line(dest: Dest, fmt: str, now: float | None, exact: bool) -> str:
    name = f"{_ip(dest.addr)}:{dest.port}"[:28]
    if fmt == "stats":
        return f"  -> {name:<28}" + "".join(print_largenum(v, exact) for v in dest.stats.counters())
    if fmt == "rate":
        cps, inpps, outpps, inbps, outbps = dest.stats.rates(now)
        return f"  -> {name:<28} {cps:8d} {inpps:8d} {outpps:8d}" + print_largenum(inbps, exact) + \
            print_largenum(outbps, exact)
    if fmt == "thresholds":
        return f"  -> {name:<28} {dest.u_threshold:<10} {dest.l_threshold:<10} {dest.activeconns:<10} " \
               f"{dest.inactconns:<10}"
    if fmt == "persistent-conn":
        return f"  -> {name:<28} {dest.weight:<9} {dest.persistconns:<11} {dest.activeconns:<10} " \
               f"{dest.inactconns:<10}"
    return f"  -> {name:<28} {dest.fwd:<7} {dest.weight:<6} {dest.activeconns:<10} {dest.inactconns:<10}"


def list_services(services: Iterable[VirtualService], *, fmt: str = "default", now: float | None = None,
                  conn_tab_size: int = 4096, exact: bool = False) -> str:
    """`ipvsadm -Ln` (fmt "default"), `--stats`, `--rate` (needs `now`), `--thresholds`,
    `--persistent-conn`; `exact` is --exact."""
    if fmt not in FORMATS:
        raise ValueError(f"ipvsadm format {fmt!r}: one of {', '.join(FORMATS)}")
    out = [f"IP Virtual Server version {IP_VS_VERSION} (size={conn_tab_size})\n", _title(fmt)]
    for vs in sorted_services(services):
        out.append(_service_line(vs, fmt, now, exact) + "\n")
        out += [_dest_line(d, fmt, now, exact) + "\n" for d in sorted_dests(vs.dests)]
    return "".join(out)


def save_rules(services: Iterable[VirtualService]) -> str:
    """`ipvsadm -Sn`: the rules that would rebuild the table."""
    out: list[str] = []
    for vs in sorted_services(services):
        name = f"{_RULE_OPTION.get(vs.protocol, '--xxx-service')} {_ip(vs.addr)}:{vs.port}"
        line = f"-A {name} -s {vs.sched_name}"
        if vs.flags & SVC_F_PERSISTENT:
            line += f" -p {vs.timeout}"
            if vs.netmask != 0xFFFFFFFF:
                line += f" -M {_ip(vs.netmask)}"
        if vs.flags & SVC_F_ONEPACKET:
            line += " -o"
        if vs.flags & _SCHED_FLAGS:
            line += " -b " + ",".join(scheduler_flag_names(vs.sched_name, vs.flags))
        out.append(line)
        out += [f"-a {name} -r {_ip(d.addr)}:{d.port} -m -w {d.weight}" for d in sorted_dests(vs.dests)]
    return "".join(line + "\n" for line in out)


def list_connections(conns: ConnectionTable, now: float) -> str:
    """`ipvsadm -Lnc`."""
    out = ["IPVS connection entries\n", f"pro expire {'state':<11} {'source':<18} {'virtual':<18} destination\n"]
    for conn in conns:
        left = max(0, math.floor(conn.deadline - now))
        expire = f"{left // 60:02d}:{left % 60:02d}"
        source = f"{_ip(conn.caddr)}:{conn.cport}"
        virtual = f"{_ip(conn.vaddr)}:{conn.vport}"
        destination = f"{_ip(conn.daddr)}:{conn.dport}"
        out.append(f"{PROTO_NAMES.get(conn.protocol, 'IP'):<3} {expire:<6} {conn.state.value:<11} "
                   f"{source:<18} {virtual:<18} {destination}\n")
    return "".join(out)


def list_timeout(timeouts: IpvsTimeouts) -> str:
    """`ipvsadm -L --timeout`."""
    return f"Timeout (tcp tcpfin udp): {int(timeouts.tcp)} {int(timeouts.tcpfin)} {int(timeouts.udp)}\n"
