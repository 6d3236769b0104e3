"""Polling for the cluster e2e tests: a condition that the cluster reaches in its own time."""

from __future__ import annotations

import time


def wait_until(predicate, what: str, timeout_s: float = 30.0, interval_s: float = 0.1):
    """`predicate()`'s first true value, polled every `interval_s`; AssertionError naming `what`
    after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what}")
