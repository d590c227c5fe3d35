"""The env loop on real tokenizers with the scripted engine: exact ids, masks, routing, failure taxonomy."""

import asyncio

import numpy as np
import pytest

from miles_envs import Env, user
from miles_envs.engine import Generation, SamplingParams
from miles_envs.agents.scripted import ScriptedEngine, SyntheticRouting, synthetic_logprob
from miles_envs.chat import ChatRenderer
from miles_envs.loop import LoopConfig, rollout, run_episode
from miles_envs.parsers import get_parser
from miles_envs.registry import make
from miles_envs.tokenizers import load_tokenizer
from miles_envs.trajectory import Status


@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer("qwen3")


@pytest.fixture(scope="module")
def renderer(qwen3):
    return ChatRenderer(qwen3)


def collect(agen):
    async def go():
        return [t async for t in agen]

    return asyncio.run(go())


def template_ids(tokenizer, messages, tools=None):
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=False, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def test_guess_number_episode_is_token_exact(qwen3, renderer):
    engine = ScriptedEngine(qwen3, ["50", "25", "I think 37", "no idea", "12", "3", "90"])
    env = make("miles/GuessNumber-v0")
    t = asyncio.run(run_episode(env, engine, renderer, get_parser("hermes"), LoopConfig(), seed=4))
    t.validate()
    assert t.status is Status.COMPLETED and t.num_turns == 7
    # the whole stream equals the chat template's rendering of the conversation
    # (the conversation goes on to the final observation, so no template quirk applies to the last turn)
    expected = template_ids(qwen3, t.messages)
    assert t.tokens == expected[: len(t.tokens)]
    assert expected[len(t.tokens)] == 198  # the template's newline after the final <|im_end|>, never generated
    model_ids = [tid for tid, m in zip(t.response_ids, t.loss_mask) if m]
    assert qwen3.decode(model_ids) == "50<|im_end|>25<|im_end|>I think 37<|im_end|>no idea<|im_end|>12<|im_end|>3<|im_end|>90<|im_end|>"
    assert t.reward_components == {"correct": 0.0, "format": 6 / 7}
    assert t.reward == pytest.approx(0.1 * 6 / 7)


def test_env_tokens_carry_zero_logprob_and_model_tokens_the_engines(qwen3, renderer):
    engine = ScriptedEngine(qwen3, ["50", "75"])
    t = asyncio.run(run_episode(make("miles/GuessNumber-v0"), engine, renderer, get_parser("hermes"), LoopConfig(max_turns=2), seed=1))
    assert t.status is Status.TRUNCATED
    env_positions = [i for i, m in enumerate(t.loss_mask) if m == 0]
    assert env_positions and all(t.logprobs[i] == 0.0 for i in env_positions)
    model_turns = [turn for turn in t.turns if turn.kind == "model"]
    first = model_turns[0]
    expected = [synthetic_logprob(tok, len(t.prompt_ids) + j) for j, tok in enumerate(t.response_ids[first.start:first.end])]
    assert t.logprobs[first.start:first.end] == expected


def test_routing_rows_cover_every_fed_token_and_match_one_full_request(qwen3, renderer):
    routing = SyntheticRouting(num_layers=3, topk=2, num_experts=8, dense_layers=(0,))
    engine = ScriptedEngine(qwen3, ["50", "25", "12"], routing=routing)
    config = LoopConfig(max_turns=3, return_routed_experts=True)
    t = asyncio.run(run_episode(make("miles/GuessNumber-v0"), engine, renderer, get_parser("hermes"), config, seed=2))
    t.validate()
    tokens = np.array(t.tokens)
    full = routing.rows(tokens[:-1], np.arange(len(tokens) - 1))
    assert t.routed_experts.dtype == np.uint8
    np.testing.assert_array_equal(t.routed_experts, full)
    assert (t.routed_experts[:, 0, :] == 0).all()


class ExplodingEnv(Env):
    max_turns = 3

    def reset(self, seed=None, options=None):
        return [user("go")], {}

    def step(self, action):
        raise RuntimeError("reward server down")


class AbortingEngine:
    async def generate(self, input_ids, sampling, **kw):
        return Generation(output_ids=[], logprobs=[], finish_reason="abort", error="server shutting down")

    async def close(self):
        pass


class FlakyEngine:
    """Raises a transport error on every third call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    async def generate(self, input_ids, sampling, **kw):
        self.calls += 1
        if self.calls % 3 == 0:
            raise ConnectionError("connection reset by peer")
        return await self.inner.generate(input_ids, sampling, **kw)


def test_env_exception_fails_the_episode_with_its_traceback(qwen3, renderer):
    t = asyncio.run(run_episode(ExplodingEnv(), ScriptedEngine(qwen3, ["hi"]), renderer, get_parser("hermes"), LoopConfig()))
    assert t.status is Status.FAILED
    assert "RuntimeError: reward server down" in t.error and "test_loop.py" in t.error
    assert t.num_turns == 1 and t.loss_mask[-1] == 1  # the model's tokens are kept
    t.validate()


class SlowEnv(Env):
    """A step that takes ``wait_s``, or raises a TimeoutError of its own."""

    def __init__(self, wait_s: float = 0.0, own_timeout: bool = False) -> None:
        self.wait_s, self.own_timeout = wait_s, own_timeout

    async def areset(self, seed=None, options=None):
        return [user("go")], {}

    async def astep(self, action):
        if self.own_timeout:
            raise TimeoutError("upstream quota service timed out")
        await asyncio.sleep(self.wait_s)
        return [user("late")], 1.0, True, False, {}


def test_env_step_past_the_timeout_fails_the_episode_and_an_envs_own_timeout_keeps_its_message(qwen3, renderer):
    parser, engine = get_parser("hermes"), ScriptedEngine(qwen3, ["hi"])
    t = asyncio.run(run_episode(SlowEnv(wait_s=30), engine, renderer, parser, LoopConfig(env_timeout=0.05)))
    assert t.status is Status.FAILED and "env step() did not finish within 0.05s (LoopConfig.env_timeout)" in t.error
    t = asyncio.run(run_episode(SlowEnv(own_timeout=True), engine, renderer, parser, LoopConfig(env_timeout=5)))
    assert t.status is Status.FAILED and "TimeoutError: upstream quota service timed out" in t.error
    assert "did not finish within" not in t.error
    t = asyncio.run(run_episode(SlowEnv(wait_s=0.01), engine, renderer, parser, LoopConfig(env_timeout=5)))
    assert t.status is Status.COMPLETED and t.reward == 1.0


def test_engine_abort_and_transport_errors_give_aborted(qwen3, renderer):
    t = asyncio.run(run_episode(make("miles/Echo-v0"), AbortingEngine(), renderer, get_parser("hermes"), LoopConfig()))
    assert t.status is Status.ABORTED and t.error == "server shutting down"
    no_retries = LoopConfig(retries=0)
    results = collect(rollout("miles/GuessNumber-v0", FlakyEngine(ScriptedEngine(qwen3, ["1"])), renderer, n=4, concurrency=1, config=no_retries))
    assert {r.status for r in results} == {Status.ABORTED}
    assert all("ConnectionError" in r.error for r in results)


def test_length_stop_truncates(qwen3, renderer):
    engine = ScriptedEngine(qwen3, ["this reply is far too long for the budget"])
    config = LoopConfig(sampling=SamplingParams(max_new_tokens=3))
    t = asyncio.run(run_episode(make("miles/Echo-v0"), engine, renderer, get_parser("hermes"), config, seed=0))
    assert t.status is Status.TRUNCATED and t.turns[-1].finish_reason == "length"
    assert len(t.response_ids) == 3


def test_context_limit_truncates_before_generating(qwen3, renderer):
    env = make("miles/GuessNumber-v0")
    prompt_len = len(renderer.prompt_ids(env.reset(seed=0)[0]))
    config = LoopConfig(max_context=prompt_len + 4)
    t = asyncio.run(run_episode(env, ScriptedEngine(qwen3, ["1"]), renderer, get_parser("hermes"), config, seed=0))
    assert t.status is Status.TRUNCATED and "context limit" in t.error
    assert len(t.tokens) <= prompt_len + 4


def test_one_bad_episode_never_stops_the_batch_and_groups_share_seeds(qwen3, renderer):
    calls = {"n": 0}

    def factory():
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("bad task file")
        return make("miles/Echo-v0")

    results = collect(rollout(factory, ScriptedEngine(qwen3, ["red"]), renderer, n=3, group_size=2, seed=10, concurrency=1))
    assert len(results) == 6
    failed = [r for r in results if r.status is Status.FAILED]
    assert len(failed) == 1 and "bad task file" in failed[0].error
    by_group = {}
    for r in results:
        by_group.setdefault(r.group_id, set()).add(r.seed)
    assert sorted(len(v) for v in by_group.values()) == [1, 1, 1] and len(by_group) == 3
    assert sorted({r.episode_id for r in results}) == ["0:0", "0:1", "1:0", "1:1", "2:0", "2:1"]


def test_unknown_env_id_fails_fast(renderer, qwen3):
    from miles_envs.registry import EnvNotFound

    with pytest.raises(EnvNotFound, match="did you mean"):
        collect(rollout("miles/Eco-v0", ScriptedEngine(qwen3, ["x"]), renderer))


def test_groups_come_out_whole_and_lost_groups_are_dropped_and_counted(qwen3, renderer):
    from miles_envs.groups import GroupCounts, complete_groups

    class LosesTask1(FlakyEngine):
        """Aborts every generation of task 1 (sampling seeds 2 and 3: task × group size + member)."""

        async def generate(self, input_ids, sampling, **kw):
            if sampling.seed in (2, 3):
                return Generation(output_ids=[], logprobs=[], finish_reason="abort", error="server restarting")
            return await self.inner.generate(input_ids, sampling, **kw)

    counts = GroupCounts()
    config = LoopConfig(retries=1, sampling=SamplingParams(seed=0), max_turns=1)
    stream = rollout("miles/GuessNumber-v0", LosesTask1(ScriptedEngine(qwen3, ["50"])), renderer, n=3, group_size=2,
                     config=config, concurrency=1)
    groups = collect(complete_groups(stream, 2, counts))
    assert (counts.complete, counts.dropped) == (2, 1)
    assert sorted(sorted(t.episode_id for t in g) for g in groups) == [["0:0", "0:1"], ["2:0", "2:1"]]
    assert all(len({t.group_id for t in g}) == 1 for g in groups)


class SeedRecorder:
    """Passes every request on and keeps the sampling seed it carried."""

    def __init__(self, inner):
        self.inner, self.seeds = inner, []

    async def generate(self, input_ids, sampling, **kw):
        self.seeds.append(sampling.seed)
        return await self.inner.generate(input_ids, sampling, **kw)


def test_each_turn_samples_from_its_own_seed_and_the_first_keeps_the_episodes(qwen3, renderer):
    def seeds_of(episode_seed):
        engine = SeedRecorder(ScriptedEngine(qwen3, ["50", "25", "12"]))
        config = LoopConfig(max_turns=3, sampling=SamplingParams(temperature=1.0, seed=episode_seed))
        asyncio.run(run_episode(make("miles/GuessNumber-v0"), engine, renderer, get_parser("hermes"), config, seed=2))
        return engine.seeds

    seeds = seeds_of(7)
    assert len(seeds) == 3 and seeds[0] == 7
    assert len(set(seeds)) == 3 and all(0 <= s < 2**63 for s in seeds)
    assert seeds_of(7) == seeds  # a seeded run repeats
    assert set(seeds_of(8)[1:]).isdisjoint(seeds[1:])  # the next episode's later turns draw other numbers
    assert seeds_of(None) == [None, None, None]
