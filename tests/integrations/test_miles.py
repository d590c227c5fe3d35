"""The Miles plug-points against the SGLang protocol server: the Sample contract, token for token."""

from __future__ import annotations

import random
from argparse import ArgumentParser, Namespace

import numpy as np
import pytest

from miles_envs.agents.protocol_server import Fault, ProtocolServer
from miles_envs.agents.scripted import ScriptedEngine, SyntheticRouting, synthetic_logprob
from miles_envs.envs.guess_number import GuessNumberEnv
from miles_envs.integrations import miles as adapter
from miles_envs.tokenizers import load_tokenizer

from .miles_types import Sample, validate_compact_rollout_ids

ROUTING = SyntheticRouting(num_layers=3, topk=2, num_experts=8)
GUESSES = ["50", "25", "75", "12", "88", "3", "97"]
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 32}


@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer("qwen3")


def make_args(server: ProtocolServer, **overrides) -> Namespace:
    args = Namespace(
        sglang_router_ip=server.host, sglang_router_port=server.port, hf_checkpoint="qwen3",
        use_rollout_routing_replay=True, num_layers=ROUTING.num_layers, moe_router_topk=ROUTING.topk,
        rollout_max_context_len=4096, rollout_batch_size=2, n_samples_per_prompt=2,
        rollout_temperature=1.0, rollout_top_p=1.0, rollout_top_k=-1, rollout_max_response_len=32,
        rollout_seed=None, rollout_stop=None, rollout_stop_token_ids=None,
    )
    parser = ArgumentParser()
    adapter.add_arguments(parser)
    adapter.add_arguments(parser)  # Miles calls the hook for both plug-points
    vars(args).update(vars(parser.parse_args(["--env-id", "miles/GuessNumber-v0"])))
    vars(args).update(overrides)
    return args


def expected_reward(seed: int, guesses: list[str]) -> float:
    env = GuessNumberEnv()
    env.reset(seed=seed)
    total = 0.0
    for text in guesses:
        _, reward, terminated, truncated, _ = env.step({"role": "assistant", "content": text})
        total += reward
        if terminated or truncated:
            break
    return total


async def test_generate_fills_the_sample_contract(qwen3):
    engine = ScriptedEngine(qwen3, GUESSES, routing=ROUTING)
    async with ProtocolServer(engine, routing_shape=(ROUTING.num_layers, ROUTING.topk)) as server:
        sample = await adapter.generate(make_args(server), Sample(group_index=4, index=9), dict(SAMPLING))
        requests = [r for r in server.requests if "input_ids" in r]

    sample.validate()
    assert sample.status is Sample.Status.COMPLETED
    assert sample.reward == pytest.approx(expected_reward(4, GUESSES))
    prompt_len = len(sample.tokens) - sample.response_length
    # the engine saw exactly the sample's stream: every request is a prefix, the last ends with the last reply
    for request in requests:
        assert sample.tokens[: len(request["input_ids"])] == request["input_ids"]
    last_reply = qwen3.encode(GUESSES[len(requests) - 1], add_special_tokens=False) + [qwen3.eos_token_id]
    assert sample.tokens == requests[-1]["input_ids"] + last_reply
    # model tokens: mask 1 and the engine's logprobs; env tokens: mask 0 and 0.0
    for i, (mask, logprob) in enumerate(zip(sample.loss_mask, sample.rollout_log_probs)):
        position = prompt_len + i
        if mask:
            assert logprob == synthetic_logprob(sample.tokens[position], position)
        else:
            assert logprob == 0.0
    assert sum(sample.loss_mask) == sum(len(qwen3.encode(g, add_special_tokens=False)) + 1 for g in GUESSES[: len(requests)])
    routed = sample.rollout_routed_experts
    assert routed.dtype == np.int32 and routed.shape == (len(sample.tokens) - 1, ROUTING.num_layers, ROUTING.topk)
    fed = np.asarray(sample.tokens[:-1], dtype=np.int64)
    assert np.array_equal(routed, ROUTING.rows(fed, np.arange(len(fed))))
    assert sample.response == qwen3.decode(sample.tokens[prompt_len:], skip_special_tokens=False)
    assert sample.metadata["env_id"] == "miles/GuessNumber-v0" and sample.metadata["seed"] == 4
    assert sample.weight_versions and sample.rollout_id is None


async def test_engine_failure_is_an_aborted_sample(qwen3):
    engine = ScriptedEngine(qwen3, GUESSES)
    async with ProtocolServer(engine) as server:
        server.inject(Fault.server_error(), times=50)
        args = make_args(server, use_rollout_routing_replay=False)
        sample = await adapter.generate(args, Sample(index=0), dict(SAMPLING))
    assert sample.status is Sample.Status.ABORTED
    assert sample.response_length == 0 and sample.metadata["error"]


async def test_env_failure_is_a_failed_sample(qwen3):
    async with ProtocolServer(ScriptedEngine(qwen3, GUESSES)) as server:
        args = make_args(server, use_rollout_routing_replay=False, env_kwargs='{"low": 5, "high": 1}')
        with pytest.raises(ValueError, match="low"):
            await adapter.generate(args, Sample(index=0), dict(SAMPLING))


async def test_multi_agent_siblings_share_rollout_id_and_reward(qwen3):
    moves = [str(m) for m in random.Random(0).sample(range(9), 9)]
    async with ProtocolServer(ScriptedEngine(qwen3, moves, routing=ROUTING), routing_shape=(3, 2)) as server:
        args = make_args(server, env_id="miles/TicTacToe-v0")
        samples = await adapter.generate(args, Sample(group_index=0, index=5), dict(SAMPLING))
        one_seat = await adapter.generate(make_args(server, env_id="miles/TicTacToe-v0", env_agent="x"), Sample(index=6), dict(SAMPLING))

    assert isinstance(samples, list) and len(samples) == 2
    validate_compact_rollout_ids([[samples]])
    assert {s.rollout_id for s in samples} == {5}
    returns = samples[0].metadata["agent_returns"]
    assert all(s.reward == pytest.approx(sum(returns.values()) / len(returns)) for s in samples)
    assert {s.metadata["agent_id"] for s in samples} == set(returns)
    for s in samples:
        s.validate()
    assert len(one_seat) == 1 and one_seat[0].metadata["agent_id"] == "x"
    assert one_seat[0].reward == one_seat[0].metadata["agent_returns"]["x"]


class PrefixCachingEngine(ScriptedEngine):
    """A scripted engine that reports SGLang's ``cached_tokens`` as a radix cache would: the longest
    prefix of the request it has seen before (earlier requests and their outputs)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[list[int]] = []
        self.reported: list[int] = []

    async def generate(self, input_ids, sampling, **options):
        generation = await super().generate(input_ids, sampling, **options)
        cached = max((common_prefix(input_ids, seq) for seq in self.seen), default=0)
        self.seen.append(list(input_ids) + list(generation.output_ids))
        self.reported.append(cached)
        generation.cached_tokens = cached
        return generation


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


async def test_prefix_cache_info_sums_every_turns_prompt_and_cached_tokens(qwen3):
    engine = PrefixCachingEngine(qwen3, GUESSES)
    async with ProtocolServer(engine) as server:
        args = make_args(server, use_rollout_routing_replay=False)
        sample = await adapter.generate(args, Sample(group_index=4, index=9), dict(SAMPLING))
        requests = [r for r in server.requests if "input_ids" in r]
    assert len(requests) > 1 and sum(engine.reported) > 0  # later turns extend earlier ones
    assert sample.prefix_cache_info.cached_tokens == sum(engine.reported)
    assert sample.prefix_cache_info.total_prompt_tokens == sum(len(r["input_ids"]) for r in requests)


async def test_multi_agent_seats_count_their_own_turns(qwen3):
    moves = [str(m) for m in random.Random(0).sample(range(9), 9)]
    engine = PrefixCachingEngine(qwen3, moves)
    async with ProtocolServer(engine) as server:
        args = make_args(server, env_id="miles/TicTacToe-v0", use_rollout_routing_replay=False)
        samples = await adapter.generate(args, Sample(group_index=0, index=5), dict(SAMPLING))
        requests = [r for r in server.requests if "input_ids" in r]
    assert sum(s.prefix_cache_info.total_prompt_tokens for s in samples) == sum(len(r["input_ids"]) for r in requests)
    assert sum(s.prefix_cache_info.cached_tokens for s in samples) == sum(engine.reported)
    assert all(s.prefix_cache_info.total_prompt_tokens > 0 for s in samples)


class GroupSource:
    """Miles' data source: ``get_samples(n)`` gives n groups of ``n_samples_per_prompt`` copies."""

    def __init__(self, group_size: int) -> None:
        self.group_size, self.next_group = group_size, 0

    def get_samples(self, n: int) -> list[list[Sample]]:
        groups = []
        for _ in range(n):
            g = self.next_group
            groups.append([Sample(group_index=g, index=g * self.group_size + j) for j in range(self.group_size)])
            self.next_group += 1
        return groups


def test_rollout_function_returns_groups_on_one_env_seed(qwen3, monkeypatch):
    # Evaluation makes its own samples from Miles' Sample class; the mirror stands in for the missing package.
    monkeypatch.setattr(adapter, "_sample_class", lambda: Sample)
    server = ProtocolServer(ScriptedEngine(qwen3, GUESSES))
    with server.running_in_thread():
        args = make_args(server, use_rollout_routing_replay=False)
        groups = adapter.generate_rollout(args, 0, GroupSource(2))
        evaluation = adapter.generate_rollout(make_args(server, use_rollout_routing_replay=False, env_eval_episodes=3), 0, None, evaluation=True)

    assert [[s.index for s in g] for g in groups] == [[0, 1], [2, 3]]
    for g, group in enumerate(groups):
        assert all(s.status is Sample.Status.COMPLETED for s in group)
        assert group[0].tokens[: 20] == group[1].tokens[: 20]  # one env seed per group: same prompt
        assert all(s.reward == pytest.approx(expected_reward(g, GUESSES)) for s in group)
    result = evaluation["miles/GuessNumber-v0"]
    assert len(result["samples"]) == 3 and result["rewards"] == [s.reward for s in result["samples"]]
    assert result["truncated"] == [False, False, False]
