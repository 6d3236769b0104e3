"""`podnet store get` against a real etcd."""

from __future__ import annotations

import json

from podnet.cli import main
from podnet.store import open_store
from podnet.store.flannel import write_network_config


def test_store_get_prefix_and_key(etcd_server, capsys):
    with open_store(etcd_server.endpoint) as store:
        write_network_config(store, "10.244.0.0/16")
        lease = store.grant(60)
        store.put("/registry/minions/node-a", '{"kind":"Node"}', lease=lease.id)
    assert main(["store", "get", "--prefix", "/registry/", "--store", etcd_server.endpoint]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"/registry/minions/node-a  (mod_revision=3 lease={lease.id:x})"
    assert out[1] == '{"kind":"Node"}'
    assert main(["store", "get", "/coreos.com/network/config", "--store", etcd_server.endpoint,
                 "-o", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["revision"] == 3
    assert json.loads(shown["kvs"][0]["value"])["Network"] == "10.244.0.0/16"


def test_store_get_needs_an_etcd(capsys):
    assert main(["store", "get", "--prefix", "/"]) == 1
    assert "only an etcd store" in capsys.readouterr().err
