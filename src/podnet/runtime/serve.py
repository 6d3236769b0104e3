"""The trio serve loop: one task per port, one timer task, clean shutdown by cancellation.

Layer: runtime. Each port task waits until its device is readable, then reads and processes frames
until EAGAIN (with a checkpoint every `batch` frames so one busy port cannot starve the others),
and writes every Transmit at once. The timer task sleeps until `datapath.next_deadline()`, calls
`handle_timer(now)` and sends what it returns (ARP requests). `now` is trio's clock, which is monotonic.

Invariants: the datapath is only ever called from this one trio thread; a port that fails is logged
and closed without taking the node down.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from podnet.core.datapath import Datapath, Transmit

log = logging.getLogger(__name__)

_IDLE_TIMER_S = 1.0


class Port(Protocol):
    name: str

    async def wait_readable(self) -> None: ...
    def receive(self): ...
    def send(self, frame, vnet) -> None: ...


class Node:
    """A datapath and the I/O ports attached to it, served by `serve()`."""

    def __init__(self, datapath: Datapath, *, batch: int = 64) -> None:
        self.datapath = datapath
        self.ports: dict[int, Port] = {}
        self.batch = batch
        self.frames_processed = 0
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[int, trio.CancelScope] = {}
        self._active: dict[int, trio.Event] = {}   # port id -> set once its task has let go of it
        self._timer_changed = trio.Event()

    def attach(self, port_id: int, port: Port) -> None:
        """Start serving `port` as the datapath's `port_id` (also while the loop runs)."""
        self.ports[port_id] = port
        if self._nursery is not None:
            self._nursery.start_soon(self._port_task, port_id, port)

    def detach(self, port_id: int) -> None:
        self.ports.pop(port_id, None)
        scope = self._scopes.pop(port_id, None)
        if scope is not None:
            scope.cancel()

    async def detach_and_wait(self, port_id: int) -> None:
        """Detach, and return once the port's task can no longer touch the port, so its fd may be
        closed: a task that epoll already woke would otherwise read the closed (or reused) fd."""
        self.detach(port_id)
        if (stopped := self._active.get(port_id)) is not None:
            await stopped.wait()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for port_id, port in self.ports.items():
                nursery.start_soon(self._port_task, port_id, port)
            nursery.start_soon(self._timer_task)
            task_status.started()
        self._nursery = None

    async def _port_task(self, port_id: int, port: Port) -> None:
        if self.ports.get(port_id) is not port:
            return  # detached before this task first ran
        stopped = self._active[port_id] = trio.Event()
        with trio.CancelScope() as scope:
            self._scopes[port_id] = scope
            try:
                await self._pump(port_id, port)
            except OSError as exc:
                log.error("port %s failed: %s; detached", port.name or port_id, exc)
            finally:
                if self._scopes.get(port_id) is scope:
                    del self._scopes[port_id]
                del self._active[port_id]
                stopped.set()

    async def _pump(self, port_id: int, port: Port) -> None:
        fast = self.datapath.forward_fast
        slow = self.datapath.process_slow
        ports = self.ports
        receive = port.receive
        batch = self.batch
        while True:
            await port.wait_readable()
            now = trio.current_time()
            handled = 0
            while True:
                got = receive()
                if got is None:
                    if not handled:
                        break
                    # drained: let the other ports run (the ACKs of this data come back through
                    # one of them), then look again before paying for a new epoll wait
                    self.frames_processed += handled
                    handled = 0
                    await trio.lowlevel.checkpoint()
                    now = trio.current_time()
                    continue
                frame, vnet = got
                out = fast(frame, port_id, now, vnet)
                if out is not None:
                    target = ports.get(out)
                    if target is not None:
                        target.send(frame, vnet)
                else:
                    for action in slow(frame, port_id, now, vnet):
                        if type(action) is Transmit:
                            target = ports.get(action[0])
                            if target is not None:
                                target.send(action[1], action[2])
                handled += 1
                if handled == batch:
                    self.frames_processed += handled
                    handled = 0
                    await trio.lowlevel.checkpoint()
                    now = trio.current_time()
            if not self._timer_changed.is_set():
                self._timer_changed.set()

    async def _timer_task(self) -> None:
        while True:
            deadline = self.datapath.next_deadline()
            with trio.move_on_at(deadline if deadline is not None else trio.current_time() + _IDLE_TIMER_S):
                if deadline is None:
                    # nothing to expire yet: wake when traffic may have created something
                    await self._timer_changed.wait()
                else:
                    await trio.sleep_forever()
            self._timer_changed = trio.Event()
            for action in self.datapath.handle_timer(trio.current_time()) or ():
                # what timers send: the underlay's ARP requests and neighbour probes
                target = self.ports.get(action.port)
                if target is not None:
                    target.send(action.frame, action.vnet)
