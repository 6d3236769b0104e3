import pytest

from podnet.linux.names import (
    DEFAULT_PREFIX,
    MAX_IFNAME_LEN,
    has_prefix,
    link_name,
    netns_name,
    tap_name,
    validate_netns,
    validate_prefix,
)


def test_default_prefix_is_valid():
    assert validate_prefix(DEFAULT_PREFIX) == "pn-"


@pytest.mark.parametrize("bad", ["", "PN-", "pn_", "-pn", "1pn", "pn-lab-x", "pn/"])
def test_bad_prefixes_are_refused(bad):
    with pytest.raises(ValueError):
        validate_prefix(bad)


def test_netns_name_is_prefix_plus_pod_and_may_be_long():
    long_pod = "default." + "a" * 200
    assert netns_name("web-1") == "pn-web-1"
    assert netns_name(long_pod, prefix="lab-") == "lab-" + long_pod


@pytest.mark.parametrize("bad", ["", "a/b", "a b", "x" * 253])
def test_bad_pod_names_are_refused(bad):
    with pytest.raises(ValueError):
        netns_name(bad)


def test_tap_names_fit_ifnamsiz_and_are_stable():
    for prefix in ("pn-", "abcdef"):
        name = tap_name("default/web-1-with-a-very-long-name", prefix=prefix)
        assert len(name) <= MAX_IFNAME_LEN
        assert name.startswith(prefix + "t")
        assert name == tap_name("default/web-1-with-a-very-long-name", prefix=prefix)
    assert tap_name("a") != tap_name("b")
    assert link_name("a", kind="v").startswith("pn-v")


def test_has_prefix_and_netns_file_names():
    assert has_prefix("pn-x") and not has_prefix("pnx")
    assert validate_netns("pn-a.b") == "pn-a.b"
    for bad in ("", ".", "..", "a/b"):
        with pytest.raises(ValueError):
            validate_netns(bad)
