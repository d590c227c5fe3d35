"""``ToolEnv``: the base of tool-use environments (tools + a task + a reward function).

An episode: reset shows the task; each assistant turn with ``tool_calls`` runs those calls
(concurrently) and returns their results as ``tool`` messages; the first turn without a tool call
is the answer and is scored. The episode is truncated after ``max_turns`` turns without an answer.
A turn whose tool-call text did not parse (``action["parse_error"]``) either gets an error message
back (``on_parse_error="observe"``) or ends the episode with ``parse_error_penalty`` ("terminate").
"""

from __future__ import annotations

import functools
import inspect
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from miles_envs.env import Env, Message, ResetResult, StepResult, system, user
from miles_envs.tools import Tool, Toolbox, tool
from miles_envs.tools.toolbox import DEFAULT_MAX_OUTPUT_CHARS, DEFAULT_TIMEOUT_S

Reward = float | Mapping[str, float]
RewardFn = Callable[["Task", Message], "Reward"]
ParseErrorPolicy = Literal["observe", "terminate"]

PARSE_ERROR_MESSAGE = (
    "Error: your tool call could not be parsed ({error}). Write the call in the required format with "
    "JSON arguments, or reply without a tool call to give your final answer."
)


@dataclass
class Task:
    """One problem: the user prompt, the reference answer, and anything the tools or reward need."""

    id: str
    prompt: str
    answer: Any
    metadata: dict[str, Any] = field(default_factory=dict)


def extract_tagged(text: str | None, tag: str = "answer") -> str | None:
    """The content of the last ``<tag>...</tag>`` in ``text``, stripped; ``None`` when absent."""
    matches = re.findall(rf"<{tag}>(.*?)</{tag}>", text or "", flags=re.DOTALL)
    return matches[-1].strip() if matches else None


class ToolEnv(Env):
    """Subclass and implement :meth:`make_task` and :meth:`score`, or pass ``tasks=`` and ``reward_fn=``.

    Tools come from ``@tool``-decorated methods of the subclass (bound to the env, so they can read
    ``self.task``) plus the ``tools`` argument. ``score`` returns a float or a dict of named
    components; a dict is reported in ``info["reward_components"]`` and combined into the scalar
    reward with ``reward_weights`` (components not named there weigh 0; ``None`` sums them all).
    """

    max_turns = 8
    system_prompt: ClassVar[str] = "You can call tools to solve the task. Reply without a tool call to answer."
    default_reward_weights: ClassVar[Mapping[str, float] | None] = None

    def __init__(
        self,
        tools: Iterable[Tool | Callable[..., Any]] = (),
        *,
        tasks: Sequence[Task] | None = None,
        reward_fn: RewardFn | None = None,
        reward_weights: Mapping[str, float] | None = None,
        max_turns: int | None = None,
        on_parse_error: ParseErrorPolicy = "observe",
        parse_error_penalty: float = -1.0,
        tool_timeout: float = DEFAULT_TIMEOUT_S,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
        system_prompt: str | None = None,
    ) -> None:
        if on_parse_error not in ("observe", "terminate"):
            raise ValueError(f"on_parse_error must be 'observe' or 'terminate', got {on_parse_error!r}")
        self.toolbox = Toolbox(
            [*self._method_tools(), *(tool(item) for item in tools)],
            timeout=tool_timeout,
            max_output_chars=max_output_chars,
        )
        self.tasks = list(tasks) if tasks is not None else None
        self.reward_fn = reward_fn
        self.reward_weights = reward_weights if reward_weights is not None else self.default_reward_weights
        if max_turns is not None:
            self.max_turns = max_turns
        self.on_parse_error = on_parse_error
        self.parse_error_penalty = parse_error_penalty
        if system_prompt is not None:
            self.system_prompt = system_prompt
        self.task: Task | None = None
        self.turns = 0
        self.done = True
        self._rng: random.Random | None = None

    def _method_tools(self) -> list[Tool]:
        return [getattr(self, name) for name in _tool_names(type(self))]

    # -- what a subclass provides -------------------------------------------------------------
    def make_task(self, rng: random.Random, options: dict[str, Any]) -> Task:
        """Draw the episode's task. ``options["task_index"]`` picks one of ``tasks`` directly."""
        if not self.tasks:
            raise NotImplementedError(f"{type(self).__name__}: pass tasks= or override make_task()")
        index = options.get("task_index")
        return self.tasks[index] if index is not None else rng.choice(self.tasks)

    def score(self, task: Task, answer: Message) -> Reward:
        """Score the final assistant message (may also be ``async``)."""
        if self.reward_fn is None:
            raise NotImplementedError(f"{type(self).__name__}: pass reward_fn= or override score()")
        return self.reward_fn(task, answer)

    # -- the env API --------------------------------------------------------------------------
    async def areset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> ResetResult:
        if seed is not None or self._rng is None:
            self._rng = random.Random(seed)
        self.task = self.make_task(self._rng, options or {})
        self.turns = 0
        self.done = False
        observation = [system(self.system_prompt), user(self.task.prompt)]
        return observation, {"tools": self.toolbox.specs, "task_id": self.task.id}

    async def astep(self, action: Message) -> StepResult:
        if self.task is None or self.done:
            raise RuntimeError(f"{type(self).__name__}.step() called outside an episode: call reset() first")
        self.turns += 1
        if action.get("parse_error"):
            if self.on_parse_error == "terminate":
                self.done = True
                components = {"parse_error": self.parse_error_penalty}
                info = {"parse_error": action["parse_error"], "reward_components": components}
                return [], self.parse_error_penalty, True, False, info
            return self._continue([user(PARSE_ERROR_MESSAGE.format(error=action["parse_error"]))])
        if action.get("tool_calls"):
            return self._continue(await self.toolbox.run(action["tool_calls"]))
        self.done = True
        outcome = self.score(self.task, action)
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if isinstance(outcome, Mapping):
            components = {name: float(value) for name, value in outcome.items()}
            return [], self.combine(components), True, False, {"reward_components": components}
        return [], float(outcome), True, False, {}

    def combine(self, components: Mapping[str, float]) -> float:
        if self.reward_weights is None:
            return float(sum(components.values()))
        return float(sum(weight * components.get(name, 0.0) for name, weight in self.reward_weights.items()))

    def _continue(self, observation: list[Message]) -> StepResult:
        truncated = self.max_turns is not None and self.turns >= self.max_turns
        self.done = truncated
        return observation, 0.0, False, truncated, {}


@functools.lru_cache(maxsize=None)
def _tool_names(cls: type) -> tuple[str, ...]:
    """Names of the ``@tool`` methods of ``cls`` and its bases, sorted (read once per class, not per episode)."""
    return tuple(sorted({name for klass in cls.__mro__ for name, value in vars(klass).items() if isinstance(value, Tool)}))
