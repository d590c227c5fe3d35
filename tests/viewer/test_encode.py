import base64
import json

import numpy as np

from miles_envs.viewer.encode import SUMMARY_COLUMNS, TokenTexts, episode_detail, model_spans, summary_row, to_script_json
from miles_envs.viewer.tool_spans import tool_call_spans

from .conftest import failed_episode, tool_episode, truncated_episode


def test_tool_call_span_covers_exactly_the_marked_tokens(qwen3):
    trajectory = tool_episode(qwen3)
    detail = episode_detail(trajectory, TokenTexts(qwen3), include_routing=True)
    [(start, end)] = detail["tool_spans"]
    tokens = trajectory.tokens
    assert tokens[start] == 151657  # <tool_call>
    assert tokens[end - 1] == 151658  # </tool_call>
    assert tokens[end] == 151645  # <|im_end|> stays outside the call
    assert start == len(trajectory.prompt_ids)


def test_tool_call_markers_in_prompt_tokens_are_not_spans(qwen3):
    trajectory = tool_episode(qwen3)
    texts = TokenTexts(qwen3).texts(trajectory.tokens)
    assert tool_call_spans(texts, 0, len(trajectory.prompt_ids)) == []


def test_unclosed_tool_call_runs_to_end_of_turn():
    texts = ["Sure", "<tool_call>", '{"name"', ': "x"']
    assert tool_call_spans(texts, 0, 4) == [(1, 4)]
    assert tool_call_spans(["<|python_tag|>", "f(", ")", "<|eom_id|>"], 0, 4) == [(0, 4)]


def test_detail_keeps_model_logprobs_only_and_mask_as_text(qwen3):
    trajectory = tool_episode(qwen3)
    detail = episode_detail(trajectory, None, include_routing=True)
    assert detail["mask"] == "".join(map(str, trajectory.loss_mask))
    assert detail["logprobs"] == [-0.6931] * trajectory.num_model_tokens
    assert detail["tool_spans"] == []  # token text is needed to find calls


def test_routing_round_trips_as_little_endian_bytes(qwen3):
    trajectory = tool_episode(qwen3)
    payload = episode_detail(trajectory, None, include_routing=True)["routing"]
    decoded = np.frombuffer(base64.b64decode(payload["b64"]), dtype=np.uint8).reshape(payload["shape"])
    assert payload["type"] == "Uint8Array"
    np.testing.assert_array_equal(decoded, trajectory.routed_experts)
    assert episode_detail(trajectory, None, include_routing=False)["routing"] == {"shape": payload["shape"]}


def test_wide_routing_dtype_falls_back_to_int32():
    trajectory = failed_episode()
    trajectory.routed_experts = np.arange(4, dtype=">i8").reshape(4, 1, 1)
    payload = episode_detail(trajectory, None, include_routing=True)["routing"]
    assert payload["type"] == "Int32Array"
    assert np.frombuffer(base64.b64decode(payload["b64"]), dtype="<i4").tolist() == [0, 1, 2, 3]


def test_script_json_is_ascii_without_closing_tags_and_keeps_non_finite():
    text = to_script_json({"content": "</script><b>é", "logprobs": [-1.0, float("-inf")], "r": float("nan")})
    assert text.isascii() and "<" not in text
    assert json.loads(text) == {"content": "</script><b>é", "logprobs": [-1.0, "-Infinity"], "r": "NaN"}


def test_summary_row_truncates_long_errors():
    trajectory = failed_episode()
    trajectory.error = "x" * 1000
    row = dict(zip(SUMMARY_COLUMNS, summary_row(trajectory)))
    assert row["status"] == "failed" and len(row["error"]) == 301


def test_model_spans_without_turns_are_runs_of_mask():
    trajectory = truncated_episode()
    trajectory.response_ids, trajectory.loss_mask = [1, 2, 3, 4, 5], [1, 1, 0, 1, 0]
    assert model_spans(trajectory) == [(0, 2), (3, 4)]
