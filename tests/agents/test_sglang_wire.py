"""Wire-format parsing: every spelling of the speculative counters and every broken invariant."""

import base64
import json

import numpy as np
import orjson
import pytest

from miles_envs.agents.sglang_wire import (
    ProtocolError,
    decode_routed_experts,
    encode_generate_request,
    generate_request,
    ids_json,
    load_generate_body,
    parse_generate_response,
    spec_stats_from_meta,
)
from miles_envs.engine import SamplingParams
from miles_envs.token_ids import TokenIds


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


# ----------------------------------------------------------------------------- raw bodies and request chunks


ROWS = np.arange(2 * 3 * 2, dtype=np.int32).reshape(2, 3, 2)


def routed_body(**extra):
    return body(routed_experts=base64.b64encode(ROWS.tobytes()).decode(), **extra)


@pytest.mark.parametrize(
    "raw",
    [
        orjson.dumps(routed_body()),
        json.dumps(routed_body()).encode(),  # ": " separators, as Python's json writes them
        json.dumps(routed_body(), indent=2).encode(),
        orjson.dumps({"note": {"routed_experts": "AAAA"}, **routed_body()}),  # the key twice: the cut must find the right one
        orjson.dumps({"text": '"routed_experts":"x', **routed_body()}),  # the key's text inside a string
    ],
)
def test_routing_cut_from_the_raw_body_parses_like_the_whole_body(raw):
    fast = parse(load_generate_body(raw), start=2, shape=(3, 2))  # rows: 3 prompt + 2 output - 1 - 2
    whole = parse(orjson.loads(raw), start=2, shape=(3, 2))
    assert fast.output_ids == whole.output_ids == [1, 2]
    np.testing.assert_array_equal(fast.routed_experts, ROWS)
    np.testing.assert_array_equal(whole.routed_experts, ROWS)
    assert fast.routed_experts.flags.writeable


@pytest.mark.parametrize(
    "meta",
    [{"routed_experts": None}, {"routed_experts": "AAAA\\/AAA"}, {}],
)
def test_bodies_the_cut_cannot_take_are_parsed_whole(meta):
    raw = orjson.dumps(body(**meta)).replace(b"\\\\/", b"\\/")
    assert load_generate_body(raw) == orjson.loads(raw)


def test_broken_routing_payload_is_a_protocol_error():
    raw = orjson.dumps(body(routed_experts="not base64!"))
    with pytest.raises(ProtocolError, match="not valid base64"):
        parse(load_generate_body(raw), start=2, shape=(3, 2))


def test_request_chunks_are_the_json_of_the_request():
    ids = TokenIds([151644, 8948, 198])
    sampling = SamplingParams(max_new_tokens=7, stop_token_ids=[2])
    for turn in range(4):
        chunks = encode_generate_request(ids, sampling, max_new_tokens=7, return_routed_experts=True, rid=f"r{turn}")
        assert orjson.loads(b"".join(chunks)) == generate_request(
            list(ids), sampling, max_new_tokens=7, return_routed_experts=True, rid=f"r{turn}"
        )
        ids.extend(range(turn * 3))


@pytest.mark.parametrize(
    "edit",
    [
        lambda ids: ids.__setitem__(0, 9),
        lambda ids: ids.__setitem__(slice(1, 3), [7]),
        lambda ids: ids.__delitem__(-1),
        lambda ids: ids.insert(0, 5),
        lambda ids: ids.pop(),
        lambda ids: ids.remove(2),
        lambda ids: ids.sort(reverse=True),
        lambda ids: ids.reverse(),
        lambda ids: ids.clear(),
        lambda ids: ids.__imul__(2),
    ],
)
def test_an_edited_stream_is_encoded_afresh(edit):
    ids = TokenIds([1, 2, 3, 4])
    assert b"".join(ids_json(ids)) == b"[1,2,3,4]"
    ids.append(6)
    assert b"".join(ids_json(ids)) == b"[1,2,3,4,6]"
    edit(ids)
    ids.extend([8])  # an edit followed by growth: the old prefix must not be reused
    assert b"".join(ids_json(ids)) == orjson.dumps(list(ids))


def test_plain_lists_and_empty_streams_encode_whole():
    assert b"".join(ids_json([1, 2])) == b"[1,2]"
    empty = TokenIds()
    assert b"".join(ids_json(empty)) == b"[]"
    empty.extend([3])
    assert b"".join(ids_json(empty)) == b"[3]"


def test_token_ids_count_only_edits_that_can_change_a_prefix():
    ids = TokenIds([1, 2])
    ids.append(3)
    ids.extend([4, 5])
    ids += [6]
    assert (ids, ids.edits) == ([1, 2, 3, 4, 5, 6], 0)
    ids[0] = 7
    ids.sort()
    assert ids.edits == 2
