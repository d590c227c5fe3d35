"""Plain JSON fallback for models without a tool-call format: the turn (or a ```json fenced block in
it) is ``{"name": ..., "arguments": {...}}`` or a list of such objects. Other text is content."""

from __future__ import annotations

import re
from typing import Any

from miles_envs.parsers.base import ToolParser, call_from_object, loads_json

_FENCE = re.compile(r"```(?:json)?[ \t]*\n(.*?)\n?```", re.DOTALL)


class JsonParser(ToolParser):
    name = "json"
    expected_format = 'Write a call as {"name": "<function-name>", "arguments": {<args as a JSON object>}}'

    def parse_calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        fenced = [m for m in _FENCE.finditer(text) if _looks_like_call(m.group(1))]
        if fenced:
            candidates = [m.group(1) for m in fenced]
            content = _FENCE.sub(lambda m: "" if _looks_like_call(m.group(1)) else m.group(0), text).strip()
        elif _looks_like_call(text):
            candidates, content = [text], ""
        else:
            return text.strip() or None, []
        objects: list[Any] = []
        for raw in candidates:
            try:
                value = loads_json(raw.strip())
            except ValueError as exc:
                raise self.fail(f"the tool call is not valid JSON: {exc}", text) from exc
            objects += value if isinstance(value, list) else [value]
        calls = [
            call_from_object(self, obj, index, text, arguments_keys=("arguments", "parameters"))
            for index, obj in enumerate(objects)
        ]
        return content or None, calls


def _looks_like_call(raw: str) -> bool:
    """A JSON object or list that names a function: ``{"name"`` (or ``[{"name"``) at its start."""
    stripped = re.sub(r"\s+", "", raw[:64])
    return stripped.startswith(('{"name"', '[{"name"'))
