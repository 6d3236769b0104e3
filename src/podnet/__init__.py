"""podnet: Kubernetes pod networking reproduced on real Ethernet frames by a Python datapath.

    import podnet
    with podnet.run_lab(["pods.yaml"]) as lab:              # or: async with podnet.open_lab(...)
        print(lab.exec("client", ["curl", "-s", "http://10.244.0.3:8080/"]).stdout)

The layers, imported one way (core <- runtime <- linux <- lab): `podnet.core` is sans-IO (frames in,
actions out), `podnet.runtime` serves it with trio, `podnet.linux` makes namespaces and TAPs,
`podnet.cluster` reads Kubernetes manifests, and `podnet.lab` puts them together.
"""

import importlib

# The names below load their modules on first use (PEP 562): `import podnet` alone stays cheap, so
# the CLI's client commands (`podnet status`, `podnet stats`, ...) do not pay for pyroute2 and the
# whole lab on every call.
_LAZY = {
    "load_manifests": "podnet.cluster.manifest", "parse_manifests": "podnet.cluster.manifest",
    "Manifests": "podnet.cluster.model",
    "Datapath": "podnet.core.datapath", "Drop": "podnet.core.datapath", "NodeMode": "podnet.core.datapath",
    "PortKind": "podnet.core.datapath", "Transmit": "podnet.core.datapath",
    "ConfigError": "podnet.errors", "IPAMExhausted": "podnet.errors", "PodnetError": "podnet.errors",
    "Lab": "podnet.lab", "LabConfig": "podnet.lab", "open_lab": "podnet.lab", "run_lab": "podnet.lab",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'podnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
