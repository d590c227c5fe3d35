"""EmbeddedEngine on a tiny fp32 Qwen3-MoE: token-exact logprobs and routing, batching, stops, bad input."""

import asyncio

import numpy as np
import pytest
import torch

from miles_envs.agents.embedded import EmbeddedEngine
from miles_envs.engine import Engine, SamplingParams
from miles_envs.models.loading import load_checkpoint
from tests.models.tiny_checkpoints import tiny_checkpoint  # noqa: F401

PROMPTS = [[9707, 1879], [9707, 1879, 11, 419, 374, 264], [151644, 872, 198, 9707], [1273, 315, 279, 13458, 12183]]


@pytest.fixture
async def engine(tiny_checkpoint):  # noqa: F811
    engine = EmbeddedEngine.from_path(tiny_checkpoint("qwen3-moe"), device="cpu")
    yield engine
    await engine.close()


def teacher_forced(model, ids: list[int]):
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_router_logits=True)
    logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)
    topk = model.config.num_experts_per_tok
    routing = torch.stack([torch.topk(torch.softmax(r.float(), -1), topk, dim=-1).indices for r in out.router_logits], dim=1)
    return out.logits[0].float(), logprobs, routing.numpy()


async def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, Engine)
    assert await engine.health()


async def test_concurrent_logprobs_and_routing_equal_a_teacher_forced_forward(engine):
    params = [SamplingParams(max_new_tokens=12, seed=i) for i in range(len(PROMPTS))]
    params[1] = SamplingParams(max_new_tokens=12, seed=7, temperature=0.7)
    generations = await asyncio.gather(
        *[engine.generate(p, s, return_routed_experts=True) for p, s in zip(PROMPTS, params)]
    )
    for prompt, sampling, generation in zip(PROMPTS, params, generations):
        assert generation.finish_reason == "length" and len(generation.output_ids) == 12
        ids = prompt + generation.output_ids
        logits, _, routing = teacher_forced(engine.model, ids)
        expected = torch.log_softmax(logits / sampling.temperature, dim=-1)
        positions = range(len(prompt) - 1, len(ids) - 1)
        reference = [float(expected[p, t]) for p, t in zip(positions, generation.output_ids)]
        assert np.abs(np.array(reference) - np.array(generation.logprobs)).max() <= 1e-4
        assert generation.routed_experts.dtype == np.int32
        assert generation.routed_experts.shape == (len(ids) - 1, 2, 2)
        assert np.array_equal(generation.routed_experts, routing[:-1])


async def test_incremental_routing_rows_concatenate_to_the_full_rows(engine):
    first = await engine.generate(PROMPTS[1], SamplingParams(max_new_tokens=5, seed=1), return_routed_experts=True)
    turn_two = PROMPTS[1] + first.output_ids + [151645, 198, 151644]
    start = len(PROMPTS[1]) + len(first.output_ids) - 1
    sampling = SamplingParams(max_new_tokens=4, seed=2)
    part = await engine.generate(turn_two, sampling, return_routed_experts=True, routed_experts_start=start)
    full = await engine.generate(turn_two, sampling, return_routed_experts=True)
    assert part.output_ids == full.output_ids
    assert np.array_equal(np.concatenate([first.routed_experts, part.routed_experts]), full.routed_experts)


async def test_a_seeded_request_is_the_same_alone_and_inside_a_batch(engine):
    sampling = SamplingParams(max_new_tokens=10, seed=123, top_p=0.9, top_k=50)
    alone = await engine.generate(PROMPTS[2], sampling)
    crowd = await asyncio.gather(
        *[engine.generate(p, SamplingParams(max_new_tokens=6 + i, seed=i)) for i, p in enumerate(PROMPTS)],
        engine.generate(PROMPTS[2], sampling),
    )
    assert crowd[-1].output_ids == alone.output_ids
    assert crowd[-1].logprobs == pytest.approx(alone.logprobs, abs=1e-4)


async def test_stop_token_ids_and_stop_strings(engine):
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    free = await engine.generate(PROMPTS[3], greedy)
    stop_id = free.output_ids[3]
    by_id = await engine.generate(PROMPTS[3], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[stop_id]))
    cut = free.output_ids.index(stop_id) + 1
    assert by_id.output_ids == free.output_ids[:cut]
    assert (by_id.finish_reason, by_id.matched_stop) == ("stop", stop_id)

    text = engine.tokenizer.decode(free.output_ids[:3])
    stop = text[-2:] if len(text) >= 2 else text
    by_text = await engine.generate(PROMPTS[3], SamplingParams(max_new_tokens=8, temperature=0, stop=[stop]))
    assert by_text.finish_reason == "stop" and by_text.matched_stop == stop
    assert stop in engine.tokenizer.decode(by_text.output_ids)
    assert stop not in engine.tokenizer.decode(by_text.output_ids[:-1])
    assert by_text.output_ids == free.output_ids[: len(by_text.output_ids)]


async def test_prompt_at_or_near_the_context_length(engine):
    context = engine.checkpoint.context_length
    full = await engine.generate([9707] * context, SamplingParams(max_new_tokens=4))
    assert (full.output_ids, full.finish_reason) == ([], "length")
    assert "context length" in full.error
    near = await engine.generate([9707] * (context - 2), SamplingParams(max_new_tokens=10, seed=0))
    assert near.finish_reason == "length" and len(near.output_ids) == 2


async def test_bad_requests_are_clear_errors(engine, tiny_checkpoint):  # noqa: F811
    with pytest.raises(ValueError, match="empty"):
        await engine.generate([], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        await engine.generate([10**7], SamplingParams())
    dense = EmbeddedEngine.from_path(tiny_checkpoint("qwen3"), device="cpu")
    try:
        with pytest.raises(ValueError, match="not a mixture-of-experts"):
            await dense.generate([9707], SamplingParams(max_new_tokens=2), return_routed_experts=True)
        plain = await dense.generate([9707], SamplingParams(max_new_tokens=2, seed=0))
        assert len(plain.output_ids) == 2 and plain.routed_experts is None
    finally:
        await dense.close()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EmbeddedEngine.from_path("/nonexistent/model")
    with pytest.raises(ValueError, match="MTP"):
        EmbeddedEngine.from_path(tiny_checkpoint("qwen3-moe"), device="cpu", draft_tokens=2)


async def test_abort_returns_the_partial_output(engine):
    task = asyncio.create_task(engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=3000, seed=0), rid="long"))
    while not engine._running:
        await asyncio.sleep(0.01)
    await engine.abort("long")
    generation = await asyncio.wait_for(task, timeout=60)
    assert generation.finish_reason == "abort"
    assert 0 < len(generation.output_ids) < 3000 and len(generation.logprobs) == len(generation.output_ids)
    again = await engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=2, seed=0))
    assert again.finish_reason == "length"


async def test_update_weights_from_a_folder_and_from_a_state_dict(tiny_checkpoint, tmp_path):  # noqa: F811
    from miles_envs.models.factory import init_model

    other = init_model(tmp_path / "other", arch="qwen3-moe", seed=1)
    reference = EmbeddedEngine.from_path(other, device="cpu")
    engine = EmbeddedEngine.from_path(tiny_checkpoint("qwen3-moe"), device="cpu")
    sampling = SamplingParams(max_new_tokens=6, temperature=0)
    try:
        want = await reference.generate(PROMPTS[1], sampling)
        before = await engine.generate(PROMPTS[1], sampling)
        assert before.output_ids != want.output_ids and before.weight_version == "0"
        await engine.update_weights(str(other), version="7")
        after = await engine.generate(PROMPTS[1], sampling)
        assert (after.output_ids, after.weight_version) == (want.output_ids, "7")
        original = load_checkpoint(tiny_checkpoint("qwen3-moe"), device="cpu").model.state_dict()
        await engine.update_weights(original, version="8")
        assert (await engine.generate(PROMPTS[1], sampling)).output_ids == before.output_ids
        with pytest.raises(ValueError, match="does not have"):
            await engine.update_weights({"no.such.weight": torch.zeros(1)})
    finally:
        await reference.close()
        await engine.close()
    assert not await engine.health()
    with pytest.raises(RuntimeError, match="closed"):
        await engine.generate([1], SamplingParams())
