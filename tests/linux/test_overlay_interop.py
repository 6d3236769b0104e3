"""podnet's VXLAN VTEP and the Linux vxlan driver exchange traffic both ways (root).

Two namespaces joined by a veth pair stand for two Flannel nodes on one underlay, 192.0.2.0/24:

- K, a kernel node: a vxlan device set up as flanneld sets up flannel.1 (VNI 1, `local`, `dev`,
  nolearning, its own MAC, MTU uplink - 50, the lease's network address as a /32), holding the
  neighbour, FDB and route entries that `FlannelNode` derives for podnet's lease, programmed over
  netlink the way flanneld does it;
- P, the podnet node: nothing but its underlay address. podnet's `Vtep` reads and writes Ethernet
  frames on P's end of the veth through an AF_PACKET socket; a UDP socket bound to the VXLAN port
  keeps P's kernel from answering port-unreachable.

The kernel pings a "pod" behind P and podnet answers through its own encapsulation; podnet sends
UDP into a socket on K; frames podnet's decapsulation refuses, the kernel refuses too; tshark
decodes the kernel's frames and podnet's alike. Everything is named `pn-<token>-...`, journalled
before it is made and removed at the end; nothing is sent outside the two namespaces.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass

import dpkt
import pytest

from podnet.core import packet as pk
from podnet.core.overlay import FlannelNode, Lease, Vtep
from podnet.core.overlay.vxlan import Decapsulated
from podnet.core.packet import DropReason
from podnet.linux.netns import get_sysctl, popen_in_netns, run_in_netns
from podnet.testing import frames as F

from plumbing import add_address, link_mac, set_up
from rfc1071 import fold_sum

pytestmark = pytest.mark.root

K_LEASE = Lease("10.244.1.0/24", "192.0.2.1", "0a:58:0a:f4:01:00")
P_LEASE = Lease("10.244.2.0/24", "192.0.2.2", "0a:58:0a:f4:02:00")
POD_BEHIND_P = "10.244.2.7"
K_FLANNEL_IP = "10.244.1.0"   # flannel.1's /32: the source of what K itself sends into the tunnel

# include/uapi/linux/if_packet.h and if_ether.h
ETH_P_ALL, SOL_PACKET, PACKET_AUXDATA, PACKET_OUTGOING = 0x0003, 263, 8, 4
TP_STATUS_CSUMNOTREADY, TP_STATUS_CSUM_VALID = 1 << 3, 1 << 7


@dataclass
class Underlay:
    k: str                 # the kernel node's netns
    p: str                 # the podnet node's netns
    vx: str                # K's vxlan device
    port: int              # the VXLAN UDP port both sides use
    k_uplink_mac: bytes
    p_uplink_mac: bytes
    kernel_node: FlannelNode
    vtep: Vtep             # podnet's VTEP on P
    raw: socket.socket     # AF_PACKET on P's veth

    def peer_k(self, vtep: Vtep | None = None):
        return (vtep or self.vtep).peer(K_LEASE.public_ip, K_LEASE.vtep_mac, self.k_uplink_mac)

    def inject(self, frame: bytes) -> None:
        self.raw.send(frame)

    def receive(self, timeout_s: float = 5.0):
        """The next VXLAN datagram for podnet's VTEP on P's veth: (frame, decapsulated, auxdata status)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            self.raw.settimeout(left)
            try:
                data, ancillary, _flags, address = self.raw.recvmsg(65536, socket.CMSG_SPACE(20))
            except TimeoutError:
                break
            if address[2] == PACKET_OUTGOING:
                continue
            status = next((struct.unpack_from("I", d)[0] for level, kind, d in ancillary
                           if (level, kind) == (SOL_PACKET, PACKET_AUXDATA)), 0)
            unnecessary = bool(status & (TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID))
            got = self.vtep.decapsulate(data, checksum_unnecessary=unnecessary)
            if got is None:
                continue  # ARP on the underlay, and the like
            assert isinstance(got, Decapsulated), f"podnet dropped the kernel's frame: {got}"
            return data, got, status
        raise AssertionError("no VXLAN datagram from the kernel node arrived")


def _packet_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, 0))
    sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    return sock


def _udp_socket(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(address)
    return sock


@pytest.fixture(params=[4789, None], ids=["dstport-4789", "kernel-default-port"])
def underlay(request, plumbing):
    dstport = request.param
    k, p = plumbing.add_netns("kn"), plumbing.add_netns("pn")
    vk, vp = plumbing.add_veth(k, "vk", p, "vp")
    add_address(k, vk, K_LEASE.public_ip, 24)
    set_up(k, "lo")
    kernel_node = FlannelNode(K_LEASE, device=plumbing.lab.name("vx"))
    kernel_node.add_lease(P_LEASE)
    plumbing.add_flannel_vxlan(k, kernel_node, vk, port=dstport)
    add_address(p, vp, P_LEASE.public_ip, 24)
    k_uplink_mac, p_uplink_mac = pk.mac_bytes(link_mac(k, vk)), pk.mac_bytes(link_mac(p, vp))
    port = dstport or 8472
    vtep = Vtep(local_ip=P_LEASE.public_ip, mac=P_LEASE.vtep_mac, underlay_mac=p_uplink_mac, port=port)
    raw = plumbing.hold(run_in_netns(p, _packet_socket, vp))
    plumbing.hold(run_in_netns(p, _udp_socket, ("0.0.0.0", port)))
    return Underlay(k, p, kernel_node.device, port, k_uplink_mac, p_uplink_mac, kernel_node, vtep, raw)


def _ping_exchange(u: Underlay) -> tuple[bytes, int, bytes]:
    """K pings the pod behind P; podnet answers through its VTEP. Returns the kernel's frame, its
    PACKET_AUXDATA status, and podnet's frame."""
    ping = popen_in_netns(u.k, ["ping", "-n", "-c", "1", "-W", "5", POD_BEHIND_P],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        frame, got, status = u.receive()
        inner = bytearray(got.inner)
        info = pk.parse_ipv4(inner)
        assert isinstance(info, pk.IPv4Info) and info.proto == pk.IPPROTO_ICMP and inner[info.l4] == pk.ICMP_ECHO
        reply = pk.build_icmp_echo_reply(inner, info, pk.mac_bytes(P_LEASE.vtep_mac))
        out = u.vtep.encapsulate(reply, u.peer_k())
        assert isinstance(out, bytes)
        u.inject(out)
        output, _ = ping.communicate(timeout=10)
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait()
    assert ping.returncode == 0 and "1 received" in output, output
    return frame, status, out


# ---- what the kernel holds ---------------------------------------------------------------------

def test_the_kernel_holds_what_flannel_node_renders(underlay, ip):
    u = underlay
    routes = [line.strip() for line in ip("-n", u.k, "route", "show").splitlines() if f" dev {u.vx} " in line + " "]
    neighbours = [line.strip() for line in ip("-n", u.k, "neigh", "show").splitlines() if f" dev {u.vx} " in line]
    fdb = subprocess.run(["bridge", "-n", u.k, "fdb", "show", "dev", u.vx], capture_output=True, text=True,
                         check=True).stdout
    assert routes == u.kernel_node.show_routes()
    assert neighbours == u.kernel_node.show_neighbours()
    # `bridge fdb show dev X` leaves out "dev X"
    assert [line.strip() for line in fdb.splitlines()] == [line.replace(f" dev {u.vx}", "")
                                                           for line in u.kernel_node.show_fdb()]
    details = ip("-n", u.k, "-d", "link", "show", u.vx)
    for word in (f"mtu {u.kernel_node.mtu} ", f"vxlan id {K_LEASE.vni} ", f"dstport {u.port} ", " nolearning ",
                 " ttl auto ", " udpcsum ", " srcport 0 0 ", f"link/ether {K_LEASE.vtep_mac} "):
        assert word in details, (word, details)
    # the kernel's route -> neighbour -> FDB walk ends where FlannelNode.resolve does
    assert f"via {P_LEASE.gateway} dev {u.vx} src {K_FLANNEL_IP}" in ip("-n", u.k, "route", "get", POD_BEHIND_P)
    assert u.kernel_node.resolve(POD_BEHIND_P) == (P_LEASE.vtep_mac, P_LEASE.public_ip)


# ---- kernel -> podnet -> kernel ----------------------------------------------------------------

def test_a_kernel_ping_is_decapsulated_and_answered_by_podnet(underlay):
    u = underlay
    frame, status, out = _ping_exchange(u)
    # the kernel's outer headers, field by field, as vxlan.py says it writes them
    assert frame[0:12] == u.p_uplink_mac + u.k_uplink_mac
    ver_ihl, tos, tot_len, _id, frag, ttl, proto, _, src, dst = struct.unpack_from("!BBHHHBBH4s4s", frame, 14)
    assert (ver_ihl, tos, frag, ttl, proto) == (0x45, 0, 0, 64, 17)      # DF clear, TTL 64 (`ttl auto`)
    assert (socket.inet_ntoa(src), socket.inet_ntoa(dst)) == (K_LEASE.public_ip, P_LEASE.public_ip)
    sport, dport, ulen, csum = struct.unpack_from("!HHHH", frame, 34)
    low, high = map(int, get_sysctl(u.k, "net/ipv4/ip_local_port_range").split())
    assert dport == u.port and low <= sport < high                      # `srcport 0 0`: the local port range
    assert frame[42:50] == bytes.fromhex("0800000000000100")             # exactly the I flag, VNI 1
    assert ulen == tot_len - 20
    # `udpcsum`: a device with `noudpcsum` would send 0. Over a veth with checksum offload the
    # kernel leaves the sum for a NIC (CHECKSUM_PARTIAL), so the field holds the folded
    # pseudo-header sum; without offload it is complete
    pseudo = frame[26:34] + struct.pack("!BBH", 0, 17, ulen)
    if status & TP_STATUS_CSUMNOTREADY:
        assert csum == fold_sum(pseudo)
    else:
        assert csum != 0 and fold_sum(pseudo + frame[34:34 + ulen]) == 0xFFFF
    # inner: flannel's MACs (K's VTEP to the neighbour entry's MAC for P's .0), K's flannel.1 address
    assert frame[50:56] == pk.mac_bytes(P_LEASE.vtep_mac) and frame[56:62] == pk.mac_bytes(K_LEASE.vtep_mac)
    assert socket.inet_ntoa(frame[76:80]) == K_FLANNEL_IP and socket.inet_ntoa(frame[80:84]) == POD_BEHIND_P
    # podnet's answer carried the same outer shape the other way (and the kernel accepted it)
    assert out[42:50] == frame[42:50] and struct.unpack_from("!H", out, 36)[0] == u.port


# ---- podnet -> kernel sockets, and what both refuse -----------------------------------------------

def _udp_into_k(u: Underlay, vtep: Vtep, payload: bytes, **kw) -> bytes | DropReason:
    inner = F.udp(POD_BEHIND_P, K_FLANNEL_IP, 5000, 6000, payload=payload, **kw)
    return vtep.encapsulate(inner, u.peer_k(vtep))


def _with_ip_checksum(frame: bytearray) -> bytes:
    frame[24:26] = b"\x00\x00"
    frame[24:26] = struct.pack("!H", pk.internet_checksum(frame[14:34]))
    return bytes(frame)


def test_podnet_reaches_a_kernel_socket_and_both_refuse_the_same_frames(underlay):
    u = underlay
    listener = run_in_netns(u.k, _udp_socket, (K_FLANNEL_IP, 6000))
    listener.settimeout(0.5)
    as_k = Vtep(local_ip=K_LEASE.public_ip, mac=K_LEASE.vtep_mac, underlay_mac=u.k_uplink_mac, port=u.port)
    plain = Vtep(local_ip=P_LEASE.public_ip, mac=P_LEASE.vtep_mac, underlay_mac=u.p_uplink_mac, port=u.port,
                 udp_csum=False)

    def expect(frame, payload: bytes | None) -> None:
        u.inject(frame)
        try:
            data, sender = listener.recvfrom(2048)
        except TimeoutError:
            data = sender = None
        if payload is None:
            assert data is None, "the kernel accepted a frame podnet refuses"
        else:
            assert (data, sender) == (payload, (POD_BEHIND_P, 5000))

    try:
        # accepted: checksummed, checksum zero, and the largest inner packet a 1500 underlay carries
        expect(_udp_into_k(u, u.vtep, b"checksummed"), b"checksummed")
        expect(_udp_into_k(u, plain, b"no checksum"), b"no checksum")
        biggest = _udp_into_k(u, u.vtep, bytes(1450 - 28))
        assert len(biggest) == 1514
        expect(biggest, bytes(1450 - 28))
        assert _udp_into_k(u, u.vtep, bytes(1450 - 27)) is DropReason.MTU_EXCEEDED

        # refused by both: podnet's decapsulation (as K's VTEP) names the reason, the kernel drops it
        good = bytearray(_udp_into_k(u, plain, b"bad"))
        wrong_vni = _udp_into_k(u, Vtep(local_ip=P_LEASE.public_ip, mac=P_LEASE.vtep_mac, vni=2,
                                        underlay_mac=u.p_uplink_mac, port=u.port), b"bad")
        extra_flag = bytearray(good)
        extra_flag[42] = 0x0C
        reserved = bytearray(good)
        reserved[49] = 0x01
        loop = _udp_into_k(u, Vtep(local_ip=P_LEASE.public_ip, mac=K_LEASE.vtep_mac, underlay_mac=u.p_uplink_mac,
                                   port=u.port, udp_csum=False), b"bad")
        bad_checksum = bytearray(_udp_into_k(u, u.vtep, b"bad"))
        bad_checksum[-1] ^= 0xFF
        ce_over_not_ect = bytearray(good)
        ce_over_not_ect[15] = 0x03
        cases = [(wrong_vni, DropReason.VXLAN_VNI_NOT_FOUND), (bytes(extra_flag), DropReason.VXLAN_INVALID_HDR),
                 (bytes(reserved), DropReason.VXLAN_INVALID_HDR), (loop, DropReason.VXLAN_LOCAL_MAC),
                 (bytes(bad_checksum), DropReason.UDP_BAD_CHECKSUM),
                 (_with_ip_checksum(ce_over_not_ect), DropReason.IP_TUNNEL_ECN)]
        for frame, reason in cases:
            assert as_k.decapsulate(frame) is reason
            expect(frame, None)
        # and the tunnel still works afterwards
        expect(_udp_into_k(u, u.vtep, b"still here"), b"still here")
    finally:
        listener.close()


# ---- tshark reads both as VXLAN --------------------------------------------------------------------

def test_tshark_decodes_the_kernels_frames_and_podnets_alike(underlay, tmp_path):
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed (apt-get install tshark)")
    u = underlay
    frame, status, out = _ping_exchange(u)
    pcap = tmp_path / "vxlan.pcap"
    with open(pcap, "wb") as f:
        writer = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB)
        writer.writepkt(frame, ts=1.0)
        writer.writepkt(out, ts=2.0)
    fields = ["frame.protocols", "vxlan.flags", "vxlan.vni", "udp.dstport", "ip.src", "icmp.type",
              "ip.checksum.status", "udp.checksum.status"]
    done = subprocess.run(
        ["tshark", "-r", str(pcap), "-n", "-d", f"udp.port=={u.port},vxlan", "-o", "ip.check_checksum:TRUE",
         "-o", "udp.check_checksum:TRUE", "-T", "fields", "-E", "separator=|", "-E", "occurrence=a",
         "-E", "aggregator=,", *[arg for name in fields for arg in ("-e", name)]],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    kernel, podnet = (dict(zip(fields, line.split("|"))) for line in done.stdout.splitlines())
    for decoded, pod_icmp in ((kernel, "8"), (podnet, "0")):
        assert decoded["frame.protocols"] == "eth:ethertype:ip:udp:vxlan:eth:ethertype:ip:icmp:data"
        assert decoded["vxlan.flags"] == "0x0800" and decoded["vxlan.vni"] == "1"
        assert decoded["udp.dstport"] == str(u.port) and decoded["icmp.type"] == pod_icmp
        assert decoded["ip.checksum.status"] == "1,1"   # outer and inner IPv4 header checksums good
    assert kernel["ip.src"] == f"{K_LEASE.public_ip},{K_FLANNEL_IP}"
    assert podnet["ip.src"] == f"{P_LEASE.public_ip},{POD_BEHIND_P}"
    # podnet's UDP checksum is complete; the kernel's, captured before any NIC could complete it,
    # is only the pseudo-header part when it was left to an offload (tshark: "bad")
    assert podnet["udp.checksum.status"] == "1"
    assert kernel["udp.checksum.status"] == ("0" if status & TP_STATUS_CSUMNOTREADY else "1")
