"""What both co-evolution scripts share: the engine (embedded tiny model on CPU, or scripted), the
trainer, the supervised warm start, frozen snapshots for the opponent pool, the run log
(trajectories JSONL + metrics JSON) and the curves (JSON + PNG).

With ``--engine embedded`` (the default when ``miles_envs.agents.embedded`` is installed) a random-init
tiny model is warm-started on scripted demonstrations, then plays and ``miles_envs.trainer.Trainer``
updates it after every iteration; with ``--engine scripted`` the seats are scripted policies and the
run is rollout-only (no weights to train).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from miles_envs.engine import SamplingParams
from miles_envs.chat import ChatRenderer
from miles_envs.multi_loop import AgentPolicy
from miles_envs.trajectory_io import JsonlWriter

console = Console()


def embedded_available() -> bool:
    return importlib.util.find_spec("miles_envs.agents.embedded") is not None


def at_least(low: float, kind: type = int):
    """An argparse type that refuses values below ``low`` with a message naming the bound."""

    def parse(text: str):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text}: must be >= {low}")
        return value

    return parse


def common_arguments(description: str, eval_temperature: float) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--engine", choices=("auto", "embedded", "scripted"), default="auto")
    parser.add_argument("--iterations", type=at_least(1), default=4)
    parser.add_argument("--games", type=at_least(1), default=16, help="episodes per iteration")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=16)
    parser.add_argument("--arch", default="qwen3", help="model architecture (qwen3, qwen3-moe, deepseek-v3)")
    parser.add_argument("--size", default="tiny", help="model size (tiny, small, medium)")
    parser.add_argument("--device", default="cpu", help="where the model runs and trains (cpu, cuda)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--entropy-coef", type=at_least(0, float), default=0.0,
                        help="entropy bonus in the RL loss (keeps a sampled policy from collapsing onto one line of play)")
    parser.add_argument("--minibatches", type=at_least(1), default=1, help="optimizer steps per rollout batch (PPO-style clipping past the first)")
    parser.add_argument("--concurrency", type=at_least(1), default=64, help="episodes in flight, and requests the engine decodes together")
    parser.add_argument("--warmup-games", type=at_least(1), default=128, help="scripted demonstration episodes for the warm start")
    parser.add_argument("--warmup-steps", type=at_least(0), default=60, help="SFT steps of the warm start (0: none)")
    parser.add_argument("--warmup-lr", type=float, default=1e-3)
    parser.add_argument("--warmup-batch", type=at_least(1), default=32, help="demonstrations per SFT step")
    parser.add_argument("--eval-games", type=at_least(1), default=64, help="episodes per evaluation at the start and the end")
    parser.add_argument("--mid-eval-games", type=at_least(1), default=None, help="episodes per evaluation in between (default: --eval-games)")
    parser.add_argument("--eval-every", type=at_least(1), default=5, help="iterations between evaluations")
    parser.add_argument("--eval-temperature", type=at_least(0, float), default=eval_temperature,
                        help="the learner's sampling temperature in evaluations (0: greedy)")
    parser.add_argument("--time-budget-s", type=at_least(0, float), default=None, help="stop iterating (then evaluate) once the run is this old")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/coevolve"))
    parser.add_argument("--results", type=Path, default=None, help="folder for the curves JSON + PNG (e.g. bench/results/coevolve)")
    return parser


@dataclass
class Learner:
    """The learning policy: its engine, and the trainer that updates it (None when rollout-only)."""

    policy: AgentPolicy
    renderer: ChatRenderer
    trainer: Any = None
    model_path: Path | None = None

    def evaluated(self, temperature: float) -> AgentPolicy:
        """The learner's policy as evaluations play it: same engine, sampled at ``temperature``."""
        return replace(self.policy, sampling=replace(self.policy.sampling, temperature=temperature))

    @property
    def version(self) -> str:
        return self.trainer.weight_version if self.trainer else "scripted"

    async def train(self, trajectories: list) -> dict[str, float]:
        """One trainer step on the learner's trajectories, then push the weights to its engine."""
        if self.trainer is None or not trajectories:
            return {}
        metrics = self.trainer.train_step(trajectories)
        await self.policy.engine.update_weights(self.trainer.state_dict(), version=self.trainer.weight_version)
        return {f"train/{k}": v for k, v in metrics.items()}

    async def warm_start(self, demonstrations: list, steps: int, lr: float, batch_size: int = 32, seed: int = 0) -> list[dict[str, float]]:
        """SFT on scripted demonstrations (tokenised by the same loop and template as RL, shuffled so
        each batch mixes episodes and roles), then push the weights."""
        from miles_envs.trainer.sft import warm_start

        if self.trainer is None or steps == 0:
            return []
        demonstrations = list(demonstrations)
        random.Random(seed).shuffle(demonstrations)
        history = warm_start(self.trainer, demonstrations, steps, batch_size=batch_size, lr=lr)
        await self.policy.engine.update_weights(self.trainer.state_dict(), version="sft")
        return history

    async def snapshot(self, reuse: Any = None) -> AgentPolicy:
        """A frozen copy at the current weights, for the opponent pool: a second engine, or ``reuse``
        (an idle engine of a snapshot leaving the pool) loaded with these weights."""
        from miles_envs.agents.embedded import EmbeddedEngine

        engine = reuse or EmbeddedEngine.from_path(self.model_path, device=self.device, weight_version=self.version,
                                                   max_running=self.policy.engine.max_running)
        await engine.update_weights(self.trainer.state_dict(), version=self.version)
        return AgentPolicy(engine, self.policy.sampling, trainable=False)

    @property
    def device(self) -> str:
        return str(self.trainer.device) if self.trainer else "cpu"


def embedded_learner(args: argparse.Namespace) -> Learner:
    """A random-init model served in-process and trained by the torch trainer, on ``--device``."""
    from miles_envs.agents.embedded import EmbeddedEngine
    from miles_envs.models.factory import init_model
    from miles_envs.trainer import Trainer, TrainerConfig

    path = init_model(args.out / "model", arch=args.arch, size=args.size, tokenizer="qwen3", seed=args.seed)
    engine = EmbeddedEngine.from_path(path, device=args.device, weight_version="step-0", max_running=args.concurrency)
    config = TrainerConfig(lr=args.lr, minibatches=args.minibatches, entropy_coef=args.entropy_coef, device=args.device, seed=args.seed)
    trainer = Trainer.from_pretrained(str(path), config)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens)
    policy = AgentPolicy(engine, sampling, name="learner")
    return Learner(policy, ChatRenderer(engine.checkpoint.tokenizer), trainer, path)


def scripted_policy(renderer: ChatRenderer, reply, name: str, max_new_tokens: int = 16) -> AgentPolicy:
    """A fixed seat played by ``reply(decoded conversation, rng) -> text`` (never trained).

    Its rng is seeded by the turn's sampling seed and the context length, so runs are reproducible.
    """
    from miles_envs.agents.scripted import ScriptContext, ScriptedEngine

    tokenizer = renderer.tokenizer

    def answer(context: ScriptContext) -> str:
        rng = random.Random(f"{name}:{context.sampling.seed}:{len(context.input_ids)}")
        return reply(tokenizer.decode(context.input_ids), rng)

    end_of_turn = renderer.turn_end_id if renderer.turn_end_id is not None else renderer.stop_token_ids[0]
    engine = ScriptedEngine(tokenizer, answer, eos_token_id=end_of_turn, weight_version=name)
    return AgentPolicy(engine, SamplingParams(max_new_tokens=max_new_tokens), trainable=False, name=name)


def eval_games(args: argparse.Namespace, phase: str) -> int:
    """Full-size evaluations where the lift is measured (the start and the end), cheaper ones in between."""
    full = phase in ("start", "end")
    return args.eval_games if full or args.mid_eval_games is None else args.mid_eval_games


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate (sound at 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def write_curves(results: Path | None, name: str, payload: dict[str, Any], plot) -> None:
    """``name.json`` and ``name.png`` (drawn by ``plot(figure, payload)``) into ``results``."""
    if results is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(payload, indent=2))
    figure = plt.figure(figsize=(11, 4.2))
    plot(figure, payload)
    figure.tight_layout()
    figure.savefig(results / f"{name}.png", dpi=110)
    plt.close(figure)
    console.print(f"wrote {results / name}.json and .png")


def use_embedded(args: argparse.Namespace) -> bool:
    if args.engine == "auto":
        return embedded_available()
    if args.engine == "embedded" and not embedded_available():
        raise SystemExit("--engine embedded needs miles_envs.agents.embedded; use --engine scripted")
    return args.engine == "embedded"


class RunLog:
    """Every trajectory to ``trajectories.jsonl``; per-iteration metrics printed and in ``metrics.json``."""

    def __init__(self, out: Path, title: str, columns: list[str], config: dict[str, Any]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.title, self.columns, self.config = out, title, columns, config
        self.rows: list[dict[str, Any]] = []
        self.writer = JsonlWriter(out / "trajectories.jsonl")
        self.started = time.perf_counter()

    def write_episodes(self, episodes: list, iteration: int) -> None:
        for episode in episodes:
            for trajectory in episode.trajectories.values():
                trajectory.metadata["iteration"] = iteration
                self.writer.write(trajectory)
        self.writer.flush()

    def record(self, row: dict[str, Any]) -> None:
        row = {**row, "elapsed_s": round(time.perf_counter() - self.started, 2)}
        self.rows.append(row)
        (self.out / "metrics.json").write_text(json.dumps({"config": self.config, "iterations": self.rows}, indent=2))
        console.print(f"[bold]{self.title}[/] " + "  ".join(f"{c}={_cell(row.get(c))}" for c in self.columns))

    def last_iteration(self, iteration: int, args: argparse.Namespace) -> bool:
        """Whether ``iteration`` ends the run: the last one asked for, or the time budget is spent."""
        spent = args.time_budget_s is not None and time.perf_counter() - self.started > args.time_budget_s
        return iteration + 1 == args.iterations or spent

    def close(self) -> None:
        self.writer.close()
        console.print(f"wrote {self.out / 'trajectories.jsonl'} and {self.out / 'metrics.json'}")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)
