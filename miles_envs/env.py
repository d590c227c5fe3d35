"""The environment API: Gymnasium's reset/step contract over chat messages.

An observation is the list of *new* messages to append to the conversation (system/user messages at
reset; tool results or user turns after a step). An action is the assistant message (``content`` plus
parsed ``tool_calls``). A subclass implements either the sync pair (``reset``/``step``) or the async
pair (``areset``/``astep``); the base class supplies the other flavour.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, ClassVar, TypeVar

from miles_envs.sync_workers import sync_workers

Message = dict[str, Any]
Observation = list[Message]
ResetResult = tuple[Observation, dict[str, Any]]
StepResult = tuple[Observation, float, bool, bool, dict[str, Any]]

T = TypeVar("T")


def assistant(content: str | None = None, tool_calls: list[dict[str, Any]] | None = None) -> Message:
    """Build an assistant message (the action type)."""
    message: Message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def user(content: str) -> Message:
    return {"role": "user", "content": content}


def system(content: str) -> Message:
    return {"role": "system", "content": content}


def _overrides(obj: object, name: str, base: type) -> bool:
    return getattr(type(obj), name) is not getattr(base, name)


class _LoopThread:
    """A private event loop on a daemon thread: lets sync callers drive an async env while keeping
    loop-bound resources (clients, subprocesses) alive between calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="miles-envs-env-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


class Env:
    """Single-agent multi-turn environment.

    Class attributes a subclass may set: ``max_turns`` (the loop truncates after this many model
    turns), ``metadata``. ``info["tools"]`` at reset carries OpenAI function schemas;
    ``info["reward_components"]`` carries named reward parts.
    """

    max_turns: ClassVar[int | None] = None
    metadata: ClassVar[dict[str, Any]] = {}
    multi_agent: ClassVar[bool] = False
    # True when reset()/step() are cheap and never block: the async flavour then calls them inline
    # instead of hopping to a worker thread (which costs tens of microseconds per call). Otherwise
    # each call runs on a worker of its own (see sync_workers), so a hung step() starves no other env.
    run_inline: ClassVar[bool] = False

    _loop_thread: _LoopThread | None = None

    # -- sync flavour -------------------------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        if not _overrides(self, "areset", Env):
            raise NotImplementedError(f"{type(self).__name__} implements neither reset() nor areset()")
        return self._run_sync(self.areset(seed=seed, options=options))

    def step(self, action: Message) -> StepResult:
        if not _overrides(self, "astep", Env):
            raise NotImplementedError(f"{type(self).__name__} implements neither step() nor astep()")
        return self._run_sync(self.astep(action))

    # -- async flavour ------------------------------------------------------------------------
    async def areset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        if not _overrides(self, "reset", Env):
            raise NotImplementedError(f"{type(self).__name__} implements neither reset() nor areset()")
        if self.run_inline:
            return self.reset(seed=seed, options=options)
        return await sync_workers.run(self.reset, seed=seed, options=options)

    async def astep(self, action: Message) -> StepResult:
        if not _overrides(self, "step", Env):
            raise NotImplementedError(f"{type(self).__name__} implements neither step() nor astep()")
        if self.run_inline:
            return self.step(action)
        return await sync_workers.run(self.step, action)

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release resources. Must be idempotent; subclasses call ``super().close()``."""
        if self._loop_thread is not None:
            self._loop_thread.stop()
            self._loop_thread = None

    async def aclose(self) -> None:
        if self.run_inline or not _overrides(self, "close", Env):  # the base close() never blocks
            self.close()
        else:
            await sync_workers.run(self.close)

    def _run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop_thread is None:
            self._loop_thread = _LoopThread()
        return self._loop_thread.run(coro)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MultiAgentEnv(Env):
    """Turn-based multi-agent environment (PettingZoo AEC spirit).

    ``reset`` returns ``({agent: new_messages}, {agent: info})``. ``agent_selection`` names the agent
    whose action the next ``step`` takes. ``step(action)`` returns per-agent dicts: ``(observations,
    rewards, terminations, truncations, infos)``, each observation holding only what that agent may
    see. The episode ends when every agent is terminated or truncated.
    """

    multi_agent: ClassVar[bool] = True
    possible_agents: ClassVar[list[str]] = []

    agents: list[str]
    agent_selection: str
