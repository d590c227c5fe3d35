"""The megatron step with the chunked vocabulary head equals the step with megatron's output layer."""

import dataclasses

import pytest
import torch

from miles_envs.trainer.batch import pack
from miles_envs.trainer.config import TrainerConfig
from miles_envs.trainer.megatron.backend import MegatronTrainer, hf_state_of
from miles_envs.trainer.megatron.model import MegatronSettings
from tests.trainer.megatron.models import tiny_qwen3_moe
from tests.trainer.megatron.shim import cpu_megatron, cpu_optimizer
from tests.trainer.tiny import make_trajectory, rollout_routing

CPU = MegatronSettings(token_dispatcher="allgather", use_cpu_initialization=True, routing_replay=True, head_chunk_tokens=7)
DATA = [([1, 2, 3], [4, 5, 6, 7]), ([9, 8, 2], [7, 6, 5, 4, 3]), ([5, 5, 5], [1, 2, 3]), ([6, 1], [2, 2, 9, 11, 12])]
METRICS = ("pg_loss", "entropy", "grad_norm", "mtp/loss", "mtp/accuracy", "mismatch/router_disagreement")


@pytest.mark.parametrize("tie", [False, True])
def test_step_with_r3_mtp_and_entropy_equals_the_unfused_head(tie):
    """Two micro-batches, chunks of 7 tokens across sequence ends, an entropy bonus (its gradient
    goes through the head), MTP-SFT: the same forward, metrics and updated weights either way."""
    config, model, mtp = tiny_qwen3_moe(mtp=1, tie=tie)
    trajectories = [
        make_trajectory(p, r, reward=float(i % 2), routed=rollout_routing(model, p + r)) for i, (p, r) in enumerate(DATA)
    ]
    (first, _) = pack(trajectories, [0.0] * len(DATA), [1.0] * len(DATA), max_row_tokens=16, rows_per_micro_batch=1)[:2]
    results = {}
    with cpu_megatron(), cpu_optimizer():
        for head in ("fused", "unfused"):
            trainer = MegatronTrainer(
                config,
                hf_state_of(model, mtp),
                TrainerConfig(device="cpu", lr=1e-3, tis_cap=None, r3=True, mtp_sft=True, entropy_coef=0.01,
                              max_row_tokens=16, rows_per_micro_batch=1),
                dataclasses.replace(CPU, vocab_head=head),
            )
            assert trainer.fused_head == (head == "fused")
            with torch.no_grad():
                forward = trainer.forward(first, replay=True)
            metrics = trainer.train_step(trajectories)
            results[head] = (forward, metrics, trainer.state_dict())
    (fwd_f, got, weights_f), (fwd_u, want, weights_u) = results["fused"], results["unfused"]
    loss_tokens = first.loss_mask.bool()  # the fused head runs only there (zero elsewhere)
    assert 0 < int(loss_tokens.sum()) < loss_tokens.numel()
    torch.testing.assert_close(fwd_f.logprobs[loss_tokens], fwd_u.logprobs[loss_tokens], atol=1e-5, rtol=0)
    torch.testing.assert_close(fwd_f.entropy[loss_tokens], fwd_u.entropy[loss_tokens], atol=1e-5, rtol=0)
    assert not fwd_f.logprobs[~loss_tokens].any()
    assert got["mtp/loss"] > 0 and got["entropy"] > 0
    for key in METRICS:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    # "loss" now holds the MTP term as the torch backend's does; megatron's own MTP loss sat outside it
    assert got["loss"] == pytest.approx(want["loss"] + CPU.mtp_loss_scale * want["mtp/loss"], rel=1e-5, abs=1e-6)
    for key, value in weights_u.items():  # Adam moves every weight by about lr (1e-3): within 1% of that
        torch.testing.assert_close(weights_f[key], value, atol=1e-5, rtol=0, msg=key)


def test_unknown_vocab_head_setting_is_refused():
    config, model, mtp = tiny_qwen3_moe(mtp=0)
    with cpu_megatron(), cpu_optimizer(), pytest.raises(ValueError, match="choose 'fused'"):
        MegatronTrainer(config, hf_state_of(model), TrainerConfig(device="cpu"), dataclasses.replace(CPU, vocab_head="chunked"))
