"""What both co-evolution scripts share: the engine (embedded tiny model on CPU, or scripted), the
trainer, frozen snapshots for the opponent pool, and the run log (trajectories JSONL + metrics JSON).

With ``--engine embedded`` (the default when ``miles_envs.agents.embedded`` is installed) a random-init
tiny model plays and ``miles_envs.trainer.Trainer`` updates it after every iteration; with
``--engine scripted`` the seats are scripted policies and the run is rollout-only (no weights to train).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from dataclasses import dataclass
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


def common_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--engine", choices=("auto", "embedded", "scripted"), default="auto")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--games", type=int, default=16, help="episodes per iteration")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--arch", default="qwen3", help="tiny model architecture (qwen3, qwen3-moe, deepseek-v3)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/coevolve"))
    return parser


@dataclass
class Learner:
    """The learning policy: its engine, and the trainer that updates it (None when rollout-only)."""

    policy: AgentPolicy
    renderer: ChatRenderer
    trainer: Any = None
    model_path: Path | None = None

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

    async def snapshot(self) -> AgentPolicy:
        """A frozen copy at the current weights, for the opponent pool (a second engine on CPU)."""
        from miles_envs.agents.embedded import EmbeddedEngine

        engine = EmbeddedEngine.from_path(self.model_path, device="cpu", weight_version=self.version)
        await engine.update_weights(self.trainer.state_dict(), version=self.version)
        return AgentPolicy(engine, self.policy.sampling, trainable=False)


def embedded_learner(args: argparse.Namespace) -> Learner:
    """A random-init tiny model served in-process and trained by the torch trainer, both on CPU."""
    from miles_envs.agents.embedded import EmbeddedEngine
    from miles_envs.models.factory import init_model
    from miles_envs.trainer import Trainer, TrainerConfig

    path = init_model(args.out / "model", arch=args.arch, size="tiny", tokenizer="qwen3", seed=args.seed)
    engine = EmbeddedEngine.from_path(path, device="cpu", weight_version="step-0")
    trainer = Trainer.from_pretrained(str(path), TrainerConfig(lr=args.lr, device="cpu", seed=args.seed))
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens)
    policy = AgentPolicy(engine, sampling, name="learner")
    return Learner(policy, ChatRenderer(engine.checkpoint.tokenizer), trainer, path)


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

    def close(self) -> None:
        self.writer.close()
        console.print(f"wrote {self.out / 'trajectories.jsonl'} and {self.out / 'metrics.json'}")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)
