"""Proposer–solver co-evolution on verifiable arithmetic.

One policy plays both roles: as the proposer it writes a problem, as each of ``--solvers`` solvers
it answers it without seeing the other answers. The proposer is paid for problems about half of the
solvers get right (neither trivial nor impossible), the solvers for right answers; with
``--difficulty-weighted``, that pay is scaled by the problem's share of ``--max-operators``. Solver
trajectories of one problem form a GRPO group (same prompt); proposer trajectories share a
per-role baseline over the batch.

A random-init model is first warm-started on demonstrations played through the env: a proposer
writing random problems of 1 to ``--max-operators`` operators on one-digit numbers, and one solver
answering each correctly (one per problem, so ``--warmup-games`` demonstrations hold as many distinct
problems). Then each iteration prints the valid-problem rate, the proposer's
difficulty (operators per problem) next to the solvers' success rate on those problems, and the
proposer's reward; every ``--eval-every`` iterations the solver answers a fixed held-out set of
problems (greedy), per operator count.

    python examples/coevolve/proposer_solver.py --iterations 3 --games 8 --out runs/proposer_solver

``bench/gpu/coevolve.py`` runs it at a size that learns, on a GPU.
"""

from __future__ import annotations

import ast
import asyncio
import random
import statistics
from collections import defaultdict
from dataclasses import replace
from statistics import mean

from harness import (
    Learner, RunLog, at_least, common_arguments, console, embedded_learner, eval_games, scripted_policy, use_embedded, wilson, write_curves,
)

from miles_envs.chat import ChatRenderer
from miles_envs.envs.proposer_solver import ProposerSolverEnv, count_operators, evaluate, random_problem
from miles_envs.multi_loop import AgentPolicy, MultiLoopConfig, rollout_multi
from miles_envs.multiagent import group_by_role
from miles_envs.tokenizers import load_tokenizer

CONFIG = MultiLoopConfig(max_context=2048)


def problem_writer(renderer: ChatRenderer, max_operators: int, name: str = "problem-writer") -> AgentPolicy:
    """A scripted proposer: a random problem with 1..``max_operators`` operators on one-digit numbers."""

    def reply(_text: str, rng: random.Random) -> str:
        return "PROBLEM: " + random_problem(rng, rng.randint(1, max_operators))

    return scripted_policy(renderer, reply, name)


def exact_solver(renderer: ChatRenderer) -> AgentPolicy:
    """A scripted solver that answers every problem correctly (the warm start's solver demonstrations)."""

    def reply(text: str, _rng: random.Random) -> str:
        return str(evaluate(text.rsplit("Problem: ", 1)[1].split("\n", 1)[0], max_operators=99))

    return scripted_policy(renderer, reply, "exact-solver")


def careless_player(renderer: ChatRenderer, seed: int) -> AgentPolicy:
    """Scripted rollouts: proposes random expressions; as a solver, ignores operator precedence (reads
    left to right) on a coin flip per answer, so problems where precedence matters split the solvers."""

    def reply(text: str, rng: random.Random) -> str:
        if "Problem: " not in text:
            numbers = [str(rng.randint(2, 30)) for _ in range(rng.randint(2, 4))]
            return "PROBLEM: " + "".join(n + rng.choice("+-*") for n in numbers[:-1]) + numbers[-1]
        problem = text.rsplit("Problem: ", 1)[1].split("\n", 1)[0]
        careless = rng.random() < 0.5
        return str(left_to_right(problem) if careless else evaluate(problem, max_operators=99))

    return scripted_policy(renderer, reply, f"careless-{seed}")


def left_to_right(expression: str) -> int:
    """A careless solver's value: operators applied in reading order, precedence ignored."""
    flat: list = []

    def walk(node):
        if isinstance(node, ast.BinOp):
            walk(node.left)
            flat.append(type(node.op))
            walk(node.right)
        else:
            flat.append(ast.literal_eval(node))

    walk(ast.parse(expression, mode="eval").body)
    value = flat[0]
    for op, operand in zip(flat[1::2], flat[2::2]):
        value = value + operand if op is ast.Add else value - operand if op is ast.Sub else value * operand
    return value


async def play(env, seating, renderer, games: int, seed: int, sampling_seed: int, concurrency: int = 64) -> list:
    return [
        e async for e in rollout_multi(
            env, seating, renderer, n=games, config=CONFIG, seed=seed, sampling_seed=sampling_seed, concurrency=concurrency,
        )
    ]


async def held_out_accuracy(learner: Learner, args, problems: int) -> dict:
    """Solver accuracy (greedy by default) on fixed problems (a fixed scripted proposer and sampling seeds), per operator count."""
    seating = {"proposer": problem_writer(learner.renderer, args.max_operators, "held-out"),
               "solver_0": learner.evaluated(args.eval_temperature)}
    env = lambda: ProposerSolverEnv(num_solvers=1, max_operators=args.max_operators)  # noqa: E731
    episodes = await play(env, seating, learner.renderer, problems, seed=10**6, sampling_seed=10**7 + args.seed,
                          concurrency=args.concurrency)
    by_operators: dict[int, list[float]] = defaultdict(list)
    for e in episodes:
        by_operators[count_operators(e.infos["solver_0"]["problem"])].append(e.returns["solver_0"])
    right = sum(sum(v) for v in by_operators.values())
    return {
        "accuracy": right / len(episodes), "accuracy_ci95": wilson(right, len(episodes)), "problems": len(episodes),
        "by_operators": {str(k): round(mean(v), 4) for k, v in sorted(by_operators.items())},
    }


async def demonstrations(renderer: ChatRenderer, args) -> list:
    """Proposer and solver trajectories of scripted episodes: what the warm start imitates."""
    seating = {"proposer": problem_writer(renderer, args.max_operators), "solver_0": exact_solver(renderer)}
    env = lambda: ProposerSolverEnv(num_solvers=1, max_operators=args.max_operators)  # noqa: E731
    episodes = await play(env, seating, renderer, args.warmup_games, seed=2 * 10**6, sampling_seed=args.seed,
                          concurrency=args.concurrency)
    return [t for e in episodes for t in e.trajectories.values()]


def scripted_learner(args) -> Learner:
    renderer = ChatRenderer(load_tokenizer("qwen3"))
    policy = careless_player(renderer, args.seed)
    return Learner(replace(policy, name="learner", trainable=True), renderer)


async def main() -> None:
    parser = common_arguments(__doc__.split("\n\n")[0], eval_temperature=0.0)
    parser.add_argument("--solvers", type=at_least(1), default=4)
    parser.add_argument("--max-operators", type=at_least(1), default=4)
    parser.add_argument("--difficulty-weighted", action="store_true",
                        help="pay the proposer learnability x operators / max operators (harder problems pay more)")
    args = parser.parse_args()
    if use_embedded(args):
        learner = embedded_learner(args)
    else:
        learner = scripted_learner(args)
        console.print("[yellow]scripted engine: rollout-only, nothing is trained[/]")
    config = {**{k: str(v) for k, v in vars(args).items()}, "trained": learner.trainer is not None}
    log = RunLog(
        args.out, "proposer-solver",
        ["iteration", "version", "valid_rate", "operators", "solver_success", "proposer_reward", "train/loss"], config,
    )
    evals: list[dict] = []
    warm_start: list[dict] = []

    async def eval_point(iteration: int, phase: str) -> None:
        row = {"iteration": iteration, "phase": phase, **await held_out_accuracy(learner, args, eval_games(args, phase))}
        evals.append(row)
        console.print(f"[bold]eval[/] iteration={iteration} {phase}  held-out solver accuracy {row['accuracy']:.3f} "
                      f"{row['accuracy_ci95']}  by operators {row['by_operators']}")
        # rewritten at every evaluation, so a run cut short keeps its curves
        payload = {"config": config, "summary": summary(evals, log.rows), "evals": evals, "warm_start": warm_start, "iterations": log.rows}
        write_curves(args.results, f"proposer_solver_seed{args.seed}", payload, plot)

    if learner.trainer is not None and args.warmup_steps:
        await eval_point(0, "init")
        demos = await demonstrations(learner.renderer, args)
        warm_start += await learner.warm_start(demos, args.warmup_steps, args.warmup_lr, args.warmup_batch, args.seed)
        console.print(f"warm start: {len(demos)} demonstration trajectories, {args.warmup_steps} SFT steps, "
                      f"loss {warm_start[0]['sft/loss']:.3f} -> {warm_start[-1]['sft/loss']:.3f}")
    await eval_point(0, "start")

    seating = {"proposer": learner.policy, **{f"solver_{i}": learner.policy for i in range(args.solvers)}}
    env = lambda: ProposerSolverEnv(num_solvers=args.solvers, max_operators=args.max_operators,  # noqa: E731
                                    difficulty_weighted=args.difficulty_weighted)
    for iteration in range(args.iterations):
        episodes = await play(env, seating, learner.renderer, args.games, seed=args.seed + iteration * args.games,
                              sampling_seed=(args.seed + iteration) * 10_000, concurrency=args.concurrency)
        valid = [e for e in episodes if e.infos.get("proposer", {}).get("valid")]
        solvers = [t for e in valid for a, t in e.trajectories.items() if a != "proposer"]
        proposers = group_by_role(t for e in episodes for a, t in e.trajectories.items() if a == "proposer")
        train_metrics = await learner.train([*proposers, *solvers])  # solvers keep their per-problem groups
        log.write_episodes(episodes, iteration)
        log.record({
            "iteration": iteration,
            "version": learner.version,
            "valid_rate": len(valid) / len(episodes),
            "operators": mean(count_operators(e.infos["proposer"]["problem"]) for e in valid) if valid else None,
            "solver_success": mean(t.reward for t in solvers) if solvers else None,
            "proposer_reward": mean(e.returns["proposer"] for e in episodes),
            "episodes": len(episodes),
            "trajectories": sum(len(e.trajectories) for e in episodes),
            **train_metrics,
        })
        last = log.last_iteration(iteration, args)
        if last:
            await eval_point(iteration + 1, "end")
            break
        if (iteration + 1) % args.eval_every == 0:
            await eval_point(iteration + 1, "co_evolution")
    log.close()
    console.print(f"held-out solver accuracy from the warm start to the end: {summary(evals, log.rows)}")
    await learner.policy.engine.close()


def summary(evals: list[dict], rows: list[dict]) -> dict:
    """Held-out solver accuracy at the start of co-evolution (after any warm start) and now, and how
    the proposer's difficulty followed the solvers' success (``tracking``)."""
    started = [e for e in evals if e["phase"] != "init"]
    if not started:
        return {}
    start, end = started[0], started[-1]
    return {"held_out_start": start["accuracy"], "held_out_start_ci95": start["accuracy_ci95"],
            "held_out_end": end["accuracy"], "held_out_end_ci95": end["accuracy_ci95"], "end_phase": end["phase"],
            "problems": [start["problems"], end["problems"]],
            "lift_points": round(100 * (end["accuracy"] - start["accuracy"]), 1), "tracking": tracking(rows)}


def tracking(rows: list[dict], window: int = 5) -> dict:
    """Operators per problem and solver success over the first and the last ``window`` iterations,
    and the Pearson correlation of the two over all iterations (None below 3 points or without spread)."""
    points = [(r["operators"], r["solver_success"]) for r in rows if r["operators"] is not None and r["solver_success"] is not None]
    if not points:
        return {}
    operators, success = zip(*points)
    try:
        correlation = round(statistics.correlation(operators, success), 3) if len(points) >= 3 else None
    except statistics.StatisticsError:  # one of the two never moved
        correlation = None
    first, last = points[:window], points[-window:]
    return {"operators": [round(mean(o for o, _ in first), 3), round(mean(o for o, _ in last), 3)],
            "solver_success": [round(mean(s for _, s in first), 3), round(mean(s for _, s in last), 3)],
            "correlation": correlation, "iterations": len(points)}


def plot(figure, payload: dict) -> None:
    left, middle, right = figure.subplots(1, 3)
    rows = payload["iterations"]
    xs = [r["iteration"] + 1 for r in rows]
    left.plot(xs, [r["operators"] for r in rows], color="tab:red", label="proposer: operators per problem")
    left.set(title="proposer's difficulty and solvers' success", xlabel="iteration", ylabel="operators per valid problem")
    twin = left.twinx()
    twin.plot(xs, [r["solver_success"] for r in rows], color="tab:blue", label="solver success on proposed problems")
    twin.plot(xs, [r["valid_rate"] for r in rows], color="tab:gray", linestyle=":", label="valid-problem rate")
    twin.set(ylim=(0, 1), ylabel="rate")
    left.legend(loc="lower left", fontsize=7)
    twin.legend(loc="lower right", fontsize=7)
    points = [e for e in payload["evals"] if e["phase"] != "init"]
    ex = [e["iteration"] for e in points]
    middle.plot(ex, [e["accuracy"] for e in points], marker="o", label="held-out (greedy)")
    middle.fill_between(ex, [e["accuracy_ci95"][0] for e in points], [e["accuracy_ci95"][1] for e in points], alpha=0.2)
    middle.set(title="solver held-out accuracy", xlabel="iteration", ylim=(0, 1))
    middle.legend()
    right.plot([s["sft/loss"] for s in payload["warm_start"]])
    right.set(title="warm start (SFT) loss", xlabel="SFT step")


if __name__ == "__main__":
    asyncio.run(main())
