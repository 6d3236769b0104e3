"""`podnet status` in a cluster of node processes reads the Services from the store: one value
there that is not a Service is left out (and logged), never the whole listing."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from podnet.cluster.model import ObjectMeta
from podnet.cluster.service import Service, ServicePort
from podnet.cluster_procs import ClusterProcesses
from podnet.store import open_store
from podnet.store.objects import key_of, put_object


def test_a_service_that_cannot_be_read_leaves_the_others_listed(caplog):
    store = open_store("embedded")
    try:
        put_object(store, Service(ObjectMeta("web", "default"), cluster_ip="10.96.0.10", selector={"app": "web"},
                                  ports=(ServicePort("http", 80, target_port=8080),)))
        store.put(key_of("Service", "default", "broken"), b'{"kind": "Service", "metadata": []}')
        with caplog.at_level(logging.WARNING):
            rows = ClusterProcesses.services_status(SimpleNamespace(store=store))
        assert rows == [{"namespace": "default", "name": "web", "type": "ClusterIP", "cluster_ip": "10.96.0.10",
                         "ports": "80/TCP"}]
        assert "broken" in caplog.text
    finally:
        store.close()
