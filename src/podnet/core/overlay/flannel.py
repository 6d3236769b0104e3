"""Flannel's vxlan backend as data: leases, and what flanneld programs on a node because of them.

Layer: core, sans-IO (no etcd, no netlink: the caller moves the JSON and applies the entries).

A Flannel node holds a lease on a /24 of the cluster network (etcd mode: key
`/coreos.com/network/subnets/10.244.1.0-24`; kube mode: the Node's podCIDR and annotations), whose
value says how to reach it (flannel-io/flannel pkg/subnet LeaseAttrs, pkg/backend/vxlan):

    {"PublicIP":"192.0.2.2","PublicIPv6":null,"BackendType":"vxlan",
     "BackendData":{"VNI":1,"VtepMAC":"0a:58:c0:00:02:02"}}

podnet adds one key of its own to BackendData, only when true: `"PodnetTunnelGSO":true`, the
node's uplink takes whole VXLAN super-frames (GSO over UDP tunnels on its TAP, linux/tap.py), so
its peers may send it one outer frame per TCP super-frame instead of MTU-sized segments. flanneld
and kernel nodes never write it (they are sent segments, as before) and ignore it when reading.

Its VXLAN device `flannel.<VNI>` (MTU = uplink - 50, `nolearning`, address = the lease's network
address as a /32) reaches every other node through three entries per remote lease, which flanneld
adds in this order when the lease appears and removes when it goes (vxlan_network.go,
handleSubnetEvents; no L2/L3-miss callbacks since flannel 0.9):

    ip neigh replace 10.244.2.0 lladdr <VtepMAC> dev flannel.1 nud permanent       (AddARP)
    bridge fdb replace <VtepMAC> dev flannel.1 dst <PublicIP> self permanent         (AddFDB)
    ip route replace 10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink               (last: the
                                                          kernel would ARP for .0 before the entry)

So a packet to 10.244.2.7 is routed to next hop 10.244.2.0 on flannel.1, whose permanent neighbour
entry gives the remote VTEP MAC as inner destination, whose FDB entry gives the remote node's
public IP as outer destination. `FlannelNode.resolve` walks that chain; `show_*` render what `ip
route show`, `ip neigh show` and `bridge fdb show` print for the device, so a test compares them
with the kernel's own output.

Invariants:
- One remote lease per subnet; a new lease for a subnet replaces the old (flanneld's *Replace).
- The node's own lease is never programmed as a remote (WatchLeases skips it).
- Leases of another BackendType are ignored, as flanneld ignores them (with a warning).
- DirectRouting and IPv6 (flannel-v6.<VNI>) are not modelled.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from ...errors import ConfigError
from .. import packet as pk
from .mtu import tunnel_mtu

DEFAULT_ETCD_PREFIX = "/coreos.com/network"
ANNOTATION_PREFIX = "flannel.alpha.coreos.com/"
BACKEND_TYPE = "vxlan"
TUNNEL_GSO_KEY = "PodnetTunnelGSO"   # podnet's own BackendData key (see the module)


def device_name(vni: int = 1) -> str:
    """flanneld's name for the VXLAN device of `vni`."""
    return f"flannel.{vni}"


@dataclass(frozen=True, slots=True)
class Lease:
    """One node's lease: its subnet, its public (underlay) IP and its VTEP MAC.

    Fields are normalised strings as flanneld writes them (MACs in lower case).
    """

    subnet: str
    public_ip: str
    vtep_mac: str
    vni: int = 1
    backend_type: str = BACKEND_TYPE
    tunnel_gso: bool = False   # the node takes whole VXLAN super-frames (TUNNEL_GSO_KEY)

    def __post_init__(self) -> None:
        try:
            net = ipaddress.IPv4Network(self.subnet, strict=True)
        except ValueError as exc:
            raise ConfigError(f"flannel lease subnet {self.subnet!r}: {exc}") from None
        try:
            public = ipaddress.IPv4Address(self.public_ip)
        except ValueError as exc:
            raise ConfigError(f"flannel lease {net} PublicIP {self.public_ip!r}: {exc}") from None
        try:
            if not isinstance(self.vtep_mac, str | bytes):   # a lease's JSON may hold anything
                raise ValueError("not a string")
            mac = pk.mac_str(pk.mac_bytes(self.vtep_mac))
        except ValueError as exc:
            raise ConfigError(f"flannel lease {net} VtepMAC {self.vtep_mac!r}: {exc}") from None
        if type(self.vni) is not int or not 0 <= self.vni < 1 << 24:   # bool is an int, JSON's true is not
            raise ConfigError(f"flannel lease {net} VNI {self.vni!r}: a VNI is 24 bits")
        object.__setattr__(self, "subnet", str(net))
        object.__setattr__(self, "public_ip", str(public))
        object.__setattr__(self, "vtep_mac", mac)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> str:
        """The subnet's network address: the remote's flannel.1 address and every route's next hop."""
        return str(self.network.network_address)

    # ---- etcd (pkg/subnet/etcd) --------------------------------------------------------------

    @property
    def subnet_key(self) -> str:
        """MakeSubnetKey: `10.244.1.0-24`."""
        return self.subnet.replace("/", "-")

    def etcd_key(self, prefix: str = DEFAULT_ETCD_PREFIX) -> str:
        return f"{prefix}/subnets/{self.subnet_key}"

    def backend_data(self) -> dict:
        data = {"VNI": self.vni, "VtepMAC": self.vtep_mac}
        if self.tunnel_gso:
            data[TUNNEL_GSO_KEY] = True
        return data

    def attrs(self) -> dict:
        """LeaseAttrs as flanneld marshals it (field order and the explicit null included)."""
        return {"PublicIP": self.public_ip, "PublicIPv6": None, "BackendType": self.backend_type,
                "BackendData": self.backend_data()}

    def to_etcd(self, prefix: str = DEFAULT_ETCD_PREFIX) -> tuple[str, str]:
        """The key and the value (Go's compact JSON) flanneld writes for this lease."""
        return self.etcd_key(prefix), json.dumps(self.attrs(), separators=(",", ":"))

    @classmethod
    def from_etcd(cls, key: str, value: str | bytes | dict) -> Lease:
        """Read a lease back from its etcd key and value; ConfigError names what is wrong."""
        name = key.rsplit("/", 1)[-1]
        subnet = name.split("&", 1)[0]  # dual stack appends &<v6 subnet>
        if subnet.count("-") != 1:
            raise ConfigError(f"flannel lease key {key!r}: expected <network>-<prefixlen>")
        subnet = subnet.replace("-", "/")
        try:
            attrs = value if isinstance(value, dict) else json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"flannel lease {key!r}: value is not JSON ({exc})") from None
        return cls._from_attrs(subnet, attrs, f"flannel lease {key!r}")

    # ---- kube subnet manager (pkg/subnet/kube) ------------------------------------------------

    def annotations(self) -> dict[str, str]:
        """The Node annotations flanneld sets in kube mode (the subnet is the Node's podCIDR)."""
        return {
            ANNOTATION_PREFIX + "backend-data": json.dumps(self.backend_data(), separators=(",", ":")),
            ANNOTATION_PREFIX + "backend-type": self.backend_type,
            ANNOTATION_PREFIX + "kube-subnet-manager": "true",
            ANNOTATION_PREFIX + "public-ip": self.public_ip,
        }

    @classmethod
    def from_node(cls, pod_cidr: str, annotations: dict[str, str]) -> Lease:
        what = f"flannel annotations of the node with podCIDR {pod_cidr!r}"
        try:
            data = json.loads(annotations[ANNOTATION_PREFIX + "backend-data"])
            attrs = {"PublicIP": annotations[ANNOTATION_PREFIX + "public-ip"],
                     "BackendType": annotations[ANNOTATION_PREFIX + "backend-type"], "BackendData": data}
        except KeyError as exc:
            raise ConfigError(f"{what}: missing {exc.args[0]}") from None
        except ValueError as exc:
            raise ConfigError(f"{what}: backend-data is not JSON ({exc})") from None
        return cls._from_attrs(pod_cidr, attrs, what)

    @classmethod
    def _from_attrs(cls, subnet: str, attrs: dict, what: str) -> Lease:
        if not isinstance(attrs, dict):
            raise ConfigError(f"{what}: expected a JSON object")
        data = attrs.get("BackendData") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{what}: BackendData is not an object")
        for field, value in (("PublicIP", attrs.get("PublicIP")), ("BackendData.VtepMAC", data.get("VtepMAC"))):
            if not isinstance(value, str):
                raise ConfigError(f"{what}: {field} missing or not a string")
        return cls(subnet, attrs["PublicIP"], data["VtepMAC"], data.get("VNI", 1),
                   attrs.get("BackendType", BACKEND_TYPE), data.get(TUNNEL_GSO_KEY) is True)


@dataclass(frozen=True, slots=True)
class RouteEntry:
    dst: str
    via: str
    dev: str

    def __str__(self) -> str:  # as `ip route show` prints it
        return f"{self.dst} via {self.via} dev {self.dev} onlink"

    def command(self) -> str:
        return f"ip route replace {self.dst} via {self.via} dev {self.dev} onlink"


@dataclass(frozen=True, slots=True)
class NeighEntry:
    ip: str
    lladdr: str
    dev: str

    def __str__(self) -> str:  # as `ip neigh show` prints it
        return f"{self.ip} dev {self.dev} lladdr {self.lladdr} PERMANENT"

    def command(self) -> str:
        return f"ip neigh replace {self.ip} lladdr {self.lladdr} dev {self.dev} nud permanent"


@dataclass(frozen=True, slots=True)
class FdbEntry:
    lladdr: str
    dst: str
    dev: str

    def __str__(self) -> str:  # as `bridge fdb show` prints it
        return f"{self.lladdr} dev {self.dev} dst {self.dst} self permanent"

    def command(self) -> str:
        return f"bridge fdb replace {self.lladdr} dev {self.dev} dst {self.dst} self permanent"


class FlannelNode:
    """What flanneld's vxlan backend keeps on one node: its own lease, the remote leases it has
    seen, and the neighbour, FDB and route entries those mean for its device."""

    def __init__(self, own: Lease, *, network: str = "10.244.0.0/16", underlay_mtu: int = 1500,
                 device: str | None = None, ip_masq: bool = False) -> None:
        try:
            self.network = ipaddress.IPv4Network(network, strict=True)
        except ValueError as exc:
            raise ConfigError(f"flannel network {network!r}: {exc}") from None
        if not own.network.subnet_of(self.network):
            raise ConfigError(f"flannel lease subnet {own.subnet} is not inside the network {self.network}")
        self.own = own
        self.device = device or device_name(own.vni)
        self.mtu = tunnel_mtu(underlay_mtu)
        self.ip_masq = ip_masq
        self._remote: dict[str, Lease] = {}

    # ---- lease events ------------------------------------------------------------------------

    def add_lease(self, lease: Lease) -> bool:
        """A lease appeared or changed (EventAdded). True if anything needs programming."""
        if lease.subnet == self.own.subnet or lease.backend_type != BACKEND_TYPE:
            return False
        if self._remote.get(lease.subnet) == lease:
            return False
        self._remote[lease.subnet] = lease
        return True

    def remove_lease(self, subnet: str) -> Lease | None:
        """A lease expired or was deleted (EventRemoved): its entries go. Returns it, if known."""
        return self._remote.pop(str(ipaddress.IPv4Network(subnet)), None)

    def leases(self) -> tuple[Lease, ...]:
        return tuple(sorted(self._remote.values(), key=lambda lease: lease.network))

    # ---- what the node holds -----------------------------------------------------------------

    @property
    def address(self) -> str:
        """flannel.1's address: the lease's network address as a /32 (no connected route)."""
        return f"{self.own.gateway}/32"

    def neighbours(self) -> tuple[NeighEntry, ...]:
        return tuple(NeighEntry(lease.gateway, lease.vtep_mac, self.device) for lease in self.leases())

    def fdb(self) -> tuple[FdbEntry, ...]:
        return tuple(FdbEntry(lease.vtep_mac, lease.public_ip, self.device) for lease in self.leases())

    def routes(self) -> tuple[RouteEntry, ...]:
        return tuple(RouteEntry(lease.subnet, lease.gateway, self.device) for lease in self.leases())

    def resolve(self, dst: str | int) -> tuple[str, str] | None:
        """(inner destination MAC, outer destination IP) for a packet to `dst`, walking route ->
        neighbour -> FDB as the kernel does; None when no remote subnet holds `dst`."""
        address = ipaddress.IPv4Address(dst)
        for lease in self._remote.values():  # remote subnets never overlap: first match is the match
            if address in lease.network:
                return lease.vtep_mac, lease.public_ip
        return None

    # ---- rendered as the tools print it ------------------------------------------------------

    def show_routes(self) -> list[str]:
        return [str(e) for e in self.routes()]

    def show_neighbours(self) -> list[str]:
        return [str(e) for e in self.neighbours()]

    def show_fdb(self) -> list[str]:
        return [str(e) for e in self.fdb()]

    def commands(self) -> list[str]:
        """The commands equivalent to what flanneld does for every remote lease, in its order."""
        out = []
        for lease in self.leases():
            out += [NeighEntry(lease.gateway, lease.vtep_mac, self.device).command(),
                    FdbEntry(lease.vtep_mac, lease.public_ip, self.device).command(),
                    RouteEntry(lease.subnet, lease.gateway, self.device).command()]
        return out

    def subnet_env(self) -> str:
        """/run/flannel/subnet.env, which the flannel CNI plugin reads (the pod MTU comes from here)."""
        first = self.own.network.network_address + 1
        return (f"FLANNEL_NETWORK={self.network}\nFLANNEL_SUBNET={first}/{self.own.network.prefixlen}\n"
                f"FLANNEL_MTU={self.mtu}\nFLANNEL_IPMASQ={'true' if self.ip_masq else 'false'}\n")
