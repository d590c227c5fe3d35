import math

import pytest
import torch

from miles_envs.trainer.losses import (
    PolicyLossInput,
    aggregation_coefficients,
    gspo,
    k3_kl,
    ppo_clip,
    token_logprobs_and_entropy,
    truncated_importance_weights,
)


def loss_input(log_ratio, advantages, *, mask=None, seq_index=None, eps_low=0.2, eps_high=0.28):
    old = torch.full((len(log_ratio),), -1.0)
    logprobs = (old + torch.tensor(log_ratio)).requires_grad_(True)
    n = len(log_ratio)
    seq_index = torch.tensor(seq_index) if seq_index is not None else torch.zeros(n, dtype=torch.long)
    return PolicyLossInput(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=torch.tensor(advantages),
        loss_mask=torch.tensor(mask if mask is not None else [1.0] * n),
        seq_index=seq_index,
        num_sequences=int(seq_index.max()) + 1,
        eps_low=eps_low,
        eps_high=eps_high,
    )


def test_ppo_clip_asymmetric_values_clipfrac_and_gradients():
    # ratios 1.5, 0.5, 0.5, 1.2 with advantages +1, +1, -1, -1 and range [0.8, 1.28]
    batch = loss_input([math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.2)], [1.0, 1.0, -1.0, -1.0])
    loss, stats = ppo_clip(batch)
    assert loss.tolist() == pytest.approx([-1.28, -0.5, 0.8, 1.2], abs=1e-6)
    assert float(stats["clipfrac"]) == pytest.approx(0.5)
    loss.sum().backward()
    # clipped tokens carry no gradient; the others get d(-A * ratio)/dlogp = -A * ratio
    assert batch.logprobs.grad.tolist() == pytest.approx([0.0, -0.5, 0.0, 1.2], abs=1e-6)


def test_ppo_clip_high_side_uses_eps_high_not_eps_low():
    batch = loss_input([math.log(1.25)], [1.0], eps_low=0.2, eps_high=0.28)
    assert ppo_clip(batch)[0].tolist() == pytest.approx([-1.25])  # inside 1 + 0.28, not clipped at 1.2


def test_gspo_uses_the_sequence_ratio_and_its_gradient():
    # seq 0: log ratios ln2, 0 (+ a masked token) -> s0 = sqrt(2); seq 1: ln 0.9 -> s1 = 0.9
    batch = loss_input(
        [math.log(2.0), 0.0, 5.0, math.log(0.9)],
        [1.0, 1.0, 1.0, -2.0],
        mask=[1.0, 1.0, 0.0, 1.0],
        seq_index=[0, 0, 0, 1],
        eps_low=0.5,
        eps_high=0.5,
    )
    loss, _ = gspo(batch)
    assert loss[[0, 1, 3]].tolist() == pytest.approx([-math.sqrt(2), -math.sqrt(2), 1.8], abs=1e-6)
    # per-sequence mean over model tokens, then mean over the 2 sequences
    coef = torch.tensor([0.25, 0.25, 0.0, 0.5])
    (loss * coef * batch.loss_mask).sum().backward()
    # sequence-level objective: -(A0 * s0 + A1 * s1) / 2, with ds_i/dlogp_t = s_i / |y_i|
    expected = [-math.sqrt(2) / 2 / 2, -math.sqrt(2) / 2 / 2, 0.0, 2.0 * 0.9 / 1 / 2]
    assert batch.logprobs.grad.tolist() == pytest.approx(expected, abs=1e-6)


def test_gspo_clips_the_whole_sequence():
    batch = loss_input([math.log(1.5), math.log(1.5)], [1.0, 1.0], eps_low=3e-4, eps_high=4e-4)
    loss, stats = gspo(batch)
    assert loss.tolist() == pytest.approx([-1.0004, -1.0004])
    assert float(stats["clipfrac"]) == 1.0


def test_truncated_importance_weights_cap_and_carry_no_gradient():
    old = torch.tensor([-1.0, -2.0], requires_grad=True)
    weights = truncated_importance_weights(old, torch.tensor([-2.0, -1.0]), cap=2.0)
    assert weights.tolist() == pytest.approx([2.0, math.exp(-1.0)])
    assert not weights.requires_grad


def test_k3_kl_hand_value_and_zero_at_equality():
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-1.5])).item() == pytest.approx(math.exp(-0.5) + 0.5 - 1.0)
    assert k3_kl(torch.tensor([-3.0]), torch.tensor([-3.0])).item() == 0.0


def test_logprobs_and_entropy_of_a_uniform_distribution():
    logits = torch.zeros(1, 2, 8)
    logprobs, entropy = token_logprobs_and_entropy(logits, torch.tensor([[3, 5]]))
    assert logprobs.flatten().tolist() == pytest.approx([-math.log(8)] * 2)
    assert entropy.flatten().tolist() == pytest.approx([math.log(8)] * 2)


def test_aggregation_coefficients():
    tokens, weights = [2, 4, 0], [1.0, 0.5, 1.0]
    assert aggregation_coefficients("token_mean", tokens, weights) == pytest.approx([1 / 6, 0.5 / 6, 1 / 6])
    assert aggregation_coefficients("seq_mean_token_mean", tokens, weights) == pytest.approx([1 / 4, 0.5 / 8, 0.0])
    assert aggregation_coefficients("seq_mean_token_sum_norm", tokens, weights, 8) == pytest.approx([1 / 16, 0.5 / 16, 1 / 16])
    assert aggregation_coefficients("seq_mean_token_sum_norm", tokens, weights) == pytest.approx([1 / 8, 0.5 / 8, 1 / 8])
    with pytest.raises(ValueError, match="token_mean"):
        aggregation_coefficients("sum", tokens, weights)
