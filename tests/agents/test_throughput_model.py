"""The GPU-like test server through the real client: capacity, weight updates mid-generation, partial aborts."""

import asyncio

import pytest

from miles_envs.engine import SamplingParams
from miles_envs.agents.protocol_server import ProtocolServer
from miles_envs.agents.scripted import ScriptedEngine
from miles_envs.agents.sglang import SGLangEngine
from miles_envs.agents.throughput_model import ThroughputModel

REPLY = "one two three four five six seven eight nine ten eleven twelve"


@pytest.fixture
async def paced(qwen3):
    model = ThroughputModel(ScriptedEngine(qwen3, [REPLY]), slots=2, decode_s=0.02, decode_s_per_running=0.0,
                            update_pause_s=0.05, weight_version="step-0")
    async with ProtocolServer(model, context_length=512) as server:
        async with SGLangEngine(server.url, retries=0) as client:
            yield model, server, client


async def wait_for_tokens(model, rid, n):
    while rid not in model._running or model._running[rid].emitted < n:
        await asyncio.sleep(0.005)


async def test_capacity_comes_from_the_servers_max_running_requests(paced, qwen3):
    _, server, client = paced
    assert await client.capacity() == 2
    assert (await client.server_info())["max_running_requests"] == 2
    async with SGLangEngine(server.url, capacity=7) as explicit:
        assert await explicit.capacity() == 7
    with pytest.raises(ValueError, match="capacity"):
        SGLangEngine(server.url, capacity=0)


async def test_update_mid_generation_splits_the_versions_exactly(paced, qwen3):
    model, _, client = paced
    expected = qwen3.encode(REPLY, add_special_tokens=False) + [qwen3.eos_token_id]
    seen_at_switch = []
    inner_update = model.inner.update_weights

    async def record_switch(source, *, version=None):  # the version flips right after this returns
        seen_at_switch.append(model._running["long"].emitted)
        await inner_update(source, version=version)

    model.inner.update_weights = record_switch
    running = asyncio.create_task(client.generate([1, 2, 3], SamplingParams(), rid="long"))
    await wait_for_tokens(model, "long", 3)
    await client.update_weights("/ckpt/step-1", version="step-1")  # returns once the new version serves
    [switched_at] = seen_at_switch
    after = await client.generate([4, 5], SamplingParams())
    gen = await running
    assert gen.output_ids == expected and gen.finish_reason == "stop"
    assert 3 <= switched_at < len(expected)
    assert gen.version_spans == [(0, "step-0"), (switched_at, "step-1")]
    assert gen.weight_version == "step-1"
    assert (after.version_spans, after.weight_version) == ([], "step-1")  # started after the update


async def test_abort_returns_the_tokens_sampled_so_far(paced, qwen3):
    model, server, client = paced
    expected = qwen3.encode(REPLY, add_special_tokens=False) + [qwen3.eos_token_id]
    running = asyncio.create_task(client.generate([1, 2, 3], SamplingParams(), rid="cut"))
    await wait_for_tokens(model, "cut", 4)
    await client.abort("cut")
    gen = await running
    assert gen.finish_reason == "abort" and 4 <= len(gen.output_ids) < len(expected)
    assert gen.output_ids == expected[: len(gen.output_ids)]
    assert len(gen.logprobs) == len(gen.output_ids)
    assert server._in_flight == {}


async def test_slots_bound_the_running_batch(paced, qwen3):
    model, _, client = paced
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, len(model._running))
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    gens = await asyncio.gather(*(client.generate([1, i], SamplingParams()) for i in range(5)))
    watcher.cancel()
    assert peak == 2 and {g.finish_reason for g in gens} == {"stop"}


async def test_slot_seconds_and_the_model_clock_count_modelled_steps_and_idle_time(qwen3):
    model = ThroughputModel(ScriptedEngine(qwen3, [REPLY]), slots=4, decode_s=0.01, decode_s_per_running=0.001,
                            prefill_s_per_token=0.0)
    sampling = SamplingParams()
    first = await model.generate([1, 2], sampling)
    n = len(first.output_ids)
    assert (model.steps, model.busy_s, model.slot_s) == (n, pytest.approx(n * 0.011), pytest.approx(n * 0.011))
    idle_from = model.model_s
    await asyncio.sleep(0.05)  # nothing to decode: the clock runs on, the slots stay idle
    assert model.model_s - idle_from >= 0.05 and model.slot_s == pytest.approx(n * 0.011)
    await asyncio.gather(model.generate([1, 2], sampling), model.generate([3, 4], sampling))
    assert model.steps == 2 * n
    assert model.slot_s == pytest.approx(n * 0.011 + n * 2 * 0.012)  # two running: each step costs 2 slots
    assert model.model_s >= model.busy_s == pytest.approx(n * 0.011 + n * 0.012)
