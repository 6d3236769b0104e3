"""Polling, for tests that wait on a lab, a cluster or a store reaching some state in its own time.

`wait_until` blocks (synchronous tests, a cluster in a background thread); `await_until` is the
same inside trio. Both return the predicate's first true value and fail with an AssertionError
that names what was awaited.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], what: str, timeout_s: float = 30.0, interval_s: float = 0.1) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what}")


async def await_until(predicate: Callable[[], T], what: str, timeout_s: float = 10.0,
                      interval_s: float = 0.01) -> T:
    with trio.move_on_after(timeout_s):
        while not (value := predicate()):
            await trio.sleep(interval_s)
        return value
    raise AssertionError(f"timed out waiting for {what}")


__all__ = ["await_until", "wait_until"]
