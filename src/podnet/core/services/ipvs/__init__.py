"""IPVS as kube-proxy's IPVS mode drives it (core layer, sans-IO).

Modules: hashing (the kernel's hash functions), table (virtual services, real servers,
connections, templates, timeouts, rate estimator), schedulers (rr, wrr, lc, wlc, sed, nq, sh, dh,
mh), proxier (kube-proxy's sync and graceful termination, as diffs), residual (kube-proxy's ipsets
and residual iptables rules), backend (IpvsBackend, the ServiceBackend), ipvsadm (the tool's
listings).
"""

from .backend import IpvsBackend, IpvsDecision
from .schedulers import SCHEDULERS

__all__ = ["SCHEDULERS", "IpvsBackend", "IpvsDecision"]
