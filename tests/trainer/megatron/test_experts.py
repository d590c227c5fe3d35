"""Grouped-GEMM experts: the same parameters and names as megatron's SequentialMLP, the same outputs
and gradients, R3 unchanged."""

import dataclasses

import pytest
import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from miles_envs.trainer.megatron.experts import GroupedMLP
from miles_envs.trainer.megatron.model import MegatronSettings, build_gpt_model
from tests.trainer.megatron.models import replayed_steps, tiny_qwen3_moe
from tests.trainer.megatron.shim import cpu_megatron, cpu_optimizer

CPU = MegatronSettings(token_dispatcher="allgather", use_cpu_initialization=True, routing_replay=True)
DATA = [([1, 2, 3], [4, 5, 6, 7]), ([9, 8, 2], [7, 6, 5, 4, 3]), ([5, 5, 5], [1, 2, 3]), ([6, 1], [2, 2, 9, 11, 12])]


def _experts_of(gpt):
    return [m for m in gpt.modules() if isinstance(m, SequentialMLP)]


def test_grouped_experts_keep_sequential_parameter_names_and_run_grouped():
    config, model, mtp = tiny_qwen3_moe(mtp=1)
    with cpu_megatron():
        grouped = build_gpt_model(config, CPU)
        sequential = build_gpt_model(config, dataclasses.replace(CPU, experts="sequential"))
    assert grouped.state_dict().keys() == sequential.state_dict().keys()
    modules = _experts_of(grouped)
    assert len(modules) == config.num_hidden_layers + 1  # every decoder layer and the MTP layer
    assert all(type(m) is GroupedMLP for m in modules)
    assert all(type(m) is SequentialMLP for m in _experts_of(sequential))
    assert modules[0].runs_grouped(torch.zeros(3, config.hidden_size))


def test_grouped_forward_and_backward_equal_the_per_expert_loop_with_empty_experts():
    config, model, mtp = tiny_qwen3_moe(mtp=0)
    with cpu_megatron():
        experts = _experts_of(build_gpt_model(config, CPU))[0]
        counts = torch.tensor([5, 0, 3, 0, 0, 7, 1, 0])  # host counts, as megatron's dispatchers hand them over
        torch.manual_seed(1)
        hidden = torch.randn(int(counts.sum()), config.hidden_size)
        probs = torch.rand(hidden.shape[0])
        grad_out = torch.randn(hidden.shape[0], config.hidden_size)
        results = []
        for run in (GroupedMLP.forward, SequentialMLP.forward):
            experts.zero_grad(set_to_none=True)
            x, p = hidden.clone().requires_grad_(), probs.clone().requires_grad_()
            out, bias = run(experts, x, counts, p)
            out.backward(grad_out)
            grads = {name: param.grad.clone() for name, param in experts.named_parameters()}
            results.append((out.detach(), bias, x.grad, p.grad, grads))
    (out_g, bias_g, dx_g, dp_g, grads_g), (out_s, bias_s, dx_s, dp_s, grads_s) = results
    assert bias_g is None and bias_s is None
    torch.testing.assert_close(out_g, out_s, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dx_g, dx_s, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dp_g, dp_s, atol=1e-6, rtol=1e-6)
    assert grads_g.keys() == grads_s.keys()
    for name in grads_s:
        torch.testing.assert_close(grads_g[name], grads_s[name], atol=1e-6, rtol=1e-6, msg=name)
    assert torch.count_nonzero(grads_g["local_experts.1.linear_fc1.weight"]) == 0  # no tokens, no gradient


def test_unaligned_expert_width_falls_back_to_the_loop():
    config, model, mtp = tiny_qwen3_moe(mtp=0)
    config.moe_intermediate_size = 22  # fc1 rows 44: not a multiple of 16 bytes of fp32 pairs
    with cpu_megatron():
        experts = _experts_of(build_gpt_model(config, CPU))[0]
    assert not experts.runs_grouped(torch.zeros(3, config.hidden_size))


def test_training_step_with_r3_and_mtp_equals_the_sequential_experts():
    """One GRPO step with R3 replay and MTP-SFT: the same metrics, routing and weights either way."""
    with cpu_megatron(), cpu_optimizer():
        results = replayed_steps({experts: dataclasses.replace(CPU, experts=experts) for experts in ("grouped", "sequential")}, DATA)
    (fwd_g, got, weights_g), (fwd_s, want, weights_s) = results["grouped"], results["sequential"]
    assert fwd_g.routing.disagreement == fwd_s.routing.disagreement == 0.0
    torch.testing.assert_close(fwd_g.logprobs, fwd_s.logprobs, atol=1e-6, rtol=0)
    for key in ("loss", "pg_loss", "entropy", "grad_norm", "mtp/loss", "mismatch/router_disagreement"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    for key, value in weights_s.items():
        torch.testing.assert_close(weights_g[key], value, atol=1e-6, rtol=0, msg=key)


def test_unknown_experts_setting_is_refused():
    config, model, mtp = tiny_qwen3_moe(mtp=0)
    with cpu_megatron(), pytest.raises(ValueError, match="choose one of grouped, sequential"):
        build_gpt_model(config, dataclasses.replace(CPU, experts="fused"))


def test_expert_gradients_go_straight_into_ddps_fp32_buffer_when_there_is_one():
    """Under megatron's DDP every weight has a ``main_grad``: the stacked experts' gradients are added
    there (once per micro-batch, accumulating) and ``.grad`` stays empty; the sums equal the gradients
    the plain path leaves in ``.grad``."""
    config, model, mtp = tiny_qwen3_moe(mtp=0)
    with cpu_megatron():
        experts = _experts_of(build_gpt_model(config, CPU))[0]
        counts = torch.tensor([5, 0, 3, 0, 0, 7, 1, 0])
        torch.manual_seed(1)
        hidden = torch.randn(int(counts.sum()), config.hidden_size)
        probs = torch.rand(hidden.shape[0])
        weights = dict(experts.named_parameters())

        def micro_batch(scale: float):
            out, _ = experts(hidden * scale, counts, probs)
            out.sum().backward()

        for scale in (1.0, 2.0):
            micro_batch(scale)
        want = {name: w.grad.clone() for name, w in weights.items()}
        for w in weights.values():
            w.grad = None
            w.main_grad = torch.zeros_like(w, dtype=torch.float32)
        for scale in (1.0, 2.0):
            micro_batch(scale)
    for name, w in weights.items():
        assert w.grad is None, name
        torch.testing.assert_close(w.main_grad, want[name], atol=1e-6, rtol=1e-6, msg=name)
    assert want["local_experts.0.linear_fc1.weight"].abs().sum() > 0
