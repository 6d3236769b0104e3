"""The Service inspection commands against a running lab (`podnet up -d`): the ClusterIP answers
through the datapath, the live rules are the offline ones, conntrack shows the connection with its
backend, and a live trace lists the three backends."""

from __future__ import annotations

import json
import re

import pytest

from .clitools import DEMO, podnet

pytestmark = pytest.mark.root

BACKENDS = {"10.244.0.3", "10.244.0.4", "10.244.0.5"}


def comparable(save: str) -> list[str]:
    """iptables-save without its date lines and with policy counters zeroed."""
    return [re.sub(r"^(:\S+ \S+) \[\d+:\d+\]$", r"\1 [0:0]", line)
            for line in save.splitlines() if not line.startswith("#")]


def test_service_commands_on_a_running_lab(state_dir):
    podnet(state_dir, "up", "-d", "-f", DEMO, "--prefix", "pn-s1")
    try:
        services = json.loads(podnet(state_dir, "status", "--services", "-o", "json").stdout)
        web = next(s for s in services if s["name"] == "web")
        cluster_ip = web["cluster_ip"]
        assert web["namespace"] == "demo" and web["type"] == "ClusterIP"
        table = podnet(state_dir, "status", "--services").stdout.splitlines()
        assert table[0].split() == ["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "PORT(S)"]
        assert table[1].split() == ["demo", "web", "ClusterIP", cluster_ip, "80/TCP"]

        fetched = podnet(state_dir, "exec", "-n", "demo", "client", "--", "curl", "-s", "-m", "5",
                         f"http://{cluster_ip}/")
        assert fetched.stdout in ("web-1\n", "web-2\n", "web-3\n")

        live = podnet(state_dir, "iptables-save").stdout
        offline = podnet(state_dir, "iptables-save", "-f", DEMO).stdout
        assert comparable(live) == comparable(offline)
        counted = podnet(state_dir, "iptables-save", "-c", "-t", "nat").stdout
        assert re.search(r"^\[[1-9]\d*:\d+\] -A KUBE-SERVICES -d " + re.escape(cluster_ip), counted, re.M)
        listed = podnet(state_dir, "iptables", "-t", "nat", "-L", "KUBE-SERVICES", "-n").stdout
        assert listed == podnet(state_dir, "iptables", "-t", "nat", "-L", "KUBE-SERVICES", "-n", "-f", DEMO).stdout
        missing = podnet(state_dir, "iptables", "-t", "nat", "-L", "NOPE", check=False)
        assert (missing.returncode, missing.stderr) == (1, "iptables: No chain/target/match by that name.\n")

        listing = podnet(state_dir, "conntrack", "-L")
        flows = [line for line in listing.stdout.splitlines() if f"dst={cluster_ip} " in line]
        assert flows, listing.stdout
        reply = re.search(r"dport=80 src=(\S+) dst=10\.244\.0\.2 sport=8080 ", flows[0])
        assert reply and reply.group(1) in BACKENDS, flows[0]
        assert flows[0].startswith("tcp      6 ") and "[ASSURED]" in flows[0]
        assert "flow entries have been shown" in listing.stderr
        stats = podnet(state_dir, "conntrack", "-S").stdout.splitlines()
        assert len(stats) == 1 and stats[0].startswith("cpu=0   \tfound=") and "insert=" in stats[0]
        assert int(podnet(state_dir, "conntrack", "-C").stdout) >= 1

        traced = json.loads(podnet(state_dir, "iptables", "trace", "--live", "--src", "10.244.0.2", "--sport",
                                   "40000", "--proto", "tcp", "--dst", cluster_ip, "--dport", "80",
                                   "--all-branches", "--json").stdout)["outcomes"]
        assert sorted(o["destination"] for o in traced) == [f"{ip}:8080" for ip in sorted(BACKENDS)]
        assert all(o["verdict"] == "DNAT" and not o["masquerade"] for o in traced)
        shown = podnet(state_dir, "iptables", "trace", "--live", "--src", "10.244.0.2", "--proto", "tcp",
                       "--dst", cluster_ip, "--dport", "80").stdout
        assert shown.startswith("outcome 1 of 1\n  verdict      DNAT\n")
        assert re.search(r"^    nat/KUBE-SERVICES:1 +-d " + re.escape(cluster_ip) + "/32 ", shown, re.M)
    finally:
        podnet(state_dir, "down")
