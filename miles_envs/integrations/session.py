"""A chat session that records the exact token ids behind an OpenAI-style conversation.

A black-box harness re-sends the whole conversation on every call. The session keeps the token
stream it built so far and the messages it encodes; when the new request extends them (same
messages, the session's own reply echoed back, new messages after it), only that suffix is rendered
as a token delta (``ChatRenderer.delta_ids``) and appended with loss mask 0, and the engine's reply
is appended as-is with mask 1. When the request does not extend them (the harness edited, dropped or
re-ordered earlier messages, changed the tools, or asks again without new messages), that is drift:
the current segment is closed with the flag ``drift`` and a new segment starts from the full
conversation. Every segment is a ``Trajectory``, so trainers read sessions like env rollouts.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from miles_envs.engine import Engine, Generation, SamplingParams
from miles_envs.env import Message
from miles_envs.loop import NON_APPEND_ONLY, TokenStream, append_generation, parse_turn, reply_text
from miles_envs.trajectory import Status, Trajectory

DRIFT = "drift"


def comparable(message: Message) -> dict[str, Any]:
    """The parts of a message that a chat template renders (extra client-side keys ignored)."""
    out: dict[str, Any] = {"role": message.get("role"), "content": message.get("content") or ""}
    calls = message.get("tool_calls") or []
    if calls:
        out["tool_calls"] = [_comparable_call(c) for c in calls]
    for key in ("tool_call_id", "name"):
        if message.get(key) is not None:
            out[key] = message[key]
    return out


def _comparable_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {"name": function.get("name"), "arguments": arguments}


class EngineAborted(RuntimeError):
    """The engine gave up on a request; the session starts a new segment on the next one."""


class ChatSession:
    """Token-exact recording of one conversation (one engine, one renderer)."""

    def __init__(self, session_id: str, engine: Engine, renderer: Any, parser: Any) -> None:
        self.session_id = session_id
        self.engine, self.renderer, self.parser = engine, renderer, parser
        self.segments: list[Trajectory] = []
        self.drift: list[str] = []
        self._stream: TokenStream | None = None
        # The stream encodes history + [turn]: both as the objects given to the renderer (it caches by identity).
        self._history: list[Message] = []
        self._turn: Message | None = None
        self._new: list[Message] = []  # messages appended for the generation in flight
        self._last: Generation | None = None
        self._tools: list[dict[str, Any]] | None = None

    async def complete(
        self, messages: list[Message], sampling: SamplingParams, tools: list[dict[str, Any]] | None = None
    ) -> tuple[Message, Generation]:
        """Extend the stream with the request's new messages, generate, record; returns (reply, generation)."""
        input_ids = self._extend(messages, tools)
        stop_ids = sorted(set(sampling.stop_token_ids) | set(self.renderer.stop_token_ids))
        gen = await self.engine.generate(list(input_ids), replace(sampling, stop_token_ids=stop_ids))
        if gen.finish_reason == "abort":
            self._stream.trajectory.status = Status.ABORTED
            self._stream.trajectory.error = gen.error or "the engine aborted the request"
            self._turn = None  # the stream ends on env tokens: the next request starts a new segment
            raise EngineAborted(self._stream.trajectory.error)
        append_generation(self._stream, gen)
        reply, _, _ = parse_turn(self.parser, reply_text(self.renderer, gen.output_ids))  # malformed calls stay text
        self._history = [*self._history, *([self._turn] if self._turn is not None else []), *self._new]
        self._turn, self._last = reply, gen
        self._stream.trajectory.messages = [*self._history, reply]
        return reply, gen

    def _extend(self, messages: list[Message], tools: list[dict[str, Any]] | None) -> list[int]:
        suffix = self._suffix(messages, tools)
        if suffix is None:
            self._start_segment(messages, tools)
            return self._stream.tokens
        delta = self.renderer.delta_ids(
            self._history, self._turn, self._last.output_ids, self._last.finish_reason, suffix, tools=tools
        )
        if not delta.append_only and NON_APPEND_ONLY not in self._stream.trajectory.flags:
            self._stream.trajectory.flags.append(NON_APPEND_ONLY)
        self._stream.append(delta.ids, "env")
        self._new = list(suffix)
        return self._stream.tokens

    def _start_segment(self, messages: list[Message], tools: list[dict[str, Any]] | None) -> None:
        if self._stream is not None and self._stream.trajectory.status is not Status.ABORTED:
            self._stream.trajectory.flags.append(DRIFT)
        self._stream = TokenStream(self.renderer.prompt_ids(messages, tools=tools))
        trajectory = self._stream.trajectory
        trajectory.env_id, trajectory.episode_id = "session", self.session_id
        trajectory.metadata["segment"] = len(self.segments)
        self.segments.append(trajectory)
        self._history, self._turn, self._tools, self._new = [], None, tools, list(messages)

    def _suffix(self, messages: list[Message], tools: list[dict[str, Any]] | None) -> list[Message] | None:
        """The new messages after the recorded conversation, or None when the request does not extend it."""
        if self._stream is None or self._turn is None:
            return None
        seen = [*self._history, self._turn]
        head, suffix = messages[: len(seen)], messages[len(seen) :]
        reason = None
        if tools != self._tools:
            reason = "the tools changed"
        elif [comparable(m) for m in head] != [comparable(m) for m in seen]:
            at = next((i for i, (a, b) in enumerate(zip(head, seen)) if comparable(a) != comparable(b)), len(head))
            reason = f"message {at} differs from the recorded conversation"
        elif not suffix:
            reason = "no new message after the last reply"
        if reason is not None:
            self.drift.append(f"segment {len(self.segments) - 1}: {reason}")
            return None
        return suffix

    def record(self) -> dict[str, Any]:
        """The session as JSON: its segments (Trajectory dicts) and the drift notes."""
        return {
            "session_id": self.session_id,
            "segments": [t.to_dict() for t in self.segments],
            "drift": list(self.drift),
        }
