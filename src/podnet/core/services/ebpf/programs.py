"""The eBPF backend's programs: tc lb4 on a pod's port, the socket-LB connect hook, XDP on the uplink.

Layer: core, sans-IO. Each program reads the maps the way Cilium's datapath does (bpf/lib/lb.h
lb4_lookup_service / lb4_local / lb4_select_backend_id*, bpf/lib/nodeport.h nodeport_lb4,
bpf/bpf_sock.c __sock4_xlate_fwd, bpf/bpf_xdp.c) and answers with a podnet `Decision`; podnet's
conntrack then pins the NAT and rewrites the packets.

Rules the programs keep
- `Decision.cost` counts BPF map lookups; `Decision.path` names every entry consulted, e.g.
  ("lb4_services_v2[10.96.0.10:80/TCP slot 0]", "lb4_services_v2[10.96.0.10:80/TCP slot 2]",
  "lb4_backends_v3[7]"); for a drop the last element is Cilium's drop reason.
- Lookup order (tc): master entry for (daddr, dport, proto, EXT scope); on a miss for a node
  address in the NodePort range, the 0.0.0.0 surrogate; the INT-scope twin for in-cluster clients
  of a TWO_SCOPES service; the source-range LPM for SOURCE_RANGE services; the CT_SERVICE entry of
  the tuple (an existing one keeps its backend if the backend still exists and the rev_nat_index
  matches); affinity; random slot or Maglev table; the backend.
- ICMP and other non-port protocols are never looked up (lb4_extract_key): no service.
- Outside clients (not from the cluster CIDR, not the node itself) hitting a ClusterIP are
  dropped (DROP_IS_CLUSTER_IP, bpf.lbExternalClusterIP=false); a source outside a
  loadBalancerSourceRanges list is dropped (DENIED_BY_LB_SRC_RANGE_CHECK).
- A frontend with no backend slots answers with `no_backend_response`: "reject" (Cilium's
  default --service-no-backend-response=reject: an ICMP port unreachable from
  tail_no_service_ipv4, even for TCP) or "drop" (DROP_NO_SERVICE).
- SNAT: the packet is masqueraded when the client is its own backend (Cilium SNATs it to
  IPV4_LOOPBACK 169.254.42.1; podnet can only masquerade to the node address) and when an outside
  client reaches a NodePort / LoadBalancer / externalIP whose chosen backend is not on this node
  (nodeport_lb4's SNAT mode). A local backend keeps the client address, whatever the
  externalTrafficPolicy: that is Cilium's behaviour, not kube-proxy's.
- With effects=False (a trace) nothing changes: lookups go through `peek`, the random generator
  is a copy, no CT, affinity or reverse_sk entry is written.
"""

from __future__ import annotations

import enum
import random
import struct
from dataclasses import dataclass

from ..base import Decision, Verdict
from ..packetinfo import PacketInfo
from . import lbmaps as lb
from .ct import CtMap, CtTuple, TUPLE_F_OUT, TUPLE_F_SERVICE
from .lbmaps import LbMaps, SCOPE_EXT, SCOPE_INT, ServiceFlags
from .maglev import tuple_hash
from .maps import LpmTrieMap

__all__ = ["OpenFlow", "ProgramConfig", "Programs", "XdpAction"]

_LB_PROTOS = frozenset({6, 17, 132})
_TCP_SYN, _TCP_ACK = 0x02, 0x10


def _is_syn(pkt: PacketInfo) -> bool:
    """ct_state.syn: a TCP SYN without ACK, the packet that opens (or reopens) a connection."""
    return pkt.proto == 6 and pkt.tcp_flags & (_TCP_SYN | _TCP_ACK) == _TCP_SYN
# the flag bits as plain ints: IntFlag arithmetic costs a microsecond per packet
_EXTERNAL_TYPES = int(ServiceFlags.NODEPORT | ServiceFlags.EXTERNAL_IP | ServiceFlags.LOADBALANCER | ServiceFlags.HOSTPORT)
_F_TWO_SCOPES = int(ServiceFlags.TWO_SCOPES)
_F_AFFINITY = int(ServiceFlags.AFFINITY)
_F_SOURCE_RANGE = int(ServiceFlags.SOURCE_RANGE)
_F_EXTERNAL_IP_OR_HOSTPORT = int(ServiceFlags.EXTERNAL_IP | ServiceFlags.HOSTPORT)
_XDP_HEADER = struct.Struct("!12xH")          # ethertype
_XDP_IPV4 = struct.Struct("!B8xB2xII")        # ver_ihl, protocol, saddr, daddr


class XdpAction(str, enum.Enum):
    ABORTED = "XDP_ABORTED"
    DROP = "XDP_DROP"
    PASS = "XDP_PASS"
    TX = "XDP_TX"
    REDIRECT = "XDP_REDIRECT"


@dataclass(frozen=True)
class ProgramConfig:
    algorithm: str                      # "random" | "maglev"
    jhash_seed: int
    node_addresses: frozenset[int]      # every address of this node (node IPs, gateway)
    cluster_net: int
    cluster_mask: int
    node_port_range: tuple[int, int]
    no_backend_response: str            # "reject" | "drop"


@dataclass
class OpenFlow:
    """What the backend remembers of a decided flow until podnet's conntrack forgets it."""

    decision: Decision
    ct_keys: tuple[CtTuple, ...]
    reverse_sk: bytes | None = None
    socket: tuple[int, int, int] | None = None


class Programs:
    def __init__(self, maps: LbMaps, ct: CtMap, config: ProgramConfig, rng: random.Random,
                 prefilter: LpmTrieMap) -> None:
        self.maps = maps
        self.ct = ct
        self.config = config
        self.rng = rng
        self.prefilter = prefilter
        self.drops: dict[str, int] = {}
        self.xdp_actions: dict[str, int] = {}
        self.sock_xlate = 0
        self._cookies: dict[tuple[int, int, int], int] = {}
        self._next_cookie = 4096

    # ---- helpers --------------------------------------------------------------------------------

    def is_internal(self, src: int, local_source: bool) -> bool:
        """In-cluster: the node itself, or an address of the cluster CIDR."""
        c = self.config
        return local_source or src in c.node_addresses or (src & c.cluster_mask) == c.cluster_net

    def _drop(self, reason: str, path: list[str], cost: int, effects: bool, *, reject: str | None = None) -> Decision:
        if effects:
            self.drops[reason] = self.drops.get(reason, 0) + 1
        verdict = Verdict.REJECT if reject else Verdict.DROP
        return Decision(verdict=verdict, reject_with=reject, path=tuple(path + [reason]), cost=cost)

    def _no_backend(self, path: list[str], cost: int, effects: bool) -> Decision:
        if self.config.no_backend_response == "reject":
            return self._drop("DROP_NO_SERVICE", path, cost, effects, reject="icmp-port-unreachable")
        return self._drop("DROP_NO_SERVICE", path, cost, effects)

    def _lookup_frontend(self, pkt: PacketInfo, get, scope_switch: bool, path: list[str]):
        """lb4_lookup_service with the surrogate retry: (Lb4Service, address, scope, lookups) or
        (None, ..., lookups)."""
        c = self.config
        cost = 1
        address = pkt.dst
        raw = get(lb.pack_lb4_key(address, pkt.dport, 0, pkt.proto, SCOPE_EXT))
        if raw is None and pkt.dst in c.node_addresses and c.node_port_range[0] <= pkt.dport <= c.node_port_range[1]:
            address, cost = 0, cost + 1
            raw = get(lb.pack_lb4_key(0, pkt.dport, 0, pkt.proto, SCOPE_EXT))
        if raw is None:
            path.append(f"lb4_services_v2[{lb.Lb4Key(pkt.dst, pkt.dport, 0, pkt.proto).frontend_text()}"
                        f" slot 0]: miss")
            return None, address, SCOPE_EXT, cost
        svc = lb.Lb4Service.unpack(raw)
        scope = SCOPE_EXT
        if scope_switch and svc.flags & _F_TWO_SCOPES:
            cost += 1
            raw_int = get(lb.pack_lb4_key(address, pkt.dport, 0, pkt.proto, SCOPE_INT))
            if raw_int is not None:
                svc, scope = lb.Lb4Service.unpack(raw_int), SCOPE_INT
        path.append(f"lb4_services_v2[{lb.Lb4Key(address, pkt.dport, 0, pkt.proto, scope).frontend_text()} slot 0]")
        return svc, address, scope, cost

    def _affinity(self, key: bytes, svc: lb.Lb4Service, now: float, effects: bool, path: list[str]) -> tuple[int, int]:
        """__lb4_affinity_backend_id: (backend_id or 0, lookups)."""
        m = self.maps.affinity
        raw = m.lookup(key) if effects else m.peek(key)
        if raw is None:
            return 0, 1
        val = lb.LbAffinityVal.unpack(raw)
        if val.last_used + svc.affinity_timeout <= int(now):
            if effects:
                m.delete(key)
            path.append("lb4_affinity: expired")
            return 0, 1
        match = lb.pack_affinity_match(val.backend_id, svc.rev_nat_index)
        found = self.maps.affinity_match.lookup(match) if effects else self.maps.affinity_match.peek(match)
        if found is None:
            if effects:
                m.delete(key)
            path.append("lb_affinity_match: stale")
            return 0, 2
        if effects:
            m.update(key, lb.LbAffinityVal(int(now), val.backend_id).pack())
        path.append(f"lb4_affinity[{val.backend_id}]")
        return val.backend_id, 2

    def _select(self, pkt: PacketInfo, svc: lb.Lb4Service, address: int, scope: int, effects: bool,
                path: list[str]) -> tuple[int, int]:
        """lb4_select_backend_id: (backend_id or 0, lookups)."""
        if self.config.algorithm == "maglev":
            key = lb.pack_revnat_key(svc.rev_nat_index)
            table = self.maps.maglev.lookup(key) if effects else self.maps.maglev.peek(key)
            if table is None or not len(table):
                return 0, 1
            sport = 0 if svc.flags & _F_AFFINITY else pkt.sport
            index = tuple_hash(pkt.src, sport, pkt.dport, pkt.proto, self.config.jhash_seed) % len(table)
            path.append(f"lb4_maglev[{svc.rev_nat_index}][{index}]")
            return table[index], 1
        slot = self._rng(effects).getrandbits(32) % svc.count + 1
        key = lb.pack_lb4_key(address, pkt.dport, slot, pkt.proto, scope)
        raw = self.maps.services.lookup(key) if effects else self.maps.services.peek(key)
        path.append(f"lb4_services_v2[{lb.Lb4Key(address, pkt.dport, slot, pkt.proto, scope).frontend_text()}"
                    f" slot {slot}]")
        return (lb.Lb4Service.unpack(raw).backend_id if raw is not None else 0), 1

    def _rng(self, effects: bool) -> random.Random:
        if effects:
            return self.rng
        copy = random.Random()
        copy.setstate(self.rng.getstate())
        return copy

    # ---- tc: the per-packet service lookup at the pod's (or uplink's) port -------------------------

    def tc_lb4(self, pkt: PacketInfo, now: float, local_source: bool, effects: bool) -> tuple[Decision, OpenFlow | None]:
        if pkt.proto not in _LB_PROTOS:
            return Decision(), None
        maps = self.maps
        get = maps.services.lookup if effects else maps.services.peek
        internal = self.is_internal(pkt.src, local_source)
        path: list[str] = []
        svc, address, scope, cost = self._lookup_frontend(pkt, get, internal, path)
        if svc is None:
            return Decision(path=tuple(path), cost=cost), None
        flags = svc.flags
        if not internal and not flags & _EXTERNAL_TYPES:
            return self._drop("DROP_IS_CLUSTER_IP", path, cost, effects), None
        if flags & _F_SOURCE_RANGE:
            cost += 1
            data = lb.pack_source_range(svc.rev_nat_index, pkt.src)
            hit = maps.source_range.lookup(data) if effects else maps.source_range.peek(data)
            if hit is None or hit[0] < 32:
                return self._drop("DENIED_BY_LB_SRC_RANGE_CHECK", path + ["lb4_source_range: miss"], cost,
                                  effects), None
        if svc.count == 0:
            return self._no_backend(path, cost, effects), None
        backend_id = 0
        svc_tuple = CtTuple.of_flow(pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.proto, TUPLE_F_SERVICE)
        cost += 1
        entry = self.ct.lookup(svc_tuple, now, count=effects)
        backend = None
        reused = reselect = False
        if entry is not None and entry.rev_nat_index == svc.rev_nat_index:
            cost += 1
            raw = maps.backends.lookup(lb.pack_backend_key(entry.backend_id)) if effects \
                else maps.backends.peek(lb.pack_backend_key(entry.backend_id))
            if raw is not None:
                found = lb.Lb4Backend.unpack(raw)
                if found.flags == lb.BackendState.ACTIVE or not _is_syn(pkt):
                    backend_id, backend, reused = entry.backend_id, found, True
                    path.append(f"ct4_global[{svc_tuple.describe().strip()}]: backend {backend_id}")
                else:
                    # lb4_local drains a backend that is no longer active (terminating, quarantined)
                    # of the connections it has, but a SYN reopening its tuple goes to an active one
                    reselect = True
                    path.append(f"ct4_global[{svc_tuple.describe().strip()}]: backend {entry.backend_id} "
                                f"{lb.BackendState(found.flags).name.lower()}, SYN: select again")
        affinity_key = None
        if backend is None:
            if flags & _F_AFFINITY and not reselect:
                affinity_key = lb.Lb4AffinityKey(pkt.src, svc.rev_nat_index).pack()
                backend_id, n = self._affinity(affinity_key, svc, now, effects, path)
                cost += n
            from_affinity = bool(backend_id)
            if not backend_id:
                backend_id, n = self._select(pkt, svc, address, scope, effects, path)
                cost += n
            cost += 1
            raw = maps.backends.lookup(lb.pack_backend_key(backend_id)) if effects \
                else maps.backends.peek(lb.pack_backend_key(backend_id))
            if raw is None:
                return self._drop("DROP_NO_SERVICE", path + [f"lb4_backends_v3[{backend_id}]: miss"], cost,
                                  effects), None
            backend = lb.Lb4Backend.unpack(raw)
            path.append(f"lb4_backends_v3[{backend_id}]")
            if affinity_key is not None and effects and not from_affinity:
                maps.affinity.update(affinity_key, lb.LbAffinityVal(int(now), backend_id).pack())
        loopback = pkt.src == backend.address
        masquerade = loopback
        if loopback:
            path.append("loopback: Cilium SNATs to 169.254.42.1, podnet masquerades")
        elif not internal:
            cost += 1                       # the endpoints map: is the backend on this node?
            if backend.address not in maps.lxc:
                masquerade = True
                path.append("nodeport SNAT: backend not on this node")
        dport = backend.port or pkt.dport
        decision = Decision(dnat=(backend.address, dport), masquerade=masquerade, path=tuple(path), cost=cost)
        if not effects:
            return decision, None
        out_tuple = CtTuple.of_flow(pkt.src, pkt.sport, backend.address, dport, pkt.proto, TUPLE_F_OUT)
        if reused:
            self.ct.refresh(svc_tuple, now, tcp_flags=pkt.tcp_flags)
        else:
            self.ct.create(svc_tuple, now, tcp_flags=pkt.tcp_flags, rev_nat_index=svc.rev_nat_index,
                           backend_id=backend_id)
        self.ct.create(out_tuple, now, tcp_flags=pkt.tcp_flags, rev_nat_index=svc.rev_nat_index,
                       length=pkt.length, node_port=not internal, loopback=loopback)
        return decision, OpenFlow(decision, (svc_tuple, out_tuple))

    # ---- socket-LB: cgroup/connect4 (and sendmsg4 for unconnected UDP) ---------------------------

    def sock4_connect(self, pkt: PacketInfo, now: float, local_source: bool,
                      effects: bool) -> tuple[Decision, OpenFlow | None]:
        if pkt.proto not in (6, 17):
            return Decision(), None
        maps = self.maps
        get = maps.services.lookup if effects else maps.services.peek
        path = [f"cgroup/connect4: pre-xlate-fwd {lb.addr_text(pkt.dst)}:{pkt.dport}"]
        svc, address, scope, cost = self._lookup_frontend(pkt, get, True, path)
        if svc is None:
            return Decision(path=tuple(path), cost=cost), None
        flags = svc.flags
        if flags & _F_EXTERNAL_IP_OR_HOSTPORT and pkt.dst not in self.config.node_addresses:
            path.append("skip: not a local address (CVE-2020-8554 mitigation), connect proceeds untranslated")
            return Decision(path=tuple(path), cost=cost), None
        if svc.count == 0:
            # connect() fails with EHOSTUNREACH (SYS_REJECT): an ICMP host unreachable gets the pod there
            return self._drop("EHOSTUNREACH", path, cost, effects, reject="icmp-host-unreachable"), None
        socket_id = (pkt.src, pkt.sport, pkt.proto)
        cookie = self._cookies.get(socket_id, self._next_cookie)   # podnet's stand-in for the socket cookie
        backend_id = 0
        affinity_key = None
        if flags & _F_AFFINITY:
            netns = 1 if local_source else pkt.src      # podnet's stand-in for the netns cookie
            affinity_key = lb.Lb4AffinityKey(netns, svc.rev_nat_index, True).pack()
            backend_id, n = self._affinity(affinity_key, svc, now, effects, path)
            cost += n
        from_affinity = bool(backend_id)
        if not backend_id:
            # sock_select_slot: TCP takes a random slot, UDP the socket cookie's
            pick = self._rng(effects).getrandbits(32) if pkt.proto == 6 else cookie
            slot = pick % svc.count + 1
            cost += 1
            raw = get(lb.pack_lb4_key(address, pkt.dport, slot, pkt.proto, scope))
            path.append(f"lb4_services_v2[{lb.Lb4Key(address, pkt.dport, slot, pkt.proto, scope).frontend_text()}"
                        f" slot {slot}]")
            backend_id = lb.Lb4Service.unpack(raw).backend_id if raw is not None else 0
        cost += 1
        raw = maps.backends.lookup(lb.pack_backend_key(backend_id)) if effects \
            else maps.backends.peek(lb.pack_backend_key(backend_id))
        if raw is None:
            return self._drop("EHOSTUNREACH", path + [f"lb4_backends_v3[{backend_id}]: miss"], cost, effects,
                              reject="icmp-host-unreachable"), None
        backend = lb.Lb4Backend.unpack(raw)
        dport = backend.port or pkt.dport
        path += [f"lb4_backends_v3[{backend_id}]", f"post-xlate-fwd {lb.addr_text(backend.address)}:{dport}",
                 f"lb4_reverse_sk[cookie {cookie}]"]
        loopback = pkt.src == backend.address
        decision = Decision(dnat=(backend.address, dport), masquerade=loopback, path=tuple(path), cost=cost)
        if not effects:
            return decision, None
        self.sock_xlate += 1
        if socket_id not in self._cookies:
            self._cookies[socket_id] = cookie
            self._next_cookie += 1
        if affinity_key is not None and not from_affinity:
            maps.affinity.update(affinity_key, lb.LbAffinityVal(int(now), backend_id).pack())
        sk_key = lb.pack_reverse_sk_key(cookie, backend.address, dport)
        maps.reverse_sk.update(sk_key, lb.pack_reverse_sk_value(pkt.dst, pkt.dport, svc.rev_nat_index))
        return decision, OpenFlow(decision, (), sk_key, socket_id)

    def sock_release(self, flow: OpenFlow) -> None:
        """cgroup/sock_release: the socket's reverse_sk entry and its cookie go."""
        if flow.reverse_sk is not None:
            self.maps.reverse_sk.delete(flow.reverse_sk)
        if flow.socket is not None:
            self._cookies.pop(flow.socket, None)

    # ---- XDP on the uplink ------------------------------------------------------------------------

    def xdp(self, frame) -> XdpAction:
        """The XDP program on the uplink, on the raw frame: the CIDR prefilter, then the LB
        source-range check. Everything else passes to tc and the stack (see backend.py)."""
        action = self._xdp(frame)
        self.xdp_actions[action.value] = self.xdp_actions.get(action.value, 0) + 1
        return action

    def _xdp(self, frame) -> XdpAction:
        if len(frame) < 34 or _XDP_HEADER.unpack_from(frame)[0] != 0x0800:
            return XdpAction.PASS
        ver_ihl, proto, saddr, daddr = _XDP_IPV4.unpack_from(frame, 14)
        if ver_ihl >> 4 != 4:
            return XdpAction.PASS
        if len(self.prefilter) and self.prefilter.lookup(saddr.to_bytes(4, "big")) is not None:
            self.drops["PREFILTER"] = self.drops.get("PREFILTER", 0) + 1
            return XdpAction.DROP
        ihl = (ver_ihl & 0x0F) * 4
        if proto not in _LB_PROTOS or len(frame) < 14 + ihl + 4:
            return XdpAction.PASS
        dport = int.from_bytes(frame[14 + ihl + 2:14 + ihl + 4], "big")
        raw = self.maps.services.lookup(lb.pack_lb4_key(daddr, dport, 0, proto, SCOPE_EXT))
        if raw is None:
            return XdpAction.PASS
        svc = lb.Lb4Service.unpack(raw)
        if svc.flags & _F_SOURCE_RANGE:
            hit = self.maps.source_range.lookup(lb.pack_source_range(svc.rev_nat_index, saddr))
            if hit is None:
                self.drops["DENIED_BY_LB_SRC_RANGE_CHECK"] = self.drops.get("DENIED_BY_LB_SRC_RANGE_CHECK", 0) + 1
                return XdpAction.DROP
        return XdpAction.PASS
