"""The eBPF backend: Cilium's kube-proxy replacement reproduced with BPF-map-style tables.

maps (BPF hash/LRU/LPM maps with max_entries), lbmaps (Cilium's lb4 layouts), maglev, ct (Cilium's
conntrack and GC), agent (Services to map entries), programs (tc, socket-LB, XDP), backend
(`EbpfBackend`), cli (Cilium's listings). See backend.py for what the analogue can and cannot do.
"""

from .backend import EbpfBackend

__all__ = ["EbpfBackend"]
