"""Multi-turn tool-use GRPO on the pretrained MoE: ToolCalc-v0 and LookupChain-v0, R3 and MTP-SFT on.

A supervised warm start on demonstration episodes of both envs (a scripted solver that reads the
task: the calculator call, then the answer; the chain of directory lookups, then the answer),
played through the real env loop so the tokens are what a rollout of that conversation gives; by
default one warm start in a process of its own, whose checkpoint every seed starts from
(``--no-shared-warm-start``: one per seed). Then, per seed (one process each on the one GPU, all at
once), GRPO steps on fresh rollouts of both envs (embedded
engine in bf16 with MTP speculative decoding, routing traces on; fp32 trainer with R3 and online
MTP-SFT; weights, MTP layer included, synced to the engine after every step). Greedy eval reward
on held-out env seeds (never trained on) before the warm start, after it (the RL start) and after
RL. Per step: reward per env, tool-call parse-error rate (model turns whose tool call did not
parse, fed back to the model as an error message), turns per episode, draft accept rate.

The warm start runs in chunks of ``--sft-check-every`` steps, each followed by a greedy check on
validation seeds (apart from the training and the held-out ones); it stops once that reward reaches
``--sft-target`` (a policy that has the format and part of the skill, so RL has room to lift it),
or at ``--sft-steps`` / ``--sft-time-limit``. ``--tool-budget-s`` bounds the whole run: each seed's
RL stops when one more step and the final eval would not fit.

    python bench/gpu/toolrl.py --model /tmp/miles-moe                    # bench/results/gpu_toolrl.json (+ .png)
    python bench/gpu/toolrl.py --plot bench/results/gpu/gpu_toolrl.json   # the PNG from a results file
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import multiprocessing
import os
import sys
import tempfile
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
# Turns per episode at most: the scripted solver needs 2 (ToolCalc) and 4 or 6 (LookupChain); the
# cap leaves room to recover from a parse error, while a policy that never answers no longer holds
# a whole batch (every rollout and check waits for its longest episode) for the envs' 6 and 10 turns.
TURN_CAPS = {"miles/ToolCalc-v0": 4, "miles/LookupChain-v0": 8}
EVAL_SEED = 10**8  # held-out env seeds start here; training seeds stay far below
VALIDATION_SEED = 5 * 10**7  # the warm start's stopping check: neither trained on nor held out
RL_SEED = 10**7  # GRPO's tasks start here, above the demonstrations' (seed * 100_000 + i)

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
                        return_routed_experts=True, max_context=4096, max_loop_lag=None, max_turns=TURN_CAPS[env_id])
    return [t async for t in rollout(env_id, engine, renderer, n=tasks, group_size=group_size, config=config, seed=seed)]


async def evaluate(engine, renderer, args, tasks: int | None = None, first_seed: int = EVAL_SEED) -> dict:
    """Greedy episodes of each env from ``first_seed`` on (default: ``--eval-tasks`` held-out ones)."""
    results = await asyncio.gather(*[play(engine, renderer, env_id, tasks or args.eval_tasks, 1, first_seed + 1000 * i, 0.0,
                                          args.tool_max_new_tokens) for i, env_id in enumerate(ENVS)])
    per_env = {env_id: episode_stats(trajectories) for env_id, trajectories in zip(ENVS, results)}
    return {"reward": sum(s["reward"] for s in per_env.values()) / len(per_env),
            "parse_error_rate": sum(s["parse_error_rate"] for s in per_env.values()) / len(per_env),
            "turns_per_episode": sum(s["turns_per_episode"] for s in per_env.values()) / len(per_env), "per_env": per_env}


async def supervised_warm_start(trainer, engine, renderer, demos: list, args, seed: int, log, on_check=None) -> list[dict]:
    """SFT on shuffled demonstrations, checked on validation seeds every ``--sft-check-every`` steps
    (``on_check(curve)`` after each); stops at ``--sft-target`` validation reward, ``--sft-steps``
    or ``--sft-time-limit``."""
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
        if on_check is not None:
            on_check(curve)
        if check["reward"] >= args.sft_target or out_of_time:
            break
    return curve


def run_job(job: tuple) -> dict:
    """A process's share: the shared warm start, or one seed's run; or its error (a failed seed must
    not cost the others)."""
    kind, folder, seed, args, start = job
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    torch.set_num_threads(2)  # seeds share the host's cores with each other (and other RL processes)
    try:
        work = _shared_warm_start(Path(folder), args) if kind == "warm_start" else _seed_run(Path(folder), seed, args, start)
        return asyncio.run(work)
    except Exception:
        return {"seed": seed, "steps": [], "error": traceback.format_exc(limit=4)}


def _load(folder: Path, seed: int, args):
    """The fp32 trainer (R3, MTP-SFT) and the bf16 embedded engine on the pretrained checkpoint."""
    import r3_trained

    from miles_envs.agents.embedded import EmbeddedEngine
    from miles_envs.trainer import Trainer, TrainerConfig

    torch.manual_seed(seed)
    config = TrainerConfig(algo="grpo", lr=args.tool_lr, r3=True, mtp_sft=True, mtp_lr=args.mtp_lr, device=args.device,
                           dtype="float32", max_row_tokens=args.tool_row_tokens, seed=seed)
    trainer = Trainer.from_pretrained(str(folder), config, experts_implementation="eager")
    engine = EmbeddedEngine.from_path(folder, device=args.device, dtype=torch.bfloat16, draft_tokens=args.draft_tokens,
                                      max_running=2 * args.tool_tasks * args.tool_group)
    return trainer, engine, r3_trained.renderer_for(engine)


def _logger(name: str):
    started = time.perf_counter()
    return lambda text: print(f"toolrl {name}: {text} ({time.perf_counter() - started:.0f}s)", flush=True)


async def warm_start_phase(trainer, engine, renderer, args, seed: int, log, record: dict, save_partial) -> None:
    """Eval of the pretrained model, demonstrations, SFT with its checks, eval of the RL start: into ``record``."""
    from miles_envs.pipeline.demonstrations import collect_demonstrations

    record["eval"]["pretrained"] = await evaluate(engine, renderer, args)
    log(f"eval pretrained {record['eval']['pretrained']['reward']:.3f}")
    demos = []
    for env_id in ENVS:
        demos += await collect_demonstrations(DEMONSTRATED[env_id], renderer,
                                              [seed * 100_000 + i for i in range(args.demos)], max_context=4096)
    record["demonstrations"] = len(demos)
    record["sft"] = await supervised_warm_start(trainer, engine, renderer, demos, args, seed, log,
                                                on_check=lambda curve: save_partial(record | {"sft": curve}))
    eval_started = time.perf_counter()
    record["eval"]["after_sft"] = await evaluate(engine, renderer, args)
    record["eval_s"] = round(time.perf_counter() - eval_started, 1)
    log(f"eval after SFT {record['eval']['after_sft']['reward']:.3f} "
        f"parse errors {record['eval']['after_sft']['parse_error_rate']:.3f} ({record['eval_s']:.0f}s)")
    save_partial(record)


def partial_writer(args, name: str):
    """``save(record)``: rewrite ``--partial-dir``/``name``.json, what a killed run still leaves behind."""
    return lambda record: write(Path(args.partial_dir) / f"{name}.json", record) if args.partial_dir else None


async def _shared_warm_start(folder: Path, args) -> dict:
    """One warm start for every seed (one process on the card, so it runs faster than one per
    seed, and all seeds' RL starts from the same checkpoint): its record and checkpoint folder."""
    from miles_envs.trainer.checkpoint import save_checkpoint

    trainer, engine, renderer = _load(folder, 0, args)
    started, record = time.perf_counter(), {"seed": "warm_start", "sft": [], "eval": {}}
    try:
        await warm_start_phase(trainer, engine, renderer, args, 0, _logger("warm start"), record,
                               partial_writer(args, "toolrl_warm_start"))
    finally:
        await engine.close()
    record["checkpoint"] = str(save_checkpoint(trainer, Path(args.work_dir) / "warm_start"))
    return record | {"wall_s": round(time.perf_counter() - started, 1)}


async def _seed_run(folder: Path, seed: int, args, start: dict | None) -> dict:
    """One seed: its own warm start (or ``start``'s checkpoint and record), GRPO until the deadline, the final eval."""
    from miles_envs.pipeline.records import rollout_metrics
    from miles_envs.trainer.checkpoint import load_checkpoint

    trainer, engine, renderer = _load(folder, seed, args)
    started, log, save_partial = time.perf_counter(), _logger(f"seed {seed}"), partial_writer(args, f"toolrl_seed{seed}")
    history: list[dict] = []
    record = {"seed": seed, "sft": [], "eval": {}, "steps": history}
    try:
        if start is None:
            await warm_start_phase(trainer, engine, renderer, args, seed, log, record, save_partial)
        else:
            load_checkpoint(trainer, start["checkpoint"])
            torch.manual_seed(seed)  # the checkpoint restored the warm start's generator
            await engine.update_weights(trainer.state_dict(), version="sft")
            record.update(copy.deepcopy({k: start[k] for k in ("demonstrations", "sft", "eval", "eval_s")}))
            log(f"RL from the shared warm start (held-out reward {record['eval']['after_sft']['reward']:.3f})")
        step_s = 0.0
        for step in range(args.tool_steps):
            now = time.perf_counter()
            if now - started > args.tool_time_limit or time.time() + step_s + 2.5 * record["eval_s"] > args.deadline:
                break
            batches = await asyncio.gather(*[play(engine, renderer, env_id, args.tool_tasks, args.tool_group,
                                                  RL_SEED + (seed * 1000 + step) * 100 + 10 * i, 1.0, args.tool_max_new_tokens)
                                             for i, env_id in enumerate(ENVS)])
            trajectories = [t for batch in batches for t in batch]
            rollout_s = time.perf_counter() - now
            metrics = trainer.train_step(trajectories)
            await engine.update_weights(trainer.state_dict(), version=trainer.weight_version)
            row = {"step": step, **episode_stats(trajectories),
                   "per_env": {env_id: episode_stats(batch) for env_id, batch in zip(ENVS, batches)},
                   "accept_rate": rollout_metrics(trajectories).get("rollout/spec_accept_rate", 0.0),
                   **{k: metrics[k] for k in ("mtp/accuracy", "mismatch/k3_kl", "entropy", "grad_norm") if k in metrics},
                   "rollout_s": round(rollout_s, 1), "step_s": round(time.perf_counter() - now, 1)}
            history.append(row)
            save_partial(record)
            step_s = row["step_s"]
            log(f"step {step} reward {row['reward']:.3f} parse errors {row['parse_error_rate']:.3f} "
                f"turns {row['turns_per_episode']:.2f} accept {row['accept_rate']:.3f} rollout {rollout_s:.0f}s of {step_s:.0f}s")
        record["eval"]["after_rl"] = await evaluate(engine, renderer, args)
        log(f"eval after RL {record['eval']['after_rl']['reward']:.3f}")
    finally:
        await engine.close()
    return record | {"wall_s": round(time.perf_counter() - started, 1)}


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


def run_jobs(jobs: list[tuple], parallel: bool) -> list[dict]:
    """Each job in a process of its own (all at once; the CUDA memory goes back as each ends), or here in turn."""
    if not parallel:
        return [run_job(job) for job in jobs]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        return pool.map(run_job, jobs)


def toolrl_report(folder: Path, args) -> dict:
    args.deadline = time.time() + args.tool_budget_s
    warm_start = None
    with tempfile.TemporaryDirectory(prefix="toolrl-") as work:
        args.work_dir = work
        if args.shared_warm_start:
            warm_start, = run_jobs([("warm_start", str(folder), 0, args, None)], args.parallel)
        jobs = [("seed", str(folder), seed, args, warm_start) for seed in range(args.tool_seeds)]
        runs = [] if warm_start and "error" in warm_start else run_jobs(jobs, args.parallel and len(jobs) > 1)
    return {
        "machine": machine(),
        "command": " ".join(["python", *sys.argv]),
        "model": str(folder),
        "envs": list(ENVS),
        "settings": {k: getattr(args, k) for k in ("tool_seeds", "tool_steps", "tool_tasks", "tool_group", "tool_lr", "mtp_lr",
                                                   "draft_tokens", "demos", "sft_steps", "sft_batch", "sft_lr", "sft_target",
                                                   "sft_check_every", "sft_val_tasks", "sft_time_limit", "eval_tasks",
                                                   "tool_max_new_tokens", "tool_row_tokens", "tool_time_limit", "tool_budget_s",
                                                   "shared_warm_start")},
        "turn_caps": TURN_CAPS,
        "setup": "SFT warm start on scripted-solver demonstrations (stopped at --sft-target validation reward; shared by the seeds unless "
                 "--no-shared-warm-start), then GRPO (R3, online MTP-SFT, MTP speculative rollouts); eval: greedy, held-out env seeds",
        "warm_start": warm_start,
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
    shared = report.get("warm_start")
    for run in [shared] if shared else report["runs"]:
        label = "shared" if run is shared else f"seed {run['seed']}"
        checks = run.get("sft") or []
        axes[0].plot([c["step"] for c in checks], [c["val_reward"] for c in checks], marker="o", label=f"{label} reward")
        axes[0].plot([c["step"] for c in checks], [c["val_parse_error_rate"] for c in checks], ls="--", label=f"{label} parse errors")
    for run in report["runs"]:
        label = f"seed {run['seed']}"
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
    parser.add_argument("--tool-lr", type=float, default=2e-4)
    parser.add_argument("--tool-row-tokens", type=int, default=8192,
                        help="tokens per packed trainer row: the fp32 trainer loops over experts once per row, so few long rows")
    parser.add_argument("--tool-max-new-tokens", type=int, default=48, help="per turn (the longest demonstrated turn is 39 tokens)")
    parser.add_argument("--tool-time-limit", type=float, default=math.inf, help="seconds of RL per seed at most (with trained_moe.py --budget-s: fitted to the budget)")
    parser.add_argument("--demos", type=int, default=1024, help="demonstration episodes per env")
    parser.add_argument("--sft-steps", type=int, default=200, help="SFT steps at most")
    parser.add_argument("--sft-batch", type=int, default=32)
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--sft-target", type=float, default=0.3, help="stop SFT once the validation reward reaches this")
    parser.add_argument("--sft-check-every", type=int, default=20, help="SFT steps between validation checks")
    parser.add_argument("--sft-val-tasks", type=int, default=8, help="validation episodes per env per check")
    parser.add_argument("--sft-time-limit", type=float, default=math.inf, help="seconds of SFT at most")
    parser.add_argument("--shared-warm-start", action=argparse.BooleanOptionalAction, default=True,
                        help="one warm start (seed 0's demonstrations), every seed's GRPO from its checkpoint; "
                             "--no-shared-warm-start: a warm start per seed")
    parser.add_argument("--tool-budget-s", type=float, default=math.inf,
                        help="seconds for the whole run (warm start included): RL stops when one more step and the final eval would not fit")
    parser.add_argument("--eval-tasks", type=int, default=24, help="held-out greedy episodes per env")


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
