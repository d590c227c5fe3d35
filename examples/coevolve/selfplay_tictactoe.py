"""Self-play on tic-tac-toe against a growing pool of frozen past versions.

A random-init model first learns the format from demonstrations: games between two random-legal
players, tokenised by the same loop and chat template RL uses, so it makes legal moves but plays
no better than chance. Then each iteration the learner plays ``--games`` games, alternating X and
O, each against a snapshot drawn from the pool (with ``--pool-hardness`` > 0, the snapshots it
still loses to are drawn more often) or, for a ``--random-share`` of the games, against the
random-legal player (a fixed league member, so the learner cannot drift into lines only its own
past versions fall for); its trajectories get per-role group ids (a per-seat
baseline, so X's first-move edge is not credited to its moves) and go to the trainer (pool seats
are not trainable); after each iteration the current weights join the pool. Every
``--eval-every`` iterations the learner plays fixed reference opponents on fixed seeds, half the
games as X: ``random`` (a random legal move) and ``one_ply`` (win if possible, block if needed,
else random). Its win+draw rate against them (the learner sampled as it plays, or at
``--eval-temperature``), with a 95% Wilson interval, is the curve that shows whether self-play made
it stronger; ``--greedy-too`` adds the greedy learner's rates at the start and the end.

    python examples/coevolve/selfplay_tictactoe.py --iterations 3 --games 8 --out runs/selfplay

``bench/gpu/coevolve.py`` runs it at a size that learns, on a GPU.
"""

from __future__ import annotations

import asyncio
import random
from statistics import mean

from harness import (
    Learner, RunLog, at_least, common_arguments, console, embedded_learner, eval_games, scripted_policy, use_embedded, wilson, write_curves,
)

from miles_envs.chat import ChatRenderer
from miles_envs.envs.tictactoe import TicTacToeEnv, one_ply_move, random_move, read_board
from miles_envs.multi_loop import AgentPolicy, MultiLoopConfig, rollout_multi
from miles_envs.multiagent import OpponentPool, group_by_role
from miles_envs.tokenizers import load_tokenizer

CONFIG = MultiLoopConfig(max_context=2048)
REFERENCES = {"random": random_move, "one_ply": one_ply_move}


def reference_player(renderer: ChatRenderer, name: str) -> AgentPolicy:
    """A fixed opponent that reads the last board it was shown and answers with its move."""
    choose = REFERENCES[name]

    def reply(text: str, rng: random.Random) -> str:
        agent, board = read_board(text)
        return str(choose(board, agent, rng))

    return scripted_policy(renderer, reply, name)


def score(reward: float) -> float:
    return 1.0 if reward > 0 else 0.5 if reward == 0 else 0.0


def other(seat: str) -> str:
    return "o" if seat == "x" else "x"


async def play(renderer, seatings: list[dict[str, AgentPolicy]], seed: int, sampling_seed: int, concurrency: int = 64) -> list:
    """One game per seating; episodes in game order."""
    episodes = [
        e async for e in rollout_multi(
            TicTacToeEnv, lambda game, _play: seatings[game], renderer, n=len(seatings), config=CONFIG,
            seed=seed, sampling_seed=sampling_seed, concurrency=concurrency,
        )
    ]
    return sorted(episodes, key=lambda e: int(e.episode_id.split(":")[0]))


async def evaluate(learner: Learner, references: dict[str, AgentPolicy], games: int, seed: int, temperature: float,
                   concurrency: int = 64) -> dict:
    """Win+draw rate (95% CI), win rate and forfeit rate against each reference, on fixed seeds, the
    learner sampled at ``temperature``."""
    row = {}
    seats = ["x" if g % 2 == 0 else "o" for g in range(games)]
    player = learner.evaluated(temperature)
    for name, reference in references.items():
        seatings = [{seat: player, other(seat): reference} for seat in seats]
        episodes = await play(learner.renderer, seatings, seed=10**6 + seed, sampling_seed=10**7 + seed * 10_000, concurrency=concurrency)
        rewards = [e.returns[seat] for e, seat in zip(episodes, seats)]
        forfeits = [e.infos.get(seat, {}).get("forfeit") and r < 0 for e, seat, r in zip(episodes, seats, rewards)]
        not_lost = sum(r >= 0 for r in rewards)
        row[name] = {
            "win_draw": not_lost / games, "win_draw_ci95": wilson(not_lost, games),
            "win": sum(r > 0 for r in rewards) / games, "forfeit": sum(forfeits) / games, "games": games,
        }
    return row


async def demonstrations(renderer: ChatRenderer, games: int, seed: int, concurrency: int) -> list:
    """Both seats' trajectories of random-legal self-play games: what the warm start imitates."""
    mover = reference_player(renderer, "random")
    episodes = await play(renderer, [{"x": mover, "o": mover}] * games, seed=2 * 10**6 + seed, sampling_seed=seed, concurrency=concurrency)
    return [t for e in episodes for t in e.trajectories.values()]


def scripted_learner(args) -> Learner:
    renderer = ChatRenderer(load_tokenizer("qwen3"))
    policy = reference_player(renderer, "random")
    policy.name, policy.trainable = "learner", True
    return Learner(policy, renderer)


async def main() -> None:
    parser = common_arguments(__doc__.split("\n\n")[0], eval_temperature=1.0)
    parser.add_argument("--pool-size", type=at_least(1), default=4)
    parser.add_argument("--greedy-too", action="store_true", help="also evaluate the greedy learner at the start and the end")
    parser.add_argument("--random-share", type=at_least(0, float), default=0.0,
                        help="share of training games against the random-legal player instead of a snapshot (a fixed member of the league)")
    parser.add_argument("--pool-hardness", type=at_least(0, float), default=0.0,
                        help="draw snapshots with weight (1 - learner's recent score)**p; 0: uniform")
    args = parser.parse_args()
    if args.random_share > 1:
        parser.error(f"argument --random-share: {args.random_share}: must be <= 1 (a share of the games)")
    if use_embedded(args):
        learner = embedded_learner(args)
    else:
        learner = scripted_learner(args)
        console.print("[yellow]scripted engine: rollout-only, nothing is trained[/]")
    references = {name: reference_player(learner.renderer, name) for name in REFERENCES}
    config = {**{k: str(v) for k, v in vars(args).items()}, "trained": learner.trainer is not None}
    log = RunLog(
        args.out, "tic-tac-toe self-play",
        ["iteration", "version", "pool", "win_rate", "win_rate_x", "win_rate_o", "win_rate_random", "illegal_rate", "train/entropy"], config,
    )
    evals: list[dict] = []
    warm_start: list[dict] = []

    async def eval_point(iteration: int, phase: str) -> None:
        games = eval_games(args, phase)
        row = {"iteration": iteration, "phase": phase, **await evaluate(learner, references, games, args.seed, args.eval_temperature, args.concurrency)}
        if args.greedy_too and phase in ("start", "end"):
            row["greedy"] = await evaluate(learner, references, games, args.seed, 0.0, args.concurrency)
        evals.append(row)
        for label, rates in (("", row), (" greedy", row.get("greedy"))):
            if rates:
                cells = "  ".join(f"{n}: {rates[n]['win_draw']:.3f} {rates[n]['win_draw_ci95']}" for n in REFERENCES)
                console.print(f"[bold]eval[/] iteration={iteration} {phase}{label}  win+draw  {cells}")
        # rewritten at every evaluation, so a run cut short keeps its curves
        payload = {"config": config, "summary": summary(evals), "evals": evals, "warm_start": warm_start, "iterations": log.rows}
        write_curves(args.results, f"selfplay_tictactoe_seed{args.seed}", payload, plot)

    if learner.trainer is not None and args.warmup_steps:
        await eval_point(0, "init")
        demos = await demonstrations(learner.renderer, args.warmup_games, args.seed, args.concurrency)
        warm_start += await learner.warm_start(demos, args.warmup_steps, args.warmup_lr, args.warmup_batch, args.seed)
        console.print(f"warm start: {len(demos)} demonstration trajectories, {args.warmup_steps} SFT steps, "
                      f"loss {warm_start[0]['sft/loss']:.3f} -> {warm_start[-1]['sft/loss']:.3f}")
    await eval_point(0, "start")

    engines = [learner.policy.engine]
    pool = OpponentPool(max_size=args.pool_size)

    async def add_snapshot(version: str) -> None:
        if learner.trainer is None:
            pool.add(version, reference_player(learner.renderer, "random"))
            return
        leaving = pool.policy(pool.versions[0]).engine if len(pool) == args.pool_size else None
        frozen = await learner.snapshot(reuse=leaving)  # the oldest snapshot's engine, once the pool is full
        if leaving is None:
            engines.append(frozen.engine)
        pool.add(version, frozen)

    await add_snapshot(learner.version if learner.trainer else "scripted-0")
    for iteration in range(args.iterations):
        rng = random.Random(args.seed * 1_000_003 + iteration)
        seats = ["x" if g % 2 == 0 else "o" for g in range(args.games)]
        opponents = [("random", references["random"]) if rng.random() < args.random_share else pool.sample(rng, hardness=args.pool_hardness)
                     for _ in range(args.games)]
        seatings = [{seat: learner.policy, other(seat): opponent} for seat, (_, opponent) in zip(seats, opponents)]
        episodes = await play(learner.renderer, seatings, seed=args.seed + iteration * args.games,
                              sampling_seed=(args.seed + iteration) * 10_000, concurrency=args.concurrency)
        results: dict[str, list[float]] = {"x": [], "o": []}
        illegal, anchor = [], []
        for episode, seat, (version, _) in zip(episodes, seats, opponents):
            results[seat].append(score(episode.returns[seat]))
            if version == "random":
                anchor.append(results[seat][-1])
            else:
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
            "win_rate_random": mean(anchor) if anchor else None,
            "illegal_rate": mean(illegal) if illegal else None,
            "episodes": len(episodes),
            "trajectories": sum(len(e.trajectories) for e in episodes),
            "pool_win_rates": {v: r for v, r in pool.win_rates().items() if v in pool.versions},
            **train_metrics,
        })
        await add_snapshot(learner.version if learner.trainer else f"scripted-{iteration + 1}")
        last = log.last_iteration(iteration, args)
        if last:
            await eval_point(iteration + 1, "end")
            break
        if (iteration + 1) % args.eval_every == 0:
            await eval_point(iteration + 1, "self_play")
    log.close()
    console.print(f"win+draw from the warm start to the end of self-play: {summary(evals)}")
    for engine in engines:
        await engine.close()


def summary(evals: list[dict]) -> dict:
    """Win+draw rate per reference at the start of self-play (after any warm start) and now; under
    ``greedy`` the same for the greedy learner, where both ends have it."""
    started = [e for e in evals if e["phase"] != "init"]
    if not started:
        return {}
    start, end = started[0], started[-1]
    result = lifts(start, end, end["phase"])
    if "greedy" in start and "greedy" in end and end is not start:
        result["greedy"] = lifts(start["greedy"], end["greedy"], end["phase"])
    return result


def lifts(start: dict, end: dict, end_phase: str) -> dict:
    return {
        name: {"start": start[name]["win_draw"], "start_ci95": start[name]["win_draw_ci95"],
               "end": end[name]["win_draw"], "end_ci95": end[name]["win_draw_ci95"], "end_phase": end_phase,
               "games": [start[name]["games"], end[name]["games"]],
               "lift_points": round(100 * (end[name]["win_draw"] - start[name]["win_draw"]), 1)}
        for name in REFERENCES
    }


def plot(figure, payload: dict) -> None:
    left, middle, right = figure.subplots(1, 3)
    for name in REFERENCES:
        points = [e for e in payload["evals"] if e["phase"] != "init"]
        xs = [e["iteration"] for e in points]
        line, = left.plot(xs, [e[name]["win_draw"] for e in points], marker="o", label=f"vs {name}")
        left.fill_between(xs, [e[name]["win_draw_ci95"][0] for e in points], [e[name]["win_draw_ci95"][1] for e in points],
                          color=line.get_color(), alpha=0.2)
        init = [e for e in payload["evals"] if e["phase"] == "init"]
        if init:
            left.scatter([0], [init[0][name]["win_draw"]], marker="x", color=line.get_color())
        greedy = [e for e in points if "greedy" in e]
        if greedy:
            left.plot([e["iteration"] for e in greedy], [e["greedy"][name]["win_draw"] for e in greedy], ls="--", marker="s",
                      color=line.get_color(), label=f"vs {name}, greedy")
    left.set(title="win+draw vs references (x: untrained)", xlabel="self-play iteration", ylim=(0, 1))
    left.legend()
    rows = payload["iterations"]
    middle.plot([r["iteration"] + 1 for r in rows], [r["win_rate"] for r in rows], label="score vs pool")
    if any(r.get("win_rate_random") is not None for r in rows):
        middle.plot([r["iteration"] + 1 for r in rows], [r.get("win_rate_random") for r in rows], label="score vs random (training)")
    middle.plot([r["iteration"] + 1 for r in rows], [r["illegal_rate"] or 0.0 for r in rows], label="illegal-move rate")
    middle.set(title="self-play", xlabel="self-play iteration", ylim=(0, 1))
    middle.legend()
    right.plot([s["sft/loss"] for s in payload["warm_start"]])
    right.set(title="warm start (SFT) loss", xlabel="SFT step")


if __name__ == "__main__":
    asyncio.run(main())
