"""The flow cache's layout: what a cached flow's key and entry hold, and which flows it takes.

Layer: core, sans-IO; constants and one predicate. The cache itself is a dict on the Datapath
(`_flows`), filled by the slow path and probed by `Datapath.forward_fast` and, for VXLAN flows, by
`Internode.quick` (core/internode); both read entries through the names here, so the layout is
written down once. (The struct the fast path reads a frame with stays in core/datapath, beside
forward_fast: see the note there.)

    key     (in_port, proto, src, dst, sport << 16 | dport), plus the tunnel port as a sixth
            element for a VXLAN flow, so forward_fast (which builds 5-element keys) never finds it
    entry   a list, for speed, indexed by the constants below: out port, the new Ethernet
            dst + src, packets, bytes, last seen, the conntrack entry, the direction of the flow
            this key is, the NAT binding (or None), the MAC frames of the flow arrive addressed to,
            and for flows to another node the next hop's underlay address (whose neighbour entry
            the cached MAC came from) and the VXLAN peer

Invariants (kept by core/datapath and core/internode):
- only what the slow path forwarded is cached, and only what `_cacheable` accepts; the cache is
  flushed whenever ports or routes change, and an entry goes with its conntrack entry or its
  neighbour, so it never answers differently from the slow path;
- an entry's packet and byte counts are folded into the datapath's totals when it goes, so the
  fast path pays for one counter update, not five;
- entries are dropped after `flow_idle_timeout_s` without a packet, checked every
  _FLOW_SWEEP_INTERVAL_S while the cache is not empty.
"""

from __future__ import annotations

from . import packet as pk

_FLOW_SWEEP_INTERVAL_S = 1.0

# the entry's fields, in the order the docstring gives them
_OUT, _ETH, _PKTS, _BYTES, _SEEN, _CT, _DIR, _NAT, _INMAC, _VIA, _PEER = range(11)


def _cacheable(info: pk.IPv4Info) -> bool:
    """What the fast path can take: TCP or UDP, no IP options, not a fragment."""
    return info.ihl == 20 and not info.is_fragment and info.proto in (pk.IPPROTO_TCP, pk.IPPROTO_UDP)
