"""Running a turn's tool calls: every failure becomes a tool-result message the model can read.

Unknown tools, invalid arguments, exceptions and timeouts never raise out of :meth:`Toolbox.run`;
they come back as ``Error: ...`` tool results so the episode continues and the model can correct
itself. Independent calls of one turn run concurrently; results keep the order of the calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

import pydantic_core

from miles_envs.deadlines import DeadlineExceeded, within
from miles_envs.env import Message
from miles_envs.tools.tool import Tool, ToolArgumentError

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_OUTPUT_CHARS = 8192


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters and say how much was dropped."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n... [truncated {len(text) - limit} characters]"


def render_result(result: Any) -> str:
    """Strings go through unchanged; anything else (dicts, lists, pydantic models, dataclasses) as JSON."""
    if isinstance(result, str):
        return result
    return pydantic_core.to_json(result, fallback=str).decode()


def tool_message(call_id: str | None, name: str | None, content: str) -> Message:
    return {"role": "tool", "tool_call_id": call_id, "name": name, "content": content}


class Toolbox:
    """A named set of tools plus the policy for running them (timeout, output limit)."""

    def __init__(
        self,
        tools: Iterable[Tool],
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    ) -> None:
        self.tools: dict[str, Tool] = {}
        for item in tools:
            if item.name in self.tools:
                raise ValueError(f"two tools are named {item.name!r}; pass name= to @tool to tell them apart")
            self.tools[item.name] = item
        self.timeout = timeout
        self.max_output_chars = max_output_chars

    @property
    def specs(self) -> list[dict[str, Any]]:
        return [item.spec for item in self.tools.values()]

    async def run(self, tool_calls: Iterable[Mapping[str, Any]]) -> list[Message]:
        """Execute OpenAI-format tool calls concurrently; one tool message per call, in call order."""
        calls = list(tool_calls)
        if len(calls) == 1:  # nothing to overlap: no task for it
            return [await self.run_one(calls[0])]
        return list(await asyncio.gather(*map(self.run_one, calls)))

    async def run_one(self, call: Mapping[str, Any]) -> Message:
        function = call.get("function") or {}
        name = function.get("name")
        content = await self._result_text(name, function.get("arguments"))
        return tool_message(call.get("id"), name, truncate(content, self.max_output_chars))

    async def _result_text(self, name: str | None, arguments: Any) -> str:
        selected = self.tools.get(name) if name else None
        if selected is None:
            available = ", ".join(self.tools) or "none"
            return f"Error: unknown tool {name!r}. Available tools: {available}."
        try:
            kwargs = selected.validate(arguments)
        except ToolArgumentError as error:
            return f"Error: invalid arguments for {name}: {error}"
        timeout = selected.timeout if selected.timeout is not None else self.timeout
        try:
            result = await within(selected.invoke(kwargs), timeout)
        except DeadlineExceeded:
            # A sync tool's worker thread cannot be stopped; its late result is discarded.
            return f"Error: {name} timed out after {timeout:g} s."
        except Exception as error:
            return f"Error: {name} raised {type(error).__name__}: {error}"
        return render_result(result)
