"""Qwen3-Coder XML tool calls::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Parameter values are text. With the tools' JSON schemas the declared type decides the conversion
(``string`` stays text, anything else is read as JSON); without schemas a value that reads as JSON
is taken as JSON, any other value as text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from miles_envs.parsers.base import ToolParser, loads_json, tool_call

_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_FUNCTION = re.compile(r"<function=([^>\n]*)>(.*?)</function>", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]*)>(.*?)</parameter>", re.DOTALL)


class Qwen3CoderParser(ToolParser):
    name = "qwen3_coder"
    expected_format = (
        "Write each call as <tool_call>\n<function=NAME>\n<parameter=ARG>\nVALUE\n</parameter>\n</function>\n</tool_call>"
    )

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        self._param_types = _parameter_types(tools or [])

    def parse_calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        blocks = _BLOCK.findall(text)
        remainder = _BLOCK.sub("", text)
        for tag, problem in (
            ("<tool_call>", "a <tool_call> block is not closed with </tool_call>"),
            ("</tool_call>", "a </tool_call> has no opening <tool_call>"),
            ("<function=", "a <function=...> must sit inside <tool_call>...</tool_call>"),
        ):
            if tag in remainder:
                raise self.fail(problem, text)
        return remainder.strip() or None, [self._call(block, index, text) for index, block in enumerate(blocks)]

    def _call(self, block: str, index: int, text: str) -> dict[str, Any]:
        match = _FUNCTION.fullmatch(block.strip())
        if match is None:
            raise self.fail(f"tool call {index + 1} must hold exactly one <function=NAME>...</function>", text)
        name, body = match.group(1).strip(), match.group(2)
        if not name:
            raise self.fail(f"tool call {index + 1} has an empty function name", text)
        if _PARAMETER.sub("", body).strip():
            raise self.fail(f"tool call {index + 1} ({name}) has text outside <parameter=...>...</parameter>", text)
        arguments: dict[str, Any] = {}
        for key, raw in _PARAMETER.findall(body):
            key = key.strip()
            if not key:
                raise self.fail(f"tool call {index + 1} ({name}) has a parameter without a name", text)
            arguments[key] = self._value(name, key, _strip_one_newline(raw))
        return tool_call(name, arguments, index, text)

    def _value(self, function: str, key: str, raw: str) -> Any:
        declared = self._param_types.get((function, key))
        if declared == "string":
            return raw
        try:
            return loads_json(raw)
        except ValueError:
            if declared is None:
                return raw
            raise self.fail(f"parameter {key!r} of {function} must be a JSON {declared}, got {raw[:80]!r}", raw) from None


def _strip_one_newline(value: str) -> str:
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def _parameter_types(tools: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], str]:
    """(function, parameter) → declared JSON type, from OpenAI function specs."""
    types: dict[tuple[str, str], str] = {}
    for spec in tools:
        function = spec.get("function", spec)
        properties = (function.get("parameters") or {}).get("properties") or {}
        for key, schema in properties.items():
            if isinstance(schema, Mapping) and isinstance(schema.get("type"), str):
                types[(function.get("name"), key)] = schema["type"]
    return types
