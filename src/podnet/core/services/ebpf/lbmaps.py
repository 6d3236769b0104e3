"""Cilium's IPv4 load-balancing maps: names, sizes and the byte layout of every key and value.

Layer: core, sans-IO. One packer per C struct of cilium/cilium bpf/lib/common.h and bpf/lib/lb.h,
with the byte orders the agent writes (pkg/maps/lbmap/ipv4.go):

    cilium_lb4_services_v2   HASH      lb4_key (12 B)            -> lb4_service (12 B)
    cilium_lb4_backends_v3   HASH      u32 backend_id            -> lb4_backend (12 B)
    cilium_lb4_reverse_nat   HASH      u16 rev_nat_index (be)    -> lb4_reverse_nat (6 B, packed)
    cilium_lb4_affinity      LRU_HASH  lb4_affinity_key (16 B)   -> lb_affinity_val (16 B)
    cilium_lb_affinity_match HASH      lb_affinity_match (8 B)   -> u8
    cilium_lb4_maglev        HASH_OF_MAPS u16 rev_nat_index (be) -> inner ARRAY u32[M] of backend ids
    cilium_lb4_source_range  LPM_TRIE  {u16 rev_nat_id, u16 pad, be32 addr} (+ prefixlen) -> u8
    cilium_lb4_reverse_sk    LRU_HASH  {u64 cookie, be32, be16, u16 pad} -> {be32, be16, u16 rev_nat}

Byte orders: addresses and L4 ports are network order (`be`); `backend_slot`, `count`, the backend
id and the affinity timeout are host order (little-endian, x86); `rev_nat_index` is stored in
network order wherever the agent writes it (Service4Value.ToNetwork, RevNat4Key.ToNetwork).
Sizes default to Cilium's `--bpf-lb-map-max` (65536) and its reverse_sk size (256Ki).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple

from .maps import BpfMap, LpmTrieMap, MapType

__all__ = [
    "BackendState", "Lb4AffinityKey", "Lb4Backend", "Lb4Key", "Lb4ReverseNat", "Lb4Service", "LbAffinityVal",
    "LbMapSizes", "LbMaps", "PROTO_NAMES", "SCOPE_EXT", "SCOPE_INT", "ServiceFlags", "addr_text", "swab16",
]

SCOPE_EXT, SCOPE_INT = 0, 1          # LB_LOOKUP_SCOPE_EXT / LB_LOOKUP_SCOPE_INT
DEFAULT_LB_MAP_MAX = 65536           # --bpf-lb-map-max
SOCK_REV_NAT_MAP_SIZE = 256 * 1024   # SockRevNat4MapSize
PROTO_NAMES = {0: "ANY", 1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}   # u8proto
PROTO_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}


def swab16(value: int) -> int:
    return ((value & 0xFF) << 8) | (value >> 8)


def addr_text(address: int) -> str:
    """Dotted quad of a host-order IPv4 int (ipaddress is ten times slower on the hot path)."""
    return f"{address >> 24}.{address >> 16 & 255}.{address >> 8 & 255}.{address & 255}"


class ServiceFlags(enum.IntFlag):
    """lb4_service.flags | flags2 << 8, as the Go side packs them (bpf/lib/common.h SVC_FLAG_*)."""

    EXTERNAL_IP = 1 << 0
    NODEPORT = 1 << 1
    EXT_LOCAL_SCOPE = 1 << 2
    HOSTPORT = 1 << 3
    AFFINITY = 1 << 4
    LOADBALANCER = 1 << 5
    ROUTABLE = 1 << 6
    SOURCE_RANGE = 1 << 7
    LOCALREDIRECT = 1 << 8
    NAT_46X64 = 1 << 9
    L7LOADBALANCER = 1 << 10
    LOOPBACK = 1 << 11
    INT_LOCAL_SCOPE = 1 << 12
    TWO_SCOPES = 1 << 13

    @property
    def svc_type(self) -> str:
        """loadbalancer.ServiceFlags.SVCType(): the first type bit that is set, else ClusterIP."""
        for bit, name in ((ServiceFlags.EXTERNAL_IP, "ExternalIPs"), (ServiceFlags.NODEPORT, "NodePort"),
                          (ServiceFlags.LOADBALANCER, "LoadBalancer"), (ServiceFlags.HOSTPORT, "HostPort"),
                          (ServiceFlags.LOCALREDIRECT, "LocalRedirect")):
            if self & bit:
                return name
        return "ClusterIP"

    def describe(self) -> str:
        """loadbalancer.ServiceFlags.String(), as `cilium bpf lb list` prints it in brackets."""
        words = [self.svc_type]
        if self & ServiceFlags.EXT_LOCAL_SCOPE:
            words.append("Local")
        if self & ServiceFlags.AFFINITY:
            words.append("sessionAffinity")
        if not self & ServiceFlags.ROUTABLE:
            words.append("non-routable")
        if self & ServiceFlags.SOURCE_RANGE:
            words.append("check source-range")
        if self & ServiceFlags.NAT_46X64:
            words.append("46x64")
        if self & ServiceFlags.L7LOADBALANCER:
            words.append("l7-load-balancer")
        return ", ".join(words)


class BackendState(enum.IntEnum):
    """lb4_backend.flags (loadbalancer.BackendState*Flag)."""

    ACTIVE = 0
    TERMINATING = 1
    QUARANTINED = 2
    MAINTENANCE = 3


_LB4_KEY = struct.Struct(">IHHBB2x")        # address, dport, backend_slot (swabbed), proto, scope
_LB4_SERVICE = struct.Struct("<IHHBB2x")    # backend_id|affinity_timeout, count, rev_nat (swabbed), flags, flags2
_LB4_BACKEND = struct.Struct(">IHBBB3x")    # address, port, proto, flags (state), cluster_id
_BACKEND_KEY = struct.Struct("<I")
_REVNAT_KEY = struct.Struct(">H")
_LB4_REVNAT = struct.Struct(">IH")
_AFFINITY_KEY = struct.Struct(">I4xHB5x")   # client_ip in the u64 union, rev_nat_id, netns_cookie bit
_AFFINITY_COOKIE_KEY = struct.Struct("<QHB5x")
_AFFINITY_VAL = struct.Struct("<QI4x")
_AFFINITY_MATCH = struct.Struct("<IH2x")
_SOURCE_RANGE_DATA = struct.Struct(">H2xI")  # rev_nat_id, pad, address (the LPM data after prefixlen)
_REVERSE_SK_KEY = struct.Struct("<Q4s2s2x")
_REVERSE_SK_VAL = struct.Struct(">IHH")


class Lb4Key(NamedTuple):
    """struct lb4_key: slot 0 is the service (master) entry, slots 1..count its backends."""

    address: int
    dport: int
    backend_slot: int = 0
    proto: int = 0
    scope: int = SCOPE_EXT
    SIZE = 12

    def pack(self) -> bytes:
        return _LB4_KEY.pack(self.address, self.dport, swab16(self.backend_slot), self.proto, self.scope)

    @classmethod
    def unpack(cls, data: bytes) -> Lb4Key:
        address, dport, slot, proto, scope = _LB4_KEY.unpack(data)
        return cls(address, dport, swab16(slot), proto, scope)

    def frontend_text(self) -> str:
        """'10.96.0.10:53/UDP', with '/i' for the internal scope (Service4Key.String())."""
        return (f"{addr_text(self.address)}:{self.dport}/{PROTO_NAMES.get(self.proto, str(self.proto))}"
                + ("/i" if self.scope == SCOPE_INT else ""))


def pack_lb4_key(address: int, dport: int, slot: int, proto: int, scope: int) -> bytes:
    """The hot-path form of Lb4Key(...).pack()."""
    return _LB4_KEY.pack(address, dport, ((slot & 0xFF) << 8) | (slot >> 8), proto, scope)


class Lb4Service(NamedTuple):
    """struct lb4_service. `backend_id` is the union: the backend id on slot entries, the affinity
    timeout (seconds) on the master entry. `count` is set on the master only."""

    backend_id: int = 0
    count: int = 0
    rev_nat_index: int = 0
    flags: int = 0                       # ServiceFlags: flags | flags2 << 8
    SIZE = 12

    @property
    def affinity_timeout(self) -> int:
        return self.backend_id

    def pack(self) -> bytes:
        return _LB4_SERVICE.pack(self.backend_id, self.count, swab16(self.rev_nat_index),
                                 self.flags & 0xFF, self.flags >> 8)

    @classmethod
    def unpack(cls, data: bytes) -> Lb4Service:
        backend_id, count, rev_nat, flags, flags2 = _LB4_SERVICE.unpack(data)
        return cls(backend_id, count, swab16(rev_nat), flags | flags2 << 8)


class Lb4Backend(NamedTuple):
    """struct lb4_backend (v3): where a backend id leads."""

    address: int
    port: int
    proto: int = 0
    flags: int = BackendState.ACTIVE
    cluster_id: int = 0
    SIZE = 12

    def pack(self) -> bytes:
        return _LB4_BACKEND.pack(self.address, self.port, self.proto, self.flags, self.cluster_id)

    @classmethod
    def unpack(cls, data: bytes) -> Lb4Backend:
        return cls(*_LB4_BACKEND.unpack(data))

    def text(self) -> str:
        return f"{addr_text(self.address)}:{self.port}/{PROTO_NAMES.get(self.proto, str(self.proto))}"


def pack_backend_key(backend_id: int) -> bytes:
    return _BACKEND_KEY.pack(backend_id)


def unpack_backend_key(data: bytes) -> int:
    return _BACKEND_KEY.unpack(data)[0]


def pack_revnat_key(rev_nat_index: int) -> bytes:
    return _REVNAT_KEY.pack(rev_nat_index)


def unpack_revnat_key(data: bytes) -> int:
    return _REVNAT_KEY.unpack(data)[0]


class Lb4ReverseNat(NamedTuple):
    """struct lb4_reverse_nat (packed, 6 B): the frontend a reply is rewritten back to."""

    address: int
    port: int
    SIZE = 6

    def pack(self) -> bytes:
        return _LB4_REVNAT.pack(self.address, self.port)

    @classmethod
    def unpack(cls, data: bytes) -> Lb4ReverseNat:
        return cls(*_LB4_REVNAT.unpack(data))


class Lb4AffinityKey(NamedTuple):
    """struct lb4_affinity_key: the client (IP, or netns cookie for socket-LB) and the service."""

    client: int
    rev_nat_id: int
    netns_cookie: bool = False
    SIZE = 16

    def pack(self) -> bytes:
        if self.netns_cookie:
            return _AFFINITY_COOKIE_KEY.pack(self.client, swab16(self.rev_nat_id), 1)
        return _AFFINITY_KEY.pack(self.client, self.rev_nat_id, 0)

    @classmethod
    def unpack(cls, data: bytes) -> Lb4AffinityKey:
        if data[10] & 1:
            cookie, rev_nat, _ = _AFFINITY_COOKIE_KEY.unpack(data)
            return cls(cookie, swab16(rev_nat), True)
        client, rev_nat, _ = _AFFINITY_KEY.unpack(data)
        return cls(client, rev_nat, False)


class LbAffinityVal(NamedTuple):
    """struct lb_affinity_val: when the client last used the entry (monotonic seconds) and where."""

    last_used: int
    backend_id: int
    SIZE = 16

    def pack(self) -> bytes:
        return _AFFINITY_VAL.pack(self.last_used, self.backend_id)

    @classmethod
    def unpack(cls, data: bytes) -> LbAffinityVal:
        return cls(*_AFFINITY_VAL.unpack(data))


def pack_affinity_match(backend_id: int, rev_nat_id: int) -> bytes:
    """struct lb_affinity_match {u32 backend_id; u16 rev_nat_id (be); u16 pad}."""
    return _AFFINITY_MATCH.pack(backend_id, swab16(rev_nat_id))


def pack_source_range(rev_nat_id: int, address: int) -> bytes:
    """The data of struct lb4_src_range_key after its lpm prefixlen (network order for the LPM)."""
    return _SOURCE_RANGE_DATA.pack(rev_nat_id, address)


def pack_reverse_sk_key(cookie: int, address: int, port: int) -> bytes:
    return _REVERSE_SK_KEY.pack(cookie, address.to_bytes(4, "big"), port.to_bytes(2, "big"))


def pack_reverse_sk_value(address: int, port: int, rev_nat_index: int) -> bytes:
    return _REVERSE_SK_VAL.pack(address, port, rev_nat_index)


@dataclass(frozen=True)
class LbMapSizes:
    """max_entries of each map: Cilium's defaults (`--bpf-lb-map-max` and its per-map overrides)."""

    services: int = DEFAULT_LB_MAP_MAX
    backends: int = DEFAULT_LB_MAP_MAX
    reverse_nat: int = DEFAULT_LB_MAP_MAX
    affinity: int = DEFAULT_LB_MAP_MAX
    affinity_match: int = DEFAULT_LB_MAP_MAX
    maglev: int = DEFAULT_LB_MAP_MAX
    source_range: int = DEFAULT_LB_MAP_MAX
    reverse_sk: int = SOCK_REV_NAT_MAP_SIZE


class LbMaps:
    """Every IPv4 LB map of one node, created with its Cilium name, type, sizes and max_entries.

    `lxc` stands in for cilium_lxc (the endpoints map): the addresses of this node's pods, which
    the NodePort path asks to learn whether a backend is local."""

    def __init__(self, sizes: LbMapSizes = LbMapSizes(), maglev_table_size: int = 16381) -> None:
        self.sizes = sizes
        self.services = BpfMap("cilium_lb4_services_v2", MapType.HASH, 12, 12, sizes.services)
        self.backends = BpfMap("cilium_lb4_backends_v3", MapType.HASH, 4, 12, sizes.backends)
        self.reverse_nat = BpfMap("cilium_lb4_reverse_nat", MapType.HASH, 2, 6, sizes.reverse_nat)
        self.affinity = BpfMap("cilium_lb4_affinity", MapType.LRU_HASH, 16, 16, sizes.affinity)
        self.affinity_match = BpfMap("cilium_lb_affinity_match", MapType.HASH, 8, 1, sizes.affinity_match)
        self.maglev = BpfMap("cilium_lb4_maglev", MapType.HASH_OF_MAPS, 2, None, sizes.maglev)
        self.maglev_table_size = maglev_table_size
        self.source_range = LpmTrieMap("cilium_lb4_source_range", 8, sizes.source_range)
        self.reverse_sk = BpfMap("cilium_lb4_reverse_sk", MapType.LRU_HASH, 16, 8, sizes.reverse_sk)
        self.lxc: dict[int, int] = {}     # pod address -> references (see class docstring)

    def all(self) -> tuple:
        return (self.services, self.backends, self.reverse_nat, self.affinity, self.affinity_match,
                self.maglev, self.source_range, self.reverse_sk)

    def control_plane_entries(self) -> int:
        """Entries the agent writes (not the datapath's affinity and reverse_sk entries)."""
        return (len(self.services) + len(self.backends) + len(self.reverse_nat) + len(self.affinity_match)
                + len(self.maglev) + len(self.source_range))
