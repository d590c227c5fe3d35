"""Render a tokenizer's chat template to text exactly as ``apply_chat_template`` does.

The template is compiled once by transformers' own compiler (same sandboxed jinja2 environment, same
``tojson``/``raise_exception``/``strftime_now``), and rendered with the tokenizer's special tokens as
variables. Like ``apply_chat_template``, message keys whose value is ``None`` are dropped first.
Templates disagree on a tool-call message's ``content: None`` (the OpenAI convention), so where that
rendering fails, two more views are tried in turn: the ``None`` values kept, as plain jinja2 renders
them (DeepSeek-V3 writes tool calls only in its ``content is none`` branch), then ``None`` content as
``""`` (Qwen3 reads the content as a string and has no branch for its absence).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jinja2.exceptions import UndefinedError
from transformers.utils.chat_template_utils import _compile_jinja_template

Message = Mapping[str, Any]

# Names a message's reasoning travels under; templates read ``reasoning_content`` (as transformers aliases it).
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


class ChatTemplate:
    """A tokenizer's compiled chat template plus the variables it is rendered with."""

    def __init__(self, tokenizer: Any, chat_template_kwargs: Mapping[str, Any] | None = None) -> None:
        source = tokenizer.chat_template
        if not source:
            raise ValueError(
                f"{type(tokenizer).__name__} has no chat_template: load a tokenizer that ships one, "
                "or set tokenizer.chat_template before building a ChatRenderer"
            )
        if isinstance(source, dict):
            source = source.get("tool_use") or source["default"]
        self.source: str = source
        self._compiled = _compile_jinja_template(source)
        self._variables = {**tokenizer.special_tokens_map, **(chat_template_kwargs or {})}

    def render(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The template's text; no tools (``None`` or empty) renders as ``tools=None``."""
        messages = [_with_reasoning_alias(m) for m in messages]
        if not any(None in m.values() for m in messages):  # the common case: every view is the same
            return self._render(messages, tools, add_generation_prompt)
        views = (
            lambda: [{k: v for k, v in m.items() if v is not None} for m in messages],
            lambda: messages,
            lambda: [{**m, "content": ""} if m.get("content", "") is None else m for m in messages],
        )
        first_error: Exception | None = None
        for view in views:
            try:
                return self._render(view(), tools, add_generation_prompt)
            except (UndefinedError, TypeError) as error:
                first_error = first_error or error
                if not any(m.get("content", "") is None for m in messages):
                    break
        raise first_error

    def _render(self, messages: list[Message], tools: Sequence[Mapping[str, Any]] | None, add_generation_prompt: bool) -> str:
        return self._compiled.render(
            messages=messages,
            tools=list(tools) if tools else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self._variables,
        )


def _with_reasoning_alias(message: Message) -> Message:
    """Expose a message's reasoning as ``reasoning_content`` whichever name it came under."""
    if "reasoning_content" in message:
        return message
    for key in _REASONING_KEYS[1:]:
        if message.get(key) is not None:
            return {**message, "reasoning_content": message[key]}
    return message
