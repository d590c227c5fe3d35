"""Reuse of observation deltas across turns and episodes, for templates that render locally.

A delta (the ids after a model turn) costs one render of the whole conversation, which grows with
every turn. For most templates the text after an assistant turn depends only on how the turn ended,
the observation and the tools, not on what came before. ``DeltaCache`` keeps such deltas, keyed by
exactly those, and is used only where that locality holds:

- at construction, the template is probed: the same turn and observation after two different
  histories must give the same tail, append-only; otherwise the cache stays off;
- a delta is stored only when its full computation was append-only with nothing to note, and only
  for histories without reasoning (fields, or think blocks in the generated text) (templates such as Qwen3 re-render reasoning, so those turns
  always take the full path and keep their ``non_append_only_template`` detection);
- every ``verify_every``-th hit is recomputed in full and compared; one mismatch turns the cache
  off for good, with a warning, so a template that defeats the probe costs speed, never exactness.

The same locality lets a miss be computed cheaply: the renderer renders the turn and observation
after a short fixed history instead of the whole conversation (``local_render`` says when; every
``verify_every``-th such delta is also computed in full and compared, under the same rule).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import orjson

Message = Mapping[str, Any]
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def has_reasoning(message: Message) -> bool:
    """Reasoning as a field, or inside generated text (``<think>...</think>``, which templates such as Qwen3 re-render)."""
    content = message.get("content")
    return any(message.get(key) for key in REASONING_KEYS) or (isinstance(content, str) and "</think>" in content)


class DeltaCache:
    def __init__(self, size: int = 4096, verify_every: int = 64) -> None:
        self.size, self.verify_every = size, verify_every
        self.enabled = True
        self.hits = self.misses = self.verified = self.local = 0
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._last_tools: tuple[Any, bytes] = (object(), b"")

    def probe(self, tail_after: Callable[[list[Message], list[Message]], str | None]) -> None:
        """Turn the cache off unless the template's tail is the same after two different histories.

        ``tail_after(history, observation)`` renders history + a fixed turn + the observation and
        returns the text after the turn, or None when that rendering is not append-only. Both a user
        and a tool observation are probed, the long history holding an earlier tool exchange
        (DeepSeek-V3, for one, renders a tool output differently once an earlier one exists).
        """
        call = {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
        short = [{"role": "user", "content": "What is 2 + 2?"}]
        long = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Add 1 and 2."},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "name": "add", "content": "3"},
            {"role": "assistant", "content": "3."},
            {"role": "user", "content": "What is 2 + 2?"},
        ]
        observations = (
            [{"role": "user", "content": "Now double it."}],
            [{"role": "tool", "tool_call_id": "call_1", "name": "add", "content": "8"}],
        )
        try:
            same = all(
                tail_after(short, observation) == tail_after(long, observation) is not None
                for observation in observations
            )
        except Exception:  # a template that cannot render the probe gets no cache
            same = False
        self.enabled = same

    def key(
        self,
        history: Sequence[Message],
        turn_message: Message,
        end: Hashable,
        text: str,
        observation: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None,
    ) -> Hashable | None:
        if not self.enabled or has_reasoning(turn_message):
            return None
        if any(m.get("role") == "assistant" and has_reasoning(m) for m in history):
            return None
        try:
            observed = orjson.dumps(observation, option=orjson.OPT_SORT_KEYS)
            tools_seen = self._tools_json(tools)
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            return None
        return (end, text != text.strip(), observed, tools_seen)

    def _tools_json(self, tools: Sequence[Mapping[str, Any]] | None) -> bytes:
        """The tools' JSON, kept for the last tools object (an episode passes the same one every turn)."""
        if tools is not self._last_tools[0]:
            self._last_tools = (tools, orjson.dumps(tools, option=orjson.OPT_SORT_KEYS))
        return self._last_tools[1]

    def lookup(self, key: Hashable) -> Any | None:
        """The stored delta, or None on a miss and on the hits chosen for verification."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        if self.hits % self.verify_every == 0:
            return None
        self._entries.move_to_end(key)
        return entry

    def local_render(self) -> bool:
        """Whether this miss may be computed after a short history (False: compute it in full, and compare)."""
        self.local += 1
        return self.local % self.verify_every != 1

    def disable(self) -> None:
        self.enabled = False
        self._entries.clear()
        warnings.warn(
            "chat template renders an observation differently after different histories; "
            "delta cache turned off (rendering stays exact, only slower)",
            RuntimeWarning,
            stacklevel=3,
        )

    def store(self, key: Hashable, delta: Any | None) -> None:
        """Keep a freshly computed delta (None: not cacheable), or check it against the stored one."""
        if not self.enabled:
            return
        stored = self._entries.get(key)
        if stored is None and delta is None:
            return
        if stored is not None:
            self.verified += 1
            if stored != delta:
                self.disable()
            return
        self._entries[key] = delta
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
