"""SkyRL-Gym envs: a task (prompt messages + the env's ``extras``) per episode, chosen by the seed.

SkyRL envs are built per task: the constructor takes the dataset row (``extras``, holding e.g. the
``reward_spec`` ground truth) and ``init(prompt)`` returns the first messages. Pass your rows as
``tasks=[{"prompt": [...], **extras}, ...]``; episode ``seed`` plays ``tasks[seed % len(tasks)]``.
``gsm8k``, ``gsm8k_multi_turn`` and ``aime`` come with two small arithmetic tasks so they run as is.
"""

from __future__ import annotations

import copy
from typing import Any

from miles_envs.env import Env, Message, ResetResult, StepResult
from miles_envs.integrations.foreign.common import foreign_spec, jsonable, require
from miles_envs.registry.spec import EnvSpec

NAMESPACE = "skyrl"


def _question(text: str) -> list[Message]:
    return [{"role": "user", "content": f"{text} Let's think step by step and output the final answer after '####'."}]


_ARITHMETIC = [("What is 17 + 25?", "42"), ("A box holds 6 rows of 7 eggs. How many eggs are in it?", "42")]
SAMPLE_TASKS: dict[str, list[dict[str, Any]]] = {
    "gsm8k": [{"prompt": _question(q), "reward_spec": {"method": "rule", "ground_truth": a}} for q, a in _ARITHMETIC],
    "gsm8k_multi_turn": [
        {"prompt": _question(q), "reward_spec": {"method": "rule", "ground_truth": a}, "extra_info": {"max_turns": 3}}
        for q, a in _ARITHMETIC
    ],
    "aime": [
        {"prompt": [{"role": "user", "content": f"{q} Put the final answer in \\boxed{{}}."}], "reward_model": {"ground_truth": a}}
        for q, a in _ARITHMETIC
    ],
}


def _registry() -> dict[str, Any]:
    require("skyrl_gym", "skyrl", "skyrl-gym")
    from skyrl_gym.envs.registration import registry

    return registry


def foreign_ids() -> list[str]:
    return sorted(_registry())


def spec(foreign_id: str) -> EnvSpec:
    entry = _registry()[foreign_id]
    needs = "" if foreign_id in SAMPLE_TASKS else " (pass tasks=[...] rows)"
    return foreign_spec(
        NAMESPACE, foreign_id, "miles_envs.integrations.foreign.skyrl:SkyRLEnv",
        description=f"SkyRL-Gym {foreign_id} ({entry.entry_point}){needs}", tags=["task"],
    )


class SkyRLEnv(Env):
    """A SkyRL-Gym ``BaseTextEnv`` by id; ``env_config`` goes to every constructor call."""

    def __init__(
        self, env_id: str, tasks: list[dict[str, Any]] | None = None, env_config: Any = None, max_turns: int | None = None
    ) -> None:
        self._skyrl = require("skyrl_gym", "skyrl", "skyrl-gym")
        self.env_id = env_id
        self.tasks = tasks if tasks is not None else SAMPLE_TASKS.get(env_id)
        if not self.tasks:
            raise ValueError(f"skyrl:{env_id} needs tasks=[{{'prompt': [...messages], **extras}}, ...] (its dataset rows)")
        self.env_config = env_config
        self._limit = max_turns
        self.max_turns = max_turns
        self._env: Any = None

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        self._close_current()
        task = copy.deepcopy(self.tasks[(seed or 0) % len(self.tasks)])
        prompt = task.pop("prompt")
        self._env = self._skyrl.make(self.env_id, env_config=self.env_config, extras=task)
        messages, metadata = self._env.init(prompt)
        self.max_turns = self._limit or getattr(self._env, "max_turns", None)
        return [dict(m) for m in messages], jsonable(metadata or {})

    def step(self, action: Message) -> StepResult:
        if self._env is None:
            raise RuntimeError("step() before reset()")
        out = self._env.step(action.get("content") or "")
        info = jsonable(out.get("metadata") or {})
        return [dict(m) for m in out.get("observations") or []], float(out["reward"]), bool(out["done"]), False, info

    def _close_current(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def close(self) -> None:
        self._close_current()
        super().close()
