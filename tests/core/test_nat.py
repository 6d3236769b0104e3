"""NAT rewrites: random frames built with dpkt are DNATed, SNATed and port-mapped, then every
checksum is recomputed here from scratch (tests/core/reference.py, not podnet's checksum code)
and compared. CHECKSUM_PARTIAL frames carry the pseudo-header seed the kernel hands up; after a
rewrite the seed must equal one computed from scratch for the new addresses, because the
receiving kernel would trust a wrong one (reference/performance.md §3, pitfall 7)."""

from __future__ import annotations

import random
import struct

import dpkt
import pytest

from reference import naive_checksum, naive_sum
from podnet.core import nat
from podnet.core.conntrack import Conntrack, Direction, FlowTuple, TCP_SYN, invert
from podnet.core.nat import NatBinding, Rewrite, icmp_error_inner, rewrite, rewrite_icmp_error
from podnet.core.packet import decrement_ttl, ip_int

CLIENT = ip_int("10.244.0.2")
VIP = ip_int("10.96.0.10")
BACKEND = ip_int("10.244.1.5")
NODE = ip_int("192.168.1.10")
ORIG, REPLY = Direction.ORIGINAL, Direction.REPLY
MAC_A, MAC_B = b"\x02\x00\x00\x00\x00\x01", b"\xee" * 6


def vnet_partial(csum_start: int, proto: int, gso: bool = False) -> bytes:
    """A virtio_net_hdr as the kernel hands up a CHECKSUM_PARTIAL frame (little-endian fields)."""
    return struct.pack("<BBHHHH", 1, 1 if gso else 0, 0, 1448 if gso else 0, csum_start,
                       16 if proto == 6 else 6)


def build(proto: int, src: int, dst: int, sport: int, dport: int, payload: bytes,
          ip_options: bool = False, ident: int = 1) -> bytearray:
    if proto == 6:
        l4 = dpkt.tcp.TCP(sport=sport, dport=dport, seq=0x01020304, ack=0x0A0B0C0D, flags=0x18,
                          win=502, data=payload)
    elif proto == 17:
        l4 = dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(payload), data=payload)
    else:
        l4 = dpkt.icmp.ICMP(type=8, code=0, data=dpkt.icmp.ICMP.Echo(id=sport, seq=7, data=payload))
    ip = dpkt.ip.IP(src=struct.pack("!I", src), dst=struct.pack("!I", dst), p=proto, ttl=64, id=ident,
                    data=l4)
    if ip_options:
        ip.opts = b"\x01\x01\x01\x00"   # NOP NOP NOP EOL: IHL 6
        ip.hl = 6
    return bytearray(bytes(dpkt.ethernet.Ethernet(dst=MAC_B, src=MAC_A, type=0x0800, data=ip)))


def l4_offset(frame) -> int:
    return 14 + (frame[14] & 0x0F) * 4


def l4_bytes(frame) -> bytes:
    total = struct.unpack_from("!H", frame, 16)[0]
    return bytes(frame[l4_offset(frame):14 + total])


def pseudo_header(frame) -> bytes:
    return bytes(frame[26:34]) + bytes([0, frame[23]]) + struct.pack("!H", len(l4_bytes(frame)))


def csum_field(frame) -> int:
    at = l4_offset(frame) + {6: 16, 17: 6, 1: 2}[frame[23]]
    return struct.unpack_from("!H", frame, at)[0]


def l4_checksum_from_scratch(frame) -> int:
    proto = frame[23]
    data = bytearray(l4_bytes(frame))
    at = {6: 16, 17: 6, 1: 2}[proto]
    data[at:at + 2] = b"\x00\x00"
    if proto == 1:
        return naive_checksum(bytes(data))
    value = naive_checksum(pseudo_header(frame) + bytes(data))
    return 0xFFFF if proto == 17 and value == 0 else value


def seed_from_scratch(frame) -> int:
    """The uninverted, folded pseudo-header sum (src, dst, proto, L4 length)."""
    return naive_sum(pseudo_header(frame))


def ip_header_ok(frame, at: int = 14) -> bool:
    return naive_checksum(bytes(frame[at:at + (frame[at] & 0x0F) * 4])) == 0


def finish_partial(frame) -> int:
    """What the consumer of a CHECKSUM_PARTIAL frame stores: the checksum of [csum_start, end)
    with the seed in the field (skb_checksum_help)."""
    value = naive_checksum(l4_bytes(frame))
    return 0xFFFF if frame[23] == 17 and value == 0 else value


def make_partial(frame) -> bytearray:
    at = l4_offset(frame) + (16 if frame[23] == 6 else 6)
    frame[at:at + 2] = struct.pack("!H", seed_from_scratch(frame))
    return frame


def random_address(rng: random.Random) -> int:
    return rng.choice([0, 0xFFFFFFFF, 0xFFFF0000, 0x0000FFFF, 0x0A000001, rng.getrandbits(32),
                       rng.getrandbits(32), rng.getrandbits(32)])


def random_port(rng: random.Random) -> int:
    return rng.choice([0, 1, 0xFFFF, 0x8000, rng.randrange(1 << 16), rng.randrange(1 << 16)])


def random_frame(rng: random.Random, proto: int) -> bytearray:
    size = rng.choice([0, 1, 2, 3, 17, 100, 1400, 1401, rng.randrange(2000)])
    return build(proto, random_address(rng), random_address(rng), random_port(rng), random_port(rng),
                  rng.randbytes(size), ip_options=rng.random() < 0.2, ident=rng.randrange(1 << 16))


def random_change(rng: random.Random, proto: int) -> dict:
    fields = {}
    while not fields:
        if rng.random() < 0.5:
            fields["src"] = random_address(rng)
        if rng.random() < 0.5:
            fields["dst"] = random_address(rng)
        if rng.random() < 0.5:
            fields["sport"] = random_port(rng)
        if proto != 1 and rng.random() < 0.5:
            fields["dport"] = random_port(rng)
    return fields


def read_fields(frame) -> dict:
    l4 = l4_offset(frame)
    fields = {"src": struct.unpack_from("!I", frame, 26)[0], "dst": struct.unpack_from("!I", frame, 30)[0]}
    if frame[23] == 1:
        fields["sport"] = struct.unpack_from("!H", frame, l4 + 4)[0]
    else:
        fields["sport"], fields["dport"] = struct.unpack_from("!HH", frame, l4)
    return fields


# ---- fully checksummed frames -------------------------------------------------------------------

@pytest.mark.parametrize("proto", [6, 17, 1])
def test_random_rewrites_keep_every_checksum_valid(proto):
    rng = random.Random(proto)
    for _ in range(1500):
        frame = random_frame(rng, proto)
        if proto == 17 and csum_field(frame) == 0:
            continue
        change = random_change(rng, proto)
        rewrite(frame, l4_offset(frame), proto, **change)
        fields = read_fields(frame)
        assert all(fields[k] == v for k, v in change.items())
        assert ip_header_ok(frame)
        assert csum_field(frame) == l4_checksum_from_scratch(frame), change


@pytest.mark.parametrize("proto", [6, 17])
def test_rewritten_frames_match_dpkt_recomputation(proto):
    rng = random.Random(10 + proto)
    for _ in range(300):
        frame = random_frame(rng, proto)
        rewrite(frame, l4_offset(frame), proto, **random_change(rng, proto))
        eth = dpkt.ethernet.Ethernet(bytes(frame))
        if proto == 17 and eth.data.data.sum == 0:
            continue
        eth.data.sum = 0
        eth.data.data.sum = 0   # dpkt recomputes both on serialisation
        assert bytes(eth) == bytes(frame)


def test_udp_without_checksum_stays_without():
    rng = random.Random(2)
    for _ in range(200):
        frame = random_frame(rng, 17)
        frame[l4_offset(frame) + 6:l4_offset(frame) + 8] = b"\x00\x00"
        rewrite(frame, l4_offset(frame), 17, **random_change(rng, 17))
        assert csum_field(frame) == 0 and ip_header_ok(frame)


def test_udp_checksum_that_becomes_zero_is_sent_as_ffff():
    # search for a rewrite whose result sums to zero; RFC 768 wants 0xffff on the wire
    frame = build(17, CLIENT, VIP, 40000, 53, b"query")
    l4 = l4_offset(frame)
    target = None
    for port in range(1 << 16):
        probe = bytearray(frame)
        probe[l4:l4 + 2] = struct.pack("!H", port)
        if l4_checksum_from_scratch(probe) == 0xFFFF:
            target = port
            break
    assert target is not None
    rewrite(frame, l4, 17, sport=target)
    assert csum_field(frame) == 0xFFFF
    rewrite(frame, l4, 17, sport=40000)   # and back
    assert frame == build(17, CLIENT, VIP, 40000, 53, b"query")


def test_icmp_echo_identifier_and_addresses():
    frame = build(1, CLIENT, VIP, 77, 0, b"ping-data")
    before = csum_field(frame)
    rewrite(frame, 34, 1, src=NODE, dst=BACKEND)
    assert csum_field(frame) == before and ip_header_ok(frame)   # no pseudo-header in ICMP
    rewrite(frame, 34, 1, sport=4242)
    assert read_fields(frame)["sport"] == 4242
    assert csum_field(frame) == l4_checksum_from_scratch(frame)
    with pytest.raises(ValueError):
        rewrite(frame, 34, 1, dport=1)


def test_other_protocols_get_addresses_only():
    ip = dpkt.ip.IP(src=struct.pack("!I", CLIENT), dst=struct.pack("!I", VIP), p=47, data=b"\x00" * 8)
    frame = bytearray(bytes(dpkt.ethernet.Ethernet(dst=MAC_B, src=MAC_A, type=0x0800, data=ip)))
    rewrite(frame, 34, 47, dst=BACKEND)
    assert read_fields(frame)["dst"] == BACKEND and ip_header_ok(frame)
    with pytest.raises(ValueError):
        rewrite(frame, 34, 47, sport=1)


def test_rewrite_works_on_a_memoryview():
    frame = build(6, CLIENT, VIP, 40000, 80, b"x" * 33)
    view = memoryview(frame)
    rewrite(view, 34, 6, dst=BACKEND, dport=8080)
    assert csum_field(frame) == l4_checksum_from_scratch(frame) and ip_header_ok(frame)


# ---- CHECKSUM_PARTIAL frames --------------------------------------------------------------------

@pytest.mark.parametrize("proto", [6, 17])
def test_partial_seed_equals_a_seed_from_scratch_after_rewrite(proto):
    rng = random.Random(20 + proto)
    for i in range(1500):
        frame = make_partial(random_frame(rng, proto))
        assert csum_field(frame) == seed_from_scratch(frame)
        vnet = vnet_partial(l4_offset(frame), proto, gso=i % 3 == 0)
        change = random_change(rng, proto)
        rewrite(frame, l4_offset(frame), proto, vnet=vnet, **change)
        assert ip_header_ok(frame)
        assert csum_field(frame) == seed_from_scratch(frame), change
        # and what the consumer completes is the right checksum
        assert finish_partial(frame) == l4_checksum_from_scratch(frame)


def test_partial_seed_ignores_port_changes():
    frame = make_partial(build(6, CLIENT, VIP, 40000, 80, b"y" * 1000))
    seed = csum_field(frame)
    rewrite(frame, 34, 6, sport=1, dport=2, vnet=vnet_partial(34, 6))
    assert csum_field(frame) == seed


def test_partial_udp_seed_is_updated_even_when_zero_would_mean_none():
    frame = make_partial(build(17, CLIENT, VIP, 40000, 53, b"q"))
    rewrite(frame, 34, 17, dst=BACKEND, vnet=vnet_partial(34, 17))
    assert csum_field(frame) == seed_from_scratch(frame)


def test_gso_super_frame_seed_uses_the_whole_length():
    payload = bytes(range(256)) * 250      # 64,000 bytes: one TSO super-frame
    frame = make_partial(build(6, CLIENT, VIP, 40000, 80, payload))
    rewrite(frame, 34, 6, dst=BACKEND, dport=8080, src=NODE, vnet=vnet_partial(34, 6, gso=True))
    assert csum_field(frame) == seed_from_scratch(frame)


def test_a_vnet_header_without_needs_csum_is_a_full_checksum():
    frame = build(6, CLIENT, VIP, 40000, 80, b"z" * 10)
    rewrite(frame, 34, 6, dst=BACKEND, vnet=bytes(10))
    assert csum_field(frame) == l4_checksum_from_scratch(frame)


# ---- reversibility ------------------------------------------------------------------------------

@pytest.mark.parametrize("proto, partial", [(6, False), (17, False), (1, False), (6, True), (17, True)])
def test_reverse_rewrite_restores_the_original_bytes(proto, partial):
    rng = random.Random(30 + proto + partial)
    for _ in range(1000):
        frame = random_frame(rng, proto)
        vnet = None
        if partial:
            make_partial(frame)
            vnet = vnet_partial(l4_offset(frame), proto)
        original = bytes(frame)
        before = read_fields(frame)
        change = random_change(rng, proto)
        rewrite(frame, l4_offset(frame), proto, vnet=vnet, **change)
        rewrite(frame, l4_offset(frame), proto, vnet=vnet, **{k: before[k] for k in change})
        assert bytes(frame) == original, change


# ---- bindings: a flow both ways -----------------------------------------------------------------

def test_binding_round_trip_through_conntrack():
    ct = Conntrack()
    request = build(6, CLIENT, VIP, 40000, 80, b"GET / HTTP/1.1\r\n\r\n")
    entry = ct.new(FlowTuple(6, CLIENT, 40000, VIP, 80), 0.0, tcp_flags=TCP_SYN,
                   dnat=(BACKEND, 8080), snat=(NODE, 61000))
    nat.apply(request, 34, entry.nat, ORIG)
    assert read_fields(request) == {"src": NODE, "dst": BACKEND, "sport": 61000, "dport": 8080}
    assert csum_field(request) == l4_checksum_from_scratch(request) and ip_header_ok(request)
    # the backend answers what it saw; conntrack finds the reply tuple
    answer = build(6, BACKEND, NODE, 8080, 61000, b"HTTP/1.1 200 OK\r\n\r\n")
    hit = ct.lookup(FlowTuple(6, BACKEND, 8080, NODE, 61000))
    assert hit == (entry, REPLY)
    nat.apply(answer, 34, hit[0].nat, hit[1])
    assert read_fields(answer) == {"src": VIP, "dst": CLIENT, "sport": 80, "dport": 40000}
    assert csum_field(answer) == l4_checksum_from_scratch(answer) and ip_header_ok(answer)


def test_binding_apply_on_partial_frames():
    binding = NatBinding.between((17, CLIENT, 40000, VIP, 53), (17, CLIENT, 40000, BACKEND, 5353))
    frame = make_partial(build(17, CLIENT, VIP, 40000, 53, b"dns"))
    nat.apply(frame, 34, binding, ORIG, vnet=vnet_partial(34, 17))
    assert read_fields(frame)["dst"] == BACKEND and csum_field(frame) == seed_from_scratch(frame)


def test_binding_rewrites_each_direction_to_the_inverse_of_the_other():
    orig = (6, CLIENT, 40000, VIP, 80)
    for translated in [(6, CLIENT, 40000, BACKEND, 8080), (6, NODE, 61000, VIP, 80),
                       (6, NODE, 61000, BACKEND, 8080), (6, CLIENT, 40000, VIP, 8080)]:
        b = NatBinding.between(orig, translated)
        fwd, back = b.rewrites
        out = tuple(v if v is not None else o for v, o in zip(fwd, orig[1:]))
        assert (6, *out) == translated
        reply_in = invert(translated)
        reply_out = tuple(v if v is not None else o for v, o in zip(back, reply_in[1:]))
        assert (6, *reply_out) == invert(orig)
    assert NatBinding.between(orig, orig) is None
    with pytest.raises(ValueError):
        NatBinding.between(orig, (17, CLIENT, 40000, VIP, 80))


# ---- ICMP errors (RELATED) ----------------------------------------------------------------------

def icmp_error(outer_src: int, outer_dst: int, quoted: bytes, icmp_type: int = 3, code: int = 3) -> bytearray:
    body = bytearray(struct.pack("!BBHI", icmp_type, code, 0, 0) + quoted)
    body[2:4] = struct.pack("!H", naive_checksum(bytes(body)))
    ip = dpkt.ip.IP(src=struct.pack("!I", outer_src), dst=struct.pack("!I", outer_dst), p=1, ttl=64,
                    data=bytes(body))
    return bytearray(bytes(dpkt.ethernet.Ethernet(dst=MAC_B, src=MAC_A, type=0x0800, data=ip)))


def icmp_ok(frame) -> bool:
    return naive_checksum(l4_bytes(frame)) == 0


@pytest.mark.parametrize("proto, quote_len", [(17, 28), (6, 28), (6, 60), (17, 200)])
def test_icmp_error_from_the_backend_side_quotes_the_clients_packet(proto, quote_len):
    ct = Conntrack()
    client_packet = build(proto, CLIENT, VIP, 40000, 53, b"payload" * 30)
    entry = ct.new(FlowTuple(proto, CLIENT, 40000, VIP, 53), 0.0, tcp_flags=TCP_SYN,
                   dnat=(BACKEND, 5353), snat=(NODE, 40001))
    translated = bytearray(client_packet)
    nat.apply(translated, 34, entry.nat, ORIG)
    # a router behind the node (or the backend) answers the translated packet
    router = ip_int("10.244.1.1")
    error = icmp_error(router, NODE, bytes(translated[14:14 + quote_len]))
    inner = icmp_error_inner(error, 34)
    assert inner == (proto, NODE, 40001, BACKEND, 5353)
    hit = ct.lookup_related(inner)
    assert hit == (entry, REPLY)
    assert rewrite_icmp_error(error, 34, hit[0].nat, hit[1])
    # the client gets an error from the ClusterIP about exactly the packet it sent
    assert read_fields(error)["src"] == VIP and read_fields(error)["dst"] == CLIENT
    assert bytes(error[42:42 + quote_len]) == bytes(client_packet[14:14 + quote_len])
    assert ip_header_ok(error) and ip_header_ok(error, 42) and icmp_ok(error)


def test_icmp_error_from_the_client_side_quotes_the_backends_packet():
    ct = Conntrack()
    entry = ct.new(FlowTuple(17, CLIENT, 40000, VIP, 53), 0.0, dnat=(BACKEND, 5353))
    backend_packet = build(17, BACKEND, CLIENT, 5353, 40000, b"answer")
    seen_by_client = bytearray(backend_packet)
    nat.apply(seen_by_client, 34, entry.nat, REPLY)
    error = icmp_error(CLIENT, VIP, bytes(seen_by_client[14:42]))
    hit = ct.lookup_related(icmp_error_inner(error, 34))
    assert hit == (entry, ORIG)
    assert rewrite_icmp_error(error, 34, hit[0].nat, hit[1])
    assert read_fields(error)["dst"] == BACKEND and read_fields(error)["src"] == CLIENT
    assert bytes(error[42:70]) == bytes(backend_packet[14:42])
    assert ip_header_ok(error) and ip_header_ok(error, 42) and icmp_ok(error)


def test_icmp_error_about_a_natted_ping():
    ct = Conntrack()
    echo = build(1, CLIENT, ip_int("8.8.8.8"), 5, 0, b"abcdefgh")
    entry = ct.new(FlowTuple.icmp(CLIENT, ip_int("8.8.8.8"), 8, 0, 5), 0.0, snat=(NODE, 999))
    out = bytearray(echo)
    nat.apply(out, 34, entry.nat, ORIG)
    assert read_fields(out) == {"src": NODE, "dst": ip_int("8.8.8.8"), "sport": 999} and icmp_ok(out)
    error = icmp_error(ip_int("172.16.0.1"), NODE, bytes(out[14:42]), icmp_type=11, code=0)
    hit = ct.lookup_related(icmp_error_inner(error, 34))
    assert hit == (entry, REPLY)
    assert rewrite_icmp_error(error, 34, hit[0].nat, hit[1])
    assert bytes(error[42:70]) == bytes(echo[14:42])
    assert read_fields(error)["dst"] == CLIENT and icmp_ok(error) and ip_header_ok(error)


def test_icmp_error_with_a_short_quote_is_left_alone():
    binding = NatBinding.between((17, CLIENT, 1, VIP, 2), (17, CLIENT, 1, BACKEND, 2))
    error = icmp_error(BACKEND, CLIENT, b"\x45" + b"\x00" * 20)   # an IP header and no L4 bytes
    before = bytes(error)
    assert icmp_error_inner(error, 34) is None
    assert not rewrite_icmp_error(error, 34, binding, REPLY)
    assert bytes(error) == before


def test_rewrite_named_fields():
    assert Rewrite() == (None, None, None, None)
    assert Rewrite(dst=1, dport=2).dport == 2


# ---- the kernel's own NAT -----------------------------------------------------------------------
# IPv4 packets (Ethernet header left out) captured with AF_PACKET on both sides of a Linux 6.18
# router namespace with nft rules `dnat to 10.98.1.2:5353` / `:8080` for 10.96.0.10:53 / :80 and
# `masquerade to :61000` out of the backend's side. The sender had checksum offload on (the
# packets carry the CHECKSUM_PARTIAL seed, as a TAP with NEEDS_CSUM hands them up) or off.

KERNEL_NAT = [
    # (partial, packet entering the router, the same packet leaving it towards the backend)
    (True, "4500002d93b640004011923d0a6200010a60000a9c750035001914f768656c6c6f206b65726e656c206e617421",
     "4500002d93b640003f1190460a6201fe0a620102ee4814e9001917ee68656c6c6f206b65726e656c206e617421"),
    (True, "4500003c46e640004006df090a6200010a60000a9c900050a940e70e00000000a002faf014fb0000020405b40402"
           "080acf6354fa000000000103030a",
     "4500003c46e640003f06dd120a6201fe0a620102ee481f90a940e70e00000000a002faf017f20000020405b40402"
     "080acf6354fa000000000103030a"),
    (False, "4500002d789b40004011ad580a6200010a60000a9c7500350019243068656c6c6f206b65726e656c206e617421",
     "4500002d789b40003f11ab610a6201fe0a620102ee4814e90019bab168656c6c6f206b65726e656c206e617421"),
    (False, "4500003c740b40004006b1e40a6200010a60000a9c900050aa917cfb00000000a002faf049f10000020405b40402"
            "080acf635a7d000000000103030a",
     "4500003c740b40003f06afed0a6201fe0a620102ee481f90aa917cfb00000000a002faf0d6010000020405b40402"
     "080acf635a7d000000000103030a"),
]


@pytest.mark.parametrize("partial, entering, leaving", KERNEL_NAT,
                         ids=["udp-partial", "tcp-partial", "udp-full", "tcp-full"])
def test_same_bytes_as_the_kernels_dnat_and_masquerade(partial, entering, leaving):
    frame = bytearray(MAC_B + MAC_A + b"\x08\x00" + bytes.fromhex(entering))
    proto = frame[23]
    if partial:
        assert csum_field(frame) == seed_from_scratch(frame)
    else:
        assert csum_field(frame) == l4_checksum_from_scratch(frame)
    decrement_ttl(frame, frame[22])   # the router forwards it
    rewrite(frame, 34, proto, src=ip_int("10.98.1.254"), sport=61000, dst=ip_int("10.98.1.2"),
            dport=5353 if proto == 17 else 8080, vnet=vnet_partial(34, proto) if partial else None)
    assert bytes(frame[14:]) == bytes.fromhex(leaving)
