"""The CPU-checkable parts of the GPU checks (bench/gpu): corpus, statistics, summaries, table rows."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

GPU_DIR = Path(__file__).resolve().parents[2] / "bench" / "gpu"
sys.path.insert(0, str(GPU_DIR))

import common  # noqa: E402
import corpus  # noqa: E402
import mtp_sft_rl  # noqa: E402
import toolrl  # noqa: E402

from miles_envs.benchrun import gpu_mtp_sft_measures, gpu_r3_measures, gpu_spec_measures  # noqa: E402
from miles_envs.envs.guess_number import GuessNumberEnv  # noqa: E402
from miles_envs.tokenizers import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("qwen3")


def test_corpus_is_deterministic_in_its_seed(tokenizer):
    first = corpus.documents(40, 7, tokenizer)
    assert first == corpus.documents(40, 7, tokenizer)
    assert first != corpus.documents(40, 8, tokenizer)


def test_guess_episodes_are_real_games_that_end():
    import random

    for seed in range(20):
        messages, tools = corpus.guess_episode(random.Random(seed))
        assert tools is None
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert 1 <= len(replies) <= GuessNumberEnv().max_guesses
        assert "Correct!" in messages[-1]["content"] or "Out of guesses" in messages[-1]["content"]


def test_conversations_render_as_mid_conversation_turns(tokenizer):
    import random

    messages, tools = corpus.calc_episode(random.Random(0))
    text = corpus.render(tokenizer, messages, tools)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n")
    assert "<think>" not in text  # the loop's stream has no empty think block on the last turn
    assert '"name": "calculator"' in text and "<tool_response>" in text
    answer = messages[-1]["content"]
    assert text.endswith(f"<|im_start|>assistant\n{answer}<|im_end|>\n")


def test_token_stream_joins_documents_with_end_of_text(tokenizer):
    stream = corpus.token_stream("qwen3", 12, 3, chunk=5)
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert stream.count(separator) == 12 and stream[-1] == separator
    assert stream == corpus.token_stream("qwen3", 12, 3, chunk=5)


def test_mean_ci_uses_the_t_quantile():
    stats = common.mean_ci([1.0, 2.0, 3.0])
    assert stats["mean"] == 2.0
    assert stats["se"] == pytest.approx(1 / math.sqrt(3))
    assert stats["ci95"] == pytest.approx([2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)])


def test_ratio_ci_is_a_geometric_mean_of_paired_ratios():
    stats = common.ratio_ci([4.0, 9.0], [1.0, 1.0])
    assert stats["ratio"] == pytest.approx(6.0)
    assert stats["values"] == [4.0, 9.0]
    assert stats["ci95"][0] < 6.0 < stats["ci95"][1]


def _run(seed: int, with_sft: bool, rates: list[float]) -> dict:
    return {"seed": seed, "mtp_sft": with_sft,
            "steps": [{"accept_rate": r, "accept_length": 1 + 2 * r, "reward": 0.1} for r in rates]}


def test_mtp_summary_pairs_seeds_and_skips_failed_arms():
    runs = [_run(0, True, [0.8, 0.8, 0.8, 0.8]), _run(0, False, [0.8, 0.8, 0.7, 0.7]),
            _run(1, True, [0.9, 0.9, 0.9, 0.9]), _run(1, False, [0.9, 0.9, 0.7, 0.7]),
            _run(2, True, [0.5, 0.5, 0.5, 0.5]), {"seed": 2, "mtp_sft": False, "steps": [], "error": "OOM"}]
    summary = mtp_sft_rl.summarize(runs, window=2)
    assert summary["steps_compared"] == 4
    assert summary["with_mtp_sft"]["accept_rate"]["change"]["values"] == [0.0, 0.0]
    assert summary["without_mtp_sft"]["accept_rate"]["change"]["values"] == pytest.approx([-0.1, -0.2])
    assert summary["accept_change_gap_with_minus_without"]["mean"] == pytest.approx(0.15)


def test_mtp_summary_without_a_complete_seed_says_so():
    summary = mtp_sft_rl.summarize([_run(0, True, [0.8]), {"seed": 0, "mtp_sft": False, "steps": [], "error": "x"}], 2)
    assert summary["steps_compared"] == 0 and "no seed" in summary["error"]


MACHINE = {"card": "NVIDIA H200", "torch": "2.11.0", "transformers": "5.24.0", "megatron_core": None}


def r3_summary(tokens: list[int]) -> dict:
    """An R3 summary whose bf16 interval reaches below 1 and whose fp32 interval does not."""
    def arm(k3):
        return {m: {"mean": v, "ci95": [v, v]} for m, v in
                {"k3_kl": k3, "extreme_frac": 0.0, "mean_abs_delta": 0.01, "router_disagreement": 0.01}.items()}

    summary = {"response_tokens_per_seed": tokens}
    for precision, (ratio, low) in {"bf16": (4.0, 0.5), "fp32": (4.0, 1.5)}.items():
        summary[f"{precision}_without_r3"], summary[f"{precision}_with_r3"] = arm(4e-4), arm(1e-4)
        summary[f"{precision}_k3_kl_reduction"] = {"ratio": ratio, "ci95": [low, 9.0], "n": len(tokens)}
    return summary


def test_r3_row_needs_the_interval_above_one():
    measures = gpu_r3_measures({"machine": MACHINE, "summary": r3_summary([9000, 8500, 8200])})
    assert [m.met for m in measures] == [False, True]
    assert "NVIDIA H200, torch 2.11.0, transformers 5.24.0, megatron-core not used" in measures[0].note
    assert "8200–9000 response tokens each" in measures[0].note


def test_spec_row_needs_the_interval_above_one():
    def row(ratio, low):
        stats = {"mean": 1.0, "ci95": [0.9, 1.1]}
        return {"temperature": 0.0, "concurrency": 8, "draft_tokens": 2, "speedup": {"ratio": ratio, "ci95": [low, 2.0], "n": 3},
                "accept_rate": stats, "plain_tok_s": stats, "spec_tok_s": stats}

    measures = gpu_spec_measures({"machine": MACHINE, "rows": [row(1.5, 0.8), row(1.5, 1.2), row(1.2, 1.1)]})
    assert [m.met for m in measures] == [False, True, False]


def test_mtp_sft_rows_report_the_gap_in_standard_errors():
    def change(mean, se):
        return {"change": {"mean": mean, "se": se, "ci95": [mean - 3 * se, mean + 3 * se], "values": [mean - se, mean + se]}}

    wide = gpu_mtp_sft_measures({"machine": MACHINE, "summary": {
        "steps_compared": 50, "with_mtp_sft": {"accept_rate": change(-0.01, 0.05)},
        "without_mtp_sft": {"accept_rate": change(-0.05, 0.005)}, "accept_change_gap_with_minus_without": None}})[0]
    assert wide.value == pytest.approx(-1.0) and not wide.met  # a mean inside ±2 with seeds far apart is not shown

    summary = {"steps_compared": 50, "with_mtp_sft": {"accept_rate": change(-0.01, 0.002)},
               "without_mtp_sft": {"accept_rate": change(-0.05, 0.005)},
               "accept_change_gap_with_minus_without": {"mean": 0.04, "se": 0.01}}
    with_sft, without, gap = gpu_mtp_sft_measures({"machine": MACHINE, "summary": summary})
    assert with_sft.value == pytest.approx(-1.0) and with_sft.met
    assert without.value == pytest.approx(-5.0) and without.met is None
    assert gap.value == pytest.approx(4.0) and gap.met

    summary["r3_after_rl"] = r3_summary([300, 500])
    *_, bf16_after, fp32_after = gpu_mtp_sft_measures({"machine": MACHINE, "summary": summary})
    assert bf16_after.name.startswith("R3 after 50+ RL steps") and "over 2 RL arms, 300–500" in bf16_after.note
    assert [bf16_after.met, fp32_after.met] == [False, True]


@pytest.mark.parametrize("env_id", toolrl.ENVS)
async def test_tool_demonstrations_solve_the_env_through_the_real_loop(env_id, tokenizer):
    """The warm start's scripted solver: every call parses, the chain is complete, the answer scores 1."""
    from miles_envs.chat.renderer import ChatRenderer
    from miles_envs.pipeline.demonstrations import collect_demonstrations

    demos = await collect_demonstrations(toolrl.DEMONSTRATED[env_id], ChatRenderer(tokenizer), list(range(12)), max_context=4096)
    stats = toolrl.episode_stats(demos)
    assert stats["reward"] == 1.0 and stats["parse_error_rate"] == 0.0
    calls = [sum(m["role"] == "tool" for m in d.messages) for d in demos]
    if env_id == "miles/ToolCalc-v0":
        assert set(calls) == {1}
    else:  # 3 or 5 dependent lookups, as the question needs
        assert set(calls) <= {3, 5} and len(set(calls)) == 2


def test_toolrl_summary_counts_only_finished_seeds():
    def run(seed, sft, rl):
        per_env = lambda value: {env: {"reward": value} for env in toolrl.ENVS}  # noqa: E731
        return {"seed": seed, "steps": [{}] * 3, "eval": {"pretrained": {"reward": 0.0, "per_env": per_env(0.0)},
                                                           "after_sft": {"reward": sft, "per_env": per_env(sft)},
                                                           "after_rl": {"reward": rl, "per_env": per_env(rl)}}}

    summary = toolrl.summarize([run(0, 0.4, 0.6), run(1, 0.5, 0.6), {"seed": 2, "steps": [], "error": "OOM"}])
    assert summary["seeds_done"] == 2
    assert summary["rl_lift_points"]["values"] == pytest.approx([20.0, 10.0])
    assert summary["eval_after_rl_miles/LookupChain-v0"]["mean"] == pytest.approx(0.6)
