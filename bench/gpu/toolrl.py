"""Multi-turn tool-use GRPO on the pretrained MoE: ToolCalc-v0 and LookupChain-v0, R3 and MTP-SFT on.

Per seed (one process each on the one GPU): a supervised warm start on demonstration episodes of
both envs (a scripted solver that reads the task: the calculator call, then the answer; the chain
of directory lookups, then the answer), played through the real env loop so the tokens are what
a rollout of that conversation gives; then GRPO steps on fresh rollouts of both envs (embedded
engine in bf16 with MTP speculative decoding, routing traces on; fp32 trainer with R3 and online
MTP-SFT; weights, MTP layer included, synced to the engine after every step). Greedy eval reward
on held-out env seeds (never trained on) before the warm start, after it (the RL start) and after
RL. Per step: reward per env, tool-call parse-error rate (model turns whose tool call did not
parse, fed back to the model as an error message), turns per episode, draft accept rate.

The warm start runs in chunks of ``--sft-check-every`` steps, each followed by a greedy check on
validation seeds (apart from the training and the held-out ones); it stops once that reward reaches
``--sft-target`` (a policy that has the format and part of the skill, so RL has room to lift it),
or at ``--sft-steps`` / ``--sft-time-limit``. ``--tool-budget-s`` bounds each seed's run: RL stops when
one more step and the final eval would not fit.

    python bench/gpu/toolrl.py --model /tmp/miles-moe                    # bench/results/gpu_toolrl.json (+ .png)
    python bench/gpu/toolrl.py --plot bench/results/gpu/gpu_toolrl.json   # the PNG from a results file
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, mean_ci, write  # noqa: E402

from miles_envs.envs.lookup_chain import LookupChainEnv  # noqa: E402
from miles_envs.envs.tool_calc import ToolCalcEnv  # noqa: E402
from miles_envs.registry import register  # noqa: E402

ENVS = ("miles/ToolCalc-v0", "miles/LookupChain-v0")
EVAL_SEED = 10**8  # held-out env seeds start here; training seeds stay far below
VALIDATION_SEED = 5 * 10**7  # the warm start's stopping check: neither trained on nor held out

# The arithmetic each ToolCalc template asks for, over its values (named as in the task id).
CALC_EXPRESSIONS = {
    "crates": "{a} * {b} - {c}", "factory": "{a} * {b} * {c}", "shared": "{a} // {b}", "train": "{a} + {b} * {c}",
    "shop": "{a} * ({s} - {p})", "account": "{a} - {b} * {c} + {d}", "stadium": "{a} * {b} * {p} // 100",
}
CALC_KEYS = {"crates": "abc", "factory": "abc", "shared": "ab", "train": "abc", "shop": "aps", "account": "abcd",
             "stadium": "abp"}


def tool_call_text(name: str, arguments: dict) -> str:
    """A tool call as the Qwen3 (hermes) template writes it in the assistant's text."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def assistant_turns(history: list) -> int:
    return sum(message["role"] == "assistant" for message in history)


class ToolCalcDemonstrated(ToolCalcEnv):
    """ToolCalc-v0 plus the solver the warm start imitates: one calculator call, then the answer."""

    def demonstration(self, history: list) -> dict:
        if assistant_turns(history) == 0:
            name, *numbers = self.task.id.split("-")
            values = dict(zip(CALC_KEYS[name], numbers))
            return {"role": "assistant", "content": tool_call_text("calculator", {"expression": CALC_EXPRESSIONS[name].format(**values)})}
        return {"role": "assistant", "content": f"<answer>{self.task.answer}</answer>"}


class LookupChainDemonstrated(LookupChainEnv):
    """LookupChain-v0 plus the solver the warm start imitates: each lookup of the chain, then the answer."""

    def demonstration(self, history: list) -> dict:
        directory, kind = self.directory, self.task.metadata["kind"]
        person = next(p for p in directory.people.values() if f"{p.name}'s team" in self.task.prompt)
        team = directory.teams[person.team_id]
        plan = [("find_person", {"name": person.name}), ("get_team", {"team_id": team.team_id})]
        if kind == "city":
            plan.append(("get_office", {"office_id": team.office_id}))
        else:
            sponsor = directory.people[team.sponsor_id]
            plan.append(("get_person", {"person_id": sponsor.person_id}))
            if kind == "sponsor_city":
                sponsor_team = directory.teams[sponsor.team_id]
                plan += [("get_team", {"team_id": sponsor_team.team_id}), ("get_office", {"office_id": sponsor_team.office_id})]
        turn = assistant_turns(history)
        if turn < len(plan):
            return {"role": "assistant", "content": tool_call_text(*plan[turn])}
        return {"role": "assistant", "content": f"<answer>{self.task.answer}</answer>"}


DEMONSTRATED = {"miles/ToolCalc-v0": "bench/ToolCalcDemonstrated-v0", "miles/LookupChain-v0": "bench/LookupChainDemonstrated-v0"}
register(DEMONSTRATED["miles/ToolCalc-v0"], ToolCalcDemonstrated, override=True)
register(DEMONSTRATED["miles/LookupChain-v0"], LookupChainDemonstrated, override=True)


def episode_stats(trajectories: list) -> dict:
    """Reward, parse-error rate per model turn, model turns per episode."""
    turns = sum(sum(turn.kind == "model" for turn in t.turns) for t in trajectories)
    return {
        "reward": sum(t.reward for t in trajectories) / len(trajectories),
        "parse_error_rate": sum(t.metadata.get("parse_errors", 0) for t in trajectories) / max(1, turns),
        "turns_per_episode": turns / len(trajectories),
        "episodes": len(trajectories),
    }


async def play(engine, renderer, env_id: str, tasks: int, group_size: int, seed: int, temperature: float,
               max_new_tokens: int) -> list:
    from miles_envs.engine import SamplingParams
    from miles_envs.loop import LoopConfig, rollout

    config = LoopConfig(sampling=SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed * 4096),
                        return_routed_experts=True, max_context=4096, max_loop_lag=None)
    return [t async for t in rollout(env_id, engine, renderer, n=tasks, group_size=group_size, config=config, seed=seed)]


async def evaluate(engine, renderer, args, tasks: int | None = None, first_seed: int = EVAL_SEED) -> dict:
    """Greedy episodes of each env from ``first_seed`` on (default: ``--eval-tasks`` held-out ones)."""
    results = await asyncio.gather(*[play(engine, renderer, env_id, tasks or args.eval_tasks, 1, first_seed + 1000 * i, 0.0,
                                          args.tool_max_new_tokens) for i, env_id in enumerate(ENVS)])
    per_env = {env_id: episode_stats(trajectories) for env_id, trajectories in zip(ENVS, results)}
    return {"reward": sum(s["reward"] for s in per_env.values()) / len(per_env),
            "parse_error_rate": sum(s["parse_error_rate"] for s in per_env.values()) / len(per_env),
            "turns_per_episode": sum(s["turns_per_episode"] for s in per_env.values()) / len(per_env), "per_env": per_env}


async def supervised_warm_start(trainer, engine, renderer, demos: list, args, seed: int, log) -> list[dict]:
    """SFT on shuffled demonstrations, checked on validation seeds every ``--sft-check-every`` steps;
    stops at ``--sft-target`` validation reward, ``--sft-steps`` or ``--sft-time-limit``."""
    import random

    from miles_envs.trainer.sft import SftOptimizer, sft_step

    optimizer, order, curve = SftOptimizer(trainer, args.sft_lr), [], []
    rng, started = random.Random(seed), time.perf_counter()
    for step in range(1, args.sft_steps + 1):
        while len(order) < args.sft_batch:  # an epoch at a time, each in a fresh order
            order += rng.sample(demos, len(demos))
        batch, order = order[:args.sft_batch], order[args.sft_batch:]
        metrics = sft_step(optimizer, batch)
        out_of_time = time.perf_counter() - started > args.sft_time_limit
        if step % args.sft_check_every and step < args.sft_steps and not out_of_time:
            continue
        await engine.update_weights(trainer.state_dict(), version=f"sft-{step}")
        check = await evaluate(engine, renderer, args, args.sft_val_tasks, VALIDATION_SEED)
        curve.append({"step": step, **metrics, "val_reward": check["reward"], "val_parse_error_rate": check["parse_error_rate"],
                      "val_turns_per_episode": check["turns_per_episode"], "s": round(time.perf_counter() - started, 1)})
        log(f"SFT step {step} loss {metrics['sft/loss']:.3f} confident {metrics['sft/confident_token_frac']:.3f} "
            f"validation reward {check['reward']:.3f} parse errors {check['parse_error_rate']:.3f}")
        if check["reward"] >= args.sft_target or out_of_time:
            break
    return curve


def seed_run(job: tuple) -> dict:
    """One seed's warm start + GRPO run, or its error (a failed seed must not cost the others)."""
    folder, seed, args = job
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    torch.set_num_threads(2)  # seeds share the host's cores with each other (and other RL processes)
    try:
        return asyncio.run(_seed_run(Path(folder), seed, args))
    except Exception:
        return {"seed": seed, "steps": [], "error": traceback.format_exc(limit=4)}


async def _seed_run(folder: Path, seed: int, args) -> dict:
    import r3_trained

    from miles_envs.agents.embedded import EmbeddedEngine
    from miles_envs.trainer import Trainer, TrainerConfig
    from miles_envs.pipeline.demonstrations import collect_demonstrations
    from miles_envs.pipeline.records import rollout_metrics

    torch.manual_seed(seed)
    config = TrainerConfig(algo="grpo", lr=args.tool_lr, r3=True, mtp_sft=True, mtp_lr=args.mtp_lr, device=args.device,
                           dtype="float32", max_row_tokens=args.tool_row_tokens, seed=seed)
    trainer = Trainer.from_pretrained(str(folder), config, experts_implementation="eager")
    engine = EmbeddedEngine.from_path(folder, device=args.device, dtype=torch.bfloat16, draft_tokens=args.draft_tokens,
                                      max_running=2 * args.tool_tasks * args.tool_group)
    renderer = r3_trained.renderer_for(engine)
    started = time.perf_counter()
    log = lambda text: print(f"toolrl seed {seed}: {text} ({time.perf_counter() - started:.0f}s)", flush=True)  # noqa: E731
    try:
        evals = {"pretrained": await evaluate(engine, renderer, args)}
        log(f"eval pretrained {evals['pretrained']['reward']:.3f}")
        demos = []
        for env_id in ENVS:
            demos += await collect_demonstrations(DEMONSTRATED[env_id], renderer,
                                                  [seed * 100_000 + i for i in range(args.demos)], max_context=4096)
        sft = await supervised_warm_start(trainer, engine, renderer, demos, args, seed, log)
        eval_started = time.perf_counter()
        evals["after_sft"] = await evaluate(engine, renderer, args)
        eval_s = time.perf_counter() - eval_started
        log(f"eval after SFT {evals['after_sft']['reward']:.3f} parse errors {evals['after_sft']['parse_error_rate']:.3f}")
        history, rl_started, step_s = [], time.perf_counter(), 0.0
        for step in range(args.tool_steps):
            now = time.perf_counter()
            if now - rl_started > args.tool_time_limit or now - started + step_s + 1.5 * eval_s > args.tool_budget_s:
                break
            batches = await asyncio.gather(*[play(engine, renderer, env_id, args.tool_tasks, args.tool_group,
                                                  (seed * 1000 + step) * 100 + 10 * i, 1.0, args.tool_max_new_tokens)
                                             for i, env_id in enumerate(ENVS)])
            trajectories = [t for batch in batches for t in batch]
            metrics = trainer.train_step(trajectories)
            await engine.update_weights(trainer.state_dict(), version=trainer.weight_version)
            row = {"step": step, **episode_stats(trajectories),
                   "per_env": {env_id: episode_stats(batch) for env_id, batch in zip(ENVS, batches)},
                   "accept_rate": rollout_metrics(trajectories).get("rollout/spec_accept_rate", 0.0),
                   **{k: metrics[k] for k in ("mtp/accuracy", "mismatch/k3_kl", "entropy", "grad_norm") if k in metrics}}
            history.append(row)
            if args.partial_dir:  # what a killed run still leaves behind
                write(Path(args.partial_dir) / f"toolrl_seed{seed}.json", {"seed": seed, "eval": evals, "steps": history})
            step_s = time.perf_counter() - now
            log(f"step {step} reward {row['reward']:.3f} parse errors {row['parse_error_rate']:.3f} "
                f"turns {row['turns_per_episode']:.2f} accept {row['accept_rate']:.3f}")
        evals["after_rl"] = await evaluate(engine, renderer, args)
        log(f"eval after RL {evals['after_rl']['reward']:.3f}")
    finally:
        await engine.close()
    return {"seed": seed, "demonstrations": len(demos), "sft": sft, "eval": evals, "steps": history,
            "wall_s": round(time.perf_counter() - started, 1)}


def summarize(runs: list[dict]) -> dict:
    done = [r for r in runs if "eval" in r and "after_rl" in r["eval"]]
    if not done:
        return {"seeds_done": 0}
    summary: dict = {"seeds_done": len(done), "rl_steps": [len(r["steps"]) for r in done],
                     "sft_steps": [r["sft"][-1]["step"] if r.get("sft") else 0 for r in done]}
    for stage in ("pretrained", "after_sft", "after_rl"):
        summary[f"eval_{stage}"] = mean_ci([r["eval"][stage]["reward"] for r in done])
        for env_id in ENVS:
            summary[f"eval_{stage}_{env_id}"] = mean_ci([r["eval"][stage]["per_env"][env_id]["reward"] for r in done])
    summary["rl_lift_points"] = mean_ci([100 * (r["eval"]["after_rl"]["reward"] - r["eval"]["after_sft"]["reward"]) for r in done])
    return summary


def toolrl_report(folder: Path, args) -> dict:
    jobs = [(str(folder), seed, args) for seed in range(args.tool_seeds)]
    if args.parallel and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            runs = pool.map(seed_run, jobs)
    else:
        runs = [seed_run(job) for job in jobs]
    return {
        "machine": machine(),
        "command": " ".join(["python", *sys.argv]),
        "model": str(folder),
        "envs": list(ENVS),
        "settings": {k: getattr(args, k) for k in ("tool_seeds", "tool_steps", "tool_tasks", "tool_group", "tool_lr", "mtp_lr",
                                                   "draft_tokens", "demos", "sft_steps", "sft_batch", "sft_lr", "sft_target",
                                                   "sft_check_every", "sft_val_tasks", "sft_time_limit", "eval_tasks",
                                                   "tool_max_new_tokens", "tool_time_limit", "tool_budget_s")},
        "setup": "SFT warm start on scripted-solver demonstrations (stopped at --sft-target validation reward), then GRPO (R3, online MTP-SFT, MTP speculative "
                 "rollouts); eval: greedy, held-out env seeds",
        "runs": runs,
        "summary": summarize(runs),
    }


def plot(report: dict, path: Path) -> Path:
    """The warm start's validation checks, then reward, parse-error rate and turns per episode over RL
    steps, one line per seed, and the held-out evals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 5, figsize=(22, 4))
    for run in report["runs"]:
        label = f"seed {run['seed']}"
        checks = run.get("sft") or []
        axes[0].plot([c["step"] for c in checks], [c["val_reward"] for c in checks], marker="o", label=f"{label} reward")
        axes[0].plot([c["step"] for c in checks], [c["val_parse_error_rate"] for c in checks], ls="--", label=f"{label} parse errors")
        steps = [row["step"] for row in run["steps"]]
        for axis, key in zip(axes[1:4], ("reward", "parse_error_rate", "turns_per_episode")):
            axis.plot(steps, [row[key] for row in run["steps"]], marker=".", label=label)
        if "eval" in run:
            stages = [s for s in ("pretrained", "after_sft", "after_rl") if s in run["eval"]]
            axes[4].plot(stages, [run["eval"][s]["reward"] for s in stages], marker="o", label=label)
    titles = ("warm start: validation (greedy)", "training reward (T=1)", "tool-call parse-error rate", "model turns per episode",
              "held-out greedy eval reward")
    for axis, title in zip(axes, titles):
        axis.set_title(title)
        axis.legend(fontsize=7)
    axes[0].set_xlabel("SFT step")
    for axis in axes[1:4]:
        axis.set_xlabel("GRPO step")
    figure.suptitle("SFT then GRPO on ToolCalc-v0 + LookupChain-v0 from the pretrained MoE (R3 + MTP-SFT on)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tool-seeds", type=int, default=3)
    parser.add_argument("--tool-steps", type=int, default=40)
    parser.add_argument("--tool-tasks", type=int, default=8, help="tasks per env per step")
    parser.add_argument("--tool-group", type=int, default=4)
    parser.add_argument("--tool-lr", type=float, default=1e-4)
    parser.add_argument("--tool-row-tokens", type=int, default=2048)
    parser.add_argument("--tool-max-new-tokens", type=int, default=96, help="per turn")
    parser.add_argument("--tool-time-limit", type=float, default=math.inf, help="seconds of RL per seed at most (with trained_moe.py --budget-s: fitted to the budget)")
    parser.add_argument("--demos", type=int, default=64, help="demonstration episodes per env")
    parser.add_argument("--sft-steps", type=int, default=120, help="SFT steps at most")
    parser.add_argument("--sft-batch", type=int, default=16)
    parser.add_argument("--sft-lr", type=float, default=5e-4)
    parser.add_argument("--sft-target", type=float, default=0.3, help="stop SFT once the validation reward reaches this")
    parser.add_argument("--sft-check-every", type=int, default=10, help="SFT steps between validation checks")
    parser.add_argument("--sft-val-tasks", type=int, default=12, help="validation episodes per env per check")
    parser.add_argument("--sft-time-limit", type=float, default=math.inf, help="seconds of SFT at most")
    parser.add_argument("--tool-budget-s", type=float, default=math.inf,
                        help="seconds per seed: RL stops when one more step and the final eval would not fit")
    parser.add_argument("--eval-tasks", type=int, default=32, help="held-out greedy episodes per env")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder written by pretrain_moe.py")
    parser.add_argument("--plot", help="write the PNG of this results file and stop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--draft-tokens", type=int, default=2)
    parser.add_argument("--mtp-lr", type=float, default=1e-4)
    parser.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--partial-dir", help="each seed rewrites its history here after every step")
    parser.add_argument("--out", default=str(RESULTS / "gpu_toolrl.json"))
    add_arguments(parser)
    args = parser.parse_args()
    if args.plot:
        print(f"wrote {plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix('.png'))}")
        return
    if not args.model:
        parser.error("--model (a checkpoint folder) or --plot (a results file) is required")
    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: no such folder (one written by bench/gpu/pretrain_moe.py)")
    for name in ("tool_seeds", "tool_tasks", "tool_group", "demos", "sft_batch", "sft_check_every", "sft_val_tasks", "eval_tasks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    report = toolrl_report(Path(args.model), args)
    out = write(args.out, report)
    print(f"wrote {out}, {plot(json.loads(out.read_text()), out.with_suffix('.png'))}")
    if not report["summary"]["seeds_done"]:
        raise SystemExit(f"no seed finished: see the errors in {out}")


if __name__ == "__main__":
    main()
