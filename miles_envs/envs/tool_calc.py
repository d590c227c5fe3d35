"""``miles/ToolCalc-v0``: arithmetic word problems with numbers too large to do in one's head.

Problems are generated from the seed (an unbounded, reproducible set); every answer is an integer,
so the reward is an exact check. The model has one tool, ``calculator``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from simpleeval import SimpleEval

from miles_envs.env import Message
from miles_envs.envs.tool_env import Reward, Task, ToolEnv, extract_tagged
from miles_envs.tools import tool

_EVALUATOR = SimpleEval(functions={}, names={})
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return its value.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, e.g. "(1234 * 56) - 789".
    """
    value = _EVALUATOR.eval(expression)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


@dataclass(frozen=True)
class _Template:
    name: str
    draw: Callable[[random.Random], dict[str, int]]
    text: str
    answer: Callable[[dict[str, int]], int]


def _crates(rng: random.Random) -> dict[str, int]:
    a, b = rng.randint(120, 980), rng.randint(12, 96)
    return {"a": a, "b": b, "c": rng.randint(1000, a * b - 1)}


def _shared(rng: random.Random) -> dict[str, int]:
    b, q = rng.randint(13, 89), rng.randint(104, 997)
    return {"a": b * q, "b": b}


def _stadium(rng: random.Random) -> dict[str, int]:
    return {"a": 25 * rng.randint(4, 40), "b": 4 * rng.randint(5, 60), "p": rng.randint(11, 97)}


def _account(rng: random.Random) -> dict[str, int]:
    b, c = rng.randint(1150, 2950), rng.randint(7, 19)
    return {"a": b * c + rng.randint(1000, 40000), "b": b, "c": c, "d": rng.randint(1000, 9000)}


def _uniform(**ranges: tuple[int, int]) -> Callable[[random.Random], dict[str, int]]:
    return lambda rng: {name: rng.randint(low, high) for name, (low, high) in ranges.items()}


TEMPLATES: tuple[_Template, ...] = (
    _Template(
        "crates", _crates,
        "A warehouse holds {a} crates with {b} bottles in each crate. Then {c} bottles are shipped out. "
        "How many bottles remain in the warehouse?",
        lambda v: v["a"] * v["b"] - v["c"],
    ),
    _Template(
        "factory", _uniform(a=(137, 989), b=(7, 23), c=(11, 59)),
        "A factory makes {a} widgets per hour and runs {b} hours a day for {c} days. "
        "How many widgets does it make in total?",
        lambda v: v["a"] * v["b"] * v["c"],
    ),
    _Template(
        "shared", _shared,
        "A mill shares {a} kilograms of flour equally among {b} bakeries. How many kilograms does each bakery get?",
        lambda v: v["a"] // v["b"],
    ),
    _Template(
        "train", _uniform(a=(251, 977), b=(313, 899), c=(6, 29)),
        "A freight train travels {a} km on its first day and {b} km on each of the next {c} days. "
        "How many kilometres does it travel in total?",
        lambda v: v["a"] + v["b"] * v["c"],
    ),
    _Template(
        "shop", _uniform(a=(140, 960), p=(113, 487), s=(512, 944)),
        "A shop buys {a} lamps at {p} cents each and sells all of them at {s} cents each. "
        "What is the profit in cents?",
        lambda v: v["a"] * (v["s"] - v["p"]),
    ),
    _Template(
        "account", _account,
        "An account holds {a} dollars. It pays {b} dollars of rent each month for {c} months and then "
        "receives a bonus of {d} dollars. What is the balance in dollars?",
        lambda v: v["a"] - v["b"] * v["c"] + v["d"],
    ),
    _Template(
        "stadium", _stadium,
        "A stadium has {a} rows of {b} seats. At a match {p}% of the seats are taken. How many seats are taken?",
        lambda v: v["a"] * v["b"] * v["p"] // 100,
    ),
)


def parse_number(text: str | None) -> Decimal | None:
    """The first number written by the model (``"12,345"``, ``"$1200"``, ``"7.0"``) or ``None``."""
    if text is None:
        return None
    match = _NUMBER.search(text)
    return Decimal(match.group().replace(",", "")) if match else None


class ToolCalcEnv(ToolEnv):
    """Solve a word problem with the calculator; reward 1 for the exact integer in ``<answer>`` tags.

    Reward components: ``correct`` (weight 1) and ``format`` (an ``<answer>`` tag is present, weight 0).
    """

    max_turns = 6
    system_prompt = (
        "Solve the arithmetic word problem. Use the calculator tool for the arithmetic. When you are done, "
        "reply without a tool call and put the final number inside <answer></answer>."
    )
    default_reward_weights = {"correct": 1.0}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__([calculator], **kwargs)

    def make_task(self, rng: random.Random, options: dict[str, Any]) -> Task:
        template = rng.choice(TEMPLATES)
        values = template.draw(rng)
        task_id = f"{template.name}-" + "-".join(str(values[k]) for k in sorted(values))
        return Task(task_id, template.text.format(**values), template.answer(values), {"template": template.name})

    def score(self, task: Task, answer: Message) -> Reward:
        tagged = extract_tagged(answer.get("content"))
        value = parse_number(tagged)
        return {"correct": float(value is not None and value == task.answer), "format": float(tagged is not None)}
