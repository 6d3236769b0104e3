"""The eBPF backend's BPF maps and Cilium's key/value layouts, byte for byte.

The expected bytes were produced by gcc (x86-64) from the structs of cilium/cilium bpf/lib/common.h
(lb4_key, lb4_service, lb4_backend, lb4_reverse_nat, lb4_affinity_key, lb_affinity_val,
ipv4_ct_tuple, ct_entry), filled with the byte orders the agent uses (htonl/htons for addresses,
ports and rev_nat_index; host order for slots, counts and ids).
"""

from __future__ import annotations

import pytest

from podnet.core.services.ebpf import lbmaps as lb
from podnet.core.services.ebpf.ct import NODE_PORT, SEEN_NON_SYN, TUPLE_F_SERVICE, CtEntry, CtTuple
from podnet.core.services.ebpf.maps import BPF_EXIST, BPF_NOEXIST, BpfMap, LpmTrieMap, MapFull, MapType
from podnet.errors import LimitExceeded

VIP, POD, CLIENT = 0x0A60000A, 0x0AF40005, 0x0AF40009   # 10.96.0.10, 10.244.0.5, 10.244.0.9


@pytest.mark.parametrize("value, expected", [
    (lb.Lb4Key(VIP, 80, 2, 6, lb.SCOPE_INT), "0a60000a0050020006010000"),
    (lb.Lb4Service(7, 3, 5, 0x50 | 0x20 << 8), "070000000300000550200000"),
    (lb.Lb4Backend(POD, 8080, 6, lb.BackendState.TERMINATING), "0af400051f90060100000000"),
    (lb.Lb4ReverseNat(VIP, 80), "0a60000a0050"),
    (lb.Lb4AffinityKey(CLIENT, 5), "0af40009000000000005000000000000"),
    (lb.Lb4AffinityKey(0x1122334455667788, 5, True), "88776655443322110005010000000000"),
    (lb.LbAffinityVal(1000, 7), "e8030000000000000700000000000000"),
    (CtTuple.of_flow(CLIENT, 40000, VIP, 80, 6, TUPLE_F_SERVICE), "0af400090a60000a00509c400604"),
    (CtEntry(rx_bytes=7, tx_packets=1, lifetime=160, flags=SEEN_NON_SYN | NODE_PORT, rev_nat_index=5,
             tx_flags_seen=2, last_tx_report=100),
     "0000000000000000070000000000000001000000000000000000000000000000"
     "a00000003000000500000200000000006400000000000000"),
])
def test_layouts_match_the_c_structs_and_round_trip(value, expected):
    packed = value.pack()
    assert packed.hex() == expected
    assert len(packed) == type(value).SIZE
    assert type(value).unpack(packed) == value


def test_struct_sizes_are_ciliums():
    assert (lb.Lb4Key.SIZE, lb.Lb4Service.SIZE, lb.Lb4Backend.SIZE, lb.Lb4ReverseNat.SIZE) == (12, 12, 12, 6)
    assert (lb.Lb4AffinityKey.SIZE, lb.LbAffinityVal.SIZE, CtTuple.SIZE, CtEntry.SIZE) == (16, 16, 14, 56)
    maps = lb.LbMaps()
    assert (maps.services.key_size, maps.services.value_size) == (12, 12)
    assert (maps.backends.key_size, maps.backends.value_size) == (4, 12)
    assert (maps.reverse_nat.key_size, maps.reverse_nat.value_size) == (2, 6)
    assert (maps.affinity.key_size, maps.affinity.value_size) == (16, 16)
    assert maps.affinity.map_type is MapType.LRU_HASH
    assert [m.max_entries for m in (maps.services, maps.backends, maps.reverse_nat, maps.affinity)] == [65536] * 4
    assert maps.reverse_sk.max_entries == 256 * 1024
    assert lb.pack_backend_key(7).hex() == "07000000"           # u32 host order
    assert lb.pack_revnat_key(5).hex() == "0005"                # rev_nat_index in network order
    assert lb.pack_affinity_match(7, 5).hex() == "0700000000050000"


def test_service_flags_print_as_cilium_does():
    F = lb.ServiceFlags
    assert F(0).describe() == "ClusterIP, non-routable"
    assert (F.NODEPORT | F.ROUTABLE | F.EXT_LOCAL_SCOPE).describe() == "NodePort, Local"
    assert (F.LOADBALANCER | F.ROUTABLE | F.SOURCE_RANGE | F.AFFINITY).describe() == \
        "LoadBalancer, sessionAffinity, check source-range"
    assert lb.Lb4Service.unpack(lb.Lb4Service(0, 0, 1, int(F.TWO_SCOPES | F.NODEPORT)).pack()).flags == \
        F.TWO_SCOPES | F.NODEPORT      # flags2 survives the trip through the second byte


def test_a_full_hash_map_refuses_a_new_key_with_e2big_and_keeps_its_entries():
    m = BpfMap("cilium_lb4_services_v2", MapType.HASH, 2, 1, 2)
    m.update(b"aa", b"1")
    m.update(b"bb", b"2")
    m.update(b"aa", b"3")                      # replacing an existing key always works
    with pytest.raises(MapFull) as info:
        m.update(b"cc", b"4", what="10.96.0.99:80/TCP")
    assert isinstance(info.value, LimitExceeded)
    assert str(info.value) == ("lb4_services_v2: map is full (max_entries 2): cannot add 10.96.0.99:80/TCP "
                               "(E2BIG)")
    assert dict(m.items()) == {b"aa": b"3", b"bb": b"2"} and m.full_errors == 1
    m.delete(b"aa")
    m.update(b"cc", b"4")                      # room again after a delete


def test_map_flags_sizes_and_counters():
    m = BpfMap("t", MapType.HASH, 2, 1, 4)
    with pytest.raises(ValueError):
        m.update(b"abc", b"1")
    with pytest.raises(ValueError):
        m.update(b"ab", b"12")
    m.update(b"ab", b"1", BPF_NOEXIST)
    with pytest.raises(KeyError):
        m.update(b"ab", b"1", BPF_NOEXIST)
    with pytest.raises(KeyError):
        m.update(b"cd", b"1", BPF_EXIST)
    assert m.peek(b"ab") == b"1" and m.lookups == 0       # peek is free (traces)
    assert m.lookup(b"ab") == b"1" and m.lookup(b"zz") is None and m.lookups == 2
    assert m.delete(b"ab") and not m.delete(b"ab") and m.deletes == 1


def test_lru_hash_evicts_the_least_recently_used():
    m = BpfMap("t", MapType.LRU_HASH, 1, 1, 2)
    m.update(b"a", b"1")
    m.update(b"b", b"2")
    m.lookup(b"a")                   # a is now the more recent
    m.update(b"c", b"3")
    assert set(dict(m.items())) == {b"a", b"c"} and m.evictions == 1


def test_lpm_trie_answers_the_longest_prefix():
    t = LpmTrieMap("cilium_cidr_v4_dyn", 4, 8)
    t.update(8, bytes([10, 0, 0, 0]), b"\x01")
    t.update(24, bytes([10, 1, 2, 0]), b"\x02")
    assert t.lookup(bytes([10, 1, 2, 3])) == (24, b"\x02")
    assert t.lookup(bytes([10, 9, 9, 9])) == (8, b"\x01")
    assert t.lookup(bytes([11, 0, 0, 1])) is None
    t.delete(24, bytes([10, 1, 2, 99]))          # masked like the kernel masks keys
    assert t.lookup(bytes([10, 1, 2, 3])) == (8, b"\x01")
