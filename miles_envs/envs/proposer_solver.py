"""``miles/ProposerSolver-v0``: one agent writes verifiable arithmetic problems, others solve them.

The ``proposer`` writes ``PROBLEM: <expression>`` (integers, ``+ - *``, parentheses, at most
``max_operators`` operators, at least one). The env computes the answer exactly; each of the
``num_solvers`` solvers (``solver_0`` …) sees only the problem, never the other solvers' replies, and
answers with an integer. Solver reward: 1 when right, else 0. Proposer reward, the learnability
signal: ``1 - |2·solve_rate - 1|`` — 0 for problems every solver gets (trivial) or none gets
(impossible), 1 when half do; an invalid problem costs ``invalid_penalty`` and ends the episode.
With ``difficulty_weighted=True`` that signal is scaled by ``operators / max_operators``: between
problems the solvers find equally learnable the harder pays more, so the proposer moves to harder
problems as soon as the solvers start getting them right, instead of only once they solve more
than half of the easy ones.
"""

from __future__ import annotations

import ast
import random
import re
from typing import Any

from miles_envs.env import Message, system, user
from miles_envs.multiagent.text import last_integer
from miles_envs.multiagent.turn_based import AgentStep, TurnBasedEnv

_PROBLEM = re.compile(r"PROBLEM:\s*(.+)", re.IGNORECASE)
_OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}
MAX_LITERAL = 999
MAX_MAGNITUDE = 10**12


class InvalidProblem(ValueError):
    """The proposed text is not an allowed arithmetic expression; the message says why."""


def evaluate(expression: str, max_operators: int) -> int:
    """The exact integer value of an allowed expression, or ``InvalidProblem``."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise InvalidProblem(f"not an arithmetic expression ({exc.msg})") from None
    except (RecursionError, ValueError):
        raise InvalidProblem("not an arithmetic expression (nested too deeply or holds a null byte)") from None
    operators = _operators(tree)
    if operators > max_operators:  # checked before evaluating, which recurses once per operator
        raise InvalidProblem(f"{operators} operators; use between 1 and {max_operators}")
    value = _value(tree.body)
    if operators < 1:
        raise InvalidProblem(f"{operators} operators; use between 1 and {max_operators}")
    if abs(value) > MAX_MAGNITUDE:
        raise InvalidProblem(f"the result exceeds {MAX_MAGNITUDE:.0e} in magnitude")
    return value


def _value(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if node.value > MAX_LITERAL:
            raise InvalidProblem(f"the number {node.value} is above {MAX_LITERAL}")
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_value(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_value(node.left), _value(node.right))
    raise InvalidProblem(f"{ast.unparse(node)!r} is not allowed: use integers, + - * and parentheses")


def random_problem(rng: random.Random, operators: int, max_literal: int = 9) -> str:
    """A random allowed expression with exactly ``operators`` binary operators and literals 0..``max_literal``."""
    if operators < 1:
        raise ValueError(f"operators={operators}: a problem has at least one operator")
    expression = str(rng.randint(0, max_literal))
    for _ in range(operators):
        expression += rng.choice("+-*") + str(rng.randint(0, max_literal))
    return expression


def count_operators(expression: str) -> int:
    """Operators in an expression (the difficulty the proposer chose)."""
    return _operators(ast.parse(expression.strip(), mode="eval"))


def _operators(tree: ast.AST) -> int:
    return sum(isinstance(node, (ast.BinOp, ast.UnaryOp)) for node in ast.walk(tree))


def extract_problem(text: str) -> str:
    """The expression after the last ``PROBLEM:``, else the reply's first line."""
    found = _PROBLEM.findall(text)
    lines = (found[-1] if found else text).strip().splitlines()
    return lines[0] if lines else ""


class ProposerSolverEnv(TurnBasedEnv):
    max_turns = 5

    def __init__(self, num_solvers: int = 4, max_operators: int = 4, invalid_penalty: float = -1.0,
                 difficulty_weighted: bool = False) -> None:
        if num_solvers < 1:
            raise ValueError(f"num_solvers={num_solvers}: at least one solver is needed to judge a problem")
        self.solvers = [f"solver_{i}" for i in range(num_solvers)]
        self.possible_agents = ["proposer", *self.solvers]
        super().__init__()
        self.agent_roles = {"proposer": "proposer", **{s: "solver" for s in self.solvers}}
        self.max_turns = 1 + num_solvers
        self.max_operators, self.invalid_penalty = max_operators, invalid_penalty
        self.difficulty_weighted = difficulty_weighted
        self.problem: str | None = None
        self.answer: int | None = None
        self.correct: dict[str, bool] = {}

    def start(self, seed: int | None, options: dict[str, Any] | None):
        rng = random.Random(seed)
        self.problem, self.answer, self.correct = None, None, {}
        prompt = (
            f"Write one arithmetic problem for {len(self.solvers)} solvers. Use integers from 0 to {MAX_LITERAL}, "
            f"+ - * and parentheses, with 1 to {self.max_operators} operators, and include the number "
            f"{rng.randint(2, 99)}. You score highest when about half of the solvers get it right. "
            "Reply with one line: PROBLEM: <expression>"
        )
        observations: dict[str, list[Message]] = {"proposer": [system("You write math problems."), user(prompt)]}
        for solver in self.solvers:
            observations[solver] = [system("You solve arithmetic problems. End your reply with the integer answer.")]
        return observations, {}, "proposer"

    def play(self, agent: str, action: Message) -> AgentStep:
        text = action.get("content") or ""
        if agent == "proposer":
            return self._propose(text)
        self.correct[agent] = last_integer(text) == self.answer
        if len(self.correct) < len(self.solvers):
            return AgentStep(next_agent=self.solvers[len(self.correct)])
        return self._score()

    def _propose(self, text: str) -> AgentStep:
        expression = extract_problem(text)
        try:
            self.answer = evaluate(expression, self.max_operators)
        except InvalidProblem as exc:
            infos = {a: {"valid": False, "reason": str(exc)} for a in self.possible_agents}
            infos["proposer"]["reward_components"] = {"valid": 0.0, "learnability": 0.0}
            return AgentStep(
                observations={"proposer": [user(f"Invalid problem: {exc}.")]},
                rewards={"proposer": self.invalid_penalty}, terminated=True, infos=infos,
            )
        self.problem = expression
        question = user(f"Problem: {expression}\nWhat is its value?")
        return AgentStep(observations={s: [dict(question)] for s in self.solvers}, next_agent=self.solvers[0])

    def _score(self) -> AgentStep:
        solve_rate = sum(self.correct.values()) / len(self.solvers)
        learnability = 1.0 - abs(2.0 * solve_rate - 1.0)
        difficulty = count_operators(self.problem) / self.max_operators
        proposer = learnability * difficulty if self.difficulty_weighted else learnability
        rewards = {"proposer": proposer, **{s: float(ok) for s, ok in self.correct.items()}}
        shared = {"valid": True, "problem": self.problem, "answer": self.answer, "solve_rate": solve_rate}
        infos = {a: dict(shared) for a in self.possible_agents}
        infos["proposer"]["reward_components"] = {"valid": 1.0, "learnability": learnability, "difficulty": difficulty}
        for solver, ok in self.correct.items():
            infos[solver]["reward_components"] = {"correct": float(ok)}
        return AgentStep(rewards=rewards, terminated=True, infos=infos)
