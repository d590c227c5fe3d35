"""``miles-envs plot RUN_DIR...``: learning curves of ``miles-envs train`` runs as one PNG.

Left: the greedy eval reward on held-out seeds (the model as given, after the warm start, then
every eval of RL) and the sampled rollout reward per RL step. Right: the warm start's loss.
Several run folders (e.g. one per seed) share the axes, one colour each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from miles_envs.cli.common import err, fail


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_curves(run: Path) -> dict[str, list[tuple[float, float]]]:
    """(x, y) series of one run folder; raises if it holds no training records."""
    evals = read_jsonl(run / "eval.jsonl")
    steps = {int(m["step"]): m for m in read_jsonl(run / "metrics.jsonl")}  # a redone step keeps its last record
    sft = read_jsonl(run / "sft.jsonl")
    if not (evals or steps or sft):
        raise FileNotFoundError(
            f"{run} holds no eval.jsonl, metrics.jsonl or sft.jsonl: pass the --out folder of `miles-envs train`"
        )
    return {
        "before": [(0, e["eval/reward_mean"]) for e in evals if e["phase"] == "before_warmup"],
        "eval": [(int(e["step"]), e["eval/reward_mean"]) for e in evals if e["phase"] == "rl"],
        "rollout": [(step, m["reward_mean"]) for step, m in sorted(steps.items())],
        "sft": [(int(s["step"]), s["sft/loss"]) for s in sft],
    }


def plot_runs(runs: list[Path], out: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {run: run_curves(run) for run in runs}
    has_sft = any(c["sft"] for c in curves.values())
    fig, axes = plt.subplots(1, 2 if has_sft else 1, figsize=(11 if has_sft else 6.5, 4), squeeze=False)
    reward_ax = axes[0][0]
    for index, (run, c) in enumerate(curves.items()):
        color = f"C{index}"
        label = run.name
        if c["eval"]:
            reward_ax.plot(*zip(*c["eval"]), "o-", color=color, label=f"{label}: greedy eval")
        if c["rollout"]:
            reward_ax.plot(*zip(*c["rollout"]), "-", color=color, alpha=0.35, label=f"{label}: rollout (sampled)")
        for _, value in c["before"]:
            reward_ax.axhline(value, color=color, linestyle=":", linewidth=1)
        if has_sft and c["sft"]:
            axes[0][1].plot(*zip(*c["sft"]), "-", color=color, label=label)
    reward_ax.set_xlabel("RL step (0 = after the warm start)")
    reward_ax.set_ylabel("mean reward")
    reward_ax.set_title("reward (dotted: greedy eval before the warm start)")
    reward_ax.grid(alpha=0.3)
    reward_ax.legend(fontsize=7)
    if has_sft:
        axes[0][1].set_xlabel("warm-start step")
        axes[0][1].set_ylabel("loss")
        axes[0][1].set_title("warm start (SFT on demonstrations)")
        axes[0][1].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def register(app: typer.Typer) -> None:
    @app.command("plot")
    def plot_cmd(
        runs: List[Path] = typer.Argument(..., help="`miles-envs train --out` folders (several: one colour each)"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG path (default: RUN_DIR/curves.png)"),
        title: Optional[str] = typer.Option(None, "--title"),
    ) -> None:
        """Plot the learning curves of training runs: eval and rollout reward, warm-start loss."""
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            fail("plotting needs matplotlib: pip install 'miles-envs[train]'")
        missing = [str(run) for run in runs if not run.is_dir()]
        if missing:
            fail(f"no such run folder: {', '.join(missing)}")
        try:
            path = plot_runs(runs, out or runs[0] / "curves.png", title)
        except FileNotFoundError as exc:
            fail(str(exc))
        err.print(f"plot → {path}")
