"""Llama-3.x JSON tool calls: the whole turn is ``{"name": ..., "parameters": {...}}`` (optionally
after ``<|python_tag|>``; several calls separated by ``;``). Any other turn is plain content."""

from __future__ import annotations

import json
from typing import Any

from miles_envs.parsers.base import ToolParser, call_from_object

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    expected_format = 'Reply with only {"name": "<function-name>", "parameters": {<args as a JSON object>}}'

    def parse_calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        body = text.strip()
        tagged = body.startswith(PYTHON_TAG)
        body = body.removeprefix(PYTHON_TAG).strip()
        if not tagged and not (body.startswith("{") and '"name"' in body):
            return text.strip() or None, []
        return None, [
            call_from_object(self, obj, index, text, arguments_keys=("parameters", "arguments"))
            for index, obj in enumerate(self._objects(body, text))
        ]

    def _objects(self, body: str, text: str) -> list[Any]:
        """JSON values separated by ``;`` and/or whitespace."""
        decoder = json.JSONDecoder()
        objects, at = [], 0
        while at < len(body):
            try:
                obj, at = decoder.raw_decode(body, at)
            except ValueError as exc:
                raise self.fail(f"tool call {len(objects) + 1} is not valid JSON: {exc}", text) from exc
            except RecursionError as exc:
                raise self.fail(f"tool call {len(objects) + 1} is nested too deeply", text) from exc
            objects.append(obj)
            rest = body[at:].lstrip()
            rest = rest[1:].lstrip() if rest.startswith(";") else rest
            at = len(body) - len(rest)
        if not objects:
            raise self.fail("the tool call is empty", text)
        return objects
