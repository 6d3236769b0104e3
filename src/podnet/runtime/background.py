"""Run an async context manager on a trio loop of its own, in a daemon thread, for synchronous callers.

Layer: runtime. `run_lab`, `run_cluster` and `run_cluster_processes` are all the same thing: open
the async context manager in a fresh `trio.run` on a thread, hand the caller a synchronous wrapper
(built with the loop's TrioToken, so its methods can `trio.from_thread.run…` into the loop), and on
exit stop the loop and wait for the async exit to finish. An exception raised while opening, or
while closing, reaches the caller's thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import trio

W = TypeVar("W")


@contextlib.contextmanager
def run_in_background(open_async: Callable[[], AbstractAsyncContextManager[Any]],
                      wrap: Callable[[Any, trio.lowlevel.TrioToken], W], *, name: str) -> Iterator[W]:
    """Yield `wrap(value, token)` while `open_async()` is entered on a trio loop in thread `name`."""
    ready = threading.Event()
    box: dict = {}

    async def main() -> None:
        try:
            async with open_async() as value:
                box["token"] = trio.lowlevel.current_trio_token()
                box["wrapped"] = wrap(value, box["token"])
                box["stop"] = trio.Event()
                ready.set()
                await box["stop"].wait()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), name=name, daemon=True)
    thread.start()
    ready.wait()
    if "wrapped" not in box:
        thread.join()
        raise box["error"]
    try:
        yield box["wrapped"]
    finally:
        trio.from_thread.run_sync(box["stop"].set, trio_token=box["token"])
        thread.join()
        if "error" in box:
            raise box["error"]
