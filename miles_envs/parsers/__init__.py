"""Tool-call parsers by model family, behind one interface (``ToolParser.parse``)."""

from __future__ import annotations

from typing import Any

from miles_envs.parsers.base import ParsedAction, ToolParseError, ToolParser
from miles_envs.parsers.deepseek_v3 import DeepSeekV3Parser
from miles_envs.parsers.hermes import HermesParser
from miles_envs.parsers.json_fallback import JsonParser
from miles_envs.parsers.llama3_json import Llama3JsonParser
from miles_envs.parsers.qwen3_coder import Qwen3CoderParser

PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (HermesParser, Qwen3CoderParser, Llama3JsonParser, DeepSeekV3Parser, JsonParser)
}

# (marker in a chat template, parser); the first match wins, so the more specific markers come first.
_TEMPLATE_MARKERS = (
    ("<parameter=", "qwen3_coder"),
    ("<｜tool▁calls▁begin｜>", "deepseek_v3"),
    ("<tool_call>", "hermes"),
    ("<|python_tag|>", "llama3_json"),
    ('"parameters": ', "llama3_json"),
)
# (substring of a lower-cased model or tokenizer name, parser)
_NAME_MARKERS = (
    ("qwen3-coder", "qwen3_coder"),
    ("qwen3_coder", "qwen3_coder"),
    ("qwen", "hermes"),
    ("hermes", "hermes"),
    ("llama", "llama3_json"),
    ("deepseek", "deepseek_v3"),
)


def get_parser(name: str, **options: Any) -> ToolParser:
    """A parser by name (``hermes``, ``qwen3_coder``, ``llama3_json``, ``deepseek_v3``, ``json``)."""
    try:
        cls = PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}: choose one of {', '.join(PARSERS)}") from None
    return cls(**options)


def parser_for(tokenizer_or_name: Any, **options: Any) -> ToolParser:
    """Best guess from a tokenizer's chat template, a parser name, or a model name; ``json`` otherwise."""
    if isinstance(tokenizer_or_name, str):
        if tokenizer_or_name in PARSERS:
            return get_parser(tokenizer_or_name, **options)
        lowered = tokenizer_or_name.lower()
        name = next((parser for marker, parser in _NAME_MARKERS if marker in lowered), "json")
        return get_parser(name, **options)
    template = getattr(tokenizer_or_name, "chat_template", None) or ""
    if isinstance(template, dict):
        template = "\n".join(template.values())
    name = next((parser for marker, parser in _TEMPLATE_MARKERS if marker in template), "json")
    return get_parser(name, **options)


__all__ = ["PARSERS", "ParsedAction", "ToolParseError", "ToolParser", "get_parser", "parser_for"]
