"""``miles-envs rollout``: run an env against an engine and write trajectories."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from miles_envs.cli.common import check_output_file, fail, make_progress
from miles_envs.cli.common import err as console


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
        retries: int = typer.Option(2, "--retries", help="replays of an aborted episode (engine trouble), same seeds"),
        update_policy: str = typer.Option(
            "continue", "--update-policy", help="weight updates mid-rollout: continue | abort_and_resume | drain"
        ),
        drop_partial: bool = typer.Option(
            False, "--drop-partial", help="abort_and_resume: regenerate an aborted turn instead of keeping its tokens"
        ),
        drain_timeout: float = typer.Option(600.0, "--drain-timeout", help="drain: longest wait (s) for turns in flight"),
        max_running: Optional[int] = typer.Option(
            None, "--max-running", help="generation requests in flight (default: the engine's reported capacity)"
        ),
    ) -> None:
        """Roll out N×G episodes; rerunning with the same output resumes where a killed run stopped
        (aborted episodes are played again)."""
        from miles_envs.engine import SamplingParams
        from miles_envs.loop import LoopConfig
        from miles_envs.registry import RegistryError
        from miles_envs.runner import metrics_path, run_to_file
        from miles_envs.trajectory_io import TrajectoryFileError
        from miles_envs.session import RolloutSession, SessionConfig, UpdateNotSupported
        from miles_envs.cli.wiring import build_engine, build_renderer
        from miles_envs.logging_sinks import open_sinks

        check_counts(
            n=n, group_size=group_size, retries=retries, concurrency=concurrency, max_running=max_running,
            max_turns=max_turns, max_new_tokens=max_new_tokens, max_context=max_context, log_every=log_every,
        )
        if not drain_timeout > 0:
            fail(f"--drain-timeout {drain_timeout:g}: must be positive (seconds)")
        if not temperature >= 0:
            fail(f"--temperature {temperature:g}: must be 0 (greedy) or more")
        if out.suffix not in (".jsonl", ".parquet"):
            fail(f"output {out} must end in .jsonl or .parquet")
        check_output_file(out, "-o")
        try:
            session = SessionConfig(
                update_policy=update_policy, keep_partial=not drop_partial, drain_timeout_s=drain_timeout,
                max_running=max_running,
            )
            refuse_multi_agent(env_id)
            renderer = build_renderer(engine, tokenizer)
            policy = build_engine(engine, renderer.tokenizer, script)
            if routed_experts and getattr(policy, "is_moe", None) is False:
                raise ValueError(
                    f"--routed-experts needs a mixture-of-experts model, and {engine} serves a dense one "
                    "(it has no routing to record): drop --routed-experts"
                )
            RolloutSession(policy, session)  # an engine the policy cannot drive fails here, before any episode
        except (RegistryError, ValueError, FileNotFoundError, ImportError, UpdateNotSupported) as exc:
            fail(str(exc))
        try:
            sink = open_sinks(log)
        except (ValueError, ImportError, OSError) as exc:
            fail(f"--log {' '.join(log)}: {exc}")
        config = LoopConfig(
            sampling=SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed),
            max_turns=max_turns, max_context=max_context, return_routed_experts=routed_experts, retries=retries,
        )
        columns = (
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"),
        )
        with make_progress(*columns, console=console) as progress:
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
                        env_id, policy, renderer, out, n=n, group_size=group_size, config=config, session=session,
                        concurrency=concurrency, seed=seed, on_trajectory=on_trajectory,
                    )
                finally:
                    await policy.close()

            try:
                summary = asyncio.run(main())
            except TrajectoryFileError as exc:
                progress.update(bar, visible=False)
                fail(f"cannot resume into -o {out}: {exc}; give a new output path or move the file away")
        if summary.get("already_complete"):
            sink.close()
            console.print(f"already complete: {summary['episodes']} episodes in {out} (metrics → {metrics_path(out)})")
            return
        sink.log(summary, step=summary["episodes"])
        sink.close()
        keys = ("episodes", "new_episodes", "resumed_episodes", "retried_from_disk", "reward_mean", "status")
        console.print_json(json.dumps({k: summary[k] for k in keys}))
        console.print(f"trajectories → {out}\nmetrics → {metrics_path(out)}")
        aborted = summary["status"].get("aborted", 0)
        if summary["new_episodes"] and aborted == summary["episodes"]:
            reason = (summary.get("abort_reason") or "no reason given").strip().splitlines()[-1]
            fail(f"every episode was aborted ({aborted}); last reason: {reason}. Rerun the command to retry them.")


def check_counts(**counts: int | None) -> None:
    """Counts that must be positive (when given), checked before anything is built."""
    for name, value in counts.items():
        if value is not None and value < 1:
            flag = "-n" if name == "n" else "--" + name.replace("_", "-")
            fail(f"{flag} {value}: must be at least 1")


def refuse_multi_agent(env_id: str) -> None:
    from miles_envs.env import MultiAgentEnv
    from miles_envs.registry import spec

    factory = spec(env_id).load()
    if isinstance(factory, type) and issubclass(factory, MultiAgentEnv):
        raise ValueError(
            f"{env_id} is a multi-agent env and `rollout` plays single-agent envs: "
            "run it with the multi-agent loop (miles_envs.multi_loop.rollout_multi)"
        )
