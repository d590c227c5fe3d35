"""Token-in/token-out chat rendering: prompt ids once, then one token delta per turn.

The loop owns the token stream. ``prompt_ids`` renders the initial messages (and tools) through the
tokenizer's chat template. After each generation the engine's ids are appended untouched, followed by
``delta_ids(...).ids``: the end-of-turn tokens the model did not write itself, the env's observation
rendered as the template renders it, and the next assistant header.

How a delta is computed. The template is a black box, so each turn renders the conversation twice:
``P = template(history, generation prompt)`` and ``F = template(history + [turn] + observation,
generation prompt)``, where ``turn`` is an assistant message whose content is the *decoded generated
text* (minus a trailing end-of-turn token). The turn is append-only when ``F`` starts with ``P +
text``; the delta is then the rest of ``F``, tokenised on its own (it starts with a special token,
so no BPE merge crosses the seam), with the model's own end-of-turn token dropped from its head.
By induction ``prompt_ids + generated + delta + generated + delta ...`` equals the template's
tokenisation of the whole conversation.

Policy for templates that are not append-only. Some templates re-render earlier text when the
conversation grows: Qwen3 drops the ``<think>`` blocks of earlier assistant turns once a new user
query arrives, and drops the empty think block its ``enable_thinking=False`` generation prompt
inserted; Llama-3 trims the assistant's surrounding whitespace. Re-tokenising would make the
trajectory disagree with what the engine actually saw and sampled from, so we never do it. Instead
the delta is still computed locally (the text the template writes after the turn, found with a
marker placed after the generated text), the exact ids the engine saw are kept, and the delta comes
back with ``append_only=False`` and a ``note`` naming where the template's rendering diverges. The
loop records the flag on the trajectory; a trainer that needs template-canonical sequences can
filter on it.

Earlier assistant turns are rendered from their generated text too: the renderer remembers, for
each ``assistant_message`` object it was given, the text behind it, and renders that object in a
later ``history`` from the text (a bounded LRU holds the most recent ``remember`` turns). A message
it does not know (a copy, or one evicted) is rendered as given, so keep each turn's reasoning on the
message (``ParsedAction.as_message`` does) for the Qwen3 check to see it.

Cost. When ``history`` is exactly (object for object) the previous call's history + turn +
observation, ``P`` is that call's ``F`` and is not rendered again: one template rendering per turn,
linear in the conversation's length. Messages must therefore not be mutated once passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from miles_envs.chat.backend import TokenizerCalls
from miles_envs.chat.delta_cache import DeltaCache
from miles_envs.chat.segment_encoder import SegmentEncoder
from miles_envs.chat.skeleton import Skeletons
from miles_envs.chat.template import ChatTemplate, Message

# Special tokens that end an assistant turn in the families we know; the template's own end-of-turn
# token is found by rendering, these are added when the vocabulary has them.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
)

# Marks the end of the generated text inside a rendering; private-use code points never come from a tokenizer's vocabulary as a whole.
_END_MARK = "\ue000miles-envs:end-of-generation\ue001"
_PROMPT_CACHE = 1024
_SHORT_HISTORY = [{"role": "user", "content": "Hi."}]  # what a local template's delta is rendered after
_NOT_VERBATIM = (
    "the chat template does not render the assistant's text verbatim, so the observation's tokens cannot be "
    "placed after the generated ones; use a template that writes assistant content as given"
)


class ChatRenderError(ValueError):
    """The chat template cannot be rendered into a token delta for this conversation."""


@dataclass(frozen=True)
class RenderedDelta:
    """Ids that follow the generated ids: end-of-turn tokens, the observation, the next header."""

    ids: list[int]
    append_only: bool
    note: str | None = None


@dataclass(eq=False)
class _SeenTurn:
    """A turn this renderer placed: the text behind the message, and the rendering that followed it."""

    message: Message
    text: str
    conversation: list[Message] = field(repr=False)  # history + message + observation, as given
    tools: Sequence[Mapping[str, Any]] | None = field(repr=False)
    rendered: str | None = field(repr=False)  # template(conversation); dropped once reused


class ChatRenderer:
    """Chat template → token ids, turn by turn, without ever re-tokenising generated ids."""

    def __init__(
        self,
        tokenizer: Any,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        remember: int = 65536,
        cache_deltas: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self._remember = remember
        # id(assistant message) -> the turn; the entry's reference keeps the id from being reused
        self._seen: OrderedDict[int, _SeenTurn] = OrderedDict()
        self.template = ChatTemplate(tokenizer, chat_template_kwargs)
        self.calls = TokenizerCalls(tokenizer)
        self.segments = SegmentEncoder(tokenizer, tokenizer_calls=self.calls)
        self.skeletons = Skeletons(lambda messages, tools: self.template.render(messages, tools, add_generation_prompt=True))
        self.turn_end_id = self._find_turn_end_id()
        self.stop_token_ids = self._collect_stop_ids()
        self._stop_ids = frozenset(self.stop_token_ids)
        self._last_turn: tuple[Sequence[int] | None, str] = (None, "")
        self._short_before: str | None = None
        self._prompts: OrderedDict[bytes, list[int]] = OrderedDict()
        self.delta_cache = DeltaCache()
        if cache_deltas:
            self.delta_cache.probe(self._probe_tail)
        else:
            self.delta_cache.enabled = False

    # -- public API ------------------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """The initial messages (and tools) rendered up to and including the assistant header.

        Episodes of one group share their prompt: it is rendered once and reused while it stays in
        a small LRU keyed by the exact messages and tools.
        """
        try:
            key = orjson.dumps([messages, tools])  # key order kept: templates may write it (tojson)
        except TypeError:  # not JSON-able: render every time
            return self.encode(self.template.render(messages, tools, add_generation_prompt=True))
        ids = self._prompts.get(key)
        if ids is None:
            questions = [(i, "content") for i, m in enumerate(messages) if m.get("role") == "user"]
            text = self.skeletons.render(messages, questions, tools)
            if text is None:
                text = self.template.render(messages, tools, add_generation_prompt=True)
            ids = self._prompts[key] = self.encode(text)
            while len(self._prompts) > _PROMPT_CACHE:
                self._prompts.popitem(last=False)
        else:
            self._prompts.move_to_end(key)
        return list(ids)

    def delta_ids(
        self,
        history: Sequence[Message],
        assistant_message: Message,
        generated_ids: Sequence[int],
        finish_reason: str,
        observation: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> RenderedDelta:
        """What must follow ``generated_ids`` so the stream continues as the template would render it.

        ``assistant_message`` is the parsed action the env received; the rendering uses the decoded
        generated text instead, because only that is token-exact.
        """
        ended_by_model = bool(generated_ids) and generated_ids[-1] in self._stop_ids
        text = self.turn_text(generated_ids)
        turn = {"role": assistant_message.get("role", "assistant"), "content": text}
        given = list(history)
        history = [self._as_generated(message) for message in given]  # reasoning shows here, in the generated text
        end = ("model", generated_ids[-1]) if ended_by_model else finish_reason
        cache_key = self.delta_cache.key(history, assistant_message, end, text, observation, tools)
        cached = self.delta_cache.lookup(cache_key) if cache_key is not None else None
        conversation = [*given, assistant_message, *observation]
        if cached is not None:
            self._remember_turn(_SeenTurn(assistant_message, text, conversation, tools, None))
            return RenderedDelta(ids=list(cached), append_only=True)
        local = cache_key is not None and self.delta_cache.local_render()
        if local and (tail := self._local_tail(turn, observation)) is not None:
            ids, notes = self._close_turn(self.encode(tail), generated_ids, finish_reason)
            self._remember_turn(_SeenTurn(assistant_message, text, conversation, tools, None))
            self.delta_cache.store(cache_key, None if notes else tuple(ids))
            return RenderedDelta(ids=ids, append_only=not any(n.startswith("the model ended") for n in notes), note="; ".join(notes) or None)

        before = self._reusable_rendering(given, tools)
        if before is None:
            before = self.template.render(history, tools, add_generation_prompt=True)
        after = self.template.render([*history, turn, *observation], tools, add_generation_prompt=True)

        notes: list[str] = []
        append_only = after.startswith(before + text)
        if append_only:
            tail = after[len(before) + len(text) :]
        else:
            notes.append(_divergence(before + text, after))
            tail = self._tail_after_marker(history, turn, observation, tools)
        ids, closing = self._close_turn(self.encode(tail), generated_ids, finish_reason)
        if any(n.startswith("the model ended") for n in closing):
            append_only = False
        notes += closing
        self._remember_turn(_SeenTurn(assistant_message, text, conversation, tools, after))
        if cache_key is not None:
            delta = tuple(ids) if append_only and not notes else None
            if not local and delta is not None and self._local_delta(turn, observation, generated_ids, finish_reason) != delta:
                self.delta_cache.disable()  # the short-history rendering disagrees with the full one
            else:
                self.delta_cache.store(cache_key, delta)
        return RenderedDelta(ids=ids, append_only=append_only, note="; ".join(notes) or None)

    def _close_turn(self, ids: list[int], generated_ids: Sequence[int], finish_reason: str) -> tuple[list[int], list[str]]:
        """Drop the end-of-turn token the model already wrote; note how a cut turn was closed."""
        if generated_ids and generated_ids[-1] in self._stop_ids:
            ids, end_mismatch = self._drop_model_turn_end(ids, generated_ids[-1])
            return ids, [end_mismatch] if end_mismatch else []
        if finish_reason in ("length", "abort"):
            closed = self.tokenizer.convert_ids_to_tokens(ids[0]) if ids and ids[0] in self._stop_ids else "nothing"
            return ids, [f"turn cut by {finish_reason}; closed with {closed}"]
        return ids, []

    def _local_tail(self, turn: Message, observation: Sequence[Message]) -> str | None:
        """The text after ``turn`` and ``observation`` rendered after a short fixed history (None if not append-only there).

        Valid only where the delta cache's probe found the template local: the same tail after any
        history and (as the cache's key already assumes) after any turn text with the same ending.
        A stripped turn is rendered as a fixed text, so the observation's skeleton can be reused.
        """
        if self._short_before is None:
            self._short_before = self.template.render(_SHORT_HISTORY, None, add_generation_prompt=True)
        text = turn["content"]
        after = None
        if text == text.strip() and text:
            text = "ok"
            messages = [*_SHORT_HISTORY, {**turn, "content": text}, *observation]
            start = len(_SHORT_HISTORY) + 1
            holes = [(i, k) for i in range(start, len(messages)) for k in ("content", "tool_call_id") if k in messages[i]]
            after = self.skeletons.render(messages, holes, None)
        if after is None:
            text = turn["content"]
            after = self.template.render([*_SHORT_HISTORY, turn, *observation], None, add_generation_prompt=True)
        prefix = self._short_before + text
        return after[len(prefix) :] if after.startswith(prefix) else None

    def _local_delta(self, turn: Message, observation: Sequence[Message], generated_ids: Sequence[int], finish_reason: str) -> tuple[int, ...] | None:
        tail = self._local_tail(turn, observation)
        if tail is None:
            return None
        ids, notes = self._close_turn(self.encode(tail), generated_ids, finish_reason)
        return None if notes else tuple(ids)

    def turn_text(self, generated_ids: Sequence[int]) -> str:
        """The generated text without its end-of-turn token, as parsers and the template see it.

        Decoded once per generation: the loop asks for it to parse the action, then ``delta_ids``
        needs it again for the same (unchanged) id list.
        """
        if generated_ids is self._last_turn[0]:
            return self._last_turn[1]
        ended_by_model = bool(generated_ids) and generated_ids[-1] in self._stop_ids
        text = self.decode(generated_ids[:-1] if ended_by_model else generated_ids)
        self._last_turn = (generated_ids, text)
        return text

    def decode(self, ids: Sequence[int]) -> str:
        return self.calls.decode(ids)

    def encode(self, text: str) -> list[int]:
        """Rendered chat text → ids; the template writes its own BOS, so none is added."""
        return self.segments.encode(text)

    # -- internals -------------------------------------------------------------------------------
    def _remember_turn(self, turn: _SeenTurn) -> None:
        self._seen[id(turn.message)] = turn
        self._seen.move_to_end(id(turn.message))
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)

    def _as_generated(self, message: Message) -> Message:
        """An earlier assistant turn as the text the model generated, when this renderer placed it."""
        seen = self._seen.get(id(message))
        if seen is None or seen.message is not message:
            return message
        return {"role": message.get("role", "assistant"), "content": seen.text}

    def _reusable_rendering(self, history: list[Message], tools: Sequence[Mapping[str, Any]] | None) -> str | None:
        """The previous call's full rendering, if ``history`` is exactly that call's conversation."""
        last = next((m for m in reversed(history) if m.get("role") == "assistant"), None)
        seen = self._seen.get(id(last)) if last is not None else None
        if seen is None or seen.message is not last or seen.rendered is None or seen.tools != tools:
            return None
        if len(seen.conversation) != len(history) or any(a is not b for a, b in zip(seen.conversation, history)):
            return None
        rendered, seen.rendered = seen.rendered, None
        return rendered

    def _tail_after_marker(
        self,
        history: Sequence[Message],
        turn: Message,
        observation: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None,
    ) -> str:
        marked = {**turn, "content": turn["content"] + _END_MARK}
        rendered = self.template.render([*history, marked, *observation], tools, add_generation_prompt=True)
        if rendered.count(_END_MARK) != 1:
            raise ChatRenderError(_NOT_VERBATIM)
        return rendered.split(_END_MARK, 1)[1]

    def _drop_model_turn_end(self, ids: list[int], model_end: int) -> tuple[list[int], str | None]:
        """The model already wrote the end-of-turn token the template would write here."""
        if ids and ids[0] == model_end:
            return ids[1:], None
        model_token = self.tokenizer.convert_ids_to_tokens(model_end)
        if ids and ids[0] in self._stop_ids:
            template_token = self.tokenizer.convert_ids_to_tokens(ids[0])
            return ids[1:], f"the model ended its turn with {model_token}, the template writes {template_token}"
        return ids, f"the model ended its turn with {model_token}, the template writes none here"

    def _probe_tail(self, history: list[Message], observation: list[Message]) -> str | None:
        """The text after a fixed turn and ``observation`` (None when not append-only): the cache's probe."""
        turn = {"role": "assistant", "content": "4"}
        before = self.template.render(history, add_generation_prompt=True) + turn["content"]
        after = self.template.render([*history, turn, *observation], add_generation_prompt=True)
        return after[len(before) :] if after.startswith(before) else None

    def _find_turn_end_id(self) -> int | None:
        """The special token the template writes right after an assistant's text."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _END_MARK}]
        rendered = self.template.render(probe, add_generation_prompt=False)
        if _END_MARK not in rendered:
            raise ChatRenderError(_NOT_VERBATIM)
        ids = self.encode(rendered.split(_END_MARK, 1)[1])
        return ids[0] if ids and ids[0] in self.tokenizer.all_special_ids else None

    def _collect_stop_ids(self) -> list[int]:
        ids: list[int] = []
        candidates = [self.turn_end_id, self.tokenizer.eos_token_id, *map(self._token_id, END_OF_TURN_TOKENS)]
        for token_id in candidates:
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids


    def _token_id(self, token: str) -> int | None:
        """The id of a whole token in the vocabulary, None when it is not one (no full vocabulary copy)."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or self.tokenizer.convert_ids_to_tokens(token_id) != token:
            return None
        return token_id


def _divergence(expected_prefix: str, rendered: str) -> str:
    """Name the first character where the template's rendering stops extending the token stream."""
    at = next((i for i, (a, b) in enumerate(zip(expected_prefix, rendered)) if a != b), min(len(expected_prefix), len(rendered)))
    return (
        f"the template re-renders earlier text at char {at} "
        f"(stream has {expected_prefix[at:at + 40]!r}, template writes {rendered[at:at + 40]!r})"
    )
