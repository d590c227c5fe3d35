"""On a GPU: the grouped-GEMM experts (``grouped_mm``, bf16) against megatron's per-expert loop."""

import pytest

from tests.gpu.marks import GPU, torch

pytestmark = GPU
pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'miles-envs[megatron]')")


def test_grouped_experts_equal_the_per_expert_loop_in_bf16():
    from megatron.core.transformer.moe.experts import SequentialMLP

    from miles_envs.trainer.megatron.experts import GroupedMLP
    from miles_envs.trainer.megatron.model import MegatronSettings, build_gpt_model
    from miles_envs.trainer.megatron.parallel import ensure_parallel
    from tests.trainer.megatron.models import tiny_qwen3_moe

    settings = MegatronSettings(bf16=True)
    ensure_parallel(settings)
    config, _, _ = tiny_qwen3_moe(mtp=0)
    experts = next(m for m in build_gpt_model(config, settings).modules() if isinstance(m, GroupedMLP))
    counts = torch.tensor([40, 0, 13, 0, 0, 77, 1, 128])  # host counts, as megatron's dispatchers hand them over
    torch.manual_seed(0)
    hidden = torch.randn(int(counts.sum()), config.hidden_size, device="cuda", dtype=torch.bfloat16)
    probs = torch.rand(hidden.shape[0], device="cuda")
    grad_out = torch.randn_like(hidden)
    assert experts.runs_grouped(hidden), "an sm90+ card in bf16 runs grouped_mm"
    results = []
    for run in (GroupedMLP.forward, SequentialMLP.forward):
        experts.zero_grad(set_to_none=True)
        x = hidden.clone().requires_grad_()
        out, _ = run(experts, x, counts, probs)
        out.backward(grad_out)
        results.append((out.float(), x.grad.float(), {n: p.grad.float() for n, p in experts.named_parameters()}))
    (out_g, dx_g, grads_g), (out_s, dx_s, grads_s) = results
    # bf16 GEMMs with different tilings: rounding differences only
    torch.testing.assert_close(out_g, out_s, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dx_g, dx_s, atol=2e-2, rtol=2e-2)
    for name in grads_s:
        torch.testing.assert_close(grads_g[name], grads_s[name], atol=5e-2, rtol=2e-2, msg=name)
    assert torch.count_nonzero(grads_g["local_experts.1.linear_fc1.weight"]) == 0
