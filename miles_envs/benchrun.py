"""Runs the ``bench/`` scripts and turns their JSON results into one list of measures against the
targets the issues set, for ``miles-envs bench`` and the README's Performance table.

Each script stays a plain program (prints its own table, writes ``bench/results/NAME.json``); this
module only runs it in a subprocess and reads that JSON. With a results folder other than
``bench/results`` the scripts run from a copy of ``bench/`` whose ``results`` points there, so quick
runs never overwrite the published numbers.

A development tool: the scripts and their published results live in the source checkout's
``bench/`` folder, beside ``miles_envs/``, which a wheel does not ship (``checkout_bench_dir``).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


class NotACheckout(RuntimeError):
    """The benches run from a source checkout, and this ``miles_envs`` is installed without one."""


def checkout_bench_dir() -> Path:
    """The checkout's ``bench/`` folder, or ``NotACheckout`` saying how to get one."""
    if not BENCH_DIR.is_dir() or not any(BENCH_DIR.glob("*.py")):
        raise NotACheckout(
            f"miles-envs bench runs the scripts in a source checkout's bench/ folder, and this miles_envs "
            f"({Path(__file__).resolve().parent}) is installed without one (a wheel ships no bench/): clone the "
            "repository, `pip install -e '.[test]'` in it, and run `miles-envs bench` there"
        )
    return BENCH_DIR


@dataclass(frozen=True)
class Target:
    text: str
    check: Callable[[float], bool]


def at_most(limit: float) -> Target:
    return Target(f"≤ {limit:g}", lambda v: v <= limit)


def below(limit: float) -> Target:
    return Target(f"< {limit:g}", lambda v: v < limit)


def above(limit: float) -> Target:
    return Target(f"> {limit:g}", lambda v: v > limit)


def at_least(limit: float) -> Target:
    return Target(f"≥ {limit:g}", lambda v: v >= limit)


@dataclass(frozen=True)
class Measure:
    name: str
    value: float | None
    unit: str = ""
    target: Target | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        """True/False against the target; None when there is no target or no value."""
        if self.target is None or self.value is None:
            return None
        return bool(self.target.check(self.value))


class MissingResult(KeyError):
    """A results JSON lacks a field the table reads (the script's output changed)."""

    def __str__(self) -> str:
        return self.args[0]


def field_at(data: Any, path: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; a clear error naming the missing part otherwise."""
    value = data
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise MissingResult(f"results have no field {path!r}")
        value = value[part]
    return value


# -- what each script's results mean --------------------------------------------------------------

def loop_overhead_measures(data: dict) -> list[Measure]:
    concurrent = field_at(data, "concurrent")
    episodes = int(field_at(concurrent, "episodes"))
    scale_note = "" if episodes >= 10_000 else "target is set for 10,000 episodes"
    measures = [
        Measure(f"in-process turn, {env}: loop + rendering", field_at(row, "turn_overhead_us"), "µs/turn", at_most(50),
                f"rendering {row['rendering_us']:.0f} µs; delta cache hits {row['delta_cache_hit_rate']:.0%}")
        for env, row in field_at(data, "in_process_turn").items()
    ]
    measures += [
        Measure(f"full turn through HTTP, {env}: client + server CPU less the env", field_at(row, "full_turn_without_env_us"),
                "µs/turn", at_most(300),
                f"client {row['client_us']:.0f}, server {row['server_us']:.0f}, env {row['env_us']:.0f} µs")
        for env, row in field_at(data, "through_http").items()
    ]
    return measures + [
        Measure(f"{episodes:,} concurrent episodes, 50 ms latency: event-loop lag p99",
                field_at(concurrent, "loop_lag_p99_ms"), "ms", below(50), scale_note),
        Measure(f"{episodes:,} concurrent episodes: wall time", field_at(concurrent, "wall_s"), "s", at_most(3),
                f"ideal {field_at(concurrent, 'ideal_wall_s'):.2f} s; "
                f"{field_at(concurrent, 'completed')} of {episodes} completed"),
    ]


def client_overhead_measures(data: dict) -> list[Measure]:
    rows = [r for r in field_at(data, "rows") if r["client"].startswith("SGLangEngine")]

    def variant(row: dict) -> str:
        """How the token history reached the client (a plain list, or the loop's episode stream)."""
        detail = row["client"].partition(", ")[2]
        return f", {detail}" if detail else ""

    return [
        Measure(f"SGLang client CPU per /generate{variant(r)}, {r['body_kb']} KB body, {r['response']}", r["cpu_us_median"], "µs",
                at_most(100) if r["response"] == "logprobs" else None, f"min–max {r['cpu_us_min']:.0f}–{r['cpu_us_max']:.0f}")
        for r in rows
    ]


def sandbox_measures(data: dict) -> list[Measure]:
    rows = {row["name"]: row for row in field_at(data, "rows")}
    skipped = data.get("docker_skipped")

    def p50(mode: str, limit: float) -> Measure:
        row = rows.get(mode)
        note = "" if row else f"not measured: {skipped or 'no row in results'}"
        return Measure(f"sandbox {mode}: print(1) p50", row and row["p50_ms"], "ms", at_most(limit), note)

    pooled = rows.get("local pooled")
    return [
        p50("local cold", 25),
        p50("local pooled", 5),
        Measure("sandbox local pooled: throughput", pooled and pooled["execs_per_s"], "execs/s",
                at_least(field_at(data, "target_execs_per_s")), f"{data.get('cpus', '?')} concurrent callers"),
        p50("docker pooled", 60),
    ]


def sandbox_load_measures(data: dict) -> list[Measure]:
    measures = []
    for row in field_at(data, "rows"):
        label = f"sandbox load, {row['backend']}, {row['sessions']:,} concurrent sessions"
        exec_target = at_most(250) if row["backend"] == "local" and row["sessions"] == 1024 else None
        measures += [
            Measure(f"{label}: exec p99", row["exec"]["p99_ms"], "ms", exec_target,
                    f"p50 {row['exec']['p50_ms']:.0f} ms; pool of {row['pool_size']}; {row['execs_per_s']:.0f} execs/s; "
                    f"queue+start p99 {row['acquire']['p99_ms']:.0f} ms; {row['repeats']} repeat(s)"),
            Measure(f"{label}: start failures", row["start_failures"], "", at_most(0)),
            Measure(f"{label}: leftovers after the run", row["leftovers"], "", at_most(0),
                    "processes, containers, mounts, temp dirs, cgroups"),
        ]
    for backend, reason in data.get("skipped", {}).items():
        measures.append(Measure(f"sandbox load, {backend}", None, note=f"not measured: {reason}"))
    return measures


def search_measures(data: dict) -> list[Measure]:
    return [
        Measure(f"{row['backend']}: queries/s at batch {batch}", row[f"qps_batch_{batch}"], "queries/s",
                note=f"{data.get('documents', '?')} documents, top-{data.get('top_k', '?')}")
        for row in field_at(data, "results")
        for batch in (1, 256)
    ]


def embedded_throughput_measures(data: dict) -> list[Measure]:
    return [
        Measure(f"embedded engine, {row['concurrency']} concurrent requests: batched ÷ sequential tokens/s",
                row["ratio"], "×", above(1) if row["concurrency"] > 1 else None,
                f"{row['batched_tok_s']:.0f} vs {row['sequential_tok_s']:.0f} tokens/s; {data.get('model', '')} on CPU")
        for row in field_at(data, "rows")
    ]


def spec_decode_measures(data: dict) -> list[Measure]:
    """Per temperature and concurrency, the best draft length against no speculation (toy draft)."""
    best: dict[tuple[float, int], dict] = {}
    for row in field_at(data, "rows"):
        key = (row["temperature"], row["concurrency"])
        if row["draft_tokens"] > 0 and (key not in best or row["speedup"] > best[key]["speedup"]):
            best[key] = row
    return [
        Measure(f"MTP speculative decoding, toy draft, T={t:g}, {c} concurrent: tokens/s vs no speculation", row["speedup"],
                "×", note=f"{row['draft_tokens']} draft tokens, accept rate {row['accept_rate']:.2f}, {row['tok_s']:.0f} "
                          f"tokens/s; toy: random-init target made draftable; {data.get('model', '')} on CPU")
        for (t, c), row in sorted(best.items())
    ]


def r3_measures(data: dict) -> list[Measure]:
    note = (f"toy: random-init weights scaled (the ratio follows the scale); k3_kl "
            f"{field_at(data, 'without_r3.k3_kl'):.2e} → {field_at(data, 'with_r3.k3_kl'):.2e}; {data.get('model', 'tiny MoE')}")
    return [Measure("R3: rollout/trainer k3_kl reduction (toy model)", field_at(data, "k3_kl_reduction"), "×", None, note)]


def _change_se(history: list[dict], third: int) -> float:
    """Standard error of (mean of the last third − mean of the first third) of per-step accept rates."""
    import statistics

    first, last = [h["accept_rate"] for h in history[:third]], [h["accept_rate"] for h in history[-third:]]
    if min(len(first), len(last)) < 2:
        return float("nan")
    return (statistics.variance(first) / len(first) + statistics.variance(last) / len(last)) ** 0.5


def mtp_measures(data: dict) -> list[Measure]:
    steps = field_at(data, "settings.steps")
    runs = data.get("runs", {})

    def measure(label: str, target: Target | None) -> Measure:
        row = field_at(data, f"summary.{label}")
        se = _change_se(runs[label], max(1, steps // 3)) if label in runs else float("nan")
        spread = "" if se != se else f" ± {100 * se:.1f} (1 SE)"
        name = "with" if label == "with_mtp_sft" else "without"
        return Measure(f"MTP draft accept rate change over {steps} RL steps, {name} MTP-SFT (toy model)",
                       row["change_points"], "points", target,
                       f"toy: random-init tiny MoE, head scaled, one seed{spread}; "
                       f"{row['accept_start']:.3f} → {row['accept_end']:.3f}")

    return [measure("with_mtp_sft", None), measure("without_mtp_sft", None)]


def gpu_machine(data: dict) -> str:
    """The machine line every GPU row carries: card, torch, transformers, megatron-core."""
    machine = data.get("machine") or {key: data.get(key) for key in ("card", "torch", "megatron_core")}
    parts = [str(machine.get("card")), f"torch {machine.get('torch')}"]
    if machine.get("transformers"):
        parts.append(f"transformers {machine['transformers']}")
    parts.append(f"megatron-core {machine.get('megatron_core') or 'not used'}")
    return ", ".join(parts)


def _ci(stats: dict, scale: float = 1.0, digits: str = ".2f") -> str:
    low, high = stats["ci95"]
    return f"95% CI [{low * scale:{digits}}, {high * scale:{digits}}]"


def megatron_gpu_measures(data: dict) -> list[Measure]:
    card, machine = field_at(data, "card"), gpu_machine(data)
    model = data.get("model") or {}
    shape = (f"{model.get('num_hidden_layers')} layers, hidden {model.get('hidden_size')}, {model.get('num_experts')} experts "
             f"top-{model.get('num_experts_per_tok')}; init: {model.get('init', 'unstated')}")
    mfu, overhead = data.get("mfu") or {}, (data.get("r3_overhead") or {}).get("ratio_on_over_off")
    measures = [Measure(f"Megatron on {card}: step time, R3 on", field_at(data, "step_seconds_r3_on_median"), "s",
                        note=f"{field_at(data, 'tokens_per_step')} tokens/step, fresh rollouts every step; {shape}; {machine}"),
                Measure(f"Megatron on {card}: tokens/s, R3 on", field_at(data, "tokens_per_second_r3_on"), "tokens/s",
                        note=machine)]
    for variant, label in (("dense", "masked attention over packed rows (before)"),
                           ("packed", "per-sequence attention (after)"),
                           ("sequential", "per-expert MLP loop (before)"),
                           ("grouped", "grouped-GEMM experts (after)"),
                           ("fused", "grouped experts + chunked vocabulary head (after)"),
                           ("lean", "+ device token dispatch, no host reads, padded head (after)")):
        if variant in mfu:
            measured = mfu[variant].get("mfu_vs_measured_matmul")
            measures.append(Measure(
                f"Megatron on {card}: MFU, {label}", mfu[variant]["mfu_vs_datasheet"], "", at_least(0.15),
                f"{len(mfu[variant]['steps'])} timed step(s); "
                + (f"{measured:.4f} of the bf16 matmul peak measured on the card; " if measured is not None else "")
                + f"{data.get('mfu_formula', data.get('mfu_note', ''))}; {machine}"))
    sweep = data.get("micro_batch_sweep") or {}
    for point in sweep.get("points", []):
        if "mfu_vs_datasheet" in point:
            measures.append(Measure(
                f"Megatron on {card}: MFU at {point['micro_tokens_target'] // 1000}k tokens per micro-batch ({sweep['arm']})",
                point["mfu_vs_datasheet"], "", at_least(0.15), f"{len(point['steps'])} timed step(s); {machine}"))
    if overhead:
        measures.append(Measure(f"Megatron on {card}: step time R3 on ÷ off", overhead["ratio"], "×",
                                note=f"{_ci(overhead)} over {overhead['n']} interleaved pairs; {machine}"))
    measures.append(Measure(f"Megatron on {card}: R3 k3_kl reduction (toy model)", field_at(data, "k3_kl_reduction"), "×", None,
                            f"toy: {model.get('init', 'random-init weights scaled')} (the ratio follows the init); {machine}"))
    return measures


def gpu_pretrain_measures(data: dict) -> list[Measure]:
    final, training = field_at(data, "held_out.final"), field_at(data, "training")
    model, machine = field_at(data, "model"), gpu_machine(data)
    entropy = final["expert_load_entropy"]
    shape = (f"{model['layers']} layers, hidden {model['hidden']}, {model['experts']} experts top-{model['topk']}, 1 MTP layer; "
             f"{training['steps']} steps × {training['batch'] * training['seq']} tokens in {training['train_s']:.0f} s")
    return [
        Measure("trained MoE: held-out next-token loss", final["lm_loss"], "nats", note=f"{shape}; {machine}"),
        Measure("trained MoE: held-out next-token top-1", final["lm_top1"], note=machine),
        Measure("trained MoE: held-out MTP-layer top-1 (token t+2)", final["mtp_top1"], note=machine),
        Measure("trained MoE: expert-load entropy, lowest layer (1 = uniform)", min(entropy), note=f"per layer {entropy}; {machine}"),
    ]


def gpu_r3_measures(data: dict) -> list[Measure]:
    return r3_rows(field_at(data, "summary"), "R3 on the trained MoE", "seeds", gpu_machine(data))


def r3_rows(summary: dict, title: str, repeats: str, machine: str) -> list[Measure]:
    """k3-KL reduction by R3 per trainer precision, with the mismatch figures behind it."""
    tokens = summary["response_tokens_per_seed"]
    measures = []
    for precision in ("bf16", "fp32"):
        reduction = summary[f"{precision}_k3_kl_reduction"]
        off, on = summary[f"{precision}_without_r3"], summary[f"{precision}_with_r3"]
        low, high = reduction["ci95"]
        measures.append(Measure(
            f"{title}: k3_kl reduction, bf16 rollout vs {precision} trainer", reduction["ratio"], "×",
            Target("≥ 3 with a 95% CI above 1", lambda v, low=low: v >= 3 and low > 1),
            f"95% CI [{low:.2f}, {high:.2f}] over {reduction['n']} {repeats}, {min(tokens)}–{max(tokens)} response tokens "
            f"each; k3_kl {off['k3_kl']['mean']:.1e} → {on['k3_kl']['mean']:.1e}; mean |Δlogprob| "
            f"{off['mean_abs_delta']['mean']:.4f} → {on['mean_abs_delta']['mean']:.4f}; |Δ| > ln 2: "
            f"{off['extreme_frac']['mean']:.1e} → {on['extreme_frac']['mean']:.1e}; router disagreement "
            f"{off['router_disagreement']['mean']:.4f} ({_ci(off['router_disagreement'], digits='.4f')}); {machine}"))
    return measures


def gpu_spec_measures(data: dict) -> list[Measure]:
    machine = gpu_machine(data)
    return [
        Measure(f"MTP speculative decoding on the trained MoE, T={row['temperature']:g}, {row['concurrency']} concurrent: "
                f"tokens/s vs plain", row["speedup"]["ratio"], "×",
                Target("≥ 1.3 with a 95% CI above 1", lambda v, low=row["speedup"]["ci95"][0]: v >= 1.3 and low > 1),
                f"{_ci(row['speedup'])} over {row['speedup']['n']} repeats; {row['draft_tokens']} draft tokens, accept rate "
                f"{row['accept_rate']['mean']:.2f}, {row['plain_tok_s']['mean']:.0f} → {row['spec_tok_s']['mean']:.0f} tokens/s; "
                f"embedded engine bf16; {machine}")
        for row in field_at(data, "rows")
    ]


def gpu_mtp_sft_measures(data: dict) -> list[Measure]:
    summary, machine = field_at(data, "summary"), gpu_machine(data)
    steps = summary["steps_compared"]
    with_sft, without = summary["with_mtp_sft"]["accept_rate"], summary["without_mtp_sft"]["accept_rate"]
    gap = summary["accept_change_gap_with_minus_without"]
    return [
        Measure(f"trained MoE, {steps} RL steps: accept rate change with MTP-SFT", 100 * with_sft["change"]["mean"], "points",
                Target("within ±2, 95% CI inside", lambda v, ci=with_sft["change"]["ci95"]: max(map(abs, ci)) <= 0.02),
                f"{_ci(with_sft['change'], 100, '.1f')}; per seed {', '.join(f'{100 * v:+.1f}' for v in with_sft['change']['values'])}; "
                f"{machine}"),
        Measure(f"trained MoE, {steps} RL steps: accept rate change without MTP-SFT", 100 * without["change"]["mean"], "points",
                note=f"{_ci(without['change'], 100, '.1f')}; {machine}"),
        Measure(f"trained MoE, {steps} RL steps: accept-rate change, with minus without, in SE", gap and gap["mean"] / gap["se"],
                "SE", at_least(3), f"{gap and 100 * gap['mean']:.1f} points; {machine}" if gap else "fewer than 2 seeds"),
        *(r3_rows(summary["r3_after_rl"], f"R3 after {steps}+ RL steps (policy moved)", "RL arms", machine)
          if summary.get("r3_after_rl") else []),
    ]


def peers_measures(data: dict) -> list[Measure]:
    """The miles-envs env-API row is the base; every other library is a ratio to it."""
    workload = (f"{field_at(data, 'episodes')} episodes × {field_at(data, 'turns')} turns, thread CPU time, "
                f"best of {field_at(data, 'repeats')}")
    measures = []
    for row in field_at(data, "rows"):
        name = row["library"]
        if row.get("error"):
            measures.append(Measure(f"per-turn overhead, {name}", None, note=f"not run: {row['error']}"))
        elif name == "miles-envs":
            measures.append(Measure("per-turn overhead, miles-envs env API (base of the ratios)", row["us_per_turn"],
                                    "µs/turn", note=f"{row['path']}; {workload}"))
        else:
            version = "" if row.get("version") in (None, "this checkout") else f" {row['version']}"
            measures.append(Measure(f"per-turn overhead, {name}{version} ÷ miles-envs env API", row["ratio_vs_ours"], "×",
                                    note=f"{row['us_per_turn']:.1f} µs/turn; {row['path']}"))
    return measures


def rl_runtime_measures(data: dict) -> list[Measure]:
    measures = []
    lost = data.get("lost_tokens")
    if lost:
        policies = lost["policies"]
        for name in ("continue", "abort_and_resume"):
            measures.append(Measure(f"tokens lost per weight update, {name}", policies[name]["lost_tokens_per_update"],
                                    "tokens", at_most(0), note=f"{policies[name]['lost_episodes']:g} episodes lost"))
        baseline = policies["abort-all baseline"]
        measures.append(Measure("tokens lost per weight update, abort-all baseline", baseline["lost_tokens_per_update"],
                                "tokens", note=f"{baseline['lost_episodes']:g} episodes lost"))
    busy = data.get("server_busy")
    if busy:
        for name, row in busy["admission"].items():
            target = at_least(0.95) if name.startswith("capacity") else None
            measures.append(Measure(f"server busy fraction, {busy['concurrent_episodes']} episodes, admission by {name}",
                                    row["busy_fraction"], "", target, note=f"{busy['slots']} slots"))
    rss = data.get("peak_rss")
    if rss:
        smallest, largest = rss["runs"][0], rss["runs"][-1]
        measures.append(Measure(f"peak RSS, {largest['episodes']:,} ÷ {smallest['episodes']:,} episodes",
                                rss["peak_ratio_largest_to_smallest"], "×", at_most(1.1),
                                note=f"{largest['peak_rss_mb']:.0f} MB vs {smallest['peak_rss_mb']:.0f} MB"))
    restart = data.get("restart_recovery")
    if restart:
        crash = f"server SIGKILLed mid-rollout, restarted after {restart['down_s']:g} s"
        measures.append(Measure(f"episodes completed, {crash}", restart["episodes_completed_min"], f"of {restart['episodes']}",
                                at_least(restart["episodes"]), note=f"fewest over {len(restart['runs'])} crashes"))
        (lo, hi), (stall_lo, stall_hi) = restart["recovery_s_min_max"], restart["stall_s_min_max"]
        measures.append(Measure("restart recovery: restarted server ready → first generation completed", restart["recovery_s"], "s",
                                note=f"median; {lo:.2f}–{hi:.2f} s over {len(restart['runs'])} crashes; whole stall from the kill "
                                     f"{restart['stall_s']:.1f} s ({stall_lo:.1f}–{stall_hi:.1f} s)"))
    return measures


def embedded_prefix_measures(data: dict) -> list[Measure]:
    last = field_at(data, "per_turn")[-1]
    workload = f"{data.get('tasks')} x {data.get('group')} episodes of {field_at(data, 'turns')} turns; {data.get('model', '')} on CPU"
    return [
        Measure(f"embedded prefix cache, turn {last['turn']} prefill CPU: cached ÷ uncached", field_at(data, "last_turn_prefill_ratio"),
                "×", below(1), f"{last['new_tokens']} new of {last['prompt_tokens']} prompt tokens"),
        Measure("embedded prefix cache: rollout tokens per CPU second, cached ÷ uncached", field_at(data, "cpu_ratio"), "×",
                above(1), f"{field_at(data, 'tok_per_cpu_s_cached'):.0f} vs {field_at(data, 'tok_per_cpu_s_uncached'):.0f}; {workload}"),
    ]


def async_speedup_measures(data: dict) -> list[Measure]:
    """Speed-up per staleness bound on the simulated workload; the real run's reward gap beside its noise."""
    measures = [
        Measure(f"async training, max staleness {row['max_staleness']}: wall-clock speed-up over sync", row["speedup"], "×",
                at_least(2.5) if row["max_staleness"] <= 2 else None,
                f"{row['speedup_min']:.2f}–{row['speedup_max']:.2f}× over repeats; {100 * row['dropped_frac']:.1f}% of groups "
                "dropped as stale; simulated long-tail agent workload")
        for row in field_at(data, "simulated.rows")
    ]
    if "real" in data:
        summary = field_at(data, "real.summary")
        measures.append(Measure(
            "async (staleness 1) − sync real run: mean rollout reward", summary["reward_diff_mean"],
            note=f"sync {summary['reward_mean_sync']:.3f}, async {summary['reward_mean_async']:.3f}; standard error of a step "
                 f"{summary['step_noise_sd']:.3f}; tiny qwen3 on miles/Echo-v0, {field_at(data, 'real.steps')} steps"))
    return measures


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    measures: Callable[[dict], list[Measure]]
    quick_args: tuple[str, ...] = ()
    runs_here: bool = True
    about: str = ""
    results: str = ""  # the results file under bench/results when it is not named after the script

    @property
    def results_name(self) -> str:
        return self.results or f"{Path(self.script).stem}.json"


BENCHES: tuple[Bench, ...] = (
    Bench("loop_overhead", "loop_overhead.py", loop_overhead_measures,
          ("--episodes", "20", "--repeats", "1", "--concurrent", "200", "--concurrent-turns", "2"),
          about="env loop on GuessNumber, ToolCalc, LookupChain, Search with scripted policies: CPU per turn minus "
                "engine and env; the same turn through the SGLang client and the protocol server (both processes' "
                "CPU); then concurrent episodes against the protocol server (50 ms latency), lag of a 5 ms ticker"),
    Bench("client_overhead", "client_overhead.py", client_overhead_measures,
          ("--requests", "50", "--repeats", "1"),
          about="client CPU per /generate against a canned server in another process: HTTP clients and JSON codecs "
                "side by side, then the whole SGLangEngine.generate"),
    Bench("sandbox", "sandbox.py", sandbox_measures, ("--runs", "20", "--cold-runs", "5", "--docker-cold-runs", "2"),
          about="print(1) through each sandbox backend, one per call (cold) or from the warm pool (pooled)"),
    Bench("sandbox_load", "sandbox_load.py", sandbox_load_measures,
          ("--sessions", "32", "--repeats", "1", "--backends", "local"),
          about="N concurrent sessions (4 short programs each) through a sandbox pool sized 4 per core, local and "
                "docker; leftovers counted after each run's process exits; latencies on a shared 2-core machine"),
    Bench("search", "search.py", search_measures, ("--scale", "2", "--rounds", "1"),
          about="BM25 over the generated encyclopedia, in process and over HTTP /retrieve, best of rounds"),
    Bench("embedded_throughput", "embedded_throughput.py", embedded_throughput_measures,
          ("--concurrency", "1", "8", "--new-tokens", "8", "--sequential-requests", "2", "--repeats", "1"),
          about="embedded engine, tiny random-init qwen3-moe on CPU: concurrent requests batched vs one at a time"),
    Bench("embedded_prefix", "embedded_prefix.py", embedded_prefix_measures,
          ("--size", "tiny", "--tasks", "2", "--group", "2", "--repeats", "1"),
          about="embedded engine on a 10-turn GuessNumber: turn-N prefill CPU and rollout tokens/s, prefix cache on vs off"),
    Bench("spec_decode", "spec_decode.py", spec_decode_measures,
          ("--draft-tokens", "0", "2", "--concurrency", "1", "--new-tokens", "8"),
          about="toy: embedded engine with MTP drafts (tiny random-init model made draftable) vs plain decoding"),
    Bench("r3_mismatch", "r3_mismatch.py", r3_measures, ("--samples", "2", "--max-new-tokens", "8"),
          about="toy: bf16 rollout vs fp32 trainer logprobs on one batch of a random-init tiny MoE with weights "
                "scaled ×10, with and without R3"),
    Bench("mtp_acceptance", "mtp_acceptance.py", mtp_measures,
          ("--steps", "3", "--warmup-steps", "2", "--max-new-tokens", "8"),
          about="toy: draft accept rate over GRPO steps on a random-init tiny MoE (one seed), MTP layer trained "
                "online (MTP-SFT) or frozen"),
    Bench("megatron_gpu", "gpu/megatron_r3_mtp.py", megatron_gpu_measures, runs_here=False,
          results="gpu/run9-megatron/megatron_r3_mtp.json",
          about="Megatron-core backend on one GPU, the trained MoE's shape (random-init stand-in), fresh rollouts "
                "every step (run there, never by this command; its results file is read)"),
    Bench("async_speedup", "async_speedup.py", async_speedup_measures,
          about="sync vs async training on a long-tailed agent workload (Pareto turn counts, log-normal tool latency) "
                "against a throughput-model engine, at staleness 1, 2, 4; then a real tiny run of both modes"),
    Bench("gpu_pretrain", "gpu/pretrain_moe.py", gpu_pretrain_measures, runs_here=False,
          results="gpu/run7-r3-toolrl/gpu_pretrain.json",
          about="small Qwen3-MoE + MTP layer pretrained from scratch on the repo's own corpus on one GPU; "
                "the model of the R3 rows (all GPU rows: one command, bench/gpu/trained_moe.py)"),
    Bench("gpu_r3", "gpu/r3_trained.py", gpu_r3_measures, runs_here=False, results="gpu/run7-r3-toolrl/gpu_r3.json",
          about="R3 on that trained MoE, no weight scaling: env rollouts in the bf16 embedded engine vs bf16/fp32 "
                "trainer forwards, with and without replay"),
    Bench("gpu_spec_decode", "gpu/spec_trained.py", gpu_spec_measures, runs_here=False,
          results="gpu/run8-megatron-spec/gpu_spec_decode.json",
          about="speculative decoding with the model's own pretrained MTP layer in the embedded engine on one GPU "
                "(its model: a 115-step pretraining run in the same command, bench/results/gpu/run8-megatron-spec/gpu_pretrain.json; the GPU tests shared the card during its first repeat)"),
    Bench("gpu_mtp_sft", "gpu/mtp_sft_rl.py", gpu_mtp_sft_measures, runs_here=False,
          results="gpu/run6-rl/gpu_mtp_sft.json",
          about="draft accept rate over GRPO steps on GuessNumber with vs without online MTP-SFT, trained MoE on "
                "one GPU"),
    Bench("peers", "peers.py", peers_measures, ("--episodes", "20", "--turns", "4", "--repeats", "1"),
          about="one scripted workload (fixed reply, fixed observation, N turns) through each library's own env "
                "step and message handling, each library in its own venv; see bench/peers.py for what is timed"),
    Bench("rl_runtime", "rl_runtime.py", rl_runtime_measures,
          ("--repeats", "1", "--concurrent", "500", "--busy-seconds", "10", "--rss-sizes", "2000", "20000"),
          about="weight updates landing on 256 episodes of a throughput-model server (per update policy vs "
                "aborting all), 5,000 concurrent episodes over HTTP against it, whole runs at two sizes, a server "
                "SIGKILLed and restarted mid-rollout"),
)


def select(names: Iterable[str]) -> list[Bench]:
    """The benches named (all when none), with close matches suggested for a typo."""
    names = list(names)
    if not names:
        return list(BENCHES)
    known = [bench.name for bench in BENCHES]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"no bench named {name!r}{hint}; known: {', '.join(known)}")
    return [bench for bench in BENCHES if bench.name in names]


# -- running ---------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """How one bench went: ``status`` is ran / failed / missing / stored / no results."""

    bench: Bench
    status: str
    detail: str = ""
    seconds: float = 0.0
    measures: list[Measure] = field(default_factory=list)


def supported_args(script: Path, wanted: tuple[str, ...], python: str = sys.executable) -> list[str]:
    """``--quick`` when the script takes it, else those of ``wanted`` (each flag with the values after
    it) that its ``--help`` lists, so the runner keeps working as scripts add or drop options."""
    help_text = subprocess.run([python, str(script), "--help"], capture_output=True, text=True, timeout=300).stdout
    offered = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", help_text))
    if "--quick" in offered:
        return ["--quick"]
    args, pending = [], list(wanted)
    while pending:
        flag, values = pending.pop(0), []
        while pending and not pending[0].startswith("--"):
            values.append(pending.pop(0))
        if flag in offered:
            args += [flag, *values]
    return args


@contextmanager
def script_folder(results_dir: Path, bench_dir: Path = BENCH_DIR) -> Iterator[Path]:
    """The folder to run the scripts from so that their ``results/`` is ``results_dir``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    if results_dir.resolve() == (bench_dir / "results").resolve():
        yield bench_dir
        return
    with tempfile.TemporaryDirectory(prefix="miles-envs-bench-") as tmp:
        staged = Path(tmp) / "bench"
        shutil.copytree(bench_dir, staged, ignore=shutil.ignore_patterns("results", "__pycache__"))
        (staged / "results").symlink_to(results_dir.resolve(), target_is_directory=True)
        yield staged


def run_bench(bench: Bench, folder: Path, results_dir: Path, *, quick: bool, timeout: float,
              log_dir: Path, python: str = sys.executable) -> Outcome:
    """Run one script (or, for a bench that cannot run here, read its stored results)."""
    published = BENCH_DIR / "results" / bench.results_name
    if not bench.runs_here:
        return read_results(bench, published, "stored")
    script = folder / bench.script
    if not script.is_file():
        return Outcome(bench, "missing", f"no script bench/{bench.script}")
    args = supported_args(script, bench.quick_args, python) if quick else []
    log = log_dir / f"{bench.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        try:
            code = subprocess.run([python, str(script), *args], stdout=out, stderr=subprocess.STDOUT,
                                  cwd=BENCH_DIR.parent, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return Outcome(bench, "failed", f"timed out after {timeout:g} s; log: {shown(log)}", time.time() - started)
    seconds = time.time() - started
    if code != 0:
        return Outcome(bench, "failed", f"exit {code}: {_last_line(log)}; log: {shown(log)}", seconds)
    results = results_dir / bench.results_name
    if not results.is_file() or results.stat().st_mtime < started:
        return Outcome(bench, "no results", f"the script wrote no {shown(results)}; log: {shown(log)}", seconds)
    outcome = read_results(bench, results, "ran", " ".join(args))
    outcome.seconds = seconds
    return outcome


def read_results(bench: Bench, path: Path, status: str, detail: str = "") -> Outcome:
    if not path.is_file():
        return Outcome(bench, "no results", f"no {shown(path)}")
    written = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    detail = detail or f"results written {written}"
    try:
        measures = bench.measures(json.loads(path.read_text()))
    except MissingResult as error:
        reason = str(error)
    except KeyError as error:
        reason = f"no field {error}"
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        reason = str(error)
    else:
        return Outcome(bench, status, detail, measures=measures)
    return Outcome(bench, "failed", f"{path.name} does not read as expected: {reason}")


def run_benches(benches: Iterable[Bench], results_dir: Path, *, quick: bool = False, timeout: float = 3600,
                on_start: Callable[[Bench], None] = lambda bench: None) -> list[Outcome]:
    """Run the benches one after another (they time themselves: never in parallel)."""
    outcomes = []
    with script_folder(results_dir) as folder:
        for bench in benches:
            on_start(bench)
            outcomes.append(run_bench(bench, folder, results_dir, quick=quick, timeout=timeout,
                                      log_dir=results_dir / "logs"))
    return outcomes


def stored_outcomes(benches: Iterable[Bench], results_dir: Path) -> list[Outcome]:
    """The table from results already on disk, running nothing."""
    return [read_results(bench, (results_dir if bench.runs_here else BENCH_DIR / "results") / bench.results_name,
                         "stored") for bench in benches]


def machine_summary() -> str:
    """CPU model, cores, OS, Python and torch: the line printed above every published table."""
    import platform

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    parts = [f"{cpu}, {os.cpu_count()} cores", f"{platform.system()} {platform.release()}",
             f"Python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    except ImportError:
        pass
    return "; ".join(parts)


def shown(path: Path) -> str:
    """A path as the table prints it: relative to the checkout when inside it."""
    try:
        return str(path.resolve().relative_to(BENCH_DIR.parent))
    except ValueError:
        return str(path)


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else "no output"
