"""Small helpers shared by tests: wait for a condition instead of sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.02, message: str | Callable[[], str] = ""
) -> T:
    """Call `predicate` every `interval` seconds until it returns something truthy, and return that; fail the
    test (AssertionError) after `timeout` seconds. `message` (or a callable giving it) explains the failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"condition not reached in {timeout:g} s{': ' + text if text else ''}")
        time.sleep(interval)


def stays_true(predicate: Callable[[], object], duration: float, interval: float = 0.02) -> None:
    """Assert that `predicate` holds at every check during `duration` seconds (for what must NOT happen, a
    bounded wait is the only proof; checking throughout catches a change that reverts before the end)."""
    deadline = time.monotonic() + duration
    while True:
        assert predicate(), "condition stopped holding"
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)
