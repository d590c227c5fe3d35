"""On a GPU: the device token dispatcher in bf16 against megatron's alltoall one, and the host's reads
of device values in a whole training step."""

import dataclasses

import pytest

from tests.gpu.marks import GPU, torch

pytestmark = GPU
pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'miles-envs[megatron]')")

DATA = [([1, 2, 3], [4, 5, 6, 7]), ([9, 8, 2], [7, 6, 5, 4, 3]), ([5, 5, 5], [1, 2, 3])]


def _moe_layer(config, settings):
    from miles_envs.trainer.megatron.model import build_gpt_model

    torch.manual_seed(0)
    return next(m for m in build_gpt_model(config, settings).modules() if hasattr(m, "token_dispatcher"))


def test_device_dispatch_equals_alltoall_in_bf16_and_reads_nothing_back():
    from miles_envs.trainer.megatron.dispatch import DeviceTokenDispatcher
    from miles_envs.trainer.megatron.host_reads import count_host_reads
    from miles_envs.trainer.megatron.model import MegatronSettings
    from miles_envs.trainer.megatron.parallel import ensure_parallel
    from tests.trainer.megatron.models import tiny_qwen3_moe

    settings = MegatronSettings(bf16=True)
    ensure_parallel(settings)
    config, _, _ = tiny_qwen3_moe(mtp=0)
    layers = {name: _moe_layer(config, dataclasses.replace(settings, token_dispatcher=name)) for name in ("device", "alltoall")}
    layers["alltoall"].load_state_dict(layers["device"].state_dict())
    assert type(layers["device"].token_dispatcher) is DeviceTokenDispatcher
    hidden = torch.randn(300, 2, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn_like(hidden)
    results = {}
    for name, layer in layers.items():
        x = hidden.clone().requires_grad_()
        torch.cuda.synchronize()
        with count_host_reads() as reads:
            out, _ = layer(x)
            out.backward(grad_out)
        results[name] = (out.float(), x.grad.float(), {n: p.grad.float() for n, p in layer.named_parameters() if p.grad is not None}, reads.total)
    (out_d, dx_d, grads_d, reads_d), (out_a, dx_a, grads_a, reads_a) = results["device"], results["alltoall"]
    assert reads_d == 0 and reads_a > 0, (reads_d, reads_a)
    # the same GEMMs on the same permuted rows; the combine adds each token's top-k outputs in another order
    torch.testing.assert_close(out_d, out_a, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dx_d, dx_a, atol=2e-2, rtol=2e-2)
    assert grads_d.keys() == grads_a.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_d[name], grads_a[name], atol=5e-2, rtol=2e-2, msg=name)


def test_host_reads_of_a_bf16_step_are_a_few_and_do_not_grow_with_the_layers():
    """The trainer as the CLI builds it (device dispatcher, device-side multi-tensor ops): a step with
    R3 and MTP-SFT reads the device a few times (the metrics), not per layer or per parameter."""
    from miles_envs.trainer.config import TrainerConfig
    from miles_envs.trainer.megatron.backend import MegatronTrainer, hf_state_of
    from miles_envs.trainer.megatron.host_reads import count_host_reads
    from miles_envs.trainer.megatron.model import MegatronSettings
    from tests.trainer.megatron.models import tiny_qwen3_moe
    from tests.trainer.tiny import make_trajectory, rollout_routing

    reads = {}
    for layers in (2, 4):
        config, model, mtp = tiny_qwen3_moe(mtp=1, layers=layers)
        trajectories = [make_trajectory(p, r, reward=float(i), routed=rollout_routing(model, p + r)) for i, (p, r) in enumerate(DATA)]
        trainer = MegatronTrainer(config, hf_state_of(model, mtp), TrainerConfig(device="cuda", dtype="bfloat16", r3=True, mtp_sft=True),
                                  MegatronSettings(bf16=True, routing_replay=True))
        trainer.train_step(trajectories)  # warm-up: optimizer state, allocator
        with count_host_reads() as counter:
            trainer.train_step(trajectories)
        reads[layers] = dict(counter.counts)
    assert reads[2] == reads[4] and sum(reads[2].values()) < 10, reads
