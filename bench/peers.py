"""Per-turn overhead of env libraries on one scripted multi-turn workload, side by side.

The workload: ``--episodes`` episodes of a trivial env that answers every action with the same
user message ("again") and ends after ``--turns`` steps; the policy is a fixed reply ("ok"), so
what is timed is each library's own env-step path plus its message handling, nothing else:

- miles-envs: ``Env.reset`` / ``Env.step`` (Gymnasium signature, OpenAI message lists), the driver
  appends the assistant message and the observation messages to the conversation.
- miles-envs rollout loop: the real token-in/token-out loop (``miles_envs.loop.rollout``) with the
  scripted engine and the qwen3 chat template: parsing, env step, token-delta rendering. The
  peers have no token path, so this row shows what tokens add, and is not the ratio's base.
- gem-llm: ``gem.Env`` subclass under GEM's ``ObservationWrapper`` (``concat_with_action``: the
  wrapper keeps the observation/action history and builds the next text observation).
- skyrl-gym: ``BaseTextEnv`` subclass, ``init`` / ``step`` returning ``BaseTextEnvStepOutput``
  (OpenAI messages), the driver keeps the chat history as SkyRL's generator does.
- textarena: ``ta.Env`` subclass on ``SinglePlayerState`` under ``LLMObservationWrapper``, driven
  by ``get_observation`` / ``step`` as TextArena's own play loop does.
- verifiers: listed with the reason it cannot run this workload here.

Each library runs in its own virtual environment (``--venvs``; the peers pin conflicting versions
of openai and nltk), one worker process each, all in this one invocation; the figure is thread CPU
time per turn (best of ``--repeats``), and the ratio is against the miles-envs env-API row measured
in the same invocation. Prints a table and writes bench/results/peers.json.

    python bench/peers.py [--episodes 2000] [--turns 8] [--repeats 3] [--venvs DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import venv
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "peers.json"
OURS = "miles-envs"
REPLY, OBSERVATION, PROMPT = "ok", "again", "Say ok."


class NotComparable(RuntimeError):
    """The library has no path that can run this workload on this machine."""


# -- workloads: each returns a function running `episodes` episodes and returning the turns taken --

def fixed_env(turns: int):
    """Our side of the workload: fixed prompt and observation, ``turns`` steps (imported lazily:
    this script also runs inside the peers' own venvs)."""
    from miles_envs import Env, user

    class Fixed(Env):
        run_inline = True

        def reset(self, seed=None, options=None):
            self.t = 0
            return [user(PROMPT)], {}

        def step(self, action):
            self.t += 1
            return [user(OBSERVATION)], 1.0, self.t >= turns, False, {}

    return Fixed


def miles_envs_workload(episodes: int, turns: int):
    from miles_envs import assistant

    Fixed = fixed_env(turns)

    def run() -> int:
        taken = 0
        for episode in range(episodes):
            env = Fixed()
            messages, _ = env.reset(seed=episode)
            done = False
            while not done:
                action = assistant(REPLY)
                messages.append(action)
                observation, _, terminated, truncated, _ = env.step(action)
                messages.extend(observation)
                done = terminated or truncated
                taken += 1
            env.close()
        return taken

    return run


def miles_envs_loop_workload(episodes: int, turns: int):
    import asyncio

    from miles_envs.agents.scripted import ScriptedEngine
    from miles_envs.chat import ChatRenderer
    from miles_envs.loop import LoopConfig, rollout
    from miles_envs.parsers import get_parser
    from miles_envs.tokenizers import load_tokenizer

    Fixed = fixed_env(turns)

    tokenizer = load_tokenizer("qwen3")
    renderer, engine = ChatRenderer(tokenizer), ScriptedEngine(tokenizer, [REPLY])

    async def drain() -> int:
        taken = 0
        async for trajectory in rollout(Fixed, engine, renderer, parser=get_parser("hermes"), n=episodes,
                                        concurrency=64, config=LoopConfig(max_turns=turns)):
            taken += trajectory.num_turns
        return taken

    return lambda: asyncio.run(drain())


def gem_workload(episodes: int, turns: int):
    from gem.core import Env
    from gem.wrappers.observation_wrapper import ObservationWrapper

    class Fixed(Env):
        def reset(self, seed=None):
            super().reset(seed)
            self.t = 0
            return PROMPT, {}

        def step(self, action):
            self.t += 1
            return OBSERVATION, 1.0, self.t >= turns, False, {}

    def run() -> int:
        taken = 0
        for episode in range(episodes):
            env = ObservationWrapper(Fixed(), include_action=True, include_chat_template=False)
            observation, _ = env.reset(seed=episode)
            done = False
            while not done:
                observation, _, terminated, truncated, _ = env.step(REPLY)
                done = terminated or truncated
                taken += 1
        return taken

    return run


def skyrl_gym_workload(episodes: int, turns: int):
    from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput

    class Fixed(BaseTextEnv):
        def __init__(self):
            super().__init__()
            self.max_turns = turns

        def step(self, action: str) -> BaseTextEnvStepOutput:
            self.turns += 1
            return BaseTextEnvStepOutput(observations=[{"role": "user", "content": OBSERVATION}], reward=1.0,
                                         done=self.turns >= self.max_turns, metadata={})

    def run() -> int:
        taken = 0
        for _ in range(episodes):
            env = Fixed()
            chat, _ = env.init([{"role": "user", "content": PROMPT}])
            chat = list(chat)
            done = False
            while not done:
                chat.append({"role": "assistant", "content": REPLY})
                output = env.step(REPLY)
                chat.extend(output["observations"])
                done = output["done"]
                taken += 1
            env.close()
        return taken

    return run


def textarena_workload(episodes: int, turns: int):
    import textarena as ta
    from textarena.state import SinglePlayerState
    from textarena.wrappers import LLMObservationWrapper

    class Fixed(ta.Env):
        def reset(self, num_players: int, seed=None):
            self.state = SinglePlayerState(num_players=num_players, seed=seed, max_turns=turns)
            self.state.reset(game_state={}, player_prompt_function=lambda player_id, game_state: PROMPT)

        def step(self, action: str):
            self.state.add_observation(action, ta.ObservationType.PLAYER_ACTION, from_id=0, to_id=-1)
            self.state.add_observation(OBSERVATION, ta.ObservationType.GAME_MESSAGE)
            if self.state.turn + 1 >= turns:
                self.state.set_outcome(reward=1.0, reason="done")
            return self.state.step()

    def run() -> int:
        taken = 0
        for episode in range(episodes):
            env = LLMObservationWrapper(Fixed())
            env.reset(num_players=1, seed=episode)
            done = False
            while not done:
                _player, _observation = env.get_observation()
                done, _ = env.step(REPLY)
                taken += 1
            env.close()
        return taken

    return run


def verifiers_workload(episodes: int, turns: int):
    import verifiers

    raise NotComparable(
        f"verifiers {verifiers.__version__} has no env-step API: a rollout (verifiers.v1 Env.run → Harness) "
        "launches each agent as a uv-bootstrapped program that reaches the model through an HTTP "
        "interception server, so a turn needs uv, a subprocess and a served model endpoint"
    )


# name → (PyPI package or None for this repo's venv, workload, what is timed)
LIBRARIES = {
    OURS: (None, miles_envs_workload, "Env.reset/step + message list"),
    f"{OURS} rollout loop": (None, miles_envs_loop_workload, "token loop: parse, step, qwen3 token delta, scripted engine"),
    "gem-llm": ("gem-llm", gem_workload, "gem.Env + ObservationWrapper(concat_with_action)"),
    "skyrl-gym": ("skyrl-gym", skyrl_gym_workload, "BaseTextEnv.init/step + chat history"),
    "textarena": ("textarena", textarena_workload, "ta.Env(SinglePlayerState) + LLMObservationWrapper"),
    "verifiers": ("verifiers", verifiers_workload, "no step path"),
}


def measure(name: str, episodes: int, turns: int, repeats: int) -> dict:
    """Worker side: best-of-`repeats` thread CPU and wall time per turn."""
    run = LIBRARIES[name][1](episodes, turns)
    run()  # warm-up: imports, caches
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        taken = run()
        best_cpu = min(best_cpu, (time.thread_time() - cpu0) / taken)
        best_wall = min(best_wall, (time.perf_counter() - wall0) / taken)
    if taken != episodes * turns:
        raise RuntimeError(f"{name} took {taken} turns, expected {episodes * turns}")
    return {"us_per_turn": best_cpu * 1e6, "wall_us_per_turn": best_wall * 1e6, "turns": taken}


# -- parent side: one venv and one worker process per library ---------------------------------------

def python_for(package: str | None, venvs: Path) -> tuple[str, str]:
    """The interpreter that has `package` (created and installed on first use), and its version."""
    if package is None:
        return sys.executable, "this checkout"
    home = venvs / package
    python = home / "bin" / "python"
    if not python.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(home)
        install = subprocess.run([str(python), "-m", "pip", "install", "-q", package], capture_output=True, text=True)
        if install.returncode != 0:
            python.unlink()
            last = (install.stderr.strip().splitlines() or ["no output"])[-1]
            raise NotComparable(f"pip install {package} failed: {last}")
    shown = subprocess.run([str(python), "-m", "pip", "show", package], capture_output=True, text=True).stdout
    version = next((line.split(":", 1)[1].strip() for line in shown.splitlines() if line.startswith("Version:")), "?")
    return str(python), version


def run_library(name: str, args: argparse.Namespace) -> dict:
    package, _, path = LIBRARIES[name]
    row = {"library": name, "path": path}
    try:
        python, version = python_for(package, args.venvs)
    except NotComparable as reason:
        return {**row, "error": str(reason)}
    row["version"] = version
    worker = subprocess.run(
        [python, __file__, "--worker", name, "--episodes", str(args.episodes), "--turns", str(args.turns),
         "--repeats", str(args.repeats)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
    )
    lines = worker.stdout.strip().splitlines()
    if worker.returncode != 0 or not lines:
        last = (worker.stderr.strip().splitlines() or ["no output"])[-1]
        return {**row, "error": last}
    return {**row, **json.loads(lines[-1])}


def worker_main(name: str, episodes: int, turns: int, repeats: int) -> None:
    try:
        print(json.dumps(measure(name, episodes, turns, repeats)))
    except NotComparable as reason:
        print(json.dumps({"error": str(reason)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--venvs", type=Path, default=Path.home() / ".cache" / "miles-envs" / "bench-peers",
                        help="where each peer library gets its own virtual environment")
    parser.add_argument("--only", action="append", choices=list(LIBRARIES), help="libraries to run (default all)")
    parser.add_argument("--worker", choices=list(LIBRARIES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker, args.episodes, args.turns, args.repeats)

    from rich.console import Console
    from rich.table import Table

    names = args.only or list(LIBRARIES)
    if OURS not in names:
        names.insert(0, OURS)
    rows = [run_library(name, args) for name in names]
    base = next(row for row in rows if row["library"] == OURS)
    if "error" in base:
        raise SystemExit(f"the {OURS} row failed, so there is no base for the ratios: {base['error']}")
    for row in rows:
        if "error" not in row:
            row["ratio_vs_ours"] = row["us_per_turn"] / base["us_per_turn"]

    table = Table(title=f"per-turn overhead, {args.episodes} episodes × {args.turns} turns, best of {args.repeats}")
    for column in ("library", "version", "timed path", "CPU µs/turn", f"÷ {OURS}"):
        table.add_column(column, justify="right" if "µs" in column or "÷" in column else "left")
    for row in rows:
        if "error" in row:
            table.add_row(row["library"], row.get("version", ""), f"not run: {row['error']}", "", "")
        else:
            table.add_row(row["library"], row["version"], row["path"], f"{row['us_per_turn']:.1f}",
                          f"{row['ratio_vs_ours']:.2f}")
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "episodes": args.episodes, "turns": args.turns, "repeats": args.repeats,
        "machine": platform.machine(), "python": platform.python_version(), "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
