"""EmbeddedEngine prefix reuse: turn N prefills only its new tokens, with the same ids and logprobs."""

import asyncio

import numpy as np
import pytest
import torch

from miles_envs.agents.embedded import EmbeddedEngine
from miles_envs.agents.embedded_prefix import PrefixEntry, PrefixStore
from miles_envs.engine import SamplingParams
from miles_envs.models.loading import load_checkpoint
from tests.models.tiny_checkpoints import tiny_checkpoint  # noqa: F401

PROMPT = [151644, 872, 198, 9707, 1879, 11, 419, 374, 264]
REPLY = [151645, 198, 151644, 872, 198, 1273, 315, 279, 151645, 198, 151644, 77091, 198]  # env turn + new header


@pytest.fixture
async def engines(tiny_checkpoint):  # noqa: F811
    path = tiny_checkpoint("qwen3-moe")
    cached = EmbeddedEngine.from_path(path, device="cpu")
    plain = EmbeddedEngine.from_path(path, device="cpu", prefix_cache_tokens=0)
    yield cached, plain
    await cached.close()
    await plain.close()


def same(a, b) -> None:
    assert a.output_ids == b.output_ids and a.finish_reason == b.finish_reason
    assert np.abs(np.array(a.logprobs) - np.array(b.logprobs)).max() <= 1e-4


async def play(engine: EmbeddedEngine, turns: int, seed: int):
    """A multi-turn episode: each turn's input = the last input + its output + the env's reply."""
    ids, generations = list(PROMPT), []
    for turn in range(turns):
        generation = await engine.generate(ids, SamplingParams(max_new_tokens=6, seed=seed * 100 + turn),
                                           return_routed_experts=True, routed_experts_start=0)
        generations.append(generation)
        ids = ids + generation.output_ids + REPLY
    return generations


async def test_later_turns_reuse_the_episode_cache_and_match_the_uncached_engine(engines):
    cached, plain = engines
    with_cache, without = await play(cached, 4, seed=1), await play(plain, 4, seed=1)
    for a, b in zip(with_cache, without):
        same(a, b)
        assert np.array_equal(a.routed_experts, b.routed_experts)
        assert b.cached_tokens == 0
    assert with_cache[0].cached_tokens == 0
    for previous, generation in zip(with_cache, with_cache[1:]):
        # everything the previous turn fed the model is reused: its prompt and all but its last output token
        assert generation.cached_tokens == previous.prompt_tokens + len(previous.output_ids) - 1
        assert generation.prompt_tokens - generation.cached_tokens == len(REPLY) + 1


async def test_a_group_prefills_its_shared_prompt_once(engines):
    cached, plain = engines
    params = [SamplingParams(max_new_tokens=5, seed=s) for s in range(4)]
    group = await asyncio.gather(*[cached.generate(PROMPT, p) for p in params])
    alone = [await plain.generate(PROMPT, p) for p in params]
    for a, b in zip(group, alone):
        same(a, b)
    # the first computes the prompt; each sibling copies it from the batch or a running sibling
    first, *siblings = sorted(g.cached_tokens for g in group)
    assert first == 0 and all(c >= len(PROMPT) - 1 for c in siblings)
    # a sibling's next turn reuses the shared prompt and its own first turn, not a sibling's
    turn_two = PROMPT + group[2].output_ids + REPLY
    again = await cached.generate(turn_two, params[0])
    same(again, await plain.generate(turn_two, params[0]))
    assert again.cached_tokens == len(PROMPT) + len(group[2].output_ids) - 1


async def test_a_weight_update_drops_the_kept_prefixes(engines, tiny_checkpoint):  # noqa: F811
    cached, plain = engines
    first = await cached.generate(PROMPT, SamplingParams(max_new_tokens=4, seed=0))
    turn_two = PROMPT + first.output_ids + REPLY
    state = load_checkpoint(tiny_checkpoint("qwen3-moe"), device="cpu").model.state_dict()
    with torch.no_grad():
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * 2
    await cached.update_weights(state, version="1")
    await plain.update_weights(state, version="1")
    after = await cached.generate(turn_two, SamplingParams(max_new_tokens=4, seed=1))
    assert after.cached_tokens == 0
    same(after, await plain.generate(turn_two, SamplingParams(max_new_tokens=4, seed=1)))


async def test_prefix_reuse_is_off_under_speculative_decoding(tiny_checkpoint):  # noqa: F811
    engine = EmbeddedEngine.from_path(tiny_checkpoint("qwen3-moe", mtp=1), device="cpu", draft_tokens=2)
    try:
        first = await engine.generate(PROMPT, SamplingParams(max_new_tokens=3, seed=0))
        second = await engine.generate(PROMPT + first.output_ids + REPLY, SamplingParams(max_new_tokens=3, seed=0))
        assert second.cached_tokens == 0 and len(second.output_ids) == 3
    finally:
        await engine.close()


def entry(tokens: list[int]) -> PrefixEntry:
    return PrefixEntry(np.asarray(tokens), [(torch.zeros(2, len(tokens), 4), torch.zeros(2, len(tokens), 4))], None)


def test_store_matches_the_longest_common_prefix_within_its_budget():
    store = PrefixStore(max_tokens=10)
    store.put(entry([1, 2, 3, 4]), None)
    store.put(entry([1, 2, 9]), None)
    assert store.match([1, 2, 3, 4, 5], None, limit=99).length == 4
    assert store.match([1, 2, 9, 9], None, limit=2).length == 2
    assert store.match([1, 2, 3], "adapter", limit=99).length == 0  # keyed by LoRA adapter
    assert store.match([7], None, limit=99).length == 0
    store.put(entry([1, 2, 3, 4, 5, 6]), None)  # extends [1, 2, 3, 4]: replaces it
    assert (len(store), store.tokens) == (2, 9)
    store.put(entry([8, 8]), None)  # over budget: the least recently used, [1, 2, 9], goes
    assert (len(store), store.tokens) == (2, 8)
    assert store.match([1, 2, 9], None, limit=99).length == 2  # only [1, 2, 3, 4, 5, 6] shares [1, 2]
    store.put(entry(list(range(11))), None)  # larger than the whole budget: not kept
    assert (len(store), store.tokens) == (2, 8)
    store.flush()
    assert (len(store), store.tokens, store.match([8, 8, 1], None, limit=99).length) == (0, 0, 0)
