"""Env-loop cost per turn on realistic envs, a full turn through HTTP, and 10,000 concurrent episodes.

Part 1, in process: GuessNumber, ToolCalc, LookupChain and Search (observations that vary per
episode and turn) plus a fixed-observation env, driven by scripted policies through ``ScriptedEngine``.
Per turn: the loop thread's CPU, the engine's and the env's own CPU (construction, reset and steps,
timing proxies), chat rendering, and the rest (loop machinery). "Turn overhead" = total minus
engine and env.
Part 2, through HTTP: the same loop against the protocol server in another process (GuessNumber and
ToolCalc), 64 episodes at a time: client-process CPU + server-process CPU (``/proc/<pid>/stat``) per
turn, and the same less the env's own CPU (construction, reset, steps) from part 1.
Part 3: 10,000 concurrent episodes × 3 turns through ``SGLangEngine`` against the protocol server
with 50 ms latency: wall time, event-loop lag p50/p99 (a 5 ms ticker's lateness), both processes'
CPU per turn over the run, the collector's pauses during the run, and the loop's admission window
sampled over time; once with the loop's pacing (lag window and quiet collector, the default) and
once without (``max_loop_lag=None``), in that order on fresh servers.

CPU figures are ``time.thread_time`` / ``time.process_time`` / kernel tick counts (robust to other
load on the machine); each is the median of ``--repeats`` runs with min–max.

    python bench/loop_overhead.py [--episodes 300] [--repeats 3] [--concurrent 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from miles_envs import Env, user
from miles_envs.agents.scripted import ScriptedEngine, ScriptedReply
from miles_envs.agents.sglang import SGLangEngine
from miles_envs.chat import ChatRenderer
from miles_envs.loop import LoopConfig, rollout
from miles_envs.metrics import RolloutMetrics
from miles_envs.parsers import get_parser
from miles_envs.tokenizers import load_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
IM_START, TOOL_RESPONSE = 151644, 151665  # qwen3 ids: one per message; one per tool observation


# ----------------------------------------------------------------------------- envs and scripted policies


class FixedEnv(Env):
    """The same observation every turn (the delta cache always hits): the old headline figure's env."""

    run_inline = True

    def reset(self, seed=None, options=None):
        self.t = 0
        return [user("Say ok.")], {}

    def step(self, action):
        self.t += 1
        return [user("again")], 1.0, self.t >= 3, False, {}


def _call(name: str, **arguments) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def guess_policy(context) -> str:
    """Binary-search-like guesses by turn; the env's higher/lower replies vary with the secret."""
    return ["50", "25", "75", "37", "62", "12", "88"][(context.input_ids.count(IM_START) - 2) % 7]


def _episode_number(context) -> int:
    """A number that differs between episodes (from the prompt's tokens), so tool results vary as a model's would."""
    return sum(context.input_ids[-80:]) % 9973


def calc_policy(context) -> str:
    """Two calculator calls whose operands depend on the episode, then an answer."""
    turn, n = context.input_ids.count(TOOL_RESPONSE), _episode_number(context)
    return _call("calculator", expression=f"{n * 37 + turn} * {n % 97 + 3}") if turn < 2 else "<answer>42</answer>"


def lookup_policy(context) -> str:
    turn, n = context.input_ids.count(TOOL_RESPONSE), _episode_number(context)
    return _call("get_person", person_id=f"P-{n * 13 % 9000 + 1000}") if turn < 2 else "<answer>Ada Novak</answer>"


QUERIES = ["Mount Bedrai height", "Who founded the town of Caithun?", "leazul lamp inventor", "river delta trade",
           "first observatory", "glass works of the north", "harbour master election", "famous bridge architect"]


def search_policy(context) -> str:
    turn, n = context.input_ids.count(TOOL_RESPONSE), _episode_number(context)
    return _call("search", query=QUERIES[(n + turn) % len(QUERIES)]) if turn < 2 else "<answer>unknown</answer>"


ENVS = {
    "GuessNumber": ("miles/GuessNumber-v0", guess_policy),
    "ToolCalc": ("miles/ToolCalc-v0", calc_policy),
    "LookupChain": ("miles/LookupChain-v0", lookup_policy),
    "Search": ("miles/Search-v0", search_policy),
    "Fixed observation": (FixedEnv, lambda context: ScriptedReply("ok")),
}


# ----------------------------------------------------------------------------- part 1: in process


class Timed:
    """Proxy adding up the thread CPU spent in chosen methods."""

    def __init__(self, inner, methods: tuple[str, ...], bucket: dict) -> None:
        self._inner, self._bucket = inner, bucket
        for name in methods:
            setattr(self, name, self._wrap(getattr(inner, name), name))

    def _wrap(self, fn, name):
        bucket, clock = self._bucket, time.thread_time
        if asyncio.iscoroutinefunction(fn):
            async def timed_async(*args, **kwargs):
                t0 = clock()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    bucket[name] = bucket.get(name, 0.0) + clock() - t0
            return timed_async

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                bucket[name] = bucket.get(name, 0.0) + clock() - t0
        return timed

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _timed_env_factory(env_id, bucket):
    """Envs whose construction, ``areset`` and ``astep`` (what the loop calls) are timed; run at
    concurrency 1, so nothing else runs on the loop thread while a step awaits."""
    from miles_envs.registry import make

    def make_env():
        t0 = time.thread_time()
        env = make(env_id) if isinstance(env_id, str) else env_id()
        bucket["make"] = bucket.get("make", 0.0) + time.thread_time() - t0
        timed = Timed(env, ("areset", "astep"), bucket)
        env.areset, env.astep = timed.areset, timed.astep
        return env
    return make_env


async def _drain(agen, metrics: RolloutMetrics) -> None:
    async for trajectory in agen:
        metrics.add(trajectory)


def in_process_turn(name: str, episodes: int, tokenizer) -> dict:
    """One run: µs per model turn of the loop thread, split into engine, env, rendering and the rest."""
    env_id, policy = ENVS[name]
    bucket: dict[str, float] = {}
    renderer = Timed(ChatRenderer(tokenizer), ("prompt_ids", "delta_ids", "turn_text"), bucket)
    engine = Timed(ScriptedEngine(tokenizer, policy), ("generate",), bucket)
    metrics = RolloutMetrics()
    cpu0 = time.thread_time()
    asyncio.run(_drain(rollout(_timed_env_factory(env_id, bucket), engine, renderer, parser=get_parser("hermes"), n=episodes,
                               concurrency=1, config=LoopConfig(max_turns=8)), metrics))
    cpu = time.thread_time() - cpu0
    summary = metrics.summary()
    turns = summary["turns_mean"] * episodes
    per = lambda s: s / turns * 1e6  # noqa: E731
    env_cpu = bucket.get("make", 0.0) + bucket.get("areset", 0.0) + bucket.get("astep", 0.0)
    rendering = bucket.get("prompt_ids", 0.0) + bucket.get("delta_ids", 0.0) + bucket.get("turn_text", 0.0)
    return {
        "turns": int(turns), "statuses": summary["status"],
        "total_us": per(cpu), "engine_us": per(bucket.get("generate", 0.0)), "env_us": per(env_cpu),
        "rendering_us": per(rendering), "turn_overhead_us": per(cpu - bucket.get("generate", 0.0) - env_cpu),
        "delta_cache_hit_rate": renderer._inner.delta_cache.hits / max(1, renderer._inner.delta_cache.hits + renderer._inner.delta_cache.misses),
    }


def _median_row(runs: list[dict], keys: tuple[str, ...]) -> dict:
    row = {k: statistics.median(r[k] for r in runs) for k in keys}
    row.update({f"{k}_min": min(r[k] for r in runs) for k in keys})
    row.update({f"{k}_max": max(r[k] for r in runs) for k in keys})
    row.update(turns=runs[0]["turns"], statuses=runs[0]["statuses"], delta_cache_hit_rate=runs[0]["delta_cache_hit_rate"])
    return row


# ----------------------------------------------------------------------------- part 2: through HTTP


def serve(env_name: str, latency_ms: float, port: int) -> None:
    """Child process: the protocol server with the env's scripted policy (one of several on the port)."""
    from miles_envs.agents.protocol_server import ProtocolServer
    from miles_envs.serving import ServerLimits, run_forever

    policy = ENVS[env_name][1] if env_name in ENVS else (lambda context: ScriptedReply("ok"))
    server = ProtocolServer(ScriptedEngine(load_tokenizer("qwen3"), policy), port=port, latency_s=latency_ms / 1e3,
                            limits=ServerLimits(reuse_port=True))
    run_forever(server, lambda s: print(f"listening on {s.url}", flush=True))


class ServerChild:
    """``workers`` server processes on one port (the kernel spreads connections among them)."""

    def __init__(self, env_name: str, latency_ms: float = 0.0, workers: int = 1) -> None:
        self.processes: list[subprocess.Popen] = []
        port = 0
        for _ in range(workers):
            process = subprocess.Popen([sys.executable, __file__, "--serve", env_name, "--latency-ms", str(latency_ms),
                                        "--port", str(port)], stdout=subprocess.PIPE, text=True)
            self.processes.append(process)
            self.url = re.search(r"(http://\S+)", process.stdout.readline()).group(1)
            port = int(self.url.rsplit(":", 1)[1])

    def cpu_s(self) -> float:
        total = 0
        for process in self.processes:
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(30)


def http_turn(name: str, episodes: int, tokenizer, server: ServerChild) -> dict:
    """Client process CPU (all threads) + server process CPU per turn, 64 episodes at a time; the
    env is inside (part 1 measures it apart)."""
    env_id, _ = ENVS[name]
    renderer = ChatRenderer(tokenizer)

    async def run() -> RolloutMetrics:
        metrics = RolloutMetrics()
        async with SGLangEngine(server.url, context_length=32768) as engine:
            await _drain(rollout(env_id, engine, renderer, parser=get_parser("hermes"),
                                 n=episodes, concurrency=64, config=LoopConfig(max_turns=8)), metrics)
        return metrics

    server0, client0 = server.cpu_s(), time.process_time()
    metrics = asyncio.run(run())
    client, server_cpu = time.process_time() - client0, server.cpu_s() - server0
    turns = metrics.summary()["turns_mean"] * episodes
    per = lambda s: s / turns * 1e6  # noqa: E731
    return {"turns": int(turns), "statuses": metrics.summary()["status"], "delta_cache_hit_rate": 0.0,
            "client_us": per(client), "server_us": per(server_cpu), "full_turn_us": per(client + server_cpu)}


# ----------------------------------------------------------------------------- part 3: 10,000 concurrent


class CollectorPauses:
    """The cyclic collector's passes while recording: (generation, seconds)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._started = 0.0

    def __enter__(self) -> CollectorPauses:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))

    def summary(self) -> dict:
        return {f"gen{g}": {"count": len(d), "total_s": round(sum(d), 4), "max_ms": round(max(d) * 1e3, 1)}
                for g in range(3) if (d := [s for gen, s in self.pauses if gen == g])}


async def _concurrent(server: ServerChild, episodes: int, turns: int, max_loop_lag: float | None) -> dict:
    import miles_envs.loop as loop_module

    windows: list = []
    window_class = getattr(loop_module, "LagWindow", None)
    if window_class is not None:
        class RecordedWindow(window_class):  # the loop's admission window, kept so it can be sampled
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                windows.append(self)
        loop_module.LagWindow = RecordedWindow
    tokenizer = load_tokenizer("qwen3")
    engine = SGLangEngine(server.url, context_length=32768, max_connections=min(episodes, 2048), timeout=600)
    lags: list[float] = []
    samples: list[tuple[float, int | None, int | None]] = []
    stop = asyncio.Event()
    wall0, client0, server0 = time.perf_counter(), time.process_time(), server.cpu_s()

    async def ticker() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t0 - 0.005)
            if len(lags) % 20 == 0:  # every ~100 ms
                window = windows[-1] if windows else None
                samples.append((round(time.perf_counter() - wall0, 3), getattr(window, "window", None), getattr(window, "in_flight", None)))

    metrics = RolloutMetrics()
    tick = asyncio.create_task(ticker())
    collector = CollectorPauses()
    try:
        with collector:
            await _drain(rollout(lambda: FixedTurns(turns), engine, ChatRenderer(tokenizer), parser=get_parser("hermes"),
                                 n=episodes, concurrency=episodes, config=LoopConfig(max_turns=turns, max_loop_lag=max_loop_lag)),
                         metrics)
    finally:
        wall = time.perf_counter() - wall0
        client_cpu, server_cpu = time.process_time() - client0, server.cpu_s() - server0
        stop.set()
        await tick
        await engine.close()
        if window_class is not None:
            loop_module.LagWindow = window_class
    s = metrics.summary()
    return {
        "max_loop_lag": max_loop_lag, "episodes": episodes, "turns_per_episode": turns,
        "completed": s["status"].get("completed", 0),
        "wall_s": wall, "ideal_wall_s": turns * 0.05, "target_wall_s": 3.0,
        "loop_lag_p50_ms": float(np.percentile(lags, 50) * 1e3), "loop_lag_p99_ms": float(np.percentile(lags, 99) * 1e3),
        "loop_lag_max_ms": float(max(lags) * 1e3), "lag_ticks": len(lags), "lag_ticks_over_50ms": sum(lag > 0.05 for lag in lags),
        "target_lag_p99_ms": 50, "client_cpu_s": client_cpu, "server_cpu_s": server_cpu, "collector_pauses": collector.summary(),
        "client_us_per_turn": client_cpu / (episodes * turns) * 1e6, "server_us_per_request": server_cpu / (episodes * turns) * 1e6,
        "admission_window_over_time": [
            {"t_s": t, "window": w, "in_flight": f} for t, w, f in samples],
    }


class FixedTurns(FixedEnv):
    def __init__(self, turns: int) -> None:
        self.turns = turns

    def step(self, action):
        self.t += 1
        return [user("again")], 1.0, self.t >= self.turns, False, {}


def concurrent_episodes(episodes: int, turns: int, event_loop: str, max_loop_lag: float | None, server_workers: int) -> dict:
    """The rollout process runs on ``event_loop`` (uvloop is what production rollout and SGLang servers use)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = ServerChild("Fixed observation", latency_ms=50, workers=server_workers)
    try:
        if event_loop == "uvloop":
            import uvloop

            result = uvloop.run(_concurrent(server, episodes, turns, max_loop_lag))
        else:
            result = asyncio.run(_concurrent(server, episodes, turns, max_loop_lag))
        return {**result, "event_loop": event_loop, "server_workers": server_workers, "load_average": os.getloadavg()}
    finally:
        server.close()


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=10000)
    parser.add_argument("--concurrent-turns", type=int, default=3)
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="event loop of the rollout process in the concurrent part (the CLI's is asyncio)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--latency-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--server-workers", type=int, default=1,
                        help="protocol server processes on one port in the concurrent part (more cores: keep the test server from being the bound)")
    args = parser.parse_args()
    for name in ("episodes", "repeats", "concurrent", "concurrent_turns", "server_workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.serve:
        return serve(args.serve, args.latency_ms, args.port)
    tokenizer = load_tokenizer("qwen3")
    in_process = {}
    for name in ENVS:
        in_process_turn(name, 16, tokenizer)  # warm caches (template, tokenizer) before measuring
        runs = [in_process_turn(name, args.episodes, tokenizer) for _ in range(args.repeats)]
        in_process[name] = _median_row(runs, ("total_us", "engine_us", "env_us", "rendering_us", "turn_overhead_us"))
    through_http = {}
    for name in ("GuessNumber", "ToolCalc"):
        server = ServerChild(name)
        try:
            http_turn(name, 16, tokenizer, server)
            runs = [http_turn(name, args.episodes, tokenizer, server) for _ in range(args.repeats)]
        finally:
            server.close()
        through_http[name] = _median_row(runs, ("client_us", "server_us", "full_turn_us"))
        env_us = in_process[name]["env_us"]  # the env's own CPU, measured in part 1
        through_http[name].update(env_us=env_us, full_turn_without_env_us=through_http[name]["full_turn_us"] - env_us)
    concurrent = concurrent_episodes(args.concurrent, args.concurrent_turns, args.event_loop, LoopConfig().max_loop_lag, args.server_workers)
    unpaced = concurrent_episodes(args.concurrent, args.concurrent_turns, args.event_loop, None, args.server_workers)
    report(in_process, through_http, concurrent, unpaced, args)


def report(in_process: dict, through_http: dict, concurrent: dict, unpaced: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    table = Table(title=f"in-process turn, µs CPU per model turn (median of {args.repeats}; loop thread)")
    for column in ("env", "turn overhead", "of which rendering", "engine", "env (make, reset, step)", "delta cache hits", "target"):
        table.add_column(column, justify="right")
    for name, row in in_process.items():
        table.add_row(name, f"{row['turn_overhead_us']:.0f} ({row['turn_overhead_us_min']:.0f}–{row['turn_overhead_us_max']:.0f})",
                      f"{row['rendering_us']:.0f}", f"{row['engine_us']:.0f}", f"{row['env_us']:.0f}",
                      f"{row['delta_cache_hit_rate']:.0%}", "≤ 50")
    console.print(table)
    table = Table(title="full turn through SGLangEngine + protocol server, µs CPU per turn (both processes)")
    for column in ("env", "client (loop, rendering, env, HTTP)", "server", "full turn", "of which env", "full turn − env", "target"):
        table.add_column(column, justify="right")
    for name, row in through_http.items():
        table.add_row(name, f"{row['client_us']:.0f}", f"{row['server_us']:.0f}",
                      f"{row['full_turn_us']:.0f} ({row['full_turn_us_min']:.0f}–{row['full_turn_us_max']:.0f})",
                      f"{row['env_us']:.0f}", f"{row['full_turn_without_env_us']:.0f}", "≤ 300")
    console.print(table)
    for run in (concurrent, unpaced):
        windows = [s["window"] for s in run["admission_window_over_time"] if s["window"] is not None]
        pauses = run["collector_pauses"]
        console.print(
            f"{run['episodes']} concurrent episodes × {run['turns_per_episode']} turns, 50 ms latency ({run['event_loop']}, "
            f"max_loop_lag={run['max_loop_lag']}): wall {run['wall_s']:.2f} s (target ≤ 3, ideal {run['ideal_wall_s']:.2f}), "
            f"loop lag p50 {run['loop_lag_p50_ms']:.1f} ms / p99 {run['loop_lag_p99_ms']:.1f} ms / max {run['loop_lag_max_ms']:.0f} ms "
            f"(target p99 < 50), completed {run['completed']}; CPU per turn: client {run['client_us_per_turn']:.0f} µs, "
            f"server {run['server_us_per_request']:.0f} µs; collector {sum(p['total_s'] for p in pauses.values()):.2f} s "
            f"(longest {max((p['max_ms'] for p in pauses.values()), default=0):.0f} ms); admission window min/median/max "
            + (f"{min(windows)}/{int(statistics.median(windows))}/{max(windows)}" if windows else "n/a")
            + f"; load average {run['load_average'][0]:.1f}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "loop_overhead.json"
    out.write_text(json.dumps({
        "method": "CPU time: loop thread (thread_time), client process (process_time), server process (/proc stat ticks)",
        "episodes": args.episodes, "repeats": args.repeats,
        "in_process_turn": in_process, "through_http": through_http, "concurrent": concurrent, "concurrent_unpaced": unpaced,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
