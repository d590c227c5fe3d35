"""DeepSeek-V3 tool-call tokens::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {ARGS}
    ```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
"""

from __future__ import annotations

import re
from typing import Any

from miles_envs.parsers.base import ToolParser, call_from_object, loads_json

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_CALL = re.compile(
    re.escape(CALL_BEGIN) + r"(.*?)" + re.escape(SEP) + r"(.*?)\n```(?:json)?\n(.*?)\n```" + re.escape(CALL_END),
    re.DOTALL,
)


class DeepSeekV3Parser(ToolParser):
    name = "deepseek_v3"
    expected_format = (
        f"Write calls as {CALLS_BEGIN}{CALL_BEGIN}function{SEP}NAME\\n```json\\n{{ARGS}}\\n```{CALL_END}{CALLS_END}"
    )

    def parse_calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        if CALLS_BEGIN not in text:
            if any(tag in text for tag in (CALLS_END, CALL_BEGIN, CALL_END, SEP)):
                raise self.fail(f"tool-call tokens appear without {CALLS_BEGIN}", text)
            return text.strip() or None, []
        content, section = text.split(CALLS_BEGIN, 1)
        if CALLS_END not in section:
            raise self.fail(f"the tool calls are not closed with {CALLS_END}", text)
        section, trailing = section.split(CALLS_END, 1)
        leftover = _CALL.sub("", section).strip()
        if leftover:
            raise self.fail(f"cannot read this part of the tool calls: {leftover[:80]!r}", text)
        calls = []
        for index, (kind, name, raw) in enumerate(_CALL.findall(section)):
            if kind.strip() != "function":
                raise self.fail(f"tool call {index + 1} has type {kind.strip()!r}; only 'function' is supported", text)
            try:
                arguments = loads_json(raw)
            except ValueError as exc:
                raise self.fail(f"the arguments of tool call {index + 1} are not valid JSON: {exc}", text) from exc
            calls.append(call_from_object(self, {"name": name, "arguments": arguments}, index, text, arguments_keys=("arguments",)))
        if not calls:
            raise self.fail("the tool-call section holds no call", text)
        content = (content + trailing).strip()
        return content or None, calls
