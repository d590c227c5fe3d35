"""Rollouts under a real RL schedule: tokens lost per weight update, server busy fraction, memory at scale.

Part 1, lost tokens per update: 256 four-turn episodes against a throughput-model engine (below),
in process; three weight updates land at 25/50/75% of the run. Lost = model tokens sampled that
never reach training: partial outputs dropped, plus every model token of an episode that ends
aborted (retries off, so nothing hides a loss). Policies ``continue``, ``abort_and_resume`` (partial
output kept / dropped) and ``drain``, beside the abort-all baseline (every in-flight request
aborted at each update, its episode lost: what Miles did before partial rollouts).

Part 2, server busy fraction: 5,000 concurrent four-turn episodes through ``SGLangEngine`` against
the throughput-model engine behind ``agents.protocol_server`` in another process. Each admission runs
for ``--busy-seconds`` (the steady state; episodes still running are then cancelled). Busy
fraction = slot-seconds decoding / (slots × server time), over the last 90% of that window (the
ramp-up excluded). Server time is the model's clock (modelled step times plus real waits
for work), so a server process starved of CPU by the client on a shared machine is not mistaken
for a client that fails to keep the server fed. Admission by the server's capacity (the session's
default: the reported slots plus 25% waiting in the server's queue) beside the old admission (the
client-lag window held across the network await). The old admission's figure depends on the
client's event-loop lag: on a quiet machine its window grows until the server is full; when the
loop lags (a loaded machine, heavy env steps) the window halves and the server starves. The load
average during the run is recorded beside the figures.

Part 3, peak RSS of a whole ``rollout`` run to JSONL (scripted engine, Echo env, 256 at once), one
subprocess per size, resident memory sampled every 0.2 s while the run goes (the import-time peak
of the process is not the run's).

The throughput model is the shipped ``agents.throughput_model.ThroughputModel``: ``slots`` sequences
decode together; a decode step takes ``decode_s + decode_s_per_running × batch`` plus
``prefill_s_per_token`` × the input tokens of requests joining it; an update pauses admission for
``update_pause_s`` while running sequences continue under the new version. Replies are scripted
(real Qwen2.5 token ids); its ``slot_s`` and ``model_s`` counters give the busy fraction.

Part 4, restart recovery: 24 four-turn episodes through ``SGLangEngine`` (its default retry and
backoff settings, loop retries off) against the protocol server as a child process paced by the
shipped ``ThroughputModel`` (16 slots); once a third of the generations are done the server is
SIGKILLed, restarted on the same port after ``--down-s``, and the rollout runs on. Reported per
repeat: episodes completed, recovery time (restarted server ready → first generation completed
after it: the client's backoff and resubmission) and the total stall (kill → that generation).

    python bench/rl_runtime.py [--repeats 3] [--concurrent 5000] [--rss-sizes 100000 1000000]
    python bench/rl_runtime.py --only restart   # rerun one section, keep the others' stored figures
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from miles_envs import Env, user
from miles_envs.agents.scripted import ScriptedEngine
from miles_envs.agents.throughput_model import ThroughputModel
from miles_envs.chat import ChatRenderer
from miles_envs.loop import LoopConfig, rollout
from miles_envs.pacing import LagWindow
from miles_envs.parsers import get_parser
from miles_envs.session import RolloutSession, SessionConfig
from miles_envs.tokenizers import load_tokenizer
from miles_envs.trajectory import Status

RESULTS = Path(__file__).resolve().parent / "results"
TOKENIZER = "qwen2_5"
TURNS = 4
UPDATE_EPISODES, UPDATE_SLOTS = 256, 128  # part 1: every episode in flight from the start


class FourTurns(Env):
    run_inline = True

    def reset(self, seed=None, options=None):
        self.t = 0
        return [user(f"Task {seed}: list a few colours, then continue when asked.")], {}

    def step(self, action):
        self.t += 1
        return [user("continue")], 1.0, self.t >= TURNS, False, {}


def replies(shortest: int, longest: int):
    """Replies of ``shortest`` to ``longest`` words, chosen by the stream (as sampling would vary)."""

    def reply(context) -> str:
        words = shortest + (len(context.input_ids) * 7919) % (longest - shortest + 1)
        return " ".join(("red", "blue", "green", "amber", "teal")[i % 5] for i in range(words))

    return reply


def model(tokenizer, slots: int, reply) -> ThroughputModel:
    """A decode step of 10 ms + 0.05 ms per running sequence (23 ms at 256), prefill 1 µs per input token."""
    return ThroughputModel(ScriptedEngine(tokenizer, reply, weight_version="step-0"), slots=slots, decode_s=0.010,
                           decode_s_per_running=0.00005, prefill_s_per_token=0.000001, update_pause_s=0.05,
                           weight_version="step-0")


# -- part 1: lost tokens per update --------------------------------------------------------------
async def play_with_updates(renderer, policy: str, keep_partial: bool, at: list[float]) -> dict:
    engine = model(renderer.tokenizer, UPDATE_SLOTS, replies(40, 80))
    baseline = policy == "abort_all"
    session = RolloutSession(engine, SessionConfig(update_policy="continue" if baseline else policy, keep_partial=keep_partial))
    config = LoopConfig(retries=0, max_loop_lag=None)
    started = time.perf_counter()

    async def updates() -> None:
        for step, when in enumerate(at, 1):
            await asyncio.sleep(max(0.0, started + when - time.perf_counter()))
            if baseline:
                await asyncio.gather(*(engine.abort(rid) for rid in session.in_flight))
            await session.update_weights(f"/ckpt/step-{step}", version=f"step-{step}")

    driver = asyncio.ensure_future(updates())
    trajectories = [t async for t in rollout(lambda: FourTurns(), session, renderer, parser=get_parser("hermes"),
                                             n=UPDATE_EPISODES, config=config, concurrency=UPDATE_EPISODES)]
    wall = time.perf_counter() - started
    updates_landed = session.stats.updates
    driver.cancel()
    aborted = [t for t in trajectories if t.status is Status.ABORTED]
    lost = session.stats.dropped_tokens + sum(t.num_model_tokens for t in aborted)
    return {
        "lost_tokens_per_update": lost / max(updates_landed, 1),
        "lost_episodes": len(aborted),
        "updates": updates_landed,
        "model_tokens": sum(t.num_model_tokens for t in trajectories),
        "split_turns": sum(len(turn.spans()) > 1 for t in trajectories for turn in t.turns if turn.kind == "model"),
        "wall_s": wall,
    }


def lost_tokens(renderer, repeats: int) -> dict:
    calibration = asyncio.run(play_with_updates(renderer, "continue", True, []))["wall_s"]
    at = [calibration * f for f in (0.25, 0.5, 0.75)]
    rows = {}
    for name, policy, keep in (("continue", "continue", True), ("abort_and_resume", "abort_and_resume", True),
                               ("abort_and_resume (drop partial)", "abort_and_resume", False), ("drain", "drain", True),
                               ("abort-all baseline", "abort_all", True)):
        runs = [asyncio.run(play_with_updates(renderer, policy, keep, at)) for _ in range(repeats)]
        rows[name] = {key: statistics.mean(r[key] for r in runs) for key in runs[0]}
        rows[name]["lost_tokens_per_update_min_max"] = [min(r["lost_tokens_per_update"] for r in runs),
                                                        max(r["lost_tokens_per_update"] for r in runs)]
    return {"calibration_wall_s": calibration, "update_at_s": at, "policies": rows}


# -- part 2: busy fraction over HTTP ----------------------------------------------------------------
def serve(port_file: str, stats_file: str, slots: int) -> None:
    """The server process: the throughput model behind the SGLang protocol; stats every 0.25 s."""
    from miles_envs.agents.protocol_server import ProtocolServer

    async def main() -> None:
        engine = model(load_tokenizer(TOKENIZER), slots, replies(120, 240))
        async with ProtocolServer(engine, context_length=32768) as server:
            Path(port_file).write_text(str(server.port))
            with open(stats_file, "a") as out:
                while True:
                    await asyncio.sleep(0.25)
                    out.write(json.dumps({"t": time.time(), "slot_s": engine.slot_s, "model_s": engine.model_s}) + "\n")
                    out.flush()

    asyncio.run(main())


class ServerSlots:
    """The SGLang client with the server's slot count as ``capacity()`` (SGLang reports it as
    ``max_running_requests`` in ``/get_server_info``)."""

    def __init__(self, client, slots: int) -> None:
        self.client, self.slots = client, slots

    async def generate(self, input_ids, sampling, **kwargs):
        return await self.client.generate(input_ids, sampling, **kwargs)

    async def capacity(self) -> int:
        return self.slots


class LagHeld:
    """The old admission: a lag-window slot held across the whole generate call."""

    def __init__(self, engine) -> None:
        self.engine, self.window = engine, LagWindow(0.01)

    async def generate(self, input_ids, sampling, **kwargs):
        async with self.window:
            return await self.engine.generate(input_ids, sampling, **kwargs)


def busy_fraction(stats_file: Path, start: float, end: float, slots: int) -> float:
    rows = [json.loads(line) for line in stats_file.read_text().splitlines()]
    span = end - start
    lo, hi = start + 0.1 * span, end
    window = [r for r in rows if lo <= r["t"] <= hi]
    first, last = window[0], window[-1]
    return (last["slot_s"] - first["slot_s"]) / (slots * (last["model_s"] - first["model_s"]))


async def drive_server(url: str, renderer, concurrent: int, slots: int, admission: str, seconds: float):
    """Run ``concurrent`` episodes for ``seconds`` (the steady state), then stop: (start, end, episodes done)."""
    from miles_envs.agents.sglang import SGLangEngine

    client = SGLangEngine(url, context_length=32768, max_connections=1024)
    engine = RolloutSession(ServerSlots(client, slots) if admission.startswith("capacity") else LagHeld(client))
    start = time.time()
    finished = 0
    stream = rollout(lambda: FourTurns(), engine, renderer, parser=get_parser("hermes"), n=concurrent,
                     concurrency=concurrent, config=LoopConfig(retries=0))

    async def play() -> None:
        nonlocal finished
        async for _ in stream:
            finished += 1

    try:
        await asyncio.wait_for(play(), seconds)
    except asyncio.TimeoutError:
        pass
    end = time.time()
    await stream.aclose()
    await client.close()
    return start, end, finished


def server_busy(renderer, concurrent: int, slots: int, seconds: float) -> dict:
    out = {}
    for admission in ("capacity (+25% queued at the server)", "lag window held across the request"):
        with tempfile.TemporaryDirectory() as tmp:
            port_file, stats_file = Path(tmp) / "port", Path(tmp) / "stats.jsonl"
            server = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file), str(stats_file), "--slots", str(slots)])
            try:
                while not port_file.exists() or not port_file.read_text():
                    time.sleep(0.1)
                url = f"http://127.0.0.1:{port_file.read_text()}"
                cpu = time.process_time()
                start, end, finished = asyncio.run(drive_server(url, renderer, concurrent, slots, admission, seconds))
                time.sleep(0.6)
                out[admission] = {"busy_fraction": busy_fraction(stats_file, start, end, slots), "wall_s": end - start,
                                  "client_cpu_s": time.process_time() - cpu, "episodes_finished": finished,
                                  "load_average_1min": os.getloadavg()[0]}
            finally:
                server.terminate()
                server.wait()
    return {"concurrent_episodes": concurrent, "slots": slots, "turns": TURNS, "seconds": seconds, "admission": out}


# -- part 3: peak RSS ------------------------------------------------------------------------------
def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def rss_child(episodes: int) -> None:
    """One run in a fresh process; resident memory sampled every 0.2 s while it runs."""
    import threading

    from miles_envs.runner import run_to_file

    renderer = ChatRenderer(load_tokenizer(TOKENIZER))
    engine = ScriptedEngine(renderer.tokenizer, ["red blue amber"])
    before = current_rss_mb()
    samples, running = [before], threading.Event()
    running.set()

    def sample() -> None:
        while running.is_set():
            samples.append(current_rss_mb())
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        summary = asyncio.run(run_to_file("miles/Echo-v0", engine, renderer, Path(tmp) / "out.jsonl", n=episodes,
                                          parser=get_parser("hermes"), concurrency=256))
    cpu = time.process_time() - cpu
    running.clear()
    sampler.join()
    print(json.dumps({"episodes": summary["episodes"], "rss_before_run_mb": before, "peak_rss_mb": max(samples),
                      "growth_mb": max(samples) - before, "cpu_s": cpu}))


def peak_rss(sizes: list[int]) -> dict:
    runs = []
    for size in sizes:
        done = subprocess.run([sys.executable, __file__, "--rss-child", str(size)], capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"runs": runs, "peak_ratio_largest_to_smallest": runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]}


# -- part 4: restart recovery ---------------------------------------------------------------------
RESTART_EPISODES, RESTART_SLOTS = 24, 16


class Timestamped:
    """Passes calls through; notes when each generation completed."""

    def __init__(self, inner) -> None:
        self.inner, self.done_at = inner, []

    async def generate(self, *args, **kwargs):
        generation = await self.inner.generate(*args, **kwargs)
        self.done_at.append(time.monotonic())
        return generation

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def crash_mid_rollout(server, renderer, down_s: float) -> dict:
    from miles_envs.agents.sglang import SGLangEngine

    async def play(engine) -> list:
        return [t async for t in rollout(lambda: FourTurns(), engine, renderer, parser=get_parser("hermes"),
                                         n=RESTART_EPISODES, concurrency=RESTART_EPISODES, config=LoopConfig(retries=0))]

    async with SGLangEngine(server.url) as client:
        engine = Timestamped(client)
        rolling = asyncio.ensure_future(play(engine))
        while len(engine.done_at) < RESTART_EPISODES * TURNS // 3:
            await asyncio.sleep(0.005)
        await asyncio.to_thread(server.kill)
        killed, done_before = time.monotonic(), len(engine.done_at)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(server.start)  # returns once the server listens again
        ready = time.monotonic()
        trajectories = await rolling
    first_after = min(t for t in engine.done_at if t >= ready)
    return {"episodes_completed": sum(t.status is Status.COMPLETED for t in trajectories),
            "episodes": RESTART_EPISODES, "generations_before_kill": done_before,
            "generations_while_down": sum(killed < t < ready for t in engine.done_at),
            "server_down_s": ready - killed, "recovery_s": first_after - ready, "stall_s": first_after - killed}


def restart_recovery(renderer, repeats: int, down_s: float) -> dict:
    from miles_envs.agents.protocol_server import ServerProcess

    reply = " ".join(("red", "blue", "green", "amber", "teal")[i % 5] for i in range(24))
    args = ["--tokenizer", TOKENIZER, "--slots", str(RESTART_SLOTS), "--decode-ms", "15", "--reply", reply]
    with ServerProcess(args) as server:
        runs = [asyncio.run(crash_mid_rollout(server, renderer, down_s)) for _ in range(repeats)]
    summary = {"episodes": RESTART_EPISODES, "turns": TURNS, "slots": RESTART_SLOTS, "down_s": down_s, "runs": runs,
               "episodes_completed_min": min(r["episodes_completed"] for r in runs)}
    for key in ("recovery_s", "stall_s"):
        values = [r[key] for r in runs]
        summary[key] = statistics.median(values)
        summary[f"{key}_min_max"] = [min(values), max(values)]
    return summary


SECTIONS = ("lost", "busy", "rss", "restart")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=5000)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--busy-seconds", type=float, default=60.0, help="part 2: how long each admission runs")
    parser.add_argument("--rss-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--restart-repeats", type=int, default=3, help="part 4: crashes, each in its own rollout")
    parser.add_argument("--down-s", type=float, default=2.0, help="part 4: how long the server stays down")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    parser.add_argument("--only", nargs="+", choices=SECTIONS,
                        help="run just these sections and update only their keys in an existing --out")
    parser.add_argument("--serve", nargs=2, metavar=("PORT_FILE", "STATS_FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "rl_runtime.json")
    args = parser.parse_args()
    if args.serve:
        return serve(*args.serve, args.slots)
    if args.rss_child:
        return rss_child(args.rss_child)
    renderer = ChatRenderer(load_tokenizer(TOKENIZER))
    sections = [section for section in args.only or SECTIONS if section not in args.skip]
    results: dict = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    results["timing"] = "wall clock for the simulated server; process CPU time for the client"
    if "lost" in sections:
        results["lost_tokens"] = lost_tokens(renderer, args.repeats)
        print(f"{'policy':34} {'lost tok/update':>16} {'(min..max)':>14} {'lost episodes':>14} {'split turns':>12} {'wall s':>8}")
        for name, row in results["lost_tokens"]["policies"].items():
            lo, hi = row["lost_tokens_per_update_min_max"]
            print(f"{name:34} {row['lost_tokens_per_update']:16.1f} {f'{lo:.0f}..{hi:.0f}':>14} "
                  f"{row['lost_episodes']:14.1f} {row['split_turns']:12.1f} {row['wall_s']:8.2f}")
    if "busy" in sections:
        results["server_busy"] = server_busy(renderer, args.concurrent, args.slots, args.busy_seconds)
        print(f"\n{args.concurrent} concurrent episodes, {args.slots} server slots")
        for name, row in results["server_busy"]["admission"].items():
            print(f"  {name:36} busy {row['busy_fraction']:6.1%}  wall {row['wall_s']:6.1f} s  "
                  f"client CPU {row['client_cpu_s']:6.1f} s  load average {row['load_average_1min']:.1f}")
    if "rss" in sections:
        results["peak_rss"] = peak_rss(args.rss_sizes)
        print()
        for run in results["peak_rss"]["runs"]:
            print(f"  {run['episodes']:>9} episodes: peak RSS {run['peak_rss_mb']:7.1f} MB "
                  f"(before the run {run['rss_before_run_mb']:.1f} MB, growth {run['growth_mb']:.1f} MB), CPU {run['cpu_s']:.0f} s")
        print(f"  peak RSS ratio {results['peak_rss']['peak_ratio_largest_to_smallest']:.3f}")
    if "restart" in sections:
        results["restart_recovery"] = restart_recovery(renderer, args.restart_repeats, args.down_s)
        print(f"\nSIGKILL mid-rollout, restart after {args.down_s:g} s")
        for row in results["restart_recovery"]["runs"]:
            print(f"  {row['episodes_completed']}/{row['episodes']} episodes completed; recovery {row['recovery_s']:.2f} s "
                  f"after the server was ready; stall {row['stall_s']:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\n→ {args.out}")


if __name__ == "__main__":
    main()
