"""Flannel's network config and subnet leases (podnet.store.flannel), on both stores."""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Address, IPv4Network

import pytest
import trio

from podnet.errors import ConfigError, IPAMExhausted
from podnet.store import EventType, KeyExists
from podnet.store.flannel import (CONFIG_KEY, SUBNETS_PREFIX, LeaseAttrs, SubnetLeaseLost,
                                  acquire_subnet_lease, keep_subnet_lease, list_subnet_leases,
                                  parse_network_config, parse_subnet_key, read_network_config,
                                  release_subnet_lease, renew_subnet_lease, subnet_key,
                                  write_network_config)
from podnet.testing.waiting import await_until

NODES = {"node-a": ("172.18.0.2", "0e:00:00:00:00:0a"), "node-b": ("172.18.0.3", "0e:00:00:00:00:0b"),
         "node-c": ("172.18.0.4", "0e:00:00:00:00:0c")}


def attrs(node: str) -> LeaseAttrs:
    return LeaseAttrs.vxlan(*NODES[node])


# --- the network config (CheckNetworkConfig) ----------------------------------------------------


def test_network_config_defaults_skip_the_first_subnet():
    config = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    assert config.network == IPv4Network("10.244.0.0/16")
    assert config.subnet_len == 24
    assert config.subnet_min == IPv4Address("10.244.1.0")  # not 10.244.0.0: the network's own
    assert config.subnet_max == IPv4Address("10.244.255.0")
    assert config.backend_type == "vxlan"
    assert len(list(config.subnets())) == 255


@pytest.mark.parametrize("network, subnet_len", [("10.0.0.0/22", 24), ("10.0.0.0/23", 25),
                                                 ("10.0.0.0/28", 30)])
def test_network_config_subnet_len_default(network, subnet_len):
    assert parse_network_config(json.dumps({"Network": network})).subnet_len == subnet_len


@pytest.mark.parametrize("config, message", [
    ({}, "please define a correct Network parameter"),
    ({"Network": "10.0.0.0/29"}, "network is too small. Minimum useful network prefix is /28"),
    ({"Network": "10.0.0.0/16", "SubnetLen": 31}, "SubnetLen must be less than /31"),
    ({"Network": "10.0.0.0/16", "SubnetLen": 17}, "accommodate at least four subnets"),
    ({"Network": "10.0.0.0/16", "SubnetMin": "10.0.1.128"}, "not on a SubnetLen boundary"),
    ({"Network": "10.0.0.0/16", "SubnetMax": "10.1.0.0"}, "not in the range of the Network"),
    ({"Network": "nonsense"}, "Network"),
])
def test_network_config_errors_name_the_key(config, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_network_config(json.dumps(config))
    assert str(error.value).startswith(CONFIG_KEY)


def test_backend_without_type_is_udp_as_in_flannel():
    assert parse_network_config('{"Network": "10.0.0.0/16"}').backend_type == "udp"


def test_subnet_keys_are_flannels():
    assert subnet_key("10.244.1.0/24") == "/coreos.com/network/subnets/10.244.1.0-24"
    assert parse_subnet_key("/coreos.com/network/subnets/10.244.1.0-24") == \
        IPv4Network("10.244.1.0/24")
    assert parse_subnet_key("/coreos.com/network/subnets/10.244.1.0-24&fc00::-64") == \
        IPv4Network("10.244.1.0/24")
    assert parse_subnet_key("/coreos.com/network/config") is None


def test_lease_attrs_json_is_flannels():
    text = attrs("node-a").to_json()
    assert json.loads(text) == {"PublicIP": "172.18.0.2", "BackendType": "vxlan",
                                "BackendData": {"VNI": 1, "VtepMAC": "0e:00:00:00:00:0a"}}
    assert LeaseAttrs.from_json(text) == attrs("node-a")


# --- leases in a store --------------------------------------------------------------------------


def test_missing_network_config_is_a_clear_error(h):
    with pytest.raises(ConfigError, match="flannel config not found"):
        acquire_subnet_lease(h.store, attrs("node-a"), now=0.0)


def test_three_nodes_get_three_distinct_subnets(h):
    config = write_network_config(h.store, "10.244.0.0/16")
    assert read_network_config(h.store) == config
    leases = [acquire_subnet_lease(h.store, attrs(node), now=0.0, ttl_s=60) for node in NODES]
    subnets = [lease.subnet for lease in leases]
    assert subnets == [IPv4Network(f"10.244.{i}.0/24") for i in (1, 2, 3)]  # first free, in order
    stored, revision = list_subnet_leases(h.store)
    assert [lease.subnet for lease in stored] == subnets and revision == h.store.revision()
    kv = h.store.get("/coreos.com/network/subnets/10.244.2.0-24")
    assert json.loads(kv.value) == {"PublicIP": "172.18.0.3", "BackendType": "vxlan",
                                    "BackendData": {"VNI": 1, "VtepMAC": "0e:00:00:00:00:0b"}}
    assert kv.lease == leases[1].lease_id != 0  # under a TTL lease
    assert 0 < h.store.time_to_live(kv.lease) <= 60
    assert leases[0].expires_at == 60.0 and leases[0].renew_at(margin_s=10) == 50.0


def test_random_pick_like_flanneld_stays_distinct(h):
    write_network_config(h.store, "10.244.0.0/16")
    rng = random.Random(7)
    subnets = {acquire_subnet_lease(h.store, attrs(node), now=0.0, rng=rng).subnet
               for node in NODES}
    assert len(subnets) == 3
    assert all(s.prefixlen == 24 and s.subnet_of(IPv4Network("10.244.0.0/16")) for s in subnets)


def test_a_restarted_node_gets_its_subnet_back(h):
    write_network_config(h.store, "10.244.0.0/16")
    for node in ("node-a", "node-b"):
        acquire_subnet_lease(h.store, attrs(node), now=0.0)
    first = acquire_subnet_lease(h.store, attrs("node-c"), now=0.0)
    watch = h.store.watch(SUBNETS_PREFIX, prefix=True)
    # node-c's process restarts: same PublicIP, a new VTEP MAC (its device was made again)
    again = acquire_subnet_lease(h.store, LeaseAttrs.vxlan("172.18.0.4", "0e:00:00:00:00:cc"),
                                 now=5.0)
    assert again.subnet == first.subnet == IPv4Network("10.244.3.0/24")
    assert again.lease_id != first.lease_id and again.mod_revision > first.mod_revision
    event = h.next_event(watch)  # other nodes see the new MAC
    assert (event.type, event.key) == (EventType.PUT, first.key)
    assert json.loads(event.kv.value)["BackendData"]["VtepMAC"] == "0e:00:00:00:00:cc"
    assert h.store.time_to_live(first.lease_id) is None  # the emptied lease is revoked
    assert len(list_subnet_leases(h.store)[0]) == 3
    watch.close()


def test_after_its_lease_expired_a_node_asks_for_its_previous_subnet(h):
    write_network_config(h.store, "10.244.0.0/16")
    gone = acquire_subnet_lease(h.store, attrs("node-a"), now=0.0, ttl_s=1)
    acquire_subnet_lease(h.store, attrs("node-b"), now=0.0)
    watch = h.store.watch(gone.key)
    h.advance(h.lease_ended_after(1))
    assert h.next_event(watch).type is EventType.DELETE
    back = acquire_subnet_lease(h.store, attrs("node-a"), now=10.0, previous_subnet=gone.subnet)
    assert back.subnet == gone.subnet == IPv4Network("10.244.1.0/24")
    other = acquire_subnet_lease(h.store, attrs("node-c"), now=10.0, previous_subnet="10.244.2.0/24")
    assert other.subnet == IPv4Network("10.244.3.0/24")  # node-b holds .2: not taken from it
    watch.close()


def test_losing_a_create_race_retries_with_another_subnet(h):
    write_network_config(h.store, "10.244.0.0/16")
    store = h.store
    real_create = store.create
    raced = []

    def racing_create(key, value, *, lease=0):  # another node creates the same key first
        if key.startswith(SUBNETS_PREFIX) and not raced:
            raced.append(key)
            real_create(key, LeaseAttrs.vxlan("172.18.0.9", "0e:00:00:00:00:09").to_json())
        return real_create(key, value, lease=lease)

    store.create = racing_create
    try:
        lease = acquire_subnet_lease(store, attrs("node-a"), now=0.0)
    finally:
        del store.create
    assert raced == [subnet_key("10.244.1.0/24")]
    assert lease.subnet == IPv4Network("10.244.2.0/24")
    assert {l.attrs.public_ip for l in list_subnet_leases(store)[0]} == {"172.18.0.9", "172.18.0.2"}


def test_out_of_subnets(h):
    write_network_config(h.store, "10.0.0.0/28")  # /30s from 10.0.0.4 to 10.0.0.12: three
    for node in NODES:
        acquire_subnet_lease(h.store, attrs(node), now=0.0)
    with pytest.raises(IPAMExhausted, match="out of subnets"):
        acquire_subnet_lease(h.store, LeaseAttrs.vxlan("172.18.0.5", "0e:00:00:00:00:0d"), now=0.0)


def test_renewal_writes_a_new_lease_and_never_steals(h):
    write_network_config(h.store, "10.244.0.0/16")
    lease = acquire_subnet_lease(h.store, attrs("node-a"), now=0.0, ttl_s=30)
    renewed = renew_subnet_lease(h.store, lease, now=20.0)
    assert renewed.subnet == lease.subnet and renewed.expires_at == 50.0
    assert renewed.lease_id != lease.lease_id and h.store.time_to_live(lease.lease_id) is None
    release_subnet_lease(h.store, renewed)  # gone; another node takes the subnet
    taken = acquire_subnet_lease(h.store, attrs("node-b"), now=21.0)
    assert taken.subnet == lease.subnet
    with pytest.raises(SubnetLeaseLost):
        renew_subnet_lease(h.store, renewed, now=22.0)
    assert LeaseAttrs.from_json(h.store.get(lease.key).value).public_ip == "172.18.0.3"


def test_config_is_written_once(h):
    write_network_config(h.store, "10.244.0.0/16")
    assert write_network_config(h.store, "10.99.0.0/16").network == IPv4Network("10.244.0.0/16")
    with pytest.raises(KeyExists):
        h.store.create(CONFIG_KEY, "{}")


async def test_keep_subnet_lease_renews_and_stops_when_the_lease_is_deleted():
    from podnet.store import EmbeddedStore
    store = EmbeddedStore()  # real time: renewals run in threads, as they do against etcd
    write_network_config(store, "10.244.0.0/16")
    lease = acquire_subnet_lease(store, attrs("node-a"), now=trio.current_time(), ttl_s=1)
    renewals = []
    try:
        with pytest.raises(ExceptionGroup) as raised:  # from the nursery's task
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: keep_subnet_lease(store, lease, margin_s=0.8,
                                                             on_renew=renewals.append))
                await trio.sleep(1.5)  # past the 1 s TTL: only renewals keep the key
                assert len(renewals) >= 3
                assert store.get(lease.key).lease == renewals[-1].lease_id
                await trio.to_thread.run_sync(store.delete, lease.key)
                await trio.sleep(1)
        assert raised.group_contains(SubnetLeaseLost, match="lease has been revoked")
    finally:
        store.close()


# --- keep_subnet_lease through store outages ----------------------------------------------------



def _faulty():
    from podnet.store import EmbeddedStore
    from podnet.testing.store import FaultyStore
    store = FaultyStore(EmbeddedStore())  # real time: renewals run in threads, as they do against etcd
    write_network_config(store, "10.244.0.0/16")
    return store


async def test_keep_subnet_lease_outlives_a_broken_watch_and_a_compaction():
    """etcd restarting breaks the lease's watch (StoreUnavailable), and its history may be compacted
    meanwhile (CompactedError): the lease is intact, so the node keeps it, renews it and watches on."""
    from podnet.store import CompactedError, StoreUnavailable
    store = _faulty()
    lease = acquire_subnet_lease(store, attrs("node-a"), now=trio.current_time(), ttl_s=1)
    renewals = []
    try:
        with pytest.raises(ExceptionGroup) as raised:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: keep_subnet_lease(store, lease, margin_s=0.8, on_renew=renewals.append))
                await await_until(lambda: store.open_watches(lease.key), "the lease's watch")
                assert store.fail_watches(lease.key, StoreUnavailable("etcd went away")) == 1
                await await_until(lambda: store.watches_opened.count(lease.key) == 2, "the watch opened again")
                await await_until(lambda: len(renewals) >= 2, "renewals")
                store.compact(store.revision())   # the history the watch would resume from is gone
                assert store.fail_watches(lease.key, CompactedError("watch", 1, store.revision())) == 1
                await await_until(lambda: store.watches_opened.count(lease.key) == 3, "the watch after the compaction")
                seen = len(renewals)
                await await_until(lambda: len(renewals) >= seen + 2, "renewals after the compaction")
                assert store.get(lease.key).lease == renewals[-1].lease_id   # still this node's lease
                await trio.to_thread.run_sync(store.delete, lease.key)      # the reopened watch sees it
                await trio.sleep(2)
        assert raised.group_contains(SubnetLeaseLost, match="lease has been revoked")
    finally:
        store.close()


@pytest.mark.parametrize("meanwhile", ["deleted", "taken"])
async def test_keep_subnet_lease_after_a_compaction_a_key_gone_or_taken_is_lost(meanwhile):
    """The watch missed what happened while its history was compacted: the key is read, and one that
    is gone, or was written by another node, is a lost lease."""
    from podnet.store import CompactedError
    store = _faulty()
    lease = acquire_subnet_lease(store, attrs("node-a"), now=trio.current_time(), ttl_s=3600)
    try:
        with pytest.raises(ExceptionGroup) as raised:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: keep_subnet_lease(store, lease, margin_s=60))
                await await_until(lambda: store.open_watches(lease.key), "the lease's watch")
                store.hold(lease.key)   # the watch never delivers the change below
                if meanwhile == "deleted":
                    store.delete(lease.key)
                else:
                    store.put(lease.key, attrs("node-b").to_json())
                store.compact(store.revision())
                store.fail_watches(lease.key, CompactedError("watch", lease.mod_revision + 1, store.revision()))
                await trio.sleep(5)
        found = "gone" if meanwhile == "deleted" else "written at revision"
        assert raised.group_contains(SubnetLeaseLost, match=f"lease lost while the watch was away \\({found}")
    finally:
        store.close()


async def test_a_renewal_whose_answer_was_lost_is_adopted():
    """etcd dies after writing a renewal, before answering it: the retry finds the key moved on with
    this node's own value, and takes that write as its renewal instead of calling the lease lost."""
    from podnet.store import StoreUnavailable
    store = _faulty()
    lease = acquire_subnet_lease(store, attrs("node-a"), now=trio.current_time(), ttl_s=1)
    renewals, lost_answers = [], []

    def lose_the_answer(call):
        if call.key == lease.key and not lost_answers:
            lost_answers.append(call.result)
            raise StoreUnavailable("etcd went away before answering")

    store.after("update", lose_the_answer)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: keep_subnet_lease(store, lease, margin_s=0.8, on_renew=renewals.append))
            await await_until(lambda: len(renewals) >= 3, "renewals after the lost answer")
            nursery.cancel_scope.cancel()
        assert len(lost_answers) == 1
        assert renewals[0].mod_revision == lost_answers[0]   # the write whose answer was lost
        kv = store.get(lease.key)
        assert kv.lease == renewals[-1].lease_id and kv.mod_revision == renewals[-1].mod_revision
    finally:
        store.close()


async def test_keep_subnet_lease_outlives_an_etcd_restart(etcd_server, etcd_restarter):
    """A real etcd stopped and started again on the same data dir and port: the watch breaks and is
    opened again, renewals that fail meanwhile are retried, and the node keeps its subnet."""
    from podnet.store.etcd import EtcdStore
    store = EtcdStore(etcd_server.endpoint, timeout_s=1.0)
    write_network_config(store, "10.244.0.0/16")
    lease = acquire_subnet_lease(store, attrs("node-a"), now=trio.current_time(), ttl_s=2)
    renewals = []
    try:
        with pytest.raises(ExceptionGroup) as raised:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: keep_subnet_lease(store, lease, margin_s=1.5, on_renew=renewals.append))
                await await_until(lambda: len(renewals) >= 1, "a renewal")
                await trio.to_thread.run_sync(etcd_restarter.stop)
                await trio.sleep(1.0)   # renewals fall due meanwhile, and fail
                await trio.to_thread.run_sync(etcd_restarter.start)
                seen = len(renewals)
                await await_until(lambda: len(renewals) >= seen + 2, "renewals after the restart", 20)
                kv = await trio.to_thread.run_sync(store.get, lease.key)
                assert kv.lease == renewals[-1].lease_id and kv.value == attrs("node-a").to_json().encode()
                await trio.to_thread.run_sync(store.delete, lease.key)   # the watch was opened again
                await trio.sleep(5)
        assert raised.group_contains(SubnetLeaseLost, match="lease has been revoked")
    finally:
        store.close()


async def test_a_lease_granted_for_a_renewal_whose_write_failed_is_revoked():
    """The store goes away between a renewal's grant and its write: the granted store lease holds
    no key, and must not be left to run out its TTL (24 h in flannel). It is revoked on the spot if
    the store answers; the second time the revoke fails too, and the lease is revoked at the next
    renewal that reaches the store. The renewals go on and the key stays this node's."""
    from podnet.store import StoreUnavailable
    store = _faulty()
    lease = acquire_subnet_lease(store, attrs("node-a"), now=trio.current_time(), ttl_s=60)
    granted, failed_writes, failed_revokes, renewals = [], [], [], []
    store.after("grant", lambda call: granted.append(call.result.id))

    def fail_two_writes(call):   # before the write: it does not happen
        if call.key == lease.key and len(failed_writes) < 2:
            failed_writes.append(granted[-1])
            raise StoreUnavailable("etcd went away after the grant")

    def fail_the_second_cleanup(call):
        if len(failed_writes) == 2 and not failed_revokes:
            failed_revokes.append(call.op)
            raise StoreUnavailable("etcd is still away")

    store.before("update", fail_two_writes)
    store.before("lease_keys", fail_the_second_cleanup)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: keep_subnet_lease(store, lease, margin_s=59.8, on_renew=renewals.append))
            await await_until(lambda: len(renewals) >= 2, "renewals after the failed writes")
            nursery.cancel_scope.cancel()
        assert len(failed_writes) == 2 and failed_revokes == ["lease_keys"]
        for lease_id in failed_writes:   # each revoked: the first at once, the second at the next renewal
            assert store.time_to_live(lease_id) is None, f"lease {lease_id:x} left to run out its TTL"
        kv = store.get(lease.key)
        assert kv.lease == renewals[-1].lease_id and store.time_to_live(kv.lease) is not None
        assert LeaseAttrs.from_json(kv.value) == attrs("node-a")
    finally:
        store.close()


def test_a_write_whose_answer_was_lost_keeps_its_lease(h):
    """The write went through and only its answer was lost: the new store lease holds the key, and
    is not revoked (that would delete the key); a retry adopts it (test_a_renewal_whose_answer_...)."""
    from podnet.store import StoreUnavailable
    from podnet.testing.store import FaultyStore
    store = FaultyStore(h.store)
    write_network_config(store, "10.244.0.0/16")
    lease = acquire_subnet_lease(store, attrs("node-a"), now=0.0, ttl_s=60)
    hook = store.after("update", lambda call: (_ for _ in ()).throw(StoreUnavailable("answer lost")))
    with pytest.raises(StoreUnavailable):
        renew_subnet_lease(store, lease, now=1.0)
    store.remove(hook)
    kv = store.get(lease.key)
    assert kv.mod_revision > lease.mod_revision and kv.lease != lease.lease_id
    assert store.time_to_live(kv.lease) is not None and store.lease_keys(kv.lease) == [lease.key]
