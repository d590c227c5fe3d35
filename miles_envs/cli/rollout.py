"""``miles-envs rollout``: run an env against an engine and write trajectories."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from miles_envs.cli.common import err as console
from miles_envs.cli.common import fail



def register(app: typer.Typer) -> None:
    @app.command("rollout")
    def rollout_cmd(
        env_id: str = typer.Argument(..., help="registered env id, e.g. miles/GuessNumber-v0"),
        engine: str = typer.Option("scripted", "--engine", help="scripted | sglang://HOST:PORT | embedded:PATH"),
        n: int = typer.Option(8, "-n", help="number of tasks (env seeds)"),
        group_size: int = typer.Option(1, "--group-size", "-g", help="episodes per task (GRPO group)"),
        out: Path = typer.Option(Path("rollouts.jsonl"), "-o", "--out", help=".jsonl or .parquet"),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="qwen3|qwen2_5|llama3|deepseek_v3 or a folder"),
        script: Optional[Path] = typer.Option(None, "--script", help="scripted engine: JSON list of replies"),
        max_turns: Optional[int] = typer.Option(None, "--max-turns"),
        max_context: int = typer.Option(8192, "--max-context"),
        max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
        temperature: float = typer.Option(1.0, "--temperature"),
        concurrency: int = typer.Option(256, "--concurrency"),
        seed: int = typer.Option(0, "--seed"),
        routed_experts: bool = typer.Option(False, "--routed-experts", help="record MoE routing (R3)"),
        log: list[str] = typer.Option([], "--log", help="metrics sink: json:FILE | tensorboard:DIR | wandb:PROJECT (repeatable)"),
        log_every: int = typer.Option(64, "--log-every", help="episodes between metric logs"),
    ) -> None:
        """Roll out N×G episodes; rerunning with the same output resumes where a killed run stopped."""
        from miles_envs.agents.engine import SamplingParams
        from miles_envs.loop import LoopConfig
        from miles_envs.registry import RegistryError, spec
        from miles_envs.runner import metrics_path, run_to_file
        from miles_envs.cli.wiring import build_engine, build_renderer
        from miles_envs.logging_sinks import open_sinks

        if out.suffix not in (".jsonl", ".parquet"):
            fail(f"output {out} must end in .jsonl or .parquet")
        try:
            spec(env_id)
            renderer = build_renderer(engine, tokenizer)
            policy = build_engine(engine, renderer.tokenizer, script)
            sink = open_sinks(log)
        except (RegistryError, ValueError, FileNotFoundError, ImportError) as exc:
            fail(str(exc))
        config = LoopConfig(
            sampling=SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed),
            max_turns=max_turns, max_context=max_context, return_routed_experts=routed_experts,
        )
        columns = (
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"),
        )
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task(env_id, total=n * group_size, rate="")

            def on_trajectory(_, metrics) -> None:
                summary = metrics.summary()
                failures = metrics.status["failed"] + metrics.status["aborted"]
                rate = f"{summary['episodes_per_s']:.1f} ep/s  {summary['model_tokens_per_s']:.0f} tok/s  failures {failures}"
                progress.update(bar, advance=1, rate=rate)
                if metrics.episodes % log_every == 0:
                    sink.log(summary, step=metrics.episodes)

            async def main() -> dict:
                try:
                    return await run_to_file(
                        env_id, policy, renderer, out, n=n, group_size=group_size, config=config,
                        concurrency=concurrency, seed=seed, on_trajectory=on_trajectory,
                    )
                finally:
                    await policy.close()

            summary = asyncio.run(main())
        sink.log(summary, step=summary["episodes"])
        sink.close()
        console.print_json(json.dumps({k: summary[k] for k in ("episodes", "resumed_episodes", "reward_mean", "status")}))
        console.print(f"trajectories → {out}\nmetrics → {metrics_path(out)}")
