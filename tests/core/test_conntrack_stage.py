"""The datapath's conntrack stage (core/conntrack_stage): conntrack's tuple for a packet, and a NEW
flow's confirm when conntrack refuses it, seen through Datapath.process."""

from __future__ import annotations

import dpkt

from reference import fix_ip_checksum
from podnet.core import packet as pk
from podnet.core.conntrack import Conntrack
from podnet.core.conntrack_stage import ct_key
from podnet.core.datapath import Datapath, Drop, PortKind, Transmit
from podnet.core.packet import DropReason
from podnet.core.services.base import NO_SERVICE, Decision, ServiceBackend, SyncReport
from podnet.testing import frames as F

A_IP, B_IP, VIP = "10.244.0.2", "10.244.0.3", "10.96.0.1"


class OneVip(ServiceBackend):
    """VIP:80 is DNATed to pod B's :8080; nothing else is a Service."""

    name = "one-vip"

    def sync(self, services, *, full=True):
        return SyncReport(full, 0, 0, 0)

    def decide(self, pkt, now, *, local_source=False, effects=True):
        return Decision(dnat=(pk.ip_int(B_IP), 8080)) if pkt.dst == pk.ip_int(VIP) else NO_SERVICE

    def dump(self):
        return ""


def _info(frame) -> pk.IPv4Info:
    info = pk.parse_ipv4(frame)
    assert isinstance(info, pk.IPv4Info)
    return info


def test_ct_key_is_conntracks_tuple_for_tcp_icmp_and_other_protocols():
    tcp = F.tcp(A_IP, B_IP, 40000, 80)
    assert ct_key(tcp, _info(tcp)) == (6, pk.ip_int(A_IP), 40000, pk.ip_int(B_IP), 80)
    echo = F.icmp_echo(A_IP, B_IP, ident=0x1234)
    # an echo request: the identifier where the source port goes, type 8 code 0 where the destination's
    assert ct_key(echo, _info(echo)) == (1, pk.ip_int(A_IP), 0x1234, pk.ip_int(B_IP), 8 << 8)
    gre = F.tcp(A_IP, B_IP)
    gre[23] = 47   # the protocol byte: GRE, which conntrack tracks by addresses alone
    fix_ip_checksum(gre)
    assert ct_key(gre, _info(gre)) == (47, pk.ip_int(A_IP), 0, pk.ip_int(B_IP), 0)


def test_ct_key_is_none_for_a_later_fragment():
    frame = F.udp(A_IP, B_IP, 5000, 53)
    frame[20:22] = (185).to_bytes(2, "big")   # fragment offset 185 * 8 bytes: no UDP header here
    fix_ip_checksum(frame)
    assert ct_key(frame, _info(frame)) is None


def test_a_moved_source_port_meeting_a_full_table_is_a_counted_drop():
    """A client reuses source port 40000 towards the Service's backend directly and through the VIP:
    the DNATed flow's reply tuple is taken, so its source port moves (get_unique_tuple); a full
    table then refuses it, which is a ct_table_full drop on the client's port, not an exception."""
    dp = Datapath(conntrack=Conntrack(1, early_drop=False))
    a = dp.add_port("pod-a", PortKind.POD, F.POD_MAC_A, A_IP)
    dp.add_port("pod-b", PortKind.POD, F.POD_MAC_B, B_IP)
    dp.set_backend(OneVip())
    direct = dp.process(F.tcp(A_IP, B_IP, 40000, 8080, flags=dpkt.tcp.TH_SYN), a, 0.0)
    assert [type(x) for x in direct] == [Transmit]
    trace = dp.trace(F.tcp(A_IP, VIP, 40000, 80, flags=dpkt.tcp.TH_SYN), a, 1.0)
    assert [type(x) for x in trace.actions] == [Transmit]       # a trace confirms nothing: no refusal
    actions = dp.process(F.tcp(A_IP, VIP, 40000, 80, flags=dpkt.tcp.TH_SYN), a, 1.0)
    assert actions == [Drop(DropReason.CT_TABLE_FULL, a, "TABLE_FULL")]
    assert dp.statistics().drops == {DropReason.CT_TABLE_FULL.value: 1}
