"""The iptables backend: kube-proxy's rules, loaded into podnet's chain engine and walked per NEW flow.

Layer: core, sans-IO. This is kube-proxy in iptables mode on one node:

- At start, the jumps from the built-in chains (what kube-proxy ensures with `iptables -I`).
- Each `sync` generates kube-proxy's restore payload (full, or partial: only the changed Services'
  chains) and applies it with `iptables-restore --noflush` semantics. The whole payload is applied
  while the datapath waits — the xt_lock of the real node — and the caller measures that wait.
- Each NEW flow walks the tables hook by hook exactly as the first packet of a connection does in
  the kernel (nat PREROUTING or OUTPUT → filter INPUT or FORWARD → nat POSTROUTING), with counters,
  `statistic` draws, and `recent` lists for session affinity. The walk is linear in the rules it
  passes: nothing indexes KUBE-SERVICES, so 10,000 Services cost 10,000 rules, as in the kernel.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from .base import Decision, ProxyServicePort, ServiceBackend, SyncReport, Verdict
from .iptables import EvalContext, Ruleset
from .iptables.trace import decide_first_packet, trace_first_packet
from .kubeproxy import KubeProxyIptables
from .packetinfo import PacketInfo


class IptablesBackend(ServiceBackend):
    name = "iptables"

    def __init__(self, *, cluster_cidr: str = "10.244.0.0/16", node_ips: Iterable[str] = (),
                 local_addresses: Iterable[int] = (), partial_sync: bool = True, seed: int = 0) -> None:
        self.local_addresses = frozenset(local_addresses)
        self.proxy = KubeProxyIptables(cluster_cidr=cluster_cidr, node_ips=tuple(node_ips))
        self.ruleset = Ruleset()
        self.partial_sync = partial_sync
        self.rng = random.Random(seed)
        self.ruleset.restore(self.proxy.jump_rules_restore())
        self.syncs = 0
        self.last_sync = None

    def sync(self, services: Iterable[ProxyServicePort], *, full: bool = True) -> SyncReport:
        services = list(services)
        result = self.proxy.sync(services, full=full or not self.partial_sync)
        try:
            self.ruleset.restore(result.payload, noflush=True)
        except Exception:
            self.proxy.restore_failed()  # kube-proxy then forces a full sync next time
            raise
        self.syncs += 1
        self.last_sync = result
        return SyncReport(full=result.full, services=len(services), objects_written=result.rules_written,
                          objects_total=self.ruleset.rule_count(),
                          detail={"chains_written": len(result.chains_written),
                                  "chains_deleted": len(result.chains_deleted),
                                  "payload_bytes": len(result.payload)})

    def decide(self, pkt: PacketInfo, now: float, *, local_source: bool = False,
               effects: bool = True) -> Decision:
        if effects:
            ctx = EvalContext(now=now, local_addresses=self.local_addresses, rng=self.rng)
            outcome = decide_first_packet(self.ruleset, pkt, ctx)
        else:  # a trace: the same walk on a copy of the generator, changing nothing
            rng = random.Random()
            rng.setstate(self.rng.getstate())
            ctx = EvalContext(now=now, local_addresses=self.local_addresses, rng=rng)
            outcome = trace_first_packet(self.ruleset, pkt, ctx)[0]
        verdict = {"DROP": Verdict.DROP, "REJECT": Verdict.REJECT}.get(outcome.verdict, Verdict.ACCEPT)
        return Decision(verdict=verdict, dnat=outcome.dnat, masquerade=outcome.masquerade,
                        random_fully=outcome.random_fully, reject_with=outcome.reject_with,
                        path=tuple(outcome.path), cost=outcome.rules_examined)

    def dump(self) -> str:
        return self.ruleset.save()

    def statistics(self) -> dict:
        return {"rules": self.ruleset.rule_count(), "syncs": self.syncs}
