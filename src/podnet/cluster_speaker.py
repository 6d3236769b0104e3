"""MetalLB's L2 speaker on a cluster node: only the elected node answers ARP for a LoadBalancer IP.

Layer: lab. A node's Lab programs its Service backend for every LoadBalancer IP and externalIP and
lists them all as addresses its uplink answers ARP for (lab.py: one node with MetalLB's L2 mode
answers for all of them). On a cluster's shared underlay that would be every node answering, and
the client sending to whichever reply came last. `Announcer` takes the place of the datapath's
`uplink_arp`: the Lab still sets every address it serves, and it answers only for those this node
wins in MetalLB's election (podnet.cluster.lb_election) and for those no Service claims (the node's
own address). The election runs again at each of the Lab's syncs, with the Services and
EndpointSlices the sync programmed, and whenever the speakers change.

    L2Speaker.run   watches the registered Nodes in the store (each node runs a speaker, as
                    MetalLB's DaemonSet does): a node that registers or leaves elects again
    an IP won       gratuitous ARP on the uplink, a request and a reply, at once and every 1.1 s
                    for 5 s (MetalLB's announcer spams so), so a client's neighbour entry moves to
                    this node without waiting for it to go stale

Invariants:
- Until the speaker has listed the Nodes, the node answers for no address a Service claims
  (MetalLB's speaker announces nothing before it knows its peers).
- An address is answered only while the Lab's last sync serves it and this node wins it: a node
  never answers for an IP its backend has not been programmed with.
- Everything here runs in the node's trio thread, the datapath's: the Lab's syncs, ARP and the
  gratuitous frames, which go out through the serve loop's uplink port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio

from podnet.cluster.lb_election import announcements, speakers
from podnet.cluster.service import EndpointSlice, Service
from podnet.core import packet as pk
from podnet.core.l2 import ProxyArp
from podnet.errors import ConfigError
from podnet.store import Store
from podnet.store.informer import Reflector
from podnet.store.objects import decode, kind_prefix

if TYPE_CHECKING:
    from podnet.cluster_node import ClusterNode

log = logging.getLogger(__name__)

GARP_INTERVAL_S = 1.1      # MetalLB's spam ticker (metallb issue #172 for the 1100)
GARP_DURATION_S = 5.0      # how long after winning it keeps sending them


def gratuitous_arp(mac: bytes, ip: int) -> list[bytes]:
    """MetalLB's Gratuitous: a broadcast ARP request and reply, both saying `ip` is at `mac`."""
    announce = pk.ArpInfo(1, pk.BROADCAST_MAC, ip, b"\x00" * 6, ip)
    return [pk.build_arp_request(mac, ip, ip), pk.build_arp_reply(mac, ip, announce)]


class Announcer(ProxyArp):
    """The datapath's `uplink_arp` on a cluster node (see the module). `view()` gives the Services
    and EndpointSlices the Lab serves now; `on_won(ips)` hears of the addresses newly answered."""

    def __init__(self, arp: ProxyArp, node: str, view: Callable[[], tuple[Iterable[Service], Iterable[EndpointSlice]]],
                 on_won: Callable[[frozenset[int]], None] | None = None) -> None:
        self.node = node
        self.speakers: frozenset[str] | None = None   # None: not listed yet, nothing claimed is answered
        self.owners: dict[str, str | None] = {}         # the last election: IP -> its node (or nobody)
        self._view = view
        self._on_won = on_won
        self._wanted: frozenset[int] = frozenset()
        self._answered: frozenset[int] = frozenset()
        super().__init__(arp.mac, arp.addresses)

    @property
    def addresses(self) -> frozenset[int]:
        return self._answered

    @addresses.setter
    def addresses(self, wanted: Iterable[int]) -> None:
        """What the Lab serves (its own address, the LoadBalancer and external IPs): elect again."""
        self._wanted = frozenset(wanted)
        self.elect()

    def set_speakers(self, names: Iterable[str]) -> None:
        self.speakers = frozenset(names)
        self.elect()

    def elect(self) -> frozenset[int]:
        """Run the election on the current view; the addresses answered from now on."""
        services, slices = self._view()
        result = announcements(services, slices, self.speakers or ())
        self.owners = result.owners
        claimed = {pk.ip_int(ip) for ip in result.owners}
        won = {pk.ip_int(ip) for ip in result.of(self.node)} if self.speakers is not None else set()
        answered = frozenset(a for a in self._wanted if a not in claimed or a in won)
        new = frozenset(a for a in answered - self._answered if a in claimed)
        gone = frozenset(a for a in self._answered - answered if a in claimed)
        self._answered = answered
        if new or gone:
            log.info("node %s: answers ARP for %s%s", self.node, ", ".join(sorted(pk.ip_str(a) for a in new)) or "-",
                     f"; no longer for {', '.join(sorted(pk.ip_str(a) for a in gone))}" if gone else "")
        if new and self._on_won is not None:
            self._on_won(new)
        return answered


class L2Speaker:
    """One node's speaker: installs its `Announcer` on the node's datapath at once (so nothing is
    answered before the election), then `run` follows the speakers in the store."""

    def __init__(self, store: Store, node: ClusterNode) -> None:
        self.store = store
        self.node = node
        lab = node.lab
        self.announcer = Announcer(lab.datapath.uplink_arp, node.name,
                                   lambda: (lab.manifests.services, getattr(lab, "cluster_slices", ())),
                                   self._won)
        lab.datapath.uplink_arp = self.announcer
        self.garps_sent = 0
        self._spamming: dict[int, float] = {}   # IP -> until when gratuitous ARPs go out
        self._spam_wanted = trio.Event()

    def _won(self, ips: frozenset[int]) -> None:
        now = trio.current_time()
        for ip in ips:
            fresh = ip not in self._spamming
            self._spamming[ip] = now + GARP_DURATION_S
            if fresh:
                self._send_garp(ip)   # at once, not at the next tick
        self._spam_wanted.set()

    def _send_garp(self, ip: int) -> None:
        internode, port_id = self.node.lab.datapath.internode, self.node.uplink_port
        port = self.node.lab.node.ports.get(port_id) if port_id is not None else None
        if internode is None or port is None:   # the uplink is not attached yet: ARP requests will find the owner
            return
        for frame in gratuitous_arp(internode.mac, ip):   # from the uplink's MAC, as ARP replies go
            port.send(frame, None)
            self.garps_sent += 1

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        reflector = Reflector(self.store, kind_prefix("Node"))
        await trio.to_thread.run_sync(reflector.relist)
        self._set_speakers(reflector)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._spam)
            task_status.started()
            async for _ in reflector.aevents():   # a Node registered, left or changed
                self._set_speakers(reflector)

    def _set_speakers(self, reflector: Reflector) -> None:
        nodes = []
        for kv in reflector.cache.values():
            try:
                nodes.append(decode(kv).obj)
            except ConfigError as exc:   # one bad Node object must not stop the speaker
                log.warning("node %s: speaker: %s skipped: %s", self.node.name, kv.key, exc)
        names = speakers(nodes)
        if names != self.announcer.speakers:
            self.announcer.set_speakers(names)

    async def _spam(self) -> None:
        while True:
            if not self._spamming:
                await self._spam_wanted.wait()
                self._spam_wanted = trio.Event()
                continue
            await trio.sleep(GARP_INTERVAL_S)
            now = trio.current_time()
            for ip, until in list(self._spamming.items()):
                if now > until or ip not in self.announcer.addresses:
                    del self._spamming[ip]   # spammed enough, or lost it meanwhile
                else:
                    self._send_garp(ip)


__all__ = ["Announcer", "GARP_DURATION_S", "GARP_INTERVAL_S", "L2Speaker", "gratuitous_arp"]
