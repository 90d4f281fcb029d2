"""Wait on conditions with a deadline: tests never sleep a fixed time to let something happen.

- ``await wait_for(condition)``: calls ``condition`` (a plain or an async function) until it
  returns a truthy value and returns that value; polls quickly at first, then every
  ``interval`` seconds; after ``timeout`` seconds fails with ``WaitTimeout`` (an
  ``AssertionError``) naming the condition (or saying ``message``, a string or a function
  called then) and its last value.
- ``wait_for_sync(condition)``: the same from synchronous code (threads, fixtures, process
  helpers).

A condition that is not met yet returns something falsy; one that can never be met any more
(a process exited) should raise, so the test fails at once rather than at the deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

# The first pauses are short (a condition usually holds within milliseconds in process),
# then they double up to ``interval``.
_FIRST_PAUSE = 0.005


class WaitTimeout(AssertionError):
    """A condition still false at its deadline; ``last`` is the value it returned last."""

    def __init__(self, message: str, last: object) -> None:
        super().__init__(message)
        self.last = last


def _describe(condition: Callable[..., Any], message: str | Callable[[], str]) -> str:
    if callable(message):
        return message()
    if message:
        return message
    name = getattr(condition, "__qualname__", None) or repr(condition)
    return f"condition {name}"


def _timeout(
    condition: Callable[..., Any], message: str | Callable[[], str], timeout: float, last: object
) -> NoReturn:
    what = _describe(condition, message)
    raise WaitTimeout(f"{what}: not met within {timeout:g} s (last value: {last!r})", last)


async def wait_for(
    condition: Callable[[], T | Awaitable[T]],
    *,
    # The deadline of the polling itself (its failure names the last value, which an
    # asyncio.timeout around the call could not).
    timeout: float = 30.0,  # noqa: ASYNC109
    interval: float = 0.05,
    message: str | Callable[[], str] = "",
) -> T:
    """Until ``condition()`` is truthy: its value. Fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = min(_FIRST_PAUSE, interval)
    while True:
        value = condition()
        last = await value if inspect.isawaitable(value) else value
        if last:
            return last  # type: ignore[return-value]
        left = deadline - time.monotonic()
        if left <= 0:
            _timeout(condition, message, timeout, last)
        await asyncio.sleep(min(pause, left))
        pause = min(2 * pause, interval)


def wait_for_sync(
    condition: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "",
) -> T:
    """``wait_for`` for synchronous code: blocks the calling thread."""
    deadline = time.monotonic() + timeout
    pause = min(_FIRST_PAUSE, interval)
    while True:
        last = condition()
        if last:
            return last
        left = deadline - time.monotonic()
        if left <= 0:
            _timeout(condition, message, timeout, last)
        time.sleep(min(pause, left))
        pause = min(2 * pause, interval)
