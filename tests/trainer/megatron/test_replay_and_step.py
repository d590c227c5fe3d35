"""R3 through RouterReplay fed from the packed layout, and the shared training step on megatron."""

import copy

import numpy as np
import pytest
import torch

from miles_envs.trainer.batch import pack
from miles_envs.trainer.config import TrainerConfig
from miles_envs.trainer.megatron.backend import MegatronTrainer, hf_state_of
from miles_envs.trainer.megatron.model import MegatronSettings
from miles_envs.trainer.torch_backend import Trainer
from tests.trainer.megatron.models import tiny_qwen3_moe
from tests.trainer.megatron.shim import cpu_megatron, cpu_optimizer
from tests.trainer.tiny import make_trajectory, rollout_routing

SETTINGS = MegatronSettings(token_dispatcher="allgather", use_cpu_initialization=True, routing_replay=True)


def _trainer(config, model, mtp, **overrides):
    trainer_config = TrainerConfig(device="cpu", lr=1e-3, tis_cap=None, **overrides)
    return MegatronTrainer(config, hf_state_of(model, mtp), trainer_config, SETTINGS)


def _routing_maps(trainer):
    """Capture each decoder router's routing map ([tokens, experts] bool) per forward."""
    seen = {}
    handles = [
        router.register_forward_hook(lambda _m, _i, out, layer=layer: seen.__setitem__(layer, out[1].detach().clone()))
        for layer, router in trainer.replay.routers
    ]
    return seen, handles


def test_router_replay_uses_exactly_the_trajectory_experts():
    config, model, mtp = tiny_qwen3_moe(mtp=1)
    rng = np.random.default_rng(0)
    prompts, responses = [[1, 2, 3], [7, 7], [4, 9, 2, 5]], [[4, 5, 6, 7], [8, 8, 1], [3, 3]]
    trajectories = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        # arbitrary experts (not what the model would pick), distinct per row, full-layer trace
        routed = np.stack([[rng.choice(8, size=2, replace=False) for _ in range(2)] for _ in range(len(p) + len(r) - 1)])
        trajectories.append(make_trajectory(p, r, routed=None if i == 1 else routed.astype(np.uint8)))
    batches = pack(trajectories, [0.0] * 3, [1.0] * 3, max_row_tokens=9, rows_per_micro_batch=2)
    assert len(batches) == 1 and batches[0].input_ids.shape[0] == 2  # two rows: token order matters
    (batch,) = batches
    with cpu_megatron(), cpu_optimizer():
        trainer = _trainer(config, model, mtp, r3=True)
        seen, handles = _routing_maps(trainer)
        with torch.no_grad():
            replayed = trainer.forward(batch, replay=True)
            replayed_maps = dict(seen)
            live = trainer.forward(batch, replay=False)
            live_maps = dict(seen)
        for h in handles:
            h.remove()
    rows, width = batch.input_ids.shape
    for layer in (0, 1):
        chosen = replayed_maps[layer].view(width, rows, -1).transpose(0, 1)  # megatron order is [T, rows]
        free = live_maps[layer].view(width, rows, -1).transpose(0, 1)
        for r in range(rows):
            for t in range(width):
                experts = batch.routed_experts[r, t, layer]
                if (experts >= 0).all():
                    assert sorted(torch.nonzero(chosen[r, t]).flatten().tolist()) == sorted(experts.tolist())
                else:  # no trace row: the live top-k
                    assert torch.equal(chosen[r, t], free[r, t])
    assert replayed.routing.disagreement > 0.5  # random experts: the live router disagrees
    assert not torch.allclose(replayed.logprobs, live.logprobs)


def test_replaying_the_models_own_routing_changes_nothing():
    config, model, mtp = tiny_qwen3_moe(mtp=1)
    tokens = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5]]
    trajectories = [make_trajectory(t[:3], t[3:], routed=rollout_routing(model, t)) for t in tokens]
    (batch,) = pack(trajectories, [0.0, 0.0], [1.0, 1.0], max_row_tokens=64)
    with cpu_megatron(), cpu_optimizer():
        trainer = _trainer(config, model, mtp, r3=True)
        with torch.no_grad():
            replayed, live = trainer.forward(batch, replay=True), trainer.forward(batch, replay=False)
    assert replayed.routing.disagreement == 0.0 and int(replayed.routing.pairs) == 2 * batch.num_loss_tokens + 2 * 4
    torch.testing.assert_close(replayed.logprobs, live.logprobs, atol=1e-6, rtol=0)


def test_megatron_step_matches_torch_backend_step():
    """Same algorithm code: one GRPO step with R3 gives the torch backend's metrics and weights."""
    config, model, mtp = tiny_qwen3_moe(mtp=1)
    data = [([1, 2, 3], [4, 5, 6, 7]), ([9, 8, 2], [7, 6, 5, 4, 3]), ([5, 5, 5], [1, 2, 3]), ([6, 1], [2, 2, 9])]
    trajectories = [
        make_trajectory(p, r, reward=float(i % 2), routed=rollout_routing(model, p + r)) for i, (p, r) in enumerate(data)
    ]
    settings = dict(r3=True, mtp_sft=False, max_grad_norm=1e9)
    with cpu_megatron(), cpu_optimizer():
        megatron = _trainer(config, model, mtp, **settings)
        reference = Trainer(copy.deepcopy(model), TrainerConfig(device="cpu", lr=1e-3, tis_cap=None, **settings))
        got, want = megatron.train_step(trajectories), reference.train_step(trajectories)
        weights = megatron.state_dict()
    for key in ("pg_loss", "loss", "entropy", "mismatch/k3_kl", "mismatch/router_disagreement", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    # Adam steps of lr=1e-3; float noise only (Adam normalises each gradient: where one is near zero,
    # noise moves its step by up to a few percent of lr)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(weights[key], value, atol=2e-5, rtol=0, msg=key)


def test_mtp_sft_loss_equals_torch_backend_and_trains_the_mtp_layer():
    config, model, mtp = tiny_qwen3_moe(mtp=1)
    trajectories = [make_trajectory([1, 2, 3], [4, 5, 6, 7, 8, 9]), make_trajectory([9, 8], [7, 6, 5, 4])]
    settings = dict(mtp_sft=True, mtp_loss_scale=1.0)
    with cpu_megatron(), cpu_optimizer():
        megatron = _trainer(config, model, mtp, **settings)
        before = {k: v.clone() for k, v in megatron.state_dict().items()}
        reference = Trainer(copy.deepcopy(model), TrainerConfig(device="cpu", lr=1e-3, tis_cap=None, **settings), mtp=copy.deepcopy(mtp))
        got, want = megatron.train_step(trajectories), reference.train_step(trajectories)
        after = megatron.state_dict()
    assert got["mtp/loss"] == pytest.approx(want["mtp/loss"], rel=1e-5)
    assert got["mtp/accuracy"] == want["mtp/accuracy"]
    assert not torch.equal(after["mtp.layers.0.eh_proj.weight"], before["mtp.layers.0.eh_proj.weight"])


def test_r3_needs_routing_replay_in_the_model():
    config, model, mtp = tiny_qwen3_moe(mtp=0)
    with cpu_megatron(), cpu_optimizer(), pytest.raises(ValueError, match="routing_replay=True"):
        MegatronTrainer(config, hf_state_of(model), TrainerConfig(device="cpu", r3=True), MegatronSettings(token_dispatcher="allgather", use_cpu_initialization=True))


def test_megatron_backend_refuses_a_separate_mtp_lr():
    config, model, mtp = tiny_qwen3_moe(mtp=1)
    with cpu_megatron(), cpu_optimizer(), pytest.raises(ValueError, match="leave mtp_lr unset"):
        _trainer(config, model, mtp, mtp_sft=True, mtp_lr=1e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_building_the_trainer_without_cuda_names_the_torch_backend():
    """No parallel state in the process: the trainer sets it up itself, which needs CUDA."""
    from megatron.core import parallel_state

    from miles_envs.trainer.megatron.parallel import MegatronUnavailable

    config, model, mtp = tiny_qwen3_moe(mtp=1)
    assert not parallel_state.model_parallel_is_initialized()
    with pytest.raises(MegatronUnavailable, match="needs a CUDA device.*use the torch backend"):
        MegatronTrainer(config, hf_state_of(model, mtp), TrainerConfig(device="cpu"), SETTINGS)
