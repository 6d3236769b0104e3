"""`podnet` from a shell: up -d, exec, status, down in that order; clean after a SIGKILL; bad manifests."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .clitools import DEMO, netns_with, podnet

pytestmark = pytest.mark.root



def test_up_detached_exec_status_down(state_dir):
    up = podnet(state_dir, "up", "-d", "-f", DEMO, "--prefix", "pn-c1")
    try:
        assert "web-1" in up.stdout and "Running" in up.stdout
        pods = {p["name"]: p for p in json.loads(podnet(state_dir, "status", "-o", "json").stdout)}
        assert set(pods) == {"client", "web-1", "web-2", "web-3"}
        assert all(p["phase"] == "Running" and p["ready"] == "1/1" for p in pods.values())
        table = podnet(state_dir, "status").stdout
        assert table.splitlines()[0].split() == ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "IP", "NODE"]
        fetched = podnet(state_dir, "exec", "-n", "demo", "client", "--", "curl", "-s", f"http://{pods['web-2']['ip']}:8080/")
        assert fetched.stdout == "web-2\n"
        # the command's exit code is podnet exec's exit code
        failed = podnet(state_dir, "exec", "client", "--", "sh", "-c", "echo oops >&2; exit 3", check=False)
        assert (failed.returncode, failed.stderr) == (3, "oops\n")
        missing = podnet(state_dir, "exec", "nosuchpod", "--", "true", check=False)
        assert missing.returncode == 1 and 'pods "nosuchpod" not found' in missing.stderr
        stats = json.loads(podnet(state_dir, "stats", "-o", "json").stdout)
        assert stats["fast_path_packets"] + stats["slow_path_packets"] > 0
        assert stats["node"] == "node-1"
        other = podnet(state_dir, "stats", "--node", "node-2", check=False)   # a lab is one node
        assert other.returncode == 1 and "no node 'node-2': this lab is one node, node-1" in other.stderr
        again = podnet(state_dir, "up", "-d", "-f", DEMO, "--prefix", "pn-c1", check=False)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        down = podnet(state_dir, "down")
    assert "stopped" in down.stdout
    assert netns_with("pn-c1") == []
    assert "no podnet lab is running" in podnet(state_dir, "status", check=False).stderr


def test_clean_after_the_datapath_was_sigkilled(state_dir):
    podnet(state_dir, "up", "-d", "-f", DEMO, "--prefix", "pn-k1")
    pid = json.loads(subprocess.run([sys.executable, "-c",
                                     "import json,sys; from podnet.control import request; "
                                     f"print(json.dumps(request({state_dir!r}, 'ping')))"],
                                    capture_output=True, text=True, check=True).stdout)["pid"]
    try:
        journal = json.loads(Path(glob.glob(os.path.join(state_dir, "podnet-*.json"))[0]).read_text())
        children = [e["pid"] for e in journal["entries"] if e["kind"] == "process"]
        # four pods, and the external client on the uplink
        assert len(children) == 4 and len(netns_with("pn-k1")) == 5
    except BaseException:
        podnet(state_dir, "down", check=False)  # never leave the lab running when this setup fails
        raise
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.05)
    assert len(netns_with("pn-k1")) == 5  # a SIGKILLed lab cleans nothing up itself
    report = podnet(state_dir, "clean", "--prefix", "pn-k1")
    assert "netns pn-k1demo.client" in report.stdout
    assert netns_with("pn-k1") == []
    for child in children:  # the pods' processes are gone too
        stat = Path(f"/proc/{child}/stat")
        assert not stat.exists() or stat.read_text().split(") ")[1].startswith("Z")
    assert "removed nothing" in podnet(state_dir, "clean", "--prefix", "pn-k1").stdout


@pytest.mark.parametrize("text, expected", [
    ("apiVersion: v1\nkind: Pdo\nmetadata: {name: web}\n", ['bad.yaml', 'Pdo/web', 'unknown kind "Pdo"']),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {}\n", ['bad.yaml', 'Pod "default/web"', 'spec.containers']),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec:\n  containers:\n  - name: c\n    command: [sleep, '1']\n"
     "    ports: [{containerPort: http}]\n", ['bad.yaml', 'Pod "default/web"', 'spec.containers[0].ports[0].containerPort']),
])
def test_a_bad_manifest_names_file_object_field_and_creates_nothing(state_dir, tmp_path, text, expected):
    # a good pod first in the same file: nothing of it may be created either
    good = "apiVersion: v1\nkind: Pod\nmetadata: {name: fine}\nspec:\n  containers:\n  - {name: c, command: [sleep, '9']}\n---\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text(good + text)
    done = podnet(state_dir, "up", "-f", str(bad), "--prefix", "pn-m1", check=False)
    assert done.returncode == 1
    for part in expected:
        assert part in done.stderr, done.stderr
    assert netns_with("pn-m1") == []
    assert not glob.glob(os.path.join(state_dir, "podnet-*.json"))


def test_exec_on_the_external_client_reaches_a_service(state_dir):
    up = podnet(state_dir, "up", "-d", "-f", DEMO, "--prefix", "pn-c2")
    try:
        assert "Running" in up.stdout
        route = podnet(state_dir, "exec", "--external", "--", "ip", "route").stdout
        assert "default via 172.18.0.2 dev eth0" in route
        vip = json.loads(podnet(state_dir, "status", "--services", "-o", "json").stdout)[0]["cluster_ip"]
        answer = podnet(state_dir, "exec", "--external", "--", "curl", "-sS", "-m", "5", f"http://{vip}/").stdout
        assert answer.strip() in {"web-1", "web-2", "web-3"}
        assert podnet(state_dir, "backend").stdout.strip() == "iptables"
    finally:
        podnet(state_dir, "down")
    assert netns_with("pn-c2") == []
