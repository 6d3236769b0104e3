"""Ask the kernel: iptables-restore must accept what the generator writes.

Every command runs inside a network namespace created for the test and deleted afterwards, so
nothing touches the host's tables. `--test` only parses (the nf_tables backend does not even
resolve jump targets with it), so the payloads are also really loaded into the throwaway
namespace and read back with iptables-save: that is where the kernel rejects dangling jumps,
deleting referenced chains, or unknown matches.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess

import pytest

from podnet.core.services.kubeproxy import KubeProxyIptables, ProxyEndpoint, ProxyServicePort

pytestmark = pytest.mark.root

NODE_IP = "192.168.0.2"


def generated_services(count: int = 300, endpoints: int = 5, generation: int = 0) -> list[ProxyServicePort]:
    """`count` service ports of every shape, `endpoints` endpoints each. `generation` moves one
    endpoint of every third service, for partial syncs."""
    out = []
    for i in range(count):
        kind = i % 6
        cluster_ip = f"172.30.{i // 250}.{i % 250 + 1}"
        eps = []
        for j in range(endpoints):
            host = j + 1 + (100 if generation and j == 0 and i % 3 == 0 else 0)
            ep_ip = f"10.{64 + i // 250}.{i % 250}.{host}"
            if kind == 5:           # nothing usable anywhere: REJECT
                eps.append(ProxyEndpoint(ep_ip, 8080, ready=False, serving=False, terminating=True))
            elif kind == 4 and j == 0:
                eps.append(ProxyEndpoint(ep_ip, 8080, ready=False, serving=True, terminating=True, is_local=True))
            else:
                eps.append(ProxyEndpoint(ep_ip, 8080, is_local=(j % 2 == 0)))
        common = dict(namespace=f"ns{i % 7}", name=f"svc{i}", port_name="" if kind == 0 else "p80",
                      cluster_ip=cluster_ip, port=80, endpoints=tuple(eps))
        if kind == 0:
            port = ProxyServicePort(protocol="TCP", **common)
        elif kind == 1:
            port = ProxyServicePort(protocol="UDP", node_port=30000 + i, **common)
        elif kind == 2:
            port = ProxyServicePort(protocol="TCP", node_port=30000 + i, load_balancer_ips=(f"198.51.100.{i % 250}",),
                                    source_ranges=("203.0.113.0/25", "192.168.0.0/24"), affinity_timeout_s=10800,
                                    **common)
        elif kind == 3:
            port = ProxyServicePort(protocol="TCP", node_port=30000 + i, load_balancer_ips=(f"198.51.101.{i % 250}",),
                                    external_ips=(f"192.168.99.{i % 250}",), external_policy_local=True,
                                    health_check_node_port=32000 + i, **common)
        elif kind == 4:
            port = ProxyServicePort(protocol="SCTP", internal_policy_local=True, **common)
        else:
            port = ProxyServicePort(protocol="TCP", node_port=30000 + i, external_ips=(f"192.168.98.{i % 250}",),
                                    **common)
        out.append(port)
    return out


@pytest.fixture
def netns():
    """A factory of fresh network namespaces, all deleted afterwards."""
    if shutil.which("ip") is None or shutil.which("iptables-restore") is None:
        pytest.skip("needs ip(8) and iptables-restore")
    created: list[str] = []

    def make() -> str:
        name = f"pn-kp-{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        created.append(name)
        return name

    try:
        yield make
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def run_in(ns: str, *argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, text=True,
                          timeout=120)


def restore(ns: str, text: str, *flags: str, binary: str = "iptables-restore") -> None:
    done = run_in(ns, binary, *flags, stdin=text)
    assert done.returncode == 0, f"{binary} {' '.join(flags)} rejected the payload:\n{done.stderr}"


def saved(ns: str) -> str:
    """iptables-save of the namespace without the timestamps."""
    done = run_in(ns, "iptables-save")
    assert done.returncode == 0, done.stderr
    return "\n".join(line for line in done.stdout.splitlines() if not line.startswith("#"))


def saved_chains(save: str, table: str) -> set[str]:
    section = save.split(f"*{table}\n", 1)[1].split("COMMIT", 1)[0]
    return {line[1:].split(" ")[0] for line in section.splitlines() if line.startswith(":")}


def saved_rule_count(save: str) -> int:
    return sum(1 for line in save.splitlines() if re.match(r"-A KUBE-", line))


def backends() -> list[str]:
    found = ["iptables-restore"]
    if shutil.which("iptables-legacy-restore"):
        found.append("iptables-legacy-restore")
    return found


@pytest.mark.parametrize("binary", backends())
@pytest.mark.parametrize("large_cluster_endpoints", [1000, 10**6], ids=["large-cluster mode", "with comments"])
def test_restore_test_accepts_300_services(netns, binary, large_cluster_endpoints):
    """`iptables-restore --test --noflush`, as kube-proxy restores (NoFlushTables), with and
    without the jump rules in front."""
    ns = netns()
    if binary != "iptables-restore" and run_in(ns, binary, "--test", stdin="*filter\nCOMMIT\n").returncode:
        pytest.skip(f"{binary} cannot reach its tables here")
    kp = KubeProxyIptables("10.64.0.0/10", node_ips=(NODE_IP,), nfacct=True,
                           large_cluster_endpoints=large_cluster_endpoints)
    result = kp.sync(generated_services(), full=True)
    assert result.statistics.large_cluster_mode is (large_cluster_endpoints == 1000)
    restore(ns, result.payload, "--test", "--noflush", binary=binary)
    restore(ns, kp.jump_rules_restore() + result.payload, "--test", "--noflush", binary=binary)
    # A partial payload only makes sense on top of the state it was computed against: it jumps
    # to the unchanged services' chains without declaring them. So load the full sync for real
    # (into the throwaway namespace), then test the partial one. The loaded copy comes from a twin
    # without nfacct matches, since no nfacct counter objects exist in the new namespace.
    twin = KubeProxyIptables("10.64.0.0/10", node_ips=(NODE_IP,), large_cluster_endpoints=large_cluster_endpoints)
    restore(ns, twin.jump_rules_restore() + twin.sync(generated_services(), full=True).payload, "--noflush",
            binary=binary)
    partial = kp.sync(generated_services(generation=1), full=False)
    assert partial.chains_deleted and not partial.full
    restore(ns, partial.payload, "--test", "--noflush", binary=binary)


def test_kernel_loads_full_and_partial_syncs(netns):
    """Load the jumps and a full sync into a fresh namespace, then partial syncs (endpoint moves,
    a deleted service); the kernel ends up where one full sync of the final state puts a second
    namespace."""
    kp = KubeProxyIptables("10.64.0.0/10", node_ips=(NODE_IP,))
    ns = netns()
    full = kp.sync(generated_services(), full=True)
    restore(ns, kp.jump_rules_restore() + full.payload, "--noflush")
    save = saved(ns)
    top_nat = {"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"}
    assert saved_chains(save, "nat") == {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"} | top_nat | kp.existing_chains
    assert saved_rule_count(save) == full.rules_written
    assert "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES" in save

    moved = kp.sync(generated_services(generation=1), full=False)
    assert moved.chains_deleted and moved.statistics.services_rewritten < 300
    restore(ns, moved.payload, "--noflush")
    final_services = generated_services(generation=1)[:-7]
    shrunk = kp.sync(final_services, full=False)
    assert shrunk.chains_deleted
    restore(ns, shrunk.payload, "--noflush")
    assert saved_chains(saved(ns), "nat") == {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"} | top_nat | \
        kp.existing_chains

    fresh_kp = KubeProxyIptables("10.64.0.0/10", node_ips=(NODE_IP,))
    fresh = netns()
    restore(fresh, fresh_kp.jump_rules_restore() + fresh_kp.sync(final_services, full=True).payload, "--noflush")
    assert saved(ns) == saved(fresh)


def test_kernel_refuses_what_kube_proxy_would_not_write(netns):
    """The checks above have teeth: a dangling jump or deleting a referenced chain is refused."""
    ns = netns()
    kp = KubeProxyIptables("10.64.0.0/10", node_ips=(NODE_IP,))
    payload = kp.sync(generated_services(12), full=True).payload
    sep = next(line.split()[1] for line in payload.splitlines() if line.startswith("-A KUBE-SEP-"))
    dangling = "\n".join(line for line in payload.splitlines()
                         if line != f":{sep} - [0:0]" and not line.startswith(f"-A {sep} ")) + "\n"
    assert f"-j {sep}" in dangling
    assert run_in(ns, "iptables-restore", "--noflush", stdin=dangling).returncode != 0
    restore(ns, payload, "--noflush")
    delete_used = f"*nat\n:{sep} - [0:0]\n-X {sep}\nCOMMIT\n"
    assert run_in(ns, "iptables-restore", "--noflush", stdin=delete_used).returncode != 0
