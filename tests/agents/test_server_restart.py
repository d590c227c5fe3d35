"""A rollout survives its SGLang server being SIGKILLed and restarted on the same port."""

import asyncio
import time

import pytest

from miles_envs.agents.protocol_server import ServerProcess
from miles_envs.agents.sglang import SGLangEngine
from miles_envs.chat import ChatRenderer
from miles_envs.loop import LoopConfig, rollout
from miles_envs.parsers import get_parser

CALL = '<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{}"}}}}\n</tool_call>'
REPLIES = [CALL.format("12 * 34"), CALL.format("408 + 1"), "The answer is <answer>409</answer>."]
OLD_RETRY_BUDGET_S = 0.5 + 1.0 + 2.0  # the sleeps of 3 retries at 0.5 s backoff: what used to abort an episode
EPISODES = 12


class CountingEngine:
    """Passes calls through; sets ``started`` once ``after`` generations have completed."""

    def __init__(self, inner: SGLangEngine, after: int) -> None:
        self.inner, self.after, self.done = inner, after, 0
        self.started = asyncio.Event()

    async def generate(self, *args, **kwargs):
        generation = await self.inner.generate(*args, **kwargs)
        self.done += 1
        if self.done >= self.after:
            self.started.set()
        return generation

    def __getattr__(self, name):
        return getattr(self.inner, name)


def server_args() -> list[str]:
    args = ["--slots", "4", "--decode-ms", "15", "--reply-by-turn"]
    for reply in REPLIES:
        args += ["--reply", reply]
    return args


async def run(engine, qwen3) -> dict[int, object]:
    trajectories = {}
    async for trajectory in rollout("miles/ToolCalc-v0", engine, ChatRenderer(qwen3), parser=get_parser("hermes"),
                                    n=EPISODES, concurrency=EPISODES, config=LoopConfig(max_turns=5)):
        trajectories[trajectory.seed] = trajectory
    return trajectories


@pytest.mark.slow
async def test_sigkill_and_restart_mid_rollout_loses_no_episode(qwen3):
    with ServerProcess(server_args()) as server:
        async with SGLangEngine(server.url) as engine:
            reference = await run(engine, qwen3)

        async with SGLangEngine(server.url) as engine:
            counting = CountingEngine(engine, after=EPISODES // 2)
            rolling = asyncio.create_task(run(counting, qwen3))
            await counting.started.wait()
            assert not rolling.done()
            server.kill()  # SIGKILL by pid: in-flight responses are cut, the port refuses connections
            down_since = time.monotonic()
            await asyncio.sleep(OLD_RETRY_BUDGET_S + 1.0)
            assert not rolling.done()  # nothing gave up while the server was gone
            await asyncio.to_thread(server.start)  # same port
            survived = await rolling
            assert time.monotonic() - down_since > OLD_RETRY_BUDGET_S

    assert sorted(survived) == sorted(reference) and len(reference) == EPISODES
    for seed, trajectory in survived.items():
        expected = reference[seed]
        assert trajectory.status == expected.status == "completed", trajectory.error
        assert trajectory.prompt_ids == expected.prompt_ids
        assert trajectory.response_ids == expected.response_ids
        assert trajectory.loss_mask == expected.loss_mask
        assert len([t for t in trajectory.turns if t.kind == "model"]) == 3
