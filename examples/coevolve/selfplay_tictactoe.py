"""Self-play on tic-tac-toe against a growing pool of frozen past versions.

Each iteration the learner plays ``--games`` games, alternating X and O, each against a snapshot
drawn from the pool; its trajectories get per-role group ids (a per-seat baseline, so X's
first-move edge is not credited to its moves) and go to the trainer; after each iteration the
current weights join the pool. Prints per iteration: the win rate against the pool (win 1, draw
0.5, loss 0) overall and per seat, the illegal-move rate, and the trainer's metrics.

    python examples/coevolve/selfplay_tictactoe.py --iterations 3 --games 8 --out runs/selfplay
"""

from __future__ import annotations

import asyncio
import random
import re
from statistics import mean

from harness import Learner, RunLog, common_arguments, console, embedded_learner, use_embedded

from miles_envs.engine import SamplingParams
from miles_envs.agents.scripted import ScriptContext, ScriptedEngine
from miles_envs.chat import ChatRenderer
from miles_envs.envs.tictactoe import TicTacToeEnv
from miles_envs.multi_loop import AgentPolicy, MultiLoopConfig, rollout_multi
from miles_envs.multiagent import OpponentPool, group_by_role
from miles_envs.tokenizers import load_tokenizer

_BOARD_ROW = re.compile(r"(\S) \| (\S) \| (\S)")


def random_legal_mover(tokenizer, seed: object):
    """A scripted player: a free cell of the last board it was shown, drawn from a seeded rng."""

    def reply(context: ScriptContext) -> str:
        shown = tokenizer.decode(context.input_ids).rsplit("Your move.", 1)[0]
        cells = [cell for row in _BOARD_ROW.findall(shown)[-3:] for cell in row]
        free = [cell for cell in cells if cell.isdigit()]
        return random.Random(f"{seed}:{len(context.input_ids)}").choice(free or ["5"])

    return reply


def scripted_learner(args) -> tuple[Learner, callable]:
    tokenizer = load_tokenizer("qwen3")
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    policy = AgentPolicy(ScriptedEngine(tokenizer, random_legal_mover(tokenizer, args.seed)), sampling, name="learner")

    async def snapshot(version: str) -> AgentPolicy:
        engine = ScriptedEngine(tokenizer, random_legal_mover(tokenizer, version), weight_version=version)
        return AgentPolicy(engine, sampling, trainable=False)

    return Learner(policy, ChatRenderer(tokenizer)), snapshot


def score(reward: float) -> float:
    return 1.0 if reward > 0 else 0.5 if reward == 0 else 0.0


async def main() -> None:
    parser = common_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--pool-size", type=int, default=4)
    args = parser.parse_args()
    if use_embedded(args):
        learner = embedded_learner(args)

        async def snapshot(version: str) -> AgentPolicy:
            return await learner.snapshot()
    else:
        learner, snapshot = scripted_learner(args)
        console.print("[yellow]scripted engine: rollout-only, nothing is trained[/]")
    engines = [learner.policy.engine]

    async def add_snapshot(version: str) -> None:
        frozen = await snapshot(version)
        engines.append(frozen.engine)
        pool.add(version, frozen)

    pool = OpponentPool(max_size=args.pool_size)
    await add_snapshot(learner.version if learner.trainer else "scripted-0")
    log = RunLog(
        args.out, "tic-tac-toe self-play",
        ["iteration", "version", "pool", "win_rate", "win_rate_x", "win_rate_o", "illegal_rate", "train/loss"],
        {**{k: str(v) for k, v in vars(args).items()}, "trained": learner.trainer is not None},
    )
    config = MultiLoopConfig(max_context=2048)
    for iteration in range(args.iterations):
        rng = random.Random(args.seed * 1_000_003 + iteration)
        seats = ["x" if g % 2 == 0 else "o" for g in range(args.games)]
        opponents = [pool.sample(rng) for _ in range(args.games)]
        seatings = [
            {seat: learner.policy, ("o" if seat == "x" else "x"): opponent}
            for seat, (_, opponent) in zip(seats, opponents)
        ]
        episodes = [
            e async for e in rollout_multi(
                TicTacToeEnv, lambda game, play, seatings=seatings: seatings[game], learner.renderer, n=args.games, config=config,
                seed=args.seed + iteration * args.games, sampling_seed=(args.seed + iteration) * 10_000,
            )
        ]
        results: dict[str, list[float]] = {"x": [], "o": []}
        illegal = []
        for episode in episodes:
            game = int(episode.episode_id.split(":")[0])
            seat, (version, _) = seats[game], opponents[game]
            results[seat].append(score(episode.returns[seat]))
            pool.record(version, results[seat][-1])
            mine = episode.trajectories.get(seat)
            if mine is not None:  # the learner moved at all (an opponent's first-move forfeit ends the game)
                illegal.append(mine.reward_components.get("illegal", 0.0) / mine.num_turns)
        trainable = group_by_role([t for e in episodes for t in e.trainable()])
        train_metrics = await learner.train(trainable)
        log.write_episodes(episodes, iteration)
        log.record({
            "iteration": iteration,
            "version": learner.version,
            "pool": len(pool),
            "win_rate": mean(results["x"] + results["o"]),
            "win_rate_x": mean(results["x"]) if results["x"] else None,
            "win_rate_o": mean(results["o"]) if results["o"] else None,
            "illegal_rate": mean(illegal) if illegal else None,
            "episodes": len(episodes),
            "trajectories": sum(len(e.trajectories) for e in episodes),
            "pool_win_rates": pool.win_rates(),
            **train_metrics,
        })
        await add_snapshot(learner.version if learner.trainer else f"scripted-{iteration + 1}")
    log.close()
    for engine in engines:
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
