"""Proposer–solver co-evolution on verifiable arithmetic.

One policy plays both roles: as the proposer it writes a problem, as each of ``--solvers`` solvers
it answers it without seeing the other answers. The proposer is paid for problems about half of the
solvers get right (neither trivial nor impossible), the solvers for right answers. Solver
trajectories of one problem form a GRPO group (same prompt); proposer trajectories share a
per-role baseline over the batch. Prints per iteration: the valid-problem rate, proposer
difficulty (1 - solve rate, and operators per problem), solver accuracy and the proposer's reward.

    python examples/coevolve/proposer_solver.py --iterations 3 --games 8 --out runs/proposer_solver
"""

from __future__ import annotations

import ast
import asyncio
import random
from statistics import mean

from harness import Learner, RunLog, common_arguments, console, embedded_learner, use_embedded

from miles_envs.engine import SamplingParams
from miles_envs.agents.scripted import ScriptContext, ScriptedEngine
from miles_envs.chat import ChatRenderer
from miles_envs.envs.proposer_solver import ProposerSolverEnv, evaluate
from miles_envs.multi_loop import AgentPolicy, MultiLoopConfig, rollout_multi
from miles_envs.multiagent import group_by_role
from miles_envs.tokenizers import load_tokenizer


def scripted_player(tokenizer, seed: int):
    """Proposes random expressions; as a solver, seats with an odd sampling seed ignore operator
    precedence (they read left to right), so problems where precedence matters split the solvers."""

    def reply(context: ScriptContext) -> str:
        text = tokenizer.decode(context.input_ids)
        rng = random.Random(f"{seed}:{context.sampling.seed}")
        if "Problem: " not in text:
            numbers = [str(rng.randint(2, 30)) for _ in range(rng.randint(2, 4))]
            return "PROBLEM: " + "".join(n + rng.choice("+-*") for n in numbers[:-1]) + numbers[-1]
        problem = text.rsplit("Problem: ", 1)[1].split("\n", 1)[0]
        careless = (context.sampling.seed or 0) % 2
        return str(left_to_right(problem) if careless else evaluate(problem, max_operators=99))

    return reply


def left_to_right(expression: str) -> int:
    """A careless solver's value: operators applied in reading order, precedence ignored."""
    tokens = ast.parse(expression, mode="eval").body
    flat: list = []

    def walk(node):
        if isinstance(node, ast.BinOp):
            walk(node.left)
            flat.append(type(node.op))
            walk(node.right)
        else:
            flat.append(ast.literal_eval(node))

    walk(tokens)
    value = flat[0]
    for op, operand in zip(flat[1::2], flat[2::2]):
        value = value + operand if op is ast.Add else value - operand if op is ast.Sub else value * operand
    return value


def scripted_learner(args) -> Learner:
    tokenizer = load_tokenizer("qwen3")
    policy = AgentPolicy(
        ScriptedEngine(tokenizer, scripted_player(tokenizer, args.seed)), SamplingParams(max_new_tokens=args.max_new_tokens), name="learner"
    )
    return Learner(policy, ChatRenderer(tokenizer))


async def main() -> None:
    parser = common_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--solvers", type=int, default=4)
    args = parser.parse_args()
    if use_embedded(args):
        learner = embedded_learner(args)
    else:
        learner = scripted_learner(args)
        console.print("[yellow]scripted engine: rollout-only, nothing is trained[/]")
    seating = {"proposer": learner.policy, **{f"solver_{i}": learner.policy for i in range(args.solvers)}}
    log = RunLog(
        args.out, "proposer-solver",
        ["iteration", "version", "valid_rate", "difficulty", "operators", "solver_accuracy", "proposer_reward", "train/loss"],
        {**{k: str(v) for k, v in vars(args).items()}, "trained": learner.trainer is not None},
    )
    config = MultiLoopConfig(max_context=2048)
    for iteration in range(args.iterations):
        episodes = [
            e async for e in rollout_multi(
                lambda: ProposerSolverEnv(num_solvers=args.solvers), seating, learner.renderer, n=args.games,
                config=config, seed=args.seed + iteration * args.games, sampling_seed=(args.seed + iteration) * 10_000,
            )
        ]
        valid = [e for e in episodes if e.infos.get("proposer", {}).get("valid")]
        solvers = [t for e in valid for a, t in e.trajectories.items() if a != "proposer"]
        proposers = group_by_role(t for e in episodes for a, t in e.trajectories.items() if a == "proposer")
        train_metrics = await learner.train([*proposers, *solvers])  # solvers keep their per-problem groups
        log.write_episodes(episodes, iteration)
        log.record({
            "iteration": iteration,
            "version": learner.version,
            "valid_rate": len(valid) / len(episodes),
            "difficulty": mean(1 - e.infos["proposer"]["solve_rate"] for e in valid) if valid else None,
            "operators": mean(count_operators(e.infos["proposer"]["problem"]) for e in valid) if valid else None,
            "solver_accuracy": mean(t.reward for t in solvers) if solvers else None,
            "proposer_reward": mean(e.returns["proposer"] for e in episodes),
            "episodes": len(episodes),
            "trajectories": sum(len(e.trajectories) for e in episodes),
            **train_metrics,
        })
    log.close()
    await learner.policy.engine.close()


def count_operators(expression: str) -> int:
    return sum(isinstance(n, (ast.BinOp, ast.UnaryOp)) for n in ast.walk(ast.parse(expression, mode="eval")))


if __name__ == "__main__":
    asyncio.run(main())
