"""The Service backends by name: an explicit dict, filled here and nowhere else."""

from __future__ import annotations

from podnet.errors import ConfigError

from .base import ServiceBackend
from .ebpf import EbpfBackend
from .iptables_backend import IptablesBackend
from .ipvs import IpvsBackend

BACKENDS: dict[str, type[ServiceBackend]] = {
    "iptables": IptablesBackend,
    "ipvs": IpvsBackend,
    "ebpf": EbpfBackend,
}


def backend_class(name: str) -> type[ServiceBackend]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(f"backend {name!r}: unknown (choose from {', '.join(sorted(BACKENDS))})") from None
