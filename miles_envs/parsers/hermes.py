"""Hermes / Qwen2.5 / Qwen3: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks."""

from __future__ import annotations

import re
from typing import Any

from miles_envs.parsers.base import ToolParser, call_from_object, loads_json

_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
# A block with the newline chat templates put before each call: removing both leaves the content
# exactly as the model wrote it, so rendering the parsed message gives back the model's text.
_BLOCK_AS_RENDERED = re.compile(r"\n?<tool_call>.*?</tool_call>", re.DOTALL)


class HermesParser(ToolParser):
    name = "hermes"
    expected_format = (
        'Write each call as <tool_call>\n{"name": "<function-name>", "arguments": {<args as a JSON object>}}\n</tool_call>'
    )

    def parse_calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        blocks = _BLOCK.findall(text)
        remainder = _BLOCK_AS_RENDERED.sub("", text)
        if "<tool_call>" in remainder:
            raise self.fail("a <tool_call> block is not closed with </tool_call>", text)
        if "</tool_call>" in remainder:
            raise self.fail("a </tool_call> has no opening <tool_call>", text)
        calls = []
        for index, block in enumerate(blocks):
            try:
                obj = loads_json(block.strip())
            except ValueError as exc:
                raise self.fail(f"tool call {index + 1} is not valid JSON: {exc}", text) from exc
            calls.append(call_from_object(self, obj, index, text, arguments_keys=("arguments", "parameters")))
        return remainder or None, calls
