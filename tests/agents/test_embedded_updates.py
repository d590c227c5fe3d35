"""EmbeddedEngine under a live RL schedule: weight updates mid-generation, aborts, capacity."""

import asyncio

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from miles_envs.agents.embedded import EmbeddedEngine
from miles_envs.engine import SamplingParams
from miles_envs.models.factory import init_model
from miles_envs.models.loading import load_checkpoint
from tests.models.tiny_checkpoints import tiny_checkpoint  # noqa: F401

PROMPT = [9707, 1879, 11, 419, 374, 264]


def logprobs_of(model, ids: list[int], start: int) -> list[float]:
    """Teacher-forced log-probabilities of ``ids[start:]`` under ``model``."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    table = torch.log_softmax(logits, dim=-1)
    return [float(table[p - 1, ids[p]]) for p in range(start, len(ids))]


def logprob_after_switch(old, new, ids: list[int], switch: int) -> float:
    """Log-probability of ``ids[switch]`` by ``new`` reading ``old``'s KV cache of everything before
    ``ids[switch - 1]``: what an engine that swaps weights between two decode steps computes."""
    with torch.no_grad():
        cache = DynamicCache()
        old.model(input_ids=torch.tensor([ids[: switch - 1]]), cache=cache, use_cache=True)
        out = new(input_ids=torch.tensor([[ids[switch - 1]]]), cache=cache, use_cache=True,
                  position_ids=torch.tensor([[switch - 1]]))
    return float(torch.log_softmax(out.logits[0, -1].float(), dim=-1)[ids[switch]])


async def wait_for_output(engine: EmbeddedEngine, rid: str, tokens: int) -> None:
    while not any(s.rid == rid and len(s.output_ids) >= tokens for s in engine._running):
        await asyncio.sleep(0.005)


async def test_an_update_mid_generation_splits_the_output_at_the_first_new_token(tiny_checkpoint, tmp_path):  # noqa: F811
    path = tiny_checkpoint("qwen3")
    other = init_model(tmp_path / "other", arch="qwen3", seed=1)
    old, new = load_checkpoint(path, device="cpu").model, load_checkpoint(other, device="cpu").model
    engine = EmbeddedEngine.from_path(path, device="cpu", weight_version="step-0")
    try:
        greedy = SamplingParams(max_new_tokens=3000, temperature=0)
        task = asyncio.create_task(engine.generate(PROMPT, greedy, rid="long"))
        await wait_for_output(engine, "long", 3)
        await engine.update_weights(new.state_dict(), version="step-1")
        seen = next(len(s.output_ids) for s in engine._running if s.rid == "long")
        await wait_for_output(engine, "long", seen + 3)
        await engine.abort("long")
        generation = await asyncio.wait_for(task, timeout=60)

        assert generation.finish_reason == "abort" and generation.weight_version == "step-1"
        switch = generation.version_spans[-1][0]
        assert 3 <= switch <= seen < len(generation.output_ids) - 2
        assert generation.version_spans == [(0, "step-0"), (switch, "step-1")]
        assert generation.spans() == [(0, "step-0"), (switch, "step-1")]
        ids = PROMPT + generation.output_ids
        # before the switch: the old weights' teacher-forced values; at it: the new weights on the old cache
        before = logprobs_of(old, ids, len(PROMPT))[:switch]
        assert np.abs(np.array(before) - np.array(generation.logprobs[:switch])).max() <= 1e-4
        at = logprob_after_switch(old, new, ids, len(PROMPT) + switch)
        assert generation.logprobs[switch] == pytest.approx(at, abs=1e-4)
        assert generation.logprobs[switch] != pytest.approx(logprobs_of(old, ids, len(PROMPT))[switch], abs=1e-3)

        after = await engine.generate(PROMPT, SamplingParams(max_new_tokens=4, temperature=0))
        assert (after.version_spans, after.spans(), after.weight_version) == ([], [(0, "step-1")], "step-1")
        assert after.logprobs == pytest.approx(logprobs_of(new, PROMPT + after.output_ids, len(PROMPT)), abs=1e-4)
    finally:
        await engine.close()


async def test_an_update_without_running_requests_or_without_a_version_leaves_no_spans(tiny_checkpoint):  # noqa: F811
    path = tiny_checkpoint("qwen3")
    engine = EmbeddedEngine.from_path(path, device="cpu")
    try:
        state = load_checkpoint(path, device="cpu").model.state_dict()
        await engine.update_weights(state, version="step-3")
        assert engine.weight_version == "step-3"
        task = asyncio.create_task(engine.generate(PROMPT, SamplingParams(max_new_tokens=3000, seed=0), rid="r"))
        await wait_for_output(engine, "r", 2)
        await engine.update_weights(state)  # same label: nothing to split
        await engine.abort("r")
        generation = await asyncio.wait_for(task, timeout=60)
        assert generation.finish_reason == "abort" and generation.version_spans == []
        assert generation.spans() == [(0, "step-3")]
    finally:
        await engine.close()


async def test_abort_of_a_queued_request_and_capacity(tiny_checkpoint):  # noqa: F811
    engine = EmbeddedEngine.from_path(tiny_checkpoint("qwen3"), device="cpu", max_running=1)
    try:
        assert await engine.capacity() == 1
        running = asyncio.create_task(engine.generate(PROMPT, SamplingParams(max_new_tokens=3000, seed=0), rid="a"))
        await wait_for_output(engine, "a", 1)
        queued = asyncio.create_task(engine.generate(PROMPT, SamplingParams(max_new_tokens=5, seed=0), rid="b"))
        while "b" not in engine._sequences:
            await asyncio.sleep(0.005)
        await engine.abort("b")
        waited = await asyncio.wait_for(queued, timeout=60)
        assert (waited.finish_reason, waited.output_ids, waited.logprobs) == ("abort", [], [])
        await engine.abort("a")
        partial = await asyncio.wait_for(running, timeout=60)
        assert partial.finish_reason == "abort" and len(partial.output_ids) == len(partial.logprobs) >= 1
    finally:
        await engine.close()
