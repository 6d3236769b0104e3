"""The trio serve loop over in-memory ports: no root, trio's mock clock for timers."""

import trio
import trio.testing

from podnet.core.datapath import Datapath, PortKind
from podnet.runtime.ports import MemoryPort
from podnet.runtime.serve import Node
from podnet.testing import frames

A_IP, B_IP = "10.244.0.2", "10.244.0.3"


def _node():
    dp = Datapath(flow_idle_timeout_s=5.0)
    a = dp.add_port("pod-a", PortKind.POD, frames.POD_MAC_A, A_IP)
    b = dp.add_port("pod-b", PortKind.POD, frames.POD_MAC_B, B_IP)
    node = Node(dp, batch=4)
    pa, pb = MemoryPort("pod-a"), MemoryPort("pod-b")
    node.attach(a, pa)
    node.attach(b, pb)
    return dp, node, pa, pb


async def test_frames_flow_between_ports_and_replies_come_back():
    dp, node, pa, pb = _node()
    async with trio.open_nursery() as nursery:
        await nursery.start(node.serve)
        for seq in range(10):
            pa.inject(frames.tcp(A_IP, B_IP, payload=b"x" * seq, seq=seq + 1), vnet=b"\x01" + bytes(9))
        got = await pb.wait_sent(10)
        pb.inject(frames.tcp(B_IP, A_IP, 80, 40000, src_mac=frames.POD_MAC_B))
        back = await pa.wait_sent(1)
        nursery.cancel_scope.cancel()
    # every frame arrived, in order, TTL decremented, vnet header passed through untouched
    assert [frames.decode(f).data.data.seq for f, _ in got] == list(range(1, 11))
    assert all(frames.decode(f).data.ttl == 63 for f, _ in got)
    assert all(v == b"\x01" + bytes(9) for _, v in got)
    assert frames.decode(back[0][0]).data.dst == bytes([10, 244, 0, 2])
    stats = dp.statistics()
    assert stats.slow_path_packets == 2 and stats.fast_path_packets == 9
    assert node.frames_processed == 11


async def test_timer_task_expires_idle_flows_with_the_mock_clock(autojump_clock):
    dp, node, pa, pb = _node()
    async with trio.open_nursery() as nursery:
        await nursery.start(node.serve)
        pa.inject(frames.udp(A_IP, B_IP))
        await pb.wait_sent(1)
        assert dp.statistics().flows == 1
        await trio.sleep(4.0)
        assert dp.statistics().flows == 1      # idle 4 s < 5 s: still cached
        await trio.sleep(3.0)
        assert dp.statistics().flows == 0      # swept by the timer task, not by a packet
        nursery.cancel_scope.cancel()


async def test_detach_stops_serving_a_port():
    dp, node, pa, pb = _node()
    async with trio.open_nursery() as nursery:
        await nursery.start(node.serve)
        node.detach(2)
        pa.inject(frames.udp(A_IP, B_IP))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert pb.sent == []  # port 2 has no I/O attached any more
    assert dp.statistics().ports[0].rx_packets == 1


async def test_detach_and_wait_returns_once_the_port_task_let_go():
    dp, node, pa, pb = _node()
    async with trio.open_nursery() as nursery:
        await nursery.start(node.serve)
        await trio.testing.wait_all_tasks_blocked()
        pa.inject(frames.udp(A_IP, B_IP))   # the task of port 1 is woken ...
        await node.detach_and_wait(1)        # ... and may finish that frame, but then it is gone
        assert 1 not in node._active and 1 not in node.ports
        pa.inject(frames.udp(A_IP, B_IP))
        await node.detach_and_wait(1)        # twice is harmless
        # a port detached before its task first ran never touches the port
        late = MemoryPort("late")
        node.attach(3, late)
        await node.detach_and_wait(3)
        late.inject(frames.udp(A_IP, B_IP))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert len(pa.inbox) == 1 and len(late.inbox) == 1   # nobody read them
