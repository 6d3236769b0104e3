"""The underlay's namespaces belong to whoever made them: a second run that finds one already there
fails and leaves it alone (root)."""

from __future__ import annotations

import pytest

from podnet.linux.netns import create_netns, delete_netns, netns_exists
from podnet.linux.resources import Resources
from podnet.linux.underlay import add_veth_host, create_underlay, remove_underlay

pytestmark = pytest.mark.root


def test_an_underlay_name_in_use_is_refused_and_left_alone(lab):
    first = Resources(prefix=lab.prefix, state_dir=lab.state_dir)
    underlay, entry = create_underlay(first, lab.name("ul"))
    try:
        second = Resources(prefix=lab.prefix, state_dir=lab.state_dir + "-2")
        with pytest.raises(FileExistsError):
            create_underlay(second, underlay.netns)
        assert netns_exists(underlay.netns)        # the first run's underlay is still there
        assert second.entries == ()              # and the second run does not claim it
        host = lab.name("host")
        create_netns(host)
        try:
            with pytest.raises(FileExistsError):
                add_veth_host(underlay, second, host)
            assert netns_exists(host) and second.entries == ()
        finally:
            delete_netns(host)
    finally:
        remove_underlay(first, underlay, entry)
        first.release_all()
