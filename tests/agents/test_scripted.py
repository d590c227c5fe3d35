"""ScriptedEngine on the real Qwen3 tokenizer: exact ids, SGLang's finish order, synthetic routing."""

import numpy as np
import pytest

from miles_envs.engine import Engine, SamplingParams
from miles_envs.agents.scripted import ScriptedEngine, ScriptedReply, SyntheticRouting, synthetic_logprob

IM_END = 151645
HELLO_WORLD = [9707, 1879]
ANSWER = "The answer is 42. Done."


def test_satisfies_the_engine_protocol(qwen3):
    assert isinstance(ScriptedEngine(qwen3, ["x"]), Engine)


async def test_reply_is_encoded_with_the_end_of_turn_id(qwen3):
    engine = ScriptedEngine(qwen3, ["Hello world"])
    gen = await engine.generate([1, 2, 3], SamplingParams())
    assert gen.output_ids == [*HELLO_WORLD, IM_END]
    assert (gen.finish_reason, gen.matched_stop, gen.prompt_tokens) == ("stop", IM_END, 3)
    assert gen.logprobs == [synthetic_logprob(t, 3 + i) for i, t in enumerate(gen.output_ids)]
    assert all(-2.0 <= lp < 0 for lp in gen.logprobs)


async def test_replies_cycle_in_call_order(qwen3):
    engine = ScriptedEngine(qwen3, ["Hello", "world"])
    texts = [qwen3.decode((await engine.generate([1], SamplingParams())).output_ids) for _ in range(3)]
    assert texts == ["Hello<|im_end|>", "world<|im_end|>", "Hello<|im_end|>"]


async def test_callable_replies_see_the_prompt_and_call_index(qwen3):
    seen = []

    def reply(context):
        seen.append((context.input_ids, context.call_index, context.rid))
        return ScriptedReply("Hello world", stop_on_eos=False)

    engine = ScriptedEngine(qwen3, reply)
    gen = await engine.generate([7, 8], SamplingParams(), rid="r1")
    await engine.generate([9], SamplingParams())
    assert seen == [([7, 8], 0, "r1"), ([9], 1, None)]
    # without an end-of-turn a real model would keep going until the limit
    assert (gen.output_ids, gen.finish_reason, gen.matched_stop) == (HELLO_WORLD, "length", None)


async def test_max_new_tokens_truncates_and_length_wins_on_the_last_token(qwen3):
    engine = ScriptedEngine(qwen3, ["Hello world"])
    short = await engine.generate([1], SamplingParams(max_new_tokens=1))
    assert (short.output_ids, short.finish_reason) == ([9707], "length")
    # the end-of-turn lands exactly on the limit: SGLang checks the length first
    exact = await engine.generate([1], SamplingParams(max_new_tokens=3))
    assert (exact.output_ids, exact.finish_reason, exact.matched_stop) == ([*HELLO_WORLD, IM_END], "length", None)


async def test_stop_string_cuts_at_the_first_token_that_completes_it(qwen3):
    engine = ScriptedEngine(qwen3, [ANSWER])
    gen = await engine.generate([1], SamplingParams(stop=["42", "Done"]))
    full = qwen3.encode(ANSWER, add_special_tokens=False)
    assert gen.output_ids == full[: len(gen.output_ids)]
    assert gen.output_ids[-3:] == [220, 19, 17]  # " ", "4", "2": the stop text stays (no_stop_trim)
    assert qwen3.decode(gen.output_ids).endswith("42")
    assert (gen.finish_reason, gen.matched_stop) == ("stop", "42")


async def test_stop_token_ids_cut_after_the_token(qwen3):
    engine = ScriptedEngine(qwen3, [ANSWER])
    gen = await engine.generate([1], SamplingParams(stop_token_ids=[13]))  # "."
    assert gen.output_ids == qwen3.encode("The answer is 42.", add_special_tokens=False)
    assert (gen.finish_reason, gen.matched_stop) == ("stop", 13)


async def test_llama3_reply_ends_with_eot(qwen3):
    from miles_envs.tokenizers import load_tokenizer

    engine = ScriptedEngine(load_tokenizer("llama3"), ["Hello world"])
    gen = await engine.generate([128000], SamplingParams())
    assert gen.output_ids == [9906, 1917, 128009]


def test_synthetic_routing_rows_are_distinct_experts_with_zero_dense_layers():
    routing = SyntheticRouting(num_layers=4, topk=3, num_experts=16, dense_layers=(0,))
    rows = routing.rows(np.array([5, 6, 7]), np.array([0, 1, 2]))
    assert rows.shape == (3, 4, 3) and rows.dtype == np.int32
    assert not rows[:, 0].any()
    moe = rows[:, 1:]
    assert moe.min() >= 0 and moe.max() < 16
    assert all(len(set(r)) == 3 for r in moe.reshape(-1, 3).tolist())
    with pytest.raises(ValueError, match="topk"):
        SyntheticRouting(num_layers=1, topk=9, num_experts=8)


async def test_routing_rows_cover_processed_tokens_from_the_start(qwen3):
    routing = SyntheticRouting(num_layers=2, topk=2, num_experts=8)
    engine = ScriptedEngine(qwen3, ["Hello world"], routing=routing)
    prompt = [11, 12, 13, 14]
    gen = await engine.generate(prompt, SamplingParams(), return_routed_experts=True, routed_experts_start=1)
    processed = prompt + gen.output_ids[:-1]
    expected = routing.rows(np.array(processed[1:]), np.arange(1, len(processed)))
    np.testing.assert_array_equal(gen.routed_experts, expected)
    assert gen.routed_experts.shape == (len(prompt) + 3 - 1 - 1, 2, 2)
    plain = await engine.generate(prompt, SamplingParams())
    assert plain.routed_experts is None
    with pytest.raises(ValueError, match="routed_experts_start"):
        await engine.generate(prompt, SamplingParams(), return_routed_experts=True, routed_experts_start=5)


async def test_spec_counters_and_weight_version(qwen3):
    engine = ScriptedEngine(qwen3, ["Hello world"], spec_draft_tokens=2, weight_version="v0")
    gen = await engine.generate([1], SamplingParams())
    assert (gen.spec.verify_ct, gen.spec.accepted_tokens, gen.spec.draft_tokens) == (1, 2, 2)
    assert gen.weight_version == "v0"
    await engine.update_weights("/ckpt/step-3", version="v3")
    assert (await engine.generate([1], SamplingParams())).weight_version == "v3"


async def test_paced_generation_reports_version_spans_and_aborts_with_its_partial_output(qwen3):
    import asyncio

    engine = ScriptedEngine(qwen3, [ANSWER], weight_version="step-0", token_delay_s=0.001)
    full = qwen3.encode(ANSWER, add_special_tokens=False) + [IM_END]

    async def when_sampled(n):
        while engine.progress().get("r1", 0) < n:
            await asyncio.sleep(0)

    async def update_after_two():
        await when_sampled(2)
        await engine.update_weights("/ckpt", version="step-1")

    gen, _ = await asyncio.gather(engine.generate([1, 2], SamplingParams(), rid="r1"), update_after_two())
    assert gen.output_ids == full and gen.finish_reason == "stop"
    assert gen.version_spans == [(0, "step-0"), (2, "step-1")] and gen.weight_version == "step-1"

    async def abort_after_three():
        await when_sampled(3)
        await engine.abort("r1")

    partial, _ = await asyncio.gather(engine.generate([7], SamplingParams(), rid="r1"), abort_after_three())
    assert (partial.output_ids, partial.finish_reason) == (full[:3], "abort")
    assert partial.logprobs == [synthetic_logprob(t, 1 + i) for i, t in enumerate(full[:3])]
    # resubmitted from the kept stream, the reply goes on where it stopped
    rest = await engine.generate([7, *full[:3]], SamplingParams())
    assert rest.output_ids == full[3:] and rest.finish_reason == "stop"
