"""`podnet up` for manifests with Nodes, and `podnet node join`: clusters of several nodes.

    podnet up -f cluster.yaml [--network vxlan|direct] [--store etcd://HOST:PORT] [--backend ...]
    podnet node join --store etcd://HOST:PORT --node NAME --node-ip IP [--network vxlan|direct] ...

Layer: lab (the user's edge). Manifests with Node objects describe a cluster: without --store every
node runs in the `podnet up` process around an embedded store (podnet.cluster_lab); with
`--store etcd://` `podnet up` runs the control plane and starts one `podnet node join` process per
Node (podnet.cluster_procs), and ends them by pid when it stops. `podnet node join` runs one node of
a cluster: it leases a subnet, registers, runs the pods the store places on it and programs its
datapath from the store, until SIGTERM or Ctrl-C, and serves its own control socket in its node
directory (`<state_dir>/nodes/<node>/control.sock`), to which `podnet up` forwards `--node` requests.
"""

from __future__ import annotations

import argparse
import signal

from podnet.errors import ConfigError


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    from podnet.cluster.topology import NETWORKS
    parser.add_argument("--network", choices=NETWORKS,
                        help="pod network between nodes (manifests with Nodes): vxlan (Flannel's VXLAN "
                             "backend, the default) or direct (host-gw: routes via the nodes' addresses)")
    parser.add_argument("--store", help="the cluster state store: etcd://HOST:PORT runs one process per Node "
                                        "(default: embedded, every node in this process)")
    _tunnel_gso_option(parser)


def _tunnel_gso_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-tunnel-gso", dest="udp_tunnel_gso", action="store_false",
                        help="vxlan: never send whole super-frames over the tunnel (GSO over UDP tunnels, "
                             "Linux 6.17+); cut them into segments in software, as towards a kernel vxlan node")


def cluster_config(args, **fields):
    from podnet.cluster.topology import ClusterConfig
    given = {"network": args.network or "vxlan", "store": args.store, "prefix": args.prefix,
             "offloads": args.offloads, "udp_tunnel_gso": args.udp_tunnel_gso}
    for name in ("backend", "cluster_cidr", "service_cidr"):
        if getattr(args, name, None) is not None:
            given[name] = getattr(args, name)
    return ClusterConfig(**given, **fields)


def check_single_node(args) -> None:
    """Cluster options on manifests without Nodes are a mistake worth saying."""
    if getattr(args, "store", None):
        raise ConfigError("--store: a cluster needs Node objects in the manifests (one per node)")


async def serve_cluster(args, state_dir: str, on_ready) -> None:
    """`podnet up` for a cluster: bring it up, serve the control socket, stop on a signal."""
    from podnet.control import serve_until_stopped, socket_path
    if args.mode not in (None, "routed"):
        raise ConfigError("--mode: a cluster's nodes are routed (Calico-style /32 pods)")
    if args.node_cidr or args.node_ip:
        raise ConfigError("--node-cidr / --node-ip: a cluster's nodes lease their subnets and take their "
                          "addresses from the Node objects")
    config = cluster_config(args, state_dir=state_dir)
    if config.store:
        from podnet.cluster_procs import open_cluster_processes as opener
    else:
        from podnet.cluster_lab import open_cluster as opener
    async with opener(args.file, config, wait_ready_s=args.timeout) as cluster:
        await serve_until_stopped(cluster, socket_path(state_dir), on_ready)


# ---- podnet node join ---------------------------------------------------------------------------

async def _join(args, config, spec) -> None:
    import trio

    from podnet.cluster_node import node_state_dir, open_cluster_node
    from podnet.control import serve_until_stopped, socket_path
    from podnet.linux.underlay import attach_underlay
    from podnet.store import open_store
    underlay = attach_underlay(args.underlay)
    store = open_store(config.store)
    try:
        # signals that come while the node starts wait here, and stop it once it is up
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with open_cluster_node(store, spec, config, underlay, wait_ready_s=args.timeout) as node:
                # its own control socket: `podnet stats --node NAME` and the like (podnet.control)
                path = socket_path(node_state_dir(config.state_dir, spec.name))

                def ready(lab) -> None:
                    pods = ", ".join(f"{p.key} {p.ip}" for p in lab.pods.values()) or "none"
                    print(f"podnet: node {spec.name} is up: {spec.ip} on {underlay.netns}, subnet {node.subnet}, "
                          f"{config.network}; pods: {pods}; control socket {path}", flush=True)

                await serve_until_stopped(node.lab, path, ready, signals=signals, node_process=True)
    finally:
        store.close()


def cmd_node_join(args) -> int:
    import ipaddress

    import trio

    from podnet.cluster.topology import ClusterConfig, node_specs
    from podnet.cluster.model import Node, NodeAddress, ObjectMeta
    from podnet.linux.resources import state_dir_default
    from podnet.linux.underlay import underlay_netns
    if not args.store or not args.store.startswith(("etcd://", "http://", "https://")):
        raise ConfigError("podnet node join: --store etcd://HOST:PORT is required (the cluster's etcd)")
    config = ClusterConfig(network=args.network, backend=args.backend, store=args.store, prefix=args.prefix,
                           state_dir=args.state_dir or state_dir_default(), offloads=args.offloads,
                           underlay_cidr=args.underlay_cidr, cluster_cidr=args.cluster_cidr,
                           service_cidr=args.service_cidr, vxlan_port=args.vxlan_port,
                           node_lease_ttl_s=args.node_lease_ttl, min_sync_period_s=args.min_sync_period,
                           grace_period_s=args.grace_period, udp_tunnel_gso=args.udp_tunnel_gso)
    try:
        ipaddress.IPv4Address(args.node_ip)
    except ValueError:
        raise ConfigError(f"--node-ip: not an IPv4 address: {args.node_ip!r}") from None
    node = Node(ObjectMeta(args.node, ""), pod_cidr=args.pod_cidr, addresses=(NodeAddress("InternalIP", args.node_ip),))
    spec = node_specs((node,), config.underlay_cidr, config.cluster_cidr)[0]
    args.underlay = args.underlay or underlay_netns(config.prefix)
    trio.run(_join, args, config, spec)
    return 0


def register(sub) -> None:
    from podnet.cluster.topology import ClusterConfig, NETWORKS
    from podnet.core.services.registry import BACKENDS
    from podnet.linux.names import DEFAULT_PREFIX
    node = sub.add_parser("node", help="run one node of a cluster on this host")
    actions = node.add_subparsers(dest="action", required=True)
    join = actions.add_parser("join", help="join the cluster whose state is in --store, as node --node")
    join.add_argument("--store", required=True, help="the cluster's etcd: etcd://HOST:PORT")
    join.add_argument("--node", required=True, help="this node's name (a Node of the cluster)")
    join.add_argument("--node-ip", required=True, help="this node's address on the underlay")
    join.add_argument("--pod-cidr", help="the subnet to ask for (default: the store leases one)")
    join.add_argument("--network", choices=NETWORKS, default="vxlan")
    _tunnel_gso_option(join)
    join.add_argument("--backend", choices=sorted(BACKENDS), default=ClusterConfig.backend)
    join.add_argument("--prefix", default=DEFAULT_PREFIX)
    join.add_argument("--underlay", help="the underlay netns (default <prefix>underlay, made by `podnet up`)")
    join.add_argument("--underlay-cidr", default=ClusterConfig.underlay_cidr)
    join.add_argument("--cluster-cidr", default=ClusterConfig.cluster_cidr)
    join.add_argument("--service-cidr", default=ClusterConfig.service_cidr)
    join.add_argument("--vxlan-port", type=int, default=ClusterConfig.vxlan_port)
    join.add_argument("--node-lease-ttl", type=int, default=ClusterConfig.node_lease_ttl_s,
                      help="seconds: the node's registration lease (renewed every quarter of it)")
    join.add_argument("--min-sync-period", type=float, default=ClusterConfig.min_sync_period_s)
    join.add_argument("--grace-period", type=float)
    join.add_argument("--no-offloads", dest="offloads", action="store_false")
    join.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for this node's pods")
    join.set_defaults(func=cmd_node_join)


__all__ = ["add_cluster_options", "check_single_node", "cluster_config", "cmd_node_join", "register",
           "serve_cluster"]
