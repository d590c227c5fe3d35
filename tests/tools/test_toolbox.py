import asyncio
import json
import threading

import pytest
from pydantic import BaseModel

from miles_envs.tools import Toolbox, tool


def call(call_id, name, arguments):
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


@tool
def divide(a: float, b: float) -> float:
    """Divide a by b."""
    return a / b


@tool
async def shout(text: str) -> str:
    """Upper-case the text."""
    return text.upper()


class Point(BaseModel):
    x: int
    y: int


@tool
def origin() -> Point:
    """The origin."""
    return Point(x=0, y=0)


async def test_results_keep_call_order_and_render_non_strings_as_json():
    box = Toolbox([divide, shout, origin])
    messages = await box.run([call("1", "shout", {"text": "hi"}), call("2", "divide", {"a": 7, "b": 2}), call("3", "origin", "")])
    assert messages == [
        {"role": "tool", "tool_call_id": "1", "name": "shout", "content": "HI"},
        {"role": "tool", "tool_call_id": "2", "name": "divide", "content": "3.5"},
        {"role": "tool", "tool_call_id": "3", "name": "origin", "content": '{"x":0,"y":0}'},
    ]


async def test_every_failure_is_a_tool_message():
    box = Toolbox([divide, shout])
    messages = await box.run([
        call("a", "multiply", {"a": 1}),
        call("b", "divide", {"a": 1}),
        call("c", "divide", {"a": 1, "b": 0}),
        call("d", "divide", "not json"),
    ])
    assert [m["content"] for m in messages] == [
        "Error: unknown tool 'multiply'. Available tools: divide, shout.",
        "Error: invalid arguments for divide: missing required argument 'b'",
        "Error: divide raised ZeroDivisionError: float division by zero",
        "Error: invalid arguments for divide: arguments are not valid JSON (expected ident at line 1 column 2)",
    ]
    assert [m["tool_call_id"] for m in messages] == ["a", "b", "c", "d"]


async def test_timeouts_come_back_as_messages_and_per_tool_timeouts_win():
    never = asyncio.Event()

    @tool(timeout=0.05)
    async def hang() -> str:
        """Never returns."""
        await never.wait()
        return "done"

    [message] = await Toolbox([hang], timeout=60).run([call("t", "hang", {})])
    assert message["content"] == "Error: hang timed out after 0.05 s."


async def test_a_sync_tool_past_its_timeout_times_out_and_its_own_timeout_error_is_not_relabelled():
    release = threading.Event()

    @tool(timeout=0.05)
    def block() -> str:
        """Blocks its worker thread until released."""
        release.wait(30)
        return "late"

    @tool
    async def gives_up() -> str:
        """Raises TimeoutError itself, well within the toolbox's timeout."""
        raise TimeoutError("upstream did not answer")

    try:
        [late] = await Toolbox([block]).run([call("s", "block", {})])
    finally:
        release.set()
    [own] = await Toolbox([gives_up], timeout=60).run([call("g", "gives_up", {})])
    assert late["content"] == "Error: block timed out after 0.05 s."
    assert own["content"] == "Error: gives_up raised TimeoutError: upstream did not answer"


async def test_output_is_truncated_at_the_limit():
    @tool
    def dump(n: int) -> str:
        """n characters."""
        return "x" * n

    box = Toolbox([dump], max_output_chars=10)
    short, long = await box.run([call("1", "dump", {"n": 10}), call("2", "dump", {"n": 25})])
    assert short["content"] == "x" * 10
    assert long["content"] == "x" * 10 + "\n... [truncated 15 characters]"


async def test_async_calls_of_one_turn_run_concurrently():
    # Each call waits for the other: run one after the other, the first would time out.
    ready = {"left": asyncio.Event(), "right": asyncio.Event()}

    @tool
    async def meet(side: str, other: str) -> str:
        """Rendezvous."""
        ready[side].set()
        await ready[other].wait()
        return side

    box = Toolbox([meet], timeout=30)
    messages = await box.run([call("1", "meet", {"side": "left", "other": "right"}),
                              call("2", "meet", {"side": "right", "other": "left"})])
    assert [m["content"] for m in messages] == ["left", "right"]


async def test_sync_calls_of_one_turn_run_concurrently_in_threads():
    barrier = threading.Barrier(3, timeout=30)

    @tool
    def wait_for_others(name: str) -> str:
        """Rendezvous of three threads."""
        barrier.wait()
        return name

    messages = await Toolbox([wait_for_others]).run([call(str(i), "wait_for_others", {"name": f"t{i}"}) for i in range(3)])
    assert [m["content"] for m in messages] == ["t0", "t1", "t2"]


def test_duplicate_names_are_rejected():
    with pytest.raises(ValueError, match="two tools are named 'divide'"):
        Toolbox([divide, tool(name="divide", description="Also divides.")(lambda: 0)])
