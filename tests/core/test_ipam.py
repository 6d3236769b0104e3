"""host-local IPAM behaviour: allocation order, errors, on-disk format and restart."""

import os
import stat
from ipaddress import IPv4Address, IPv4Network

import pytest

from podnet.core.ipam import (
    Allocation,
    DiskStore,
    IPAMStatistics,
    MemoryStore,
    Pool,
    node_pool_cidr,
)
from podnet.errors import ConfigError, IPAMExhausted


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)


def fill(pool: Pool, count: int, prefix: str = "cid") -> list[IPv4Address]:
    return [pool.allocate(f"{prefix}{i}").ip for i in range(count)]


# --- defaults and allocation order ------------------------------------------------------------


def test_first_address_is_dot_two_with_host_local_defaults():
    pool = Pool("10.244.1.0/24")
    alloc = pool.allocate("cid1")
    assert alloc == Allocation(ip("10.244.1.2"), 24, ip("10.244.1.1"), "cid1", "eth0")
    assert pool.range_text == "10.244.1.1-10.244.1.254"


def test_gateway_network_and_broadcast_never_handed_out():
    pool = Pool("10.244.9.0/29")
    handed = fill(pool, 5)
    assert handed == [ip(f"10.244.9.{n}") for n in range(2, 7)]
    assert not {ip("10.244.9.0"), ip("10.244.9.1"), ip("10.244.9.7")} & set(handed)


def test_released_address_not_reused_until_cursor_comes_round():
    pool = Pool("10.244.1.0/24")
    assert fill(pool, 3) == [ip("10.244.1.2"), ip("10.244.1.3"), ip("10.244.1.4")]
    assert pool.release("cid0") == ip("10.244.1.2")
    # Observed with the reference plugin: after .2 was freed the next pod got .5.
    assert pool.allocate("next").ip == ip("10.244.1.5")


def test_wrap_around_reuses_freed_address():
    pool = Pool("10.244.9.0/29")
    fill(pool, 5)  # .2-.6, cursor at .6 = range_end
    pool.release("cid1")  # frees .3
    assert pool.allocate("late").ip == ip("10.244.9.3")


def test_wrap_skips_gateway_and_starts_at_range_start():
    pool = Pool("10.244.9.0/29")
    fill(pool, 5)
    pool.release("cid0")  # .2, the first address after the skipped gateway
    assert pool.allocate("late").ip == ip("10.244.9.2")


def test_explicit_range_and_gateway():
    pool = Pool("10.244.3.0/24", range_start="10.244.3.100", range_end="10.244.3.101",
                gateway="10.244.3.254")
    assert fill(pool, 2) == [ip("10.244.3.100"), ip("10.244.3.101")]
    assert pool.lookup("cid0").gateway == ip("10.244.3.254")
    assert pool.statistics().capacity == 2
    with pytest.raises(IPAMExhausted, match="10.244.3.100-10.244.3.101"):
        pool.allocate("third")


def test_gateway_inside_range_is_skipped_mid_range():
    pool = Pool("10.244.3.0/29", gateway="10.244.3.3")
    assert fill(pool, 5) == [ip(f"10.244.3.{n}") for n in (1, 2, 4, 5, 6)]


# --- errors -----------------------------------------------------------------------------------


def test_exhausted_slash29_names_pool_and_range_with_host_local_text():
    pool = Pool("10.244.9.0/29", name="node-1")
    fill(pool, 5)
    with pytest.raises(IPAMExhausted) as info:
        pool.allocate("sixth")
    assert str(info.value) == (
        'pool "node-1" (10.244.9.0/29): failed to allocate for range 0: '
        "no IP addresses available in range set: 10.244.9.1-10.244.9.6"
    )
    assert pool.lookup("sixth") is None
    assert pool.statistics().exhausted_total == 1


@pytest.mark.parametrize("subnet", ["10.244.7.0/31", "10.244.7.0/32"])
def test_too_small_network_is_config_error(subnet):
    with pytest.raises(ConfigError) as info:
        Pool(subnet)
    assert f"invalid range set 0: Network {subnet} too small to allocate from" in str(info.value)


@pytest.mark.parametrize("field, value", [
    ("range_start", "10.244.8.200"),
    ("range_end", "10.244.9.3"),
    ("gateway", "10.9.9.9"),
    ("range_end", "10.244.8.7"),  # broadcast
    ("range_start", "10.244.8.0"),  # network
])
def test_range_fields_outside_subnet_name_the_field(field, value):
    with pytest.raises(ConfigError) as info:
        Pool("10.244.8.0/29", name="n", **{field: value})
    assert f"{field} {value}" in str(info.value)
    assert 'pool "n"' in str(info.value)


def test_range_start_after_end_is_config_error():
    with pytest.raises(ConfigError, match="range_start 10.244.8.5 is after range_end 10.244.8.3"):
        Pool("10.244.8.0/29", range_start="10.244.8.5", range_end="10.244.8.3")


def test_subnet_with_host_bits_is_config_error():
    with pytest.raises(ConfigError, match="10.244.8.5/24"):
        Pool("10.244.8.5/24")


@pytest.mark.parametrize("owner, ifname", [("", "eth0"), ("cid", ""), ("c\r\nid", "eth0"),
                                           ("cid", "eth\n0")])
def test_owner_and_ifname_that_cannot_be_stored_are_rejected(owner, ifname):
    pool = Pool("10.244.8.0/29")
    with pytest.raises(ConfigError):
        pool.allocate(owner, ifname)
    assert pool.allocations() == []


# --- idempotency and release ------------------------------------------------------------------


def test_allocate_is_idempotent_for_same_owner_and_ifname():
    pool = Pool("10.244.1.0/24")
    first = pool.allocate("cid1")
    assert pool.allocate("cid1") == first
    assert pool.allocate("cid1", requested=first.ip) == first
    assert pool.statistics().allocations_total == 1
    # Another interface of the same sandbox is a separate allocation.
    assert pool.allocate("cid1", "net1").ip == ip("10.244.1.3")


def test_same_owner_requesting_a_different_address_is_refused():
    pool = Pool("10.244.1.0/24")
    pool.allocate("cid1")
    with pytest.raises(ConfigError, match="already holds 10.244.1.2"):
        pool.allocate("cid1", requested=ip("10.244.1.9"))
    assert [a.ip for a in pool.allocations()] == [ip("10.244.1.2")]


def test_release_is_idempotent_and_does_not_move_cursor():
    pool = Pool("10.244.1.0/24")
    pool.allocate("cid1")
    assert pool.release("cid1") == ip("10.244.1.2")
    assert pool.release("cid1") is None
    assert pool.release("never") is None
    assert pool.lookup("cid1") is None
    assert pool.allocate("cid2").ip == ip("10.244.1.3")
    assert pool.statistics().releases_total == 1


def test_release_matches_ifname():
    pool = Pool("10.244.1.0/24")
    pool.allocate("cid1", "eth0")
    pool.allocate("cid1", "net1")
    assert pool.release("cid1", "net1") == ip("10.244.1.3")
    assert pool.lookup("cid1", "eth0").ip == ip("10.244.1.2")


# --- requested address ------------------------------------------------------------------------


def test_requested_free_address_is_taken_and_moves_cursor():
    pool = Pool("10.244.8.0/24")
    assert pool.allocate("cid1", requested=ip("10.244.8.50")).ip == ip("10.244.8.50")
    assert pool.allocate("cid2").ip == ip("10.244.8.51")


def test_requested_taken_address_has_host_local_text():
    pool = Pool("10.244.8.0/29", name="node-8")
    fill(pool, 5)
    with pytest.raises(IPAMExhausted) as info:
        pool.allocate("other", requested=ip("10.244.8.6"))
    assert str(info.value) == (
        'pool "node-8" (10.244.8.0/29): failed to allocate for range 0: '
        "requested IP address 10.244.8.6 is not available in range set 10.244.8.1-10.244.8.6"
    )


def test_requested_gateway_is_not_available():
    pool = Pool("10.244.8.0/29")
    with pytest.raises(IPAMExhausted, match="requested IP address 10.244.8.1 is not available"):
        pool.allocate("cid", requested="10.244.8.1")


@pytest.mark.parametrize("requested", ["10.244.8.7", "10.244.8.0", "10.1.1.1"])
def test_requested_outside_range_is_config_error(requested):
    pool = Pool("10.244.8.0/29")
    with pytest.raises(ConfigError, match=f"{requested} not in range set 10.244.8.1-10.244.8.6"):
        pool.allocate("cid", requested=requested)
    assert pool.allocations() == []


# --- statistics -------------------------------------------------------------------------------


def test_statistics_counts():
    pool = Pool("10.244.9.0/29")
    assert pool.statistics() == IPAMStatistics(5, 0, 5, 0, 0, 0)
    fill(pool, 5)
    pool.allocate("cid0")  # idempotent repeat: not a new allocation
    with pytest.raises(IPAMExhausted):
        pool.allocate("extra")
    pool.release("cid3")
    assert pool.statistics() == IPAMStatistics(
        capacity=5, allocated=4, free=1, allocations_total=5, releases_total=1, exhausted_total=1)


# --- DiskStore: host-local's on-disk layout ---------------------------------------------------


def test_disk_layout_matches_host_local(tmp_path):
    pool = Pool("10.244.1.0/24", store=DiskStore(tmp_path, "podnet"))
    pool.allocate("cid1", "eth0")
    pool.allocate("cid2", "eth0")
    net_dir = tmp_path / "podnet"
    assert sorted(os.listdir(net_dir)) == ["10.244.1.2", "10.244.1.3", "last_reserved_ip.0",
                                           "lock"]
    assert (net_dir / "10.244.1.2").read_bytes() == b"cid1\r\neth0"
    assert (net_dir / "last_reserved_ip.0").read_bytes() == b"10.244.1.3"
    assert (net_dir / "lock").read_bytes() == b""
    ip_mode = stat.S_IMODE((net_dir / "10.244.1.2").stat().st_mode)
    assert ip_mode & ~0o644 == 0 and ip_mode & 0o600 == 0o600


def test_disk_range_index_names_cursor_file(tmp_path):
    pool = Pool("10.244.1.0/24", store=DiskStore(tmp_path, "podnet", range_index=2))
    pool.allocate("cid1")
    assert (tmp_path / "podnet" / "last_reserved_ip.2").read_bytes() == b"10.244.1.2"


def test_disk_release_leaves_lock_and_cursor(tmp_path):
    pool = Pool("10.244.1.0/24", store=DiskStore(tmp_path, "podnet"))
    pool.allocate("cid1")
    pool.release("cid1")
    assert sorted(os.listdir(tmp_path / "podnet")) == ["last_reserved_ip.0", "lock"]
    assert (tmp_path / "podnet" / "last_reserved_ip.0").read_bytes() == b"10.244.1.2"


def test_disk_reserve_is_exclusive(tmp_path):
    store = DiskStore(tmp_path, "podnet")
    assert store.reserve(ip("10.244.1.5"), "a", "eth0") is True
    assert store.reserve(ip("10.244.1.5"), "b", "eth0") is False
    assert (tmp_path / "podnet" / "10.244.1.5").read_bytes() == b"a\r\neth0"


def test_file_created_behind_the_pools_back_is_skipped(tmp_path):
    store = DiskStore(tmp_path, "podnet")
    pool = Pool("10.244.1.0/24", store=store)
    (tmp_path / "podnet" / "10.244.1.2").write_bytes(b"intruder\r\neth0")
    assert pool.allocate("cid1").ip == ip("10.244.1.3")


def test_restart_keeps_allocations_and_cursor(tmp_path):
    pool = Pool("10.244.1.0/24", name="node-1", store=DiskStore(tmp_path, "podnet"))
    fill(pool, 4)  # .2-.5
    pool.release("cid0")
    pool.release("cid2")

    restarted = Pool("10.244.1.0/24", name="node-1", store=DiskStore(tmp_path, "podnet"))
    assert [(a.ip, a.owner, a.ifname) for a in restarted.allocations()] == [
        (ip("10.244.1.3"), "cid1", "eth0"), (ip("10.244.1.5"), "cid3", "eth0")]
    # A pod the node already knows gets its address back on a re-run ADD.
    assert restarted.allocate("cid3").ip == ip("10.244.1.5")
    # The cursor survived: the next new pod gets .6, not the freed .2.
    assert restarted.allocate("new").ip == ip("10.244.1.6")


def test_restart_on_memory_store_keeps_state():
    store = MemoryStore()
    fill(Pool("10.244.1.0/24", store=store), 2)
    pool = Pool("10.244.1.0/24", store=store)
    assert pool.lookup("cid1").ip == ip("10.244.1.3")
    assert pool.allocate("cid2").ip == ip("10.244.1.4")


def test_load_tolerates_old_format_and_ignores_junk(tmp_path):
    net_dir = tmp_path / "podnet"
    net_dir.mkdir()
    (net_dir / "10.244.1.7").write_bytes(b"oldcid\n")  # pre-ifname format: owner only
    (net_dir / "10.244.1.8").write_bytes(b"newcid\r\neth0")
    (net_dir / "README").write_text("not an address")
    (net_dir / "10.244.1.999").write_text("junk")
    (net_dir / "last_reserved_ip.1").write_text("10.244.1.200")  # another range set's cursor
    (net_dir / "10.244.1.9").mkdir()
    (net_dir / "last_reserved_ip.0").write_text("10.244.1.8\n")
    records, last = DiskStore(tmp_path, "podnet").load()
    assert records == {ip("10.244.1.7"): ("oldcid", ""), ip("10.244.1.8"): ("newcid", "eth0")}
    assert last == ip("10.244.1.8")

    pool = Pool("10.244.1.0/24", store=DiskStore(tmp_path, "podnet"))
    # host-local matches old-format records on the owner alone.
    assert pool.lookup("oldcid", "eth0").ip == ip("10.244.1.7")
    assert pool.allocate("oldcid", "eth0").ip == ip("10.244.1.7")
    assert pool.release("oldcid", "eth0") == ip("10.244.1.7")
    assert not (net_dir / "10.244.1.7").exists()
    assert pool.allocate("next").ip == ip("10.244.1.10")  # .9 is a directory, not ours to take


def test_garbled_cursor_starts_from_range_start(tmp_path):
    net_dir = tmp_path / "podnet"
    net_dir.mkdir()
    (net_dir / "last_reserved_ip.0").write_text("garbage")
    pool = Pool("10.244.1.0/24", store=DiskStore(tmp_path, "podnet"))
    assert pool.allocate("cid").ip == ip("10.244.1.2")


def test_cursor_outside_range_starts_from_range_start():
    store = MemoryStore()
    store.set_last_reserved(ip("10.244.1.100"))
    pool = Pool("10.244.1.0/24", range_start="10.244.1.10", range_end="10.244.1.20", store=store)
    assert pool.allocate("cid").ip == ip("10.244.1.10")


def test_addresses_of_other_subnets_in_the_directory_are_left_alone(tmp_path):
    store = DiskStore(tmp_path, "podnet")
    store.reserve(ip("10.99.0.5"), "elsewhere", "eth0")
    pool = Pool("10.244.1.0/24", store=store)
    assert pool.allocations() == []
    assert pool.release("elsewhere") is None
    assert (tmp_path / "podnet" / "10.99.0.5").exists()


@pytest.mark.parametrize("network", ["", "..", "a/b"])
def test_network_name_must_be_a_directory_name(tmp_path, network):
    with pytest.raises(ConfigError):
        DiskStore(tmp_path, network)


# --- node pools -------------------------------------------------------------------------------


def test_node_pool_cidr():
    assert node_pool_cidr(0) == IPv4Network("10.244.0.0/24")
    assert node_pool_cidr(1) == IPv4Network("10.244.1.0/24")
    assert node_pool_cidr(255) == IPv4Network("10.244.255.0/24")
    assert node_pool_cidr(3, "10.32.0.0/12", 20) == IPv4Network("10.32.48.0/20")
    with pytest.raises(ConfigError):
        node_pool_cidr(256)
    with pytest.raises(ConfigError):
        node_pool_cidr(0, "10.244.0.0/16", 8)
