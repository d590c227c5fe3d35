"""Await something under a deadline in the calling task.

``asyncio.wait_for`` (before Python 3.12) and ``asyncio.wait`` run the awaitable in a task of its
own: a task, a waiter future and a timer per call, tens of µs on a path taken every env step and
tool call. ``asyncio.timeout`` (3.11+) cancels the calling task instead. The deadline's own expiry
is told apart from a ``TimeoutError`` the awaited code raises itself, which passes through as is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+


class DeadlineExceeded(TimeoutError):
    """The deadline passed before the awaitable finished (it was cancelled)."""


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """The awaitable's result; ``DeadlineExceeded`` once ``timeout`` seconds pass (None: no deadline)."""
    if timeout is None:
        return await awaitable
    if _timeout is None:  # Python 3.10: its asyncio.TimeoutError is not the builtin one
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded from None
    deadline = _timeout(timeout)
    try:
        async with deadline:
            return await awaitable
    except TimeoutError:
        if deadline.expired():
            raise DeadlineExceeded from None
        raise
