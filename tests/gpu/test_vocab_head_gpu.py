"""On a GPU: the chunked vocabulary head in bf16 at the Qwen3 vocabulary against the full logits."""

import pytest

from tests.gpu.marks import GPU, torch

pytestmark = GPU

TOKENS, HIDDEN, VOCAB, CHUNK = 6000, 512, 151_669, 1024


def _reference(hidden, weight, targets):
    from miles_envs.trainer.losses import token_logprobs_and_entropy

    return token_logprobs_and_entropy(hidden @ weight.t(), targets)  # the output layer's bf16 logits, then fp32


def _fused(hidden, weight, targets):
    from miles_envs.trainer.megatron.vocab_head import vocab_head

    out = vocab_head(hidden, weight, targets, chunk_tokens=CHUNK)
    return out.logprobs, out.entropy


def _run(head, hidden, weight, targets, coef):
    """Values, gradients and the peak memory the head added above its inputs."""
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logprobs, entropy = head(hidden, weight, targets)
    ((coef[0] * logprobs).sum() + (coef[1] * entropy).sum()).backward()
    torch.cuda.synchronize()
    return logprobs.detach(), entropy.detach(), hidden.grad.float(), weight.grad.float(), torch.cuda.max_memory_allocated() - base


def test_bf16_head_equals_full_logits_and_never_holds_them():
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=gen) * 0.05).bfloat16()
    targets = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=gen)
    coef = torch.randn(2, TOKENS, device="cuda", generator=gen)
    *got, fused_peak = _run(_fused, hidden, weight, targets, coef)
    *want, reference_peak = _run(_reference, hidden, weight, targets, coef)
    # bf16 logits from GEMMs of other shapes may differ by a bf16 ulp (8e-3 at |logit| 1); fp32 reductions
    for name, g, w in zip(("logprobs", "entropy"), got[:2], want[:2]):
        torch.testing.assert_close(g, w, atol=1e-2, rtol=1e-3, msg=name)
    # the weight's gradient sums bf16 chunk products in fp32 (the reference: one bf16 GEMM)
    for name, g, w in zip(("hidden grad", "weight grad"), got[2:], want[2:]):
        torch.testing.assert_close(g, w, atol=2e-2 * w.abs().max().item(), rtol=2e-2, msg=name)
    full_logits = TOKENS * VOCAB * 4  # one fp32 copy of all logits
    assert fused_peak < full_logits < reference_peak


def test_megatron_bf16_forward_fused_equals_unfused():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'miles-envs[megatron]')")
    from miles_envs.trainer.batch import pack
    from miles_envs.trainer.config import TrainerConfig
    from miles_envs.trainer.megatron.backend import MegatronTrainer, hf_state_of
    from miles_envs.trainer.megatron.model import MegatronSettings
    from tests.trainer.megatron.models import tiny_qwen3_moe
    from tests.trainer.tiny import make_trajectory, rollout_routing

    config, model, mtp = tiny_qwen3_moe(mtp=1)
    data = [([1, 2, 3], [4, 5, 6, 7]), ([9, 8, 2], [7, 6, 5, 4, 3]), ([5, 5, 5], [1, 2, 3])]
    trajectories = [make_trajectory(p, r, reward=float(i), routed=rollout_routing(model, p + r)) for i, (p, r) in enumerate(data)]
    (batch,) = pack(trajectories, [0.0] * 3, [1.0] * 3, max_row_tokens=16, rows_per_micro_batch=4)
    out = {}
    for head in ("fused", "unfused"):
        trainer = MegatronTrainer(
            config, hf_state_of(model, mtp), TrainerConfig(device="cuda", dtype="bfloat16", r3=True, mtp_sft=True),
            MegatronSettings(bf16=True, routing_replay=True, vocab_head=head, head_chunk_tokens=8),
        )
        with torch.no_grad():
            result = trainer.forward(batch, replay=True)
        mask = batch.loss_mask.bool().cuda()
        out[head] = (result.logprobs[mask], result.entropy[mask])
    for got, want in zip(out["fused"], out["unfused"]):  # bf16 logits: up to an ulp apart
        torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-3)
