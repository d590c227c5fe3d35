"""Weight updates landing mid-generation and mid-episode under each update policy, on the real Qwen3
tokenizer with the scripted engine sampling one token per tick: no episode lost, exact version spans,
aborted partial outputs kept or dropped as configured, generations bounded by capacity."""

import asyncio
import contextlib

import pytest

from miles_envs import Env, user
from miles_envs.agents.scripted import ScriptedEngine, synthetic_logprob
from miles_envs.chat import ChatRenderer
from miles_envs.loop import LoopConfig, rollout, run_episode
from miles_envs.parsers import get_parser
from miles_envs.session import RolloutSession, SessionConfig, UpdateNotSupported
from miles_envs.tokenizers import load_tokenizer
from miles_envs.trajectory import Status

TICK = 0.002  # seconds per sampled token


class ThreeTurns(Env):
    """Three model turns; ``update`` (if set) is awaited inside the second step: an update mid-episode."""

    max_turns = 3

    def __init__(self, update=None):
        self.update, self.steps = update, 0

    def reset(self, seed=None, options=None):
        return [user(f"count for me, task {seed}")], {}

    async def astep(self, action):
        self.steps += 1
        if self.steps == 2 and self.update is not None:
            await self.update()
        done = self.steps == 3
        return ([] if done else [user("again")]), float(done), done, False, {}


def reply(context):
    """Depends only on the stream, so every run (interrupted or not) writes the same tokens."""
    return f"turn at {len(context.input_ids)} tokens, then a few more words"


@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer("qwen3")


@pytest.fixture(scope="module")
def renderer(qwen3):
    return ChatRenderer(qwen3)


def engine(qwen3, tick=TICK):
    return ScriptedEngine(qwen3, reply, weight_version="step-0", token_delay_s=tick)


async def update_after(session, engine, tokens, version):
    """Apply an update as soon as some running generation has sampled exactly ``tokens`` tokens."""
    while not any(n >= tokens for n in engine.progress().values()):
        await asyncio.sleep(0)  # the generation has TICK seconds per token: this sees every count
    await session.update_weights(f"/ckpt/{version}", version=version)


async def episode_with_update(qwen3, renderer, policy, *, after_tokens=3, **options):
    inner = engine(qwen3)
    session = RolloutSession(inner, SessionConfig(update_policy=policy, **options))
    play = run_episode(ThreeTurns(), session, renderer, get_parser("hermes"), LoopConfig(), seed=1)
    trajectory, _ = await asyncio.gather(play, update_after(session, inner, after_tokens, "step-1"))
    return trajectory, session


async def uninterrupted(qwen3, renderer):
    return await run_episode(ThreeTurns(), engine(qwen3), renderer, get_parser("hermes"), LoopConfig(), seed=1)


def model_turns(trajectory):
    return [t for t in trajectory.turns if t.kind == "model"]


async def test_continue_splits_the_generation_at_the_update(qwen3, renderer):
    baseline = await uninterrupted(qwen3, renderer)
    t, session = await episode_with_update(qwen3, renderer, "continue")
    t.validate()
    assert t.status is Status.COMPLETED
    assert (t.response_ids, t.logprobs) == (baseline.response_ids, baseline.logprobs)
    first, second, third = model_turns(t)
    assert first.spans() == [(first.start, first.start + 3, "step-0"), (first.start + 3, first.end, "step-1")]
    assert second.spans() == [(second.start, second.end, "step-1")] and third.weight_version == "step-1"
    assert t.version_range == (0, 1)
    assert session.stats.aborted_generations == 0 and session.stats.updates == 1


async def test_abort_and_resume_keeps_the_partial_output_under_its_old_version(qwen3, renderer):
    baseline = await uninterrupted(qwen3, renderer)
    t, session = await episode_with_update(qwen3, renderer, "abort_and_resume")
    t.validate()
    assert t.status is Status.COMPLETED
    # the resubmission continues after the kept tokens: the stream equals the uninterrupted one
    assert (t.response_ids, t.logprobs) == (baseline.response_ids, baseline.logprobs)
    first = model_turns(t)[0]
    assert first.spans() == [(first.start, first.start + 3, "step-0"), (first.start + 3, first.end, "step-1")]
    assert first.finish_reason == "stop"
    stats = session.stats
    assert (stats.aborted_generations, stats.resubmissions, stats.kept_partial_tokens, stats.dropped_tokens) == (1, 1, 3, 0)


async def test_abort_and_resume_can_drop_the_partial_output(qwen3, renderer):
    baseline = await uninterrupted(qwen3, renderer)
    t, session = await episode_with_update(qwen3, renderer, "abort_and_resume", keep_partial=False)
    t.validate()
    assert t.status is Status.COMPLETED and t.response_ids == baseline.response_ids
    assert [turn.spans()[0][2] for turn in model_turns(t)] == ["step-1"] * 3
    assert all(len(turn.spans()) == 1 for turn in model_turns(t))  # nothing of the old weights is left
    assert (session.stats.dropped_tokens, session.stats.kept_partial_tokens) == (3, 0)


async def test_drain_waits_for_the_generation_then_updates(qwen3, renderer):
    t, session = await episode_with_update(qwen3, renderer, "drain")
    t.validate()
    first, second, third = model_turns(t)
    assert first.spans() == [(first.start, first.end, "step-0")]
    assert second.weight_version == third.weight_version == "step-1"
    assert session.stats.drain_timeouts == 0 and session.stats.aborted_generations == 0


async def test_drain_timeout_applies_the_update_and_labels_the_straggler_honestly(qwen3, renderer):
    t, session = await episode_with_update(qwen3, renderer, "drain", after_tokens=1, drain_timeout_s=TICK / 4)
    first = model_turns(t)[0]
    assert session.stats.drain_timeouts == 1
    assert [v for *_, v in first.spans()] == ["step-0", "step-1"]
    assert first.spans()[0][1] > first.start  # the split lies inside the turn


@pytest.mark.parametrize("policy", ["continue", "abort_and_resume", "drain"])
async def test_update_between_turns_moves_the_next_turn_to_the_new_version(qwen3, renderer, policy):
    inner = engine(qwen3)
    session = RolloutSession(inner, SessionConfig(update_policy=policy))
    env = ThreeTurns(update=lambda: session.update_weights("/ckpt/step-1", version="step-1"))
    t = await run_episode(env, session, renderer, get_parser("hermes"), LoopConfig(), seed=2)
    assert t.status is Status.COMPLETED
    assert [turn.spans() for turn in model_turns(t)] == [
        [(turn.start, turn.end, version)] for turn, version in zip(model_turns(t), ["step-0", "step-0", "step-1"])
    ]


@pytest.mark.parametrize(
    "policy, keep_partial", [("continue", True), ("abort_and_resume", True), ("abort_and_resume", False), ("drain", True)]
)
async def test_many_episodes_under_repeated_updates_lose_nothing(qwen3, renderer, policy, keep_partial):
    def run(target):
        return rollout(lambda: ThreeTurns(), target, renderer, parser=get_parser("hermes"), n=6, group_size=2, concurrency=12)

    baseline = {t.episode_id: t async for t in run(engine(qwen3))}
    inner = engine(qwen3)
    session = RolloutSession(inner, SessionConfig(update_policy=policy, keep_partial=keep_partial))

    async def updates():
        hit: set[str] = set()
        for step in (1, 2, 3):  # each update lands on a generation no earlier update touched
            while not any(n >= 2 and rid not in hit for rid, n in inner.progress().items()):
                await asyncio.sleep(0)
            hit.update(inner.progress())
            await session.update_weights(f"/ckpt/step-{step}", version=f"step-{step}")

    driver = asyncio.ensure_future(updates())
    results = await collect(run(session))
    with contextlib.suppress(asyncio.TimeoutError):  # a drain's last update lands as the last generations end
        await asyncio.wait_for(asyncio.shield(driver), TICK * 20)
    landed = driver.done()
    driver.cancel()
    assert landed, "the rollout ended before three updates could land"
    assert len(results) == 12 and {t.status for t in results} == {Status.COMPLETED}
    for t in results:
        t.validate()
        assert (t.response_ids, t.logprobs) == (baseline[t.episode_id].response_ids, baseline[t.episode_id].logprobs)
        versions = [int(v.split("-")[1]) for *_, v in t.model_version_spans()]
        assert versions == sorted(versions)  # versions only move forward along a stream
        assert sum(e - s for s, e, _ in t.model_version_spans()) == t.num_model_tokens
        assert all(lp == synthetic_logprob(tid, len(t.prompt_ids) + i) for i, (tid, lp, m) in
                   enumerate(zip(t.response_ids, t.logprobs, t.loss_mask)) if m)
    split_turns = sum(len(turn.spans()) > 1 for t in results for turn in model_turns(t))
    stats = session.stats
    assert stats.updates == 3
    if policy == "continue":
        assert split_turns >= 3 and stats.aborted_generations == 0
    elif policy == "drain":
        assert split_turns == 0 and stats.aborted_generations == 0
    elif keep_partial:
        # every kept token is older than its turn's last span, and nothing else is
        older = sum(turn.spans()[-1][0] - turn.start for t in results for turn in model_turns(t))
        assert split_turns >= 3 and stats.aborted_generations >= split_turns and stats.kept_partial_tokens == older
    else:
        assert split_turns == 0 and stats.dropped_tokens >= 2 * 3


async def collect(stream):
    return [t async for t in stream]


async def test_generations_are_bounded_by_capacity_and_cpu_admission_never_holds_them(qwen3, renderer):
    def play(session, admission):
        return asyncio.gather(*(
            run_episode(ThreeTurns(), session, renderer, get_parser("hermes"), LoopConfig(), seed=s, admission=admission)
            for s in range(6)
        ))

    bounded = RolloutSession(engine(qwen3), SessionConfig(max_running=2))
    await play(bounded, None)
    assert bounded.stats.peak_running == 2 and await bounded.capacity() == 2
    # a reported capacity of 4 slots, plus a quarter more waiting in the server's queue
    reported = RolloutSession(FourSlots(qwen3, reply, token_delay_s=TICK))
    await play(reported, None)
    assert reported.stats.peak_running == 5 and await reported.capacity() == 5
    # one CPU slot at a time, yet all six generations are on the engine together
    free = RolloutSession(engine(qwen3))
    trajectories = await play(free, asyncio.Semaphore(1))
    assert free.stats.peak_running == 6 and await free.capacity() is None
    assert {t.status for t in trajectories} == {Status.COMPLETED}


class FourSlots(ScriptedEngine):
    async def capacity(self):
        return 4


class FixedEngine:
    """An engine with no update_weights or abort (e.g. a frozen opponent behind a proxy)."""

    def __init__(self, inner):
        self.inner = inner

    async def generate(self, input_ids, sampling, **kw):
        return await self.inner.generate(input_ids, sampling, **kw)


async def test_configuration_mistakes_fail_before_anything_runs(qwen3, renderer):
    with pytest.raises(ValueError, match="unknown update policy 'abort'.*continue, abort_and_resume, drain"):
        SessionConfig(update_policy="abort")
    with pytest.raises(ValueError, match="max_running=0"):
        SessionConfig(max_running=0)
    with pytest.raises(UpdateNotSupported, match="cannot abort requests.*use continue or drain"):
        RolloutSession(FixedEngine(engine(qwen3)), SessionConfig(update_policy="abort_and_resume"))
    session = RolloutSession(FixedEngine(engine(qwen3, tick=0)))
    with pytest.raises(UpdateNotSupported, match="FixedEngine cannot update its weights"):
        await session.update_weights("/ckpt", version="step-1")
    t = await run_episode(ThreeTurns(), session, renderer, get_parser("hermes"), LoopConfig(), seed=0)
    assert t.status is Status.COMPLETED and session.stats.updates == 0
