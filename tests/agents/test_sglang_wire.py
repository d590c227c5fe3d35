"""Wire-format parsing: every spelling of the speculative counters and every broken invariant."""

import base64

import numpy as np
import pytest

from miles_envs.agents.sglang_wire import (
    ProtocolError,
    decode_routed_experts,
    parse_generate_response,
    spec_stats_from_meta,
)


def body(**meta):
    base = {
        "finish_reason": {"type": "stop", "matched": 2},
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "output_token_logprobs": [[-0.5, 1, None], [-0.25, 2, None]],
    }
    return {"output_ids": [1, 2], "meta_info": {**base, **meta}}


def parse(payload, start=None, shape=None):
    return parse_generate_response(payload, prompt_len=3, routed_experts_start=start, routing_shape=shape)


@pytest.mark.parametrize(
    "meta",
    [
        {"spec_num_correct_drafts": 5, "spec_num_proposed_drafts": 9},
        {"spec_accepted_drafts": 5, "spec_proposed_drafts": 9},
        {"spec_accept_token_num": 5, "spec_draft_token_num": 9},
        {"completion_tokens": 8, "spec_accept_rate": 5 / 9, "spec_accept_length": 8 / 3},  # rates only
    ],
)
def test_spec_counters_in_every_spelling(meta):
    stats = spec_stats_from_meta({"spec_verify_ct": 3, **meta})
    assert (stats.verify_ct, stats.accepted_tokens, stats.draft_tokens) == (3, 5, 9)


def test_no_speculation_means_no_spec_stats():
    assert spec_stats_from_meta({"spec_verify_ct": 0}) is None
    assert parse(body()).spec is None


def test_parse_a_valid_body():
    gen = parse(body(weight_version=12, cached_tokens=1))
    assert (gen.output_ids, gen.logprobs, gen.finish_reason, gen.matched_stop) == ([1, 2], [-0.5, -0.25], "stop", 2)
    assert (gen.weight_version, gen.cached_tokens, gen.error) == ("12", 1, None)


def test_abort_finish_carries_the_server_message():
    gen = parse(body(finish_reason={"type": "abort", "message": "out of memory"}))
    assert gen.finish_reason == "abort" and gen.error == "out of memory"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"text": "x"}, "no meta_info"),
        (body(completion_tokens=3), "completion_tokens is 3"),
        (body(finish_reason={"type": "exploded"}), "unknown finish_reason"),
        (body(output_token_logprobs=[[None, 1, None], [-0.1, 2, None]]), "null logprob"),
        ({**body(), "output_ids": [1, 3]}, "disagree"),
        (body(output_token_logprobs=None), "return_logprob"),
    ],
)
def test_broken_bodies_raise_protocol_errors(payload, message):
    with pytest.raises(ProtocolError, match=message):
        parse(payload)


def test_routing_must_be_present_and_sized_when_requested():
    rows = np.arange(4 * 2 * 1, dtype=np.int32).reshape(4, 2, 1)
    encoded = base64.b64encode(rows.tobytes()).decode()
    gen = parse(body(routed_experts=encoded), start=0, shape=(2, 1))
    np.testing.assert_array_equal(gen.routed_experts, rows)
    with pytest.raises(ProtocolError, match="--enable-return-routed-experts"):
        parse(body(), start=0, shape=(2, 1))
    with pytest.raises(ProtocolError, match="expected 3 rows"):
        parse(body(routed_experts=encoded), start=1, shape=(2, 1))
    with pytest.raises(ProtocolError, match="no \\(num_layers, topk\\)"):
        parse(body(routed_experts=encoded), start=0)
    with pytest.raises(ProtocolError, match="base64"):
        decode_routed_experts("***", 1, 1, 1)
