"""SGLangEngine against the protocol server over loopback: routing, clamping, faults, admin calls."""

import asyncio

import numpy as np
import pytest

from miles_envs.engine import SamplingParams
from miles_envs.agents.protocol_server import Fault, ProtocolServer
from miles_envs.agents.scripted import ScriptedEngine, ScriptedReply, SyntheticRouting
from miles_envs.agents.sglang import EngineAdminError, SGLangEngine

ROUTING = SyntheticRouting(num_layers=4, topk=2, num_experts=8, dense_layers=(0,))
TOOL_RESPONSE = 151665  # marks one environment observation per turn in the episodes below
REPLIES = ["Let me look that up.", "One more lookup.", "The answer is 42."]


def reply_by_turn(context):
    """The reply depends only on how many observations the prompt holds, never on call order."""
    return ScriptedReply(REPLIES[context.input_ids.count(TOOL_RESPONSE)])


@pytest.fixture
async def server(qwen3):
    engine = ScriptedEngine(qwen3, reply_by_turn, routing=ROUTING, spec_draft_tokens=3)
    async with ProtocolServer(engine, context_length=256) as srv:
        yield srv


@pytest.fixture
async def client(server):
    engine = SGLangEngine(server.url, num_layers=4, topk=2, retries=2, backoff_s=0.01, timeout=5.0)
    yield engine
    await engine.close()


async def test_routing_rows_are_decoded_exactly(server, client):
    prompt = [151644, 872, 198, 9707, 1879]
    gen = await client.generate(prompt, SamplingParams(), return_routed_experts=True, routed_experts_start=2)
    expected_ids = [10061, 752, 1401, 429, 705, 13, 151645]  # "Let me look that up." + <|im_end|>
    assert gen.output_ids == expected_ids and gen.finish_reason == "stop"
    processed = prompt + expected_ids[:-1]
    expected = ROUTING.rows(np.array(processed[2:]), np.arange(2, len(processed)))
    assert gen.routed_experts.dtype == np.int32
    np.testing.assert_array_equal(gen.routed_experts, expected)
    assert not gen.routed_experts[:, 0].any()  # the dense layer comes back as zero rows
    sent = server.requests[-1]
    assert (sent["return_routed_experts"], sent["routed_experts_start_len"], sent["return_logprob"]) == (True, 2, True)
    assert sent["sampling_params"]["no_stop_trim"] is True and sent["sampling_params"]["skip_special_tokens"] is False


async def test_incremental_rows_over_an_episode_equal_one_full_request(qwen3, client):
    tokens = [151644, 872, 198, 9707, 151645, 198]
    rows, held = [], 0  # one row per processed token: all held tokens but the last generated one
    for turn in range(3):
        gen = await client.generate(list(tokens), SamplingParams(), return_routed_experts=True, routed_experts_start=held)
        rows.append(gen.routed_experts)
        held += len(gen.routed_experts)
        assert held == len(tokens) + len(gen.output_ids) - 1
        tokens += gen.output_ids
        observation = qwen3.encode(f"\n<|im_start|>user\n<tool_response>\nresult {turn}\n</tool_response><|im_end|>\n")
        tokens += observation
    last_prompt = tokens[: -len(observation) - len(gen.output_ids)]
    full = await client.generate(last_prompt, SamplingParams(), return_routed_experts=True, routed_experts_start=0)
    assert full.output_ids == gen.output_ids
    incremental = np.concatenate(rows)
    assert incremental.shape == (len(last_prompt) + len(full.output_ids) - 1, 4, 2)
    np.testing.assert_array_equal(incremental, full.routed_experts)


async def test_max_new_tokens_is_clamped_to_the_context_from_server_info(server):
    async with SGLangEngine(server.url) as client:  # context length read from /get_server_info
        prompt = list(range(1000, 1250))
        gen = await client.generate(prompt, SamplingParams(max_new_tokens=100))
        assert server.requests[-1]["sampling_params"]["max_new_tokens"] == 6
        assert gen.finish_reason == "length" and len(gen.output_ids) == 6
        full = await client.generate(list(range(256)), SamplingParams())
        assert (full.finish_reason, full.output_ids) == ("length", [])
        assert "fills the context length 256" in full.error
        assert len(server.requests) == 1  # a full prompt never reaches the server


async def test_rid_lora_and_spec_counters_travel(server, client):
    await client.load_lora_adapter("math", "/adapters/math")
    gen = await client.generate([1, 2], SamplingParams(), lora="math", rid="episode-7-turn-0")
    sent = server.requests[-1]
    assert (sent["lora_path"], sent["rid"]) == ("math", "episode-7-turn-0")
    n = len(gen.output_ids)
    assert (gen.spec.verify_ct, gen.spec.accepted_tokens, gen.spec.draft_tokens) == (2, n - 2, 6)
    await client.unload_lora_adapter("math")
    rejected = await client.generate([1, 2], SamplingParams(), lora="math")
    assert rejected.finish_reason == "abort" and "HTTP 400" in rejected.error and "not loaded" in rejected.error
    with pytest.raises(EngineAdminError, match="not loaded"):
        await client.unload_lora_adapter("math")


async def test_server_error_is_retried_then_succeeds(server, client):
    server.inject(Fault.server_error(503), times=2)
    gen = await client.generate([1, 2], SamplingParams())
    assert gen.finish_reason == "stop" and gen.error is None
    assert len(server.requests) == 3


async def test_server_error_aborts_after_the_retries(server, client):
    server.inject(Fault.server_error(500), times=5)
    gen = await client.generate([1, 2], SamplingParams())
    assert (gen.finish_reason, gen.output_ids) == ("abort", [])
    assert "after 3 attempts" in gen.error and "HTTP 500" in gen.error
    assert len(server.requests) == 3


async def test_client_error_is_never_retried(server, client):
    server.inject(Fault.server_error(429), times=3)
    gen = await client.generate([1, 2], SamplingParams())
    assert gen.finish_reason == "abort" and "HTTP 429" in gen.error
    assert len(server.requests) == 1


async def test_delay_beyond_the_timeout_aborts_and_frees_the_server(server):
    async with SGLangEngine(server.url, context_length=256, timeout=0.3) as client:
        server.inject(Fault.delay(60.0))
        gen = await client.generate([1, 2], SamplingParams(), rid="slow")
        assert gen.finish_reason == "abort" and "timed out" in gen.error and "slow" in gen.error
        info = await client.server_info()
        assert info["internal_states"][0]["num_in_flight"] == 0  # the client aborted the rid


async def test_disconnect_mid_body_is_retried_then_succeeds(server, client):
    server.inject(Fault.disconnect())
    gen = await client.generate([1, 2], SamplingParams())
    assert gen.finish_reason == "stop" and len(server.requests) == 2


async def test_disconnect_mid_body_aborts_after_the_retries(server, client):
    server.inject(Fault.disconnect(), times=3)
    gen = await client.generate([1, 2], SamplingParams())
    assert gen.finish_reason == "abort" and "RemoteProtocolError" in gen.error


async def test_malformed_json_aborts_with_a_clear_error(server, client):
    server.inject(Fault.malformed_json())
    gen = await client.generate([1, 2], SamplingParams())
    assert gen.finish_reason == "abort" and "malformed JSON response from /generate" in gen.error
    assert len(server.requests) == 1


async def test_connect_error_aborts(client):
    async with SGLangEngine("http://127.0.0.1:9", context_length=256, retries=1, backoff_s=0.01, restart_deadline_s=0.2) as dead:
        gen = await dead.generate([1, 2], SamplingParams())
        assert gen.finish_reason == "abort" and "ConnectError" in gen.error
        assert not await dead.health()
    assert await client.health()


async def test_abort_by_rid_ends_a_running_request(server, client):
    server.latency_s = 60.0
    task = asyncio.create_task(client.generate([1, 2], SamplingParams(), rid="long"))
    while "long" not in server._in_flight:
        await asyncio.sleep(0.01)
    await client.abort("long")
    gen = await task
    assert (gen.finish_reason, gen.output_ids) == ("abort", [])


async def test_pause_holds_requests_until_continue(server, client):
    await client.pause_generation("in_place")
    task = asyncio.create_task(client.generate([1, 2], SamplingParams()))
    while not server._in_flight:
        await asyncio.sleep(0.01)
    assert not task.done()
    await client.continue_generation()
    assert (await task).finish_reason == "stop"


async def test_weight_update_and_cache_flush(server, client):
    await client.update_weights("/ckpt/step-10", version="step-10")
    gen = await client.generate([1, 2], SamplingParams())
    assert gen.weight_version == "step-10"
    assert (await client.server_info())["model_path"] == "/ckpt/step-10"
    await client.flush_cache()


async def test_many_concurrent_requests_through_a_small_pool(server):
    server.latency_s = 0.02
    async with SGLangEngine(server.url, context_length=256, max_connections=16) as client:
        gens = await asyncio.gather(*(client.generate([1, i], SamplingParams()) for i in range(200)))
    assert {g.finish_reason for g in gens} == {"stop"}
    assert {tuple(g.output_ids) for g in gens} == {(10061, 752, 1401, 429, 705, 13, 151645)}


async def test_a_retry_never_reuses_a_rid_the_server_has_seen(server, client):
    server.inject(Fault.disconnect())
    server.inject(Fault.server_error(503))
    gen = await client.generate([1, 2], SamplingParams(), rid="episode-3-turn-1")
    assert gen.finish_reason == "stop"
    assert [r["rid"] for r in server.requests] == ["episode-3-turn-1", "episode-3-turn-1.retry1", "episode-3-turn-1.retry2"]


async def test_a_restart_is_waited_out_and_an_incompatible_one_refused(qwen3):
    engine = ScriptedEngine(qwen3, reply_by_turn)
    first = await ProtocolServer(engine, context_length=256).start()
    client = SGLangEngine(first.url, retries=1, backoff_s=0.01, restart_deadline_s=60.0)
    assert (await client.generate([1, 2], SamplingParams())).finish_reason == "stop"
    await first.stop()

    async def restart(context_length):
        await asyncio.sleep(0.3)  # the client finds the port closed, retries, then waits for health
        return await ProtocolServer(engine, port=first.port, context_length=context_length).start()

    restarting = asyncio.create_task(restart(256))
    gen = await client.generate([1, 2], SamplingParams())
    second = await restarting
    assert gen.finish_reason == "stop" and gen.output_ids[-1] == qwen3.eos_token_id
    await second.stop()

    restarting = asyncio.create_task(restart(128))  # the same model can no longer hold the context in use
    gen = await client.generate([1, 2], SamplingParams())
    third = await restarting
    assert gen.finish_reason == "abort" and "context_length was 256, now 128" in gen.error
    assert "incompatible" in (await client.generate([1, 2], SamplingParams())).error  # refused from now on
    assert third.requests == []
    await third.stop()
    await client.close()


async def test_abort_while_waiting_for_a_restart_returns_at_once(server):
    async with SGLangEngine("http://127.0.0.1:9", context_length=256, retries=0, backoff_s=0.01) as dead:
        waiting = asyncio.create_task(dead.generate([1, 2], SamplingParams(), rid="stuck"))
        while dead._recovery is None:
            await asyncio.sleep(0.01)
        with pytest.raises(EngineAdminError):  # nothing to tell the absent server, but the caller's request ends
            await dead.abort("stuck")
        gen = await waiting
        assert gen.finish_reason == "abort" and "aborted by the caller" in gen.error
