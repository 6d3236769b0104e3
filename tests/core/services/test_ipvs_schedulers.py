"""The IPVS schedulers against the kernel's rules, with expectations worked out by hand.

Destinations are named A, B, C...; `service(...)` adds them so that the kernel's list (new
destinations go to the head) reads in the order given. Connections are opened and closed through
the real connection table, so ActiveConn/InActConn move as in the kernel.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from podnet.core.services.ipvs.hashing import hash_32, hsiphash_u32, siphash
from podnet.core.services.ipvs.schedulers import (
    MH_KEY1, SourceHashing, make_scheduler, scheduler_flag_names,
)
from podnet.core.services.ipvs.table import (
    IPPROTO_TCP, IPPROTO_UDP, SVC_F_SCHED1, SVC_F_SCHED2, ConnectionTable, IpvsState, VirtualService,
)
from podnet.core.services.packetinfo import PacketInfo
from podnet.errors import ConfigError

VIP = int(ipaddress.IPv4Address("10.96.0.10"))
NAMES = "ABCDEFGH"


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def addr(name: str) -> int:
    return ip(f"10.244.0.{NAMES.index(name) + 1}")


def service(sched: str, weights: dict[str, int], *, flags: int = 0, protocol: int = IPPROTO_TCP) -> VirtualService:
    """A service whose destination list reads in the order of `weights`."""
    vs = VirtualService(protocol, VIP, 80, make_scheduler(sched), flags=flags)
    for name in reversed(list(weights)):
        vs.add_dest(addr(name), 8080, weights[name])
    assert [name_of(d) for d in vs.dests] == list(weights)
    return vs


def name_of(dest) -> str | None:
    return None if dest is None else NAMES[(dest.addr & 0xFF) - 1]


def pick(vs: VirtualService, src: str = "10.0.0.1", sport: int = 40000, commit: bool = True) -> str | None:
    return name_of(vs.scheduler.schedule(vs, PacketInfo(ip(src), VIP, vs.protocol, sport, 80), commit)[0])


def picks(vs: VirtualService, n: int) -> str:
    return "".join(pick(vs) or "-" for _ in range(n))


class Conns:
    """Open and close connections on a service through the kernel-like connection table."""

    def __init__(self, vs: VirtualService) -> None:
        self.vs = vs
        self.table = ConnectionTable()
        self.port = 1000
        self.open_by_dest: dict[str, list] = {}

    def open(self, state: IpvsState = IpvsState.ESTABLISHED) -> str:
        dest = self.vs.scheduler.schedule(self.vs, PacketInfo(ip("10.0.0.1"), VIP, IPPROTO_TCP, self.port, 80))[0]
        assert dest is not None
        conn = self.table.new(IPPROTO_TCP, ip("10.0.0.1"), self.port, VIP, 80, dest, 0.0, state=state)
        self.port += 1
        self.open_by_dest.setdefault(name_of(dest), []).append(conn)
        return name_of(dest)

    def close(self, name: str) -> None:
        self.table.expire(self.open_by_dest[name].pop(0))


# -- the hash functions --------------------------------------------------------------------------

def test_siphash_2_4_reference_vectors():
    """Aumasson & Bernstein's vectors (key 00..0f, message 00..n-1), which pin the round function
    the kernel's hsiphash (SipHash-1-3 on 64-bit) shares."""
    key = bytes(range(16))
    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
    assert siphash(b"", k0, k1) == 0x726FDB47DD0E0E31
    assert siphash(bytes(range(15)), k0, k1) == 0xA129CA6149BE45E5
    assert siphash(bytes(range(8)), k0, k1) == 0x93F5F5799A932462


def test_hsiphash_is_siphash_1_3_of_four_little_endian_bytes():
    value = 0x0A000001 + 40000
    expected = siphash(value.to_bytes(4, "little"), MH_KEY1[0], MH_KEY1[1], 1, 3) & 0xFFFFFFFF
    assert hsiphash_u32(value, MH_KEY1) == expected
    assert hsiphash_u32(value + (1 << 32), MH_KEY1) == expected    # a u32: wraps


def test_hash_32_takes_the_high_bits():
    assert hash_32(1, 8) == 0x61C88647 >> 24
    assert hash_32(0, 8) == 0


# -- rr -------------------------------------------------------------------------------------------

def test_rr_walks_the_list_from_the_head_and_wraps():
    vs = service("rr", {"A": 1, "B": 1, "C": 1})
    assert picks(vs, 7) == "ABCABCA"


def test_rr_new_destinations_go_to_the_head_and_the_pointer_follows_its_node():
    vs = service("rr", {"C": 1, "B": 1, "A": 1})
    assert picks(vs, 4) == "CBAC"                  # pointer on C (index 0)
    vs.add_dest(addr("D"), 8080, 1)                # list: D C B A, pointer still on C
    assert picks(vs, 4) == "BADC"


def test_rr_deleting_the_current_destination_steps_back_to_its_predecessor():
    vs = service("rr", {"D": 1, "C": 1, "B": 1, "A": 1})
    assert picks(vs, 2) == "DC"                    # pointer on C
    vs.del_dest(vs.by_key[(addr("B"), 8080)])      # after the pointer: nothing moves
    assert picks(vs, 3) == "ADC"                   # list D C A; pointer on C
    vs.del_dest(vs.by_key[(addr("C"), 8080)])      # ip_vs_rr_del_dest: pointer -> D
    assert picks(vs, 3) == "ADA"


def test_rr_skips_weight_0_and_gives_up_after_one_round():
    vs = service("rr", {"A": 1, "B": 0, "C": 1})
    assert picks(vs, 4) == "ACAC"
    vs.update_dest(vs.by_key[(addr("A"), 8080)], 0)
    vs.update_dest(vs.by_key[(addr("C"), 8080)], 0)
    assert pick(vs) is None


def test_rr_trace_does_not_move_the_pointer():
    vs = service("rr", {"A": 1, "B": 1})
    assert pick(vs, commit=False) == "A"
    assert pick(vs, commit=False) == "A"
    assert picks(vs, 2) == "AB"


# -- wrr ------------------------------------------------------------------------------------------

def rebound(vs: VirtualService) -> VirtualService:
    """ipvsadm -E with the scheduler again: init_service sees every destination at once."""
    vs.set_scheduler(make_scheduler(vs.sched_name))
    return vs


def test_wrr_4_3_2_gives_the_kernels_sequence():
    vs = rebound(service("wrr", {"A": 4, "B": 3, "C": 2}))
    assert picks(vs, 18) == "AABABCABC" * 2


def test_wrr_3_2_1():
    # mw = 3, di = 1: cw 3 -> A; cw 2 -> A B; cw 1 -> A B C; then back to 3
    vs = rebound(service("wrr", {"A": 3, "B": 2, "C": 1}))
    assert picks(vs, 12) == "AABABC" * 2


def test_wrr_steps_by_the_gcd():
    # weights 4 and 2: di = 2, mw = 4 - 1 = 3; cw 3 -> A; cw 1 -> A B; cw -1 -> back to 3
    vs = rebound(service("wrr", {"A": 4, "B": 2}))
    assert picks(vs, 6) == "AABAAB"


def test_wrr_destinations_added_one_by_one_keep_the_current_weight():
    # ip_vs_wrr_dest_changed only resets cw when it is 0 or above the new mw: adding C(2) alone
    # gives di 2, mw 2 - 1 = 1, so cw = 1; adding B(3) and A(4) leaves it at 1. So the first round
    # runs at cw 1 (A B C) before the usual cycle starts from mw = 4.
    vs = service("wrr", {"A": 4, "B": 3, "C": 2})
    assert picks(vs, 15) == "ABC" + "AABABCABC" + "AAB"


def test_wrr_gcd_realigns_cw_when_destinations_are_added():
    # B(2) alone: di 2, mw 1, cw 1. Adding A(4): di 2, mw 3, cw = (1 // 2) * 2 + 1 = 1
    vs = service("wrr", {"A": 4, "B": 2})
    assert picks(vs, 6) == "ABAABA"


def test_wrr_a_weight_change_restarts_from_the_head():
    vs = rebound(service("wrr", {"A": 3, "B": 2, "C": 1}))
    assert picks(vs, 2) == "AA"                   # now cw = 2, pointer on A
    vs.update_dest(vs.by_key[(addr("C"), 8080)], 3)  # di 1, mw 3, cw stays 2, pointer to the head
    # A=3 B=2 C=3 from the head: cw 2 -> A B C; cw 1 -> A B C; cw 3 -> A C
    assert picks(vs, 8) == "ABCABCAC"


def test_wrr_all_weights_zero_has_no_destination():
    vs = service("wrr", {"A": 0, "B": 0})
    assert pick(vs) is None


# -- lc / wlc / sed / nq --------------------------------------------------------------------------

def test_lc_least_overhead_ties_to_the_first():
    vs = service("lc", {"A": 1, "B": 1, "C": 1})
    conns = Conns(vs)
    assert [conns.open() for _ in range(4)] == ["A", "B", "C", "A"]   # each time the first of the least
    conns.close("B")                                    # A 512, B 0, C 256
    assert conns.open() == "B"                          # A 512, B 256, C 256
    assert conns.open(IpvsState.SYN_RECV) == "B"        # B is the first of the least (256)

def test_lc_counts_inactive_connections_as_one_256th():
    vs = service("lc", {"A": 1, "B": 1})
    conns = Conns(vs)
    assert conns.open(IpvsState.SYN_RECV) == "A"   # A: 0 active, 1 inactive -> overhead 1
    assert conns.open(IpvsState.SYN_RECV) == "B"   # B 0 < A 1
    assert conns.open() == "A"                      # tie at 1 -> first; A now 256 + 1
    assert conns.open() == "B"
    assert conns.open(IpvsState.SYN_RECV) == "A"    # tie at 257
    assert conns.open(IpvsState.SYN_RECV) == "B"    # A 258 > B 257


def test_lc_skips_weight_0():
    vs = service("lc", {"A": 0, "B": 1})
    assert pick(vs) == "B"


def test_wlc_weighs_overhead_by_weight_and_keeps_the_earlier_on_ties():
    vs = service("wlc", {"A": 1, "B": 2, "C": 3})
    conns = Conns(vs)
    # overheads (active*256) / weight; a dest replaces `least` only if loh*w_d > doh*w_least
    assert conns.open() == "A"      # all 0: nobody beats A            -> A 256
    assert conns.open() == "B"      # B: 256*2 > 0*1; C: 0*3 > 0*2 no  -> B 256
    assert conns.open() == "C"      # B beats A (512 > 256); C beats B (256*3 > 0) -> C 256
    assert conns.open() == "C"      # loads 256, 128, 85: C (768 > 512 against B) -> C 512
    assert conns.open() == "B"      # loads 256, 128, 171: B; C: 256*3 > 512*2 no -> B 512
    assert conns.open() == "C"      # loads 256, 256, 171: A stays vs B (512 > 512 no); C: 768 > 512 -> C 768
    assert conns.open() == "A"      # loads 256, 256, 256: ties keep A; connections now 1:2:3


def test_wlc_never_picks_weight_0_even_idle():
    vs = service("wlc", {"A": 1, "B": 0})
    conns = Conns(vs)
    assert [conns.open() for _ in range(3)] == ["A", "A", "A"]


def test_sed_ignores_inactive_connections():
    vs = service("sed", {"A": 1, "B": 1})
    conns = Conns(vs)
    for _ in range(3):
        assert conns.open(IpvsState.SYN_RECV) == "A"    # (0+1)/1 everywhere: ties keep A
    assert conns.open() == "A"                          # A active 1
    assert conns.open() == "B"                          # A (1+1) > B (0+1)


def test_sed_prefers_the_heavier_server_until_it_is_busier():
    vs = service("sed", {"A": 1, "B": 3})
    conns = Conns(vs)
    # A: 1/1; B: 1/3 -> B. Then B 2/3 < A 1 -> B; B 3/3 ties A 1 -> A stays least? compare
    # loh*w_B > doh*w_A: 1*3 > 3*1 is false -> A
    assert [conns.open() for _ in range(3)] == ["B", "B", "A"]


def test_nq_sends_to_the_first_idle_server():
    vs = service("nq", {"A": 1, "B": 3})
    conns = Conns(vs)
    assert conns.open() == "A"        # idle: taken at once, weights do not matter
    assert conns.open() == "B"        # A busy, B idle
    # no idle one: sed on (active+1)/w: A 2/1, B 2/3 -> B; then B 3/3=1 < A 2 -> B; then B 4/3 < 2 -> B
    assert [conns.open() for _ in range(3)] == ["B", "B", "B"]
    conns.close("A")
    assert conns.open() == "A"        # idle again


# -- sh / dh -------------------------------------------------------------------------------------

def test_sh_bucket_of_a_source_by_hand():
    # 10.0.0.1 = 0x0A000001; 2654435761 = 0x9E3779B1; low byte of the product = 0x01 * 0xB1 = 177
    sched = SourceHashing()
    assert sched.hashkey(ip("10.0.0.1"), 0, 0) == 177
    vs = service("sh", {"A": 1, "B": 1, "C": 1})
    assert pick(vs, "10.0.0.1") == "ABC"[177 % 3]       # buckets round the list one each
    vs2 = service("sh", {"A": 2, "B": 1})
    assert pick(vs2, "10.0.0.1") == "AAB"[177 % 3]      # A takes 2 consecutive buckets, B 1


def test_sh_is_stable_per_source_and_port_only_with_sh_port():
    vs = service("sh", {"A": 1, "B": 1, "C": 1, "D": 1})
    first = pick(vs, "10.0.7.9", 1111)
    assert all(pick(vs, "10.0.7.9", port) == first for port in range(2000, 2050))
    vs_port = service("sh", {"A": 1, "B": 1, "C": 1, "D": 1}, flags=SVC_F_SCHED2)
    assert len({pick(vs_port, "10.0.7.9", port) for port in range(2000, 2050)}) == 4


def test_sh_weight_0_means_no_destination_unless_fallback():
    src = "10.0.0.1"                               # bucket 177: 177 % 3 = 0 -> A with three weight-1
    vs = service("sh", {"A": 1, "B": 1, "C": 1})
    assert pick(vs, src) == "A"
    vs.update_dest(vs.by_key[(addr("B"), 8080)], 0)  # B keeps one bucket: the table is unchanged
    assert pick(vs, src) == "A"
    vs.update_dest(vs.by_key[(addr("A"), 8080)], 0)
    assert pick(vs, src) is None
    vs.flags |= SVC_F_SCHED1                        # sh-fallback: probe bucket (offset + hash)
    assert pick(vs, src) == "C"


def test_dh_hashes_the_destination_address():
    vs = service("dh", {"A": 1, "B": 1, "C": 1})
    bucket = (VIP * 2654435761) & 255
    expected = "ABC"[bucket % 3]
    assert {pick(vs, f"10.1.{i}.{j}") for i in range(5) for j in range(5)} == {expected}


# -- mh -------------------------------------------------------------------------------------------

def _table_counts(vs: VirtualService) -> Counter:
    return Counter(name_of(d) for d in vs.scheduler.table(vs))


def test_mh_table_size_and_even_fill():
    vs = service("mh", {"A": 1, "B": 1, "C": 1, "D": 1, "E": 1})
    assert vs.scheduler.size == 4093                  # primes[12 - 8]
    counts = _table_counts(vs)
    assert sum(counts.values()) == 4093 and None not in counts
    assert max(counts.values()) - min(counts.values()) <= 1   # one slot per destination per round


def test_mh_weights_give_turns():
    vs = service("mh", {"A": 2, "B": 1})
    counts = _table_counts(vs)
    assert counts["A"] in (2729, 2728) and counts["A"] + counts["B"] == 4093   # 2 of every 3 slots


def test_mh_removal_is_minimally_disruptive():
    names = {"A": 1, "B": 1, "C": 1, "D": 1, "E": 1, "F": 1}
    vs = service("mh", names)
    before = [name_of(d) for d in vs.scheduler.table(vs)]
    vs.del_dest(vs.by_key[(addr("C"), 8080)])
    after = [name_of(d) for d in vs.scheduler.table(vs)]
    moved = sum(1 for b, a in zip(before, after) if b != "C" and a != b)
    assert "C" not in after
    assert moved / 4093 < 0.10        # Maglev: most slots of the others stay where they were


def test_mh_lookup_follows_the_kernels_hash():
    vs = service("mh", {"A": 1, "B": 1, "C": 1}, flags=SVC_F_SCHED2)
    table = vs.scheduler.table(vs)
    src, sport = ip("10.0.0.1"), 40000
    slot = hsiphash_u32(src + sport, MH_KEY1) % 4093
    assert pick(vs, "10.0.0.1", sport) == name_of(table[slot])


def test_mh_weight_0_keeps_its_slots_and_gets_nothing():
    vs = service("mh", {"A": 1, "B": 1, "C": 1})
    before = list(vs.scheduler.table(vs))
    vs.update_dest(vs.by_key[(addr("B"), 8080)], 0)  # last_weight stays 1: same table
    assert vs.scheduler.table(vs) == before
    b_sources = [f"10.9.{i}.{j}" for i in range(4) for j in range(40)
                 if name_of(before[hsiphash_u32(ip(f"10.9.{i}.{j}"), MH_KEY1) % 4093]) == "B"]
    assert b_sources and all(pick(vs, s) is None for s in b_sources)
    vs.flags |= SVC_F_SCHED1
    assert all(pick(vs, s) in ("A", "C") for s in b_sources)


# -- names ---------------------------------------------------------------------------------------

def test_unknown_scheduler_is_a_config_error():
    with pytest.raises(ConfigError, match="lblcx"):
        make_scheduler("lblcx")


def test_flag_names_as_ipvsadm_prints_them():
    assert scheduler_flag_names("mh", SVC_F_SCHED2) == ["mh-port"]
    assert scheduler_flag_names("sh", SVC_F_SCHED1 | SVC_F_SCHED2) == ["sh-fallback", "sh-port"]
    assert scheduler_flag_names("rr", SVC_F_SCHED2) == ["flag-2"]


def test_udp_connections_stay_inactive_for_lc():
    vs = service("lc", {"A": 1, "B": 1}, protocol=IPPROTO_UDP)
    table = ConnectionTable()
    dest = vs.dests[0]
    conn = table.new(IPPROTO_UDP, ip("10.0.0.1"), 53, VIP, 80, dest, 0.0, state=IpvsState.UDP)
    table.set_state(conn, IpvsState.ESTABLISHED, 1.0)   # never active for UDP
    assert (dest.activeconns, dest.inactconns) == (0, 1)
