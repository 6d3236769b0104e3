"""The cluster options of the command line: --no-tunnel-gso reaches ClusterConfig from `podnet up`
and from `podnet node join`, and the node processes `podnet up --store etcd://` starts get it too."""

from __future__ import annotations

from podnet.cli import build_parser
from podnet.cli_cluster import cluster_config
from podnet.cluster.model import Node, NodeAddress, ObjectMeta
from podnet.cluster.topology import ClusterConfig, node_specs
from podnet.cluster_procs import join_argv
from podnet.linux.underlay import Underlay


def test_up_takes_no_tunnel_gso_into_the_cluster_config():
    parser = build_parser()
    on = cluster_config(parser.parse_args(["up", "-f", "cluster.yaml"]))
    off = cluster_config(parser.parse_args(["up", "-f", "cluster.yaml", "--no-tunnel-gso"]))
    assert (on.udp_tunnel_gso, off.udp_tunnel_gso) == (True, False)


def test_the_node_processes_of_a_cluster_get_the_same_choice():
    node = Node(ObjectMeta("node-2", ""), addresses=(NodeAddress("InternalIP", "172.18.0.12"),))
    spec = node_specs((node,), ClusterConfig.underlay_cidr)[0]
    for gso in (True, False):
        config = ClusterConfig(store="etcd://127.0.0.1:2379", state_dir="/run/podnet-test", udp_tunnel_gso=gso)
        argv = join_argv(spec, config, Underlay("pn-underlay"))
        assert argv[1:3] == ["-m", "podnet.cli"]
        args = build_parser().parse_args(argv[3:])
        assert (args.action, args.node, args.node_ip, args.udp_tunnel_gso) == ("join", "node-2", "172.18.0.12", gso)
