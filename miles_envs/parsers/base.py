"""The tool-call parser interface: generated text → content, OpenAI-format tool calls, reasoning.

Parsers never raise anything but ``ToolParseError``; its message is written for the model to read
(the loop returns it as the error observation), so it says what was wrong and the expected format.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from miles_envs.env import Message, assistant


class ToolParseError(ValueError):
    """The model's text attempts a tool call that cannot be parsed; ``str(error)`` is model-readable."""

    def __init__(self, message: str, text: str = "") -> None:
        super().__init__(message)
        self.text = text


@dataclass
class ParsedAction:
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    reasoning: str | None = None

    def as_message(self) -> Message:
        """The assistant message the env receives (reasoning kept, so chat templates see it)."""
        message = assistant(self.content, self.tool_calls)
        if self.reasoning is not None:
            message["reasoning_content"] = self.reasoning
        return message


class ToolParser(ABC):
    """Parses one assistant turn. Subclasses implement ``parse_calls`` on the text after reasoning."""

    name: ClassVar[str]
    #: the format the model is told to use when its call is malformed
    expected_format: ClassVar[str]

    def parse(self, text: str) -> ParsedAction:
        reasoning, rest = split_reasoning(text)
        try:
            content, calls = self.parse_calls(rest)
        except ToolParseError:
            raise
        except (ValueError, RecursionError) as exc:
            raise ToolParseError(f"could not read the tool call ({exc}). {self.expected_format}", text) from exc
        return ParsedAction(content=content or None, tool_calls=calls, reasoning=reasoning)

    @abstractmethod
    def parse_calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """Split ``text`` into the plain content and the tool calls."""

    def fail(self, problem: str, text: str) -> ToolParseError:
        return ToolParseError(f"{problem}. {self.expected_format}", text)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``<think>…</think>`` → (reasoning, rest). An unclosed block is all reasoning (cut by length)."""
    if "</think>" in text:
        head, rest = text.split("</think>", 1)
        return head.split("<think>", 1)[-1].strip("\n"), rest.lstrip("\n")
    if text.lstrip().startswith("<think>"):
        return text.lstrip()[len("<think>") :].strip("\n"), ""
    return None, text


def loads_json(raw: str) -> Any:
    """``json.loads`` whose failures (including absurd nesting) are reported as ``ValueError``."""
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


_ARGUMENTS_JSON = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(..., ensure_ascii=False) without a new encoder per call


def tool_call(name: str, arguments: Any, index: int, source: str) -> dict[str, Any]:
    """An OpenAI-format tool call; the id is derived from the turn's text so reruns reproduce it."""
    if not isinstance(arguments, str):
        arguments = _ARGUMENTS_JSON(arguments)
    digest = hashlib.blake2b(f"{index}\0{source}".encode(errors="surrogatepass"), digest_size=6).hexdigest()
    return {"id": f"call_{digest}", "type": "function", "function": {"name": name, "arguments": arguments}}


def call_from_object(parser: ToolParser, obj: Any, index: int, source: str, *, arguments_keys: tuple[str, ...]) -> dict[str, Any]:
    """Validate a decoded ``{"name": ..., "arguments": {...}}`` object and build the call."""
    if not isinstance(obj, dict):
        raise parser.fail(f"tool call {index + 1} is a JSON {type(obj).__name__}, not an object", source)
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise parser.fail(f'tool call {index + 1} has no "name" string', source)
    key = next((k for k in arguments_keys if k in obj), None)
    arguments = obj[key] if key else {}
    if isinstance(arguments, str):
        try:
            arguments = loads_json(arguments)
        except ValueError as exc:
            raise parser.fail(f"the arguments of tool call {index + 1} ({name}) are not valid JSON: {exc}", source) from exc
    if not isinstance(arguments, dict):
        raise parser.fail(f"the arguments of tool call {index + 1} ({name}) must be a JSON object", source)
    return tool_call(name.strip(), arguments, index, source)
