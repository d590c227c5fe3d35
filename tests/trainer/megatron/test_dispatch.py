"""The device token dispatcher: megatron's outputs and gradients, no data-dependent host read, R3 kept."""

import dataclasses

import pytest
import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher

from miles_envs.trainer.config import TrainerConfig
from miles_envs.trainer.megatron.backend import MegatronTrainer, hf_state_of
from miles_envs.trainer.megatron.dispatch import DeviceTokenDispatcher
from miles_envs.trainer.megatron.host_reads import count_host_reads
from miles_envs.trainer.megatron.model import MegatronSettings, build_gpt_model
from tests.trainer.megatron.models import replayed_steps, tiny_qwen3_moe
from tests.trainer.megatron.shim import cpu_alltoall, cpu_megatron, cpu_optimizer
from tests.trainer.tiny import make_trajectory, rollout_routing

CPU = MegatronSettings(use_cpu_initialization=True, routing_replay=True)
MEGATRON = {"allgather": MoEAllGatherTokenDispatcher, "alltoall": MoEAlltoAllTokenDispatcher}
DATA = [([1, 2, 3], [4, 5, 6, 7]), ([9, 8, 2], [7, 6, 5, 4, 3]), ([5, 5, 5], [1, 2, 3]), ([6, 1], [2, 2, 9, 11, 12])]


def _moe_layers(gpt):
    return [m for m in gpt.modules() if hasattr(m, "token_dispatcher")]


def _layer_run(layer, hidden, grad_out):
    """Output, input gradient and parameter gradients of one MoE layer forward + backward."""
    layer.zero_grad(set_to_none=True)
    x = hidden.clone().requires_grad_()
    out, bias = layer(x)
    assert bias is None
    out.backward(grad_out)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


def test_every_moe_layer_gets_the_device_dispatcher_on_one_rank():
    config, model, mtp = tiny_qwen3_moe(mtp=1)
    with cpu_megatron():
        layers = _moe_layers(build_gpt_model(config, CPU))
        kept = _moe_layers(build_gpt_model(config, dataclasses.replace(CPU, token_dispatcher="allgather")))
    assert len(layers) == config.num_hidden_layers + 1  # the decoder's and the MTP layer's
    assert all(type(layer.token_dispatcher) is DeviceTokenDispatcher for layer in layers)
    assert all(type(layer.token_dispatcher) is MoEAllGatherTokenDispatcher for layer in kept)


@pytest.mark.parametrize("reference", ["alltoall", "allgather"])
@pytest.mark.parametrize("experts", ["grouped", "sequential"])
def test_device_dispatch_equals_megatrons_dispatcher(reference, experts):
    """fp32 on CPU, 37 tokens x top-2 of 8 experts (some experts get none): the same output, input
    gradient and router/expert weight gradients, bit for bit."""
    config, model, mtp = tiny_qwen3_moe(mtp=0)
    runs = {}
    with cpu_megatron(), cpu_alltoall():
        for name in ("device", reference):
            torch.manual_seed(0)
            gpt = build_gpt_model(config, dataclasses.replace(CPU, token_dispatcher=name, experts=experts, routing_replay=False))
            runs[name] = _moe_layers(gpt)[0]
        with torch.no_grad():  # positive inputs, all-negative router rows: experts 1 and 5 get no token
            runs["device"].router.weight[[1, 5]] = -1.0
        runs[reference].load_state_dict(runs["device"].state_dict())
        assert type(runs[reference].token_dispatcher) is MEGATRON[reference]
        torch.manual_seed(1)
        hidden = torch.randn(37, 1, config.hidden_size).abs()
        grad_out = torch.randn_like(hidden)
        out_d, dx_d, grads_d = _layer_run(runs["device"], hidden, grad_out)
        out_m, dx_m, grads_m = _layer_run(runs[reference], hidden, grad_out)
        counts = runs["device"].router(hidden.view(-1, config.hidden_size))[1].sum(0)
    assert counts[[1, 5]].sum() == 0 and int(counts.sum()) == 37 * config.num_experts_per_tok
    torch.testing.assert_close(out_d, out_m, atol=0, rtol=0)
    torch.testing.assert_close(dx_d, dx_m, atol=0, rtol=0)
    assert grads_d.keys() == grads_m.keys() and any("router" in n for n in grads_d)
    for name in grads_m:
        torch.testing.assert_close(grads_d[name], grads_m[name], atol=0, rtol=0, msg=name)


def test_device_dispatch_with_grouped_experts_reads_nothing_back_from_the_device():
    """Forward and backward of an MoE layer: no scalar read, no data-dependent shape (``nonzero``,
    ``masked_select``, boolean indexing), no copy to the host; megatron's allgather dispatcher does."""
    config, model, mtp = tiny_qwen3_moe(mtp=0)
    hidden = torch.randn(29, 2, config.hidden_size)
    reads = {}
    with cpu_megatron():
        for name in ("device", "allgather"):
            layer = _moe_layers(build_gpt_model(config, dataclasses.replace(CPU, token_dispatcher=name)))[0]
            with count_host_reads(include_host_tensors=True) as counter:
                _layer_run(layer, hidden, torch.ones_like(hidden))
            reads[name] = counter.total
    assert reads == {"device": 0, "allgather": reads["allgather"]} and reads["allgather"] > 0


def test_training_step_with_r3_and_mtp_equals_megatrons_dispatcher():
    """One GRPO step with R3 replay (including the MTP layer's live routing) and MTP-SFT: the same
    replayed routing, forward, metrics and weights with the device dispatcher as with megatron's."""
    with cpu_megatron(), cpu_optimizer(), cpu_alltoall():
        results = replayed_steps({name: dataclasses.replace(CPU, token_dispatcher=name) for name in ("device", "alltoall")}, DATA)
    (fwd_d, got, weights_d), (fwd_m, want, weights_m) = results["device"], results["alltoall"]
    assert fwd_d.routing.disagreement == fwd_m.routing.disagreement == 0.0  # the replayed experts are the trace's
    torch.testing.assert_close(fwd_d.logprobs, fwd_m.logprobs, atol=0, rtol=0)
    for key in ("loss", "pg_loss", "entropy", "grad_norm", "mtp/loss", "mtp/accuracy", "mismatch/router_disagreement"):
        assert got[key] == want[key], key
    for key, value in weights_m.items():
        torch.testing.assert_close(weights_d[key], value, atol=0, rtol=0, msg=key)


def test_unknown_dispatcher_is_refused():
    config, model, mtp = tiny_qwen3_moe(mtp=0)
    with cpu_megatron(), pytest.raises(ValueError, match="choose one of device, alltoall, allgather"):
        build_gpt_model(config, dataclasses.replace(CPU, token_dispatcher="flex"))


@pytest.mark.parametrize("dispatcher", ["device", "alltoall"])
def test_host_reads_of_a_training_step_do_not_grow_with_the_moe_layers(dispatcher):
    """A GRPO step with R3 and MTP-SFT on a 2- and a 4-layer model (on CPU every tensor is a host
    tensor, so the counter counts what would be a device read on a GPU): with the device dispatcher
    the count is the same, with megatron's it grows with every MoE layer."""
    reads = {}
    with cpu_megatron(), cpu_optimizer(), cpu_alltoall():
        for layers in (2, 4):
            config, model, mtp = tiny_qwen3_moe(mtp=1, layers=layers)
            trajectories = [make_trajectory(p, r, reward=float(i % 2), routed=rollout_routing(model, p + r))
                            for i, (p, r) in enumerate(DATA)]
            trainer = MegatronTrainer(
                config, hf_state_of(model, mtp), TrainerConfig(device="cpu", lr=1e-3, tis_cap=None, r3=True, mtp_sft=True),
                dataclasses.replace(CPU, token_dispatcher=dispatcher),
            )
            with count_host_reads(include_host_tensors=True) as counter:
                trainer.train_step(trajectories)
            reads[layers] = counter.total
    if dispatcher == "device":
        assert reads[4] == reads[2]
    else:
        assert reads[4] > reads[2]
