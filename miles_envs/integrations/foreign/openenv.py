"""OpenEnv envs through their HTTP/WebSocket servers (``openenv-core``'s ``GenericEnvClient``).

An OpenEnv env is a server, so the adapter is a client: ``base_url`` names the server, the reply
text goes into the action field ``action_field``, and the observation is written out from
``observation_field`` (or, when unset, every observation field as JSON). Each episode opens its own
server session; the session lives on the event loop that opened it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from miles_envs.env import Env, Message, ResetResult, StepResult, user
from miles_envs.integrations.foreign.common import foreign_spec, jsonable, require
from miles_envs.registry.spec import EnvSpec

NAMESPACE = "openenv"
CLIENT_ID = "HTTP"


def foreign_ids() -> list[str]:
    """OpenEnv envs are servers, not names: one generic client env, given ``base_url`` when made."""
    return [CLIENT_ID]


def spec(foreign_id: str) -> EnvSpec:
    s = foreign_spec(
        NAMESPACE, foreign_id, "miles_envs.integrations.foreign.openenv:OpenEnvClientEnv",
        description="an OpenEnv server as an env (make with base_url=...)", tags=["http"],
    )
    s.kwargs.pop("env_id")
    return s


class OpenEnvClientEnv(Env):
    """One OpenEnv server session per episode."""

    def __init__(
        self, base_url: str, action_field: str = "message", observation_field: str | None = None,
        message_timeout_s: float = 60.0, max_turns: int | None = None,
    ) -> None:
        require("openenv", "openenv", "openenv-core")
        self.base_url = base_url
        self.action_field = action_field
        self.observation_field = observation_field
        self.message_timeout_s = message_timeout_s
        self.max_turns = max_turns
        self._client: Any = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    async def areset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        from openenv.core.generic_client import GenericEnvClient

        await self._disconnect()
        client = GenericEnvClient(base_url=self.base_url, message_timeout_s=self.message_timeout_s)
        await client.connect()
        self._client, self._client_loop = client, asyncio.get_running_loop()
        kwargs = {**(options or {}), **({} if seed is None else {"seed": seed})}
        result = await client.reset(**kwargs)
        return [user(self._text(result.observation))], jsonable({"metadata": (result.observation or {}).get("metadata", {})})

    async def astep(self, action: Message) -> StepResult:
        if self._client is None:
            raise RuntimeError("step() before reset()")
        result = await self._client.step({self.action_field: action.get("content") or ""})
        observation = result.observation or {}
        reward = float(result.reward or 0.0)
        return [user(self._text(observation))], reward, bool(result.done), False, jsonable({"metadata": observation.get("metadata", {})})

    def _text(self, observation: dict[str, Any]) -> str:
        if self.observation_field is not None:
            return str(observation.get(self.observation_field, ""))
        fields = {k: v for k, v in observation.items() if k not in ("reward", "done", "metadata")}
        return json.dumps(fields, sort_keys=True, ensure_ascii=False)

    async def _disconnect(self) -> None:
        client, loop = self._client, self._client_loop
        self._client = self._client_loop = None
        if client is None:
            return
        if loop is asyncio.get_running_loop():
            await client.close()
        elif loop is not None and loop.is_running():
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(client.close(), loop))

    async def aclose(self) -> None:
        await self._disconnect()
        super().close()

    def close(self) -> None:
        if self._client is not None and self._loop_thread is not None and self._client_loop is self._loop_thread.loop:
            self._run_sync(self._disconnect())
        self._client = self._client_loop = None
        super().close()
