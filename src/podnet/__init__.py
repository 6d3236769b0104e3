"""podnet: Kubernetes pod networking reproduced on real Ethernet frames by a Python datapath.

    import podnet
    with podnet.run_lab(["pods.yaml"]) as lab:              # or: async with podnet.open_lab(...)
        print(lab.exec("client", ["curl", "-s", "http://10.244.0.3:8080/"]).stdout)

The layers, imported one way (core <- runtime <- linux <- lab): `podnet.core` is sans-IO (frames in,
actions out), `podnet.runtime` serves it with trio, `podnet.linux` makes namespaces and TAPs,
`podnet.cluster` reads Kubernetes manifests, and `podnet.lab` puts them together.
"""

from podnet.cluster.manifest import load_manifests, parse_manifests
from podnet.cluster.model import Manifests
from podnet.core.datapath import Datapath, Drop, NodeMode, PortKind, Transmit
from podnet.errors import ConfigError, IPAMExhausted, PodnetError
from podnet.lab import Lab, LabConfig, open_lab, run_lab

__all__ = [
    "ConfigError", "Datapath", "Drop", "IPAMExhausted", "Lab", "LabConfig", "Manifests", "NodeMode",
    "PodnetError", "PortKind", "Transmit", "load_manifests", "open_lab", "parse_manifests", "run_lab",
]
