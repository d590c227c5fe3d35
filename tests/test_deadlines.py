import asyncio

import pytest

from miles_envs.deadlines import DeadlineExceeded, within


async def test_result_passes_through_and_none_means_no_deadline():
    async def value():
        await asyncio.sleep(0)
        return 7

    assert await within(value(), 5.0) == 7
    assert await within(value(), None) == 7


async def test_expiry_cancels_the_awaitable_and_raises_deadline_exceeded():
    cancelled = asyncio.Event()

    async def forever():
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(DeadlineExceeded):
        await within(forever(), 0.01)
    assert cancelled.is_set()
    if hasattr(asyncio.Task, "cancelling"):  # Python 3.11+: the caller is not left marked as cancelled
        assert asyncio.current_task().cancelling() == 0


async def test_a_timeout_error_raised_by_the_awaitable_itself_is_not_the_deadline():
    async def own():
        raise TimeoutError("the awaited code's own")

    with pytest.raises(TimeoutError, match="the awaited code's own") as caught:
        await within(own(), 5.0)
    assert not isinstance(caught.value, DeadlineExceeded)
