"""On a GPU: the real stack (NCCL, Float16Module bf16, DDP + distributed optimizer, RouterReplay)."""

import pytest
import torch

from miles_envs.trainer.config import TrainerConfig
from miles_envs.trainer.megatron.backend import MegatronTrainer, hf_state_of
from miles_envs.trainer.megatron.model import MegatronSettings
from tests.trainer.megatron.models import tiny_qwen3_moe
from tests.trainer.tiny import make_trajectory, rollout_routing

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_trainer_step_with_r3_and_mtp_on_gpu():
    from miles_envs.trainer.megatron.parallel import init_parallel

    settings = MegatronSettings(bf16=True, routing_replay=True)
    init_parallel(settings)
    config, model, mtp = tiny_qwen3_moe(mtp=1)
    data = [([1, 2, 3], [4, 5, 6, 7]), ([9, 8, 2], [7, 6, 5, 4, 3]), ([5, 5, 5], [1, 2, 3])]
    trajectories = [make_trajectory(p, r, reward=float(i), routed=rollout_routing(model, p + r)) for i, (p, r) in enumerate(data)]
    trainer = MegatronTrainer(
        config, hf_state_of(model, mtp), TrainerConfig(device="cuda", dtype="bfloat16", r3=True, mtp_sft=True, lr=1e-3), settings
    )
    before = {k: v.float().cpu().clone() for k, v in trainer.state_dict().items()}
    metrics = [trainer.train_step(trajectories) for _ in range(3)]
    after = trainer.state_dict()
    assert metrics[0]["mismatch/router_disagreement"] < 0.2  # bf16 trainer vs fp32 rollout
    assert all(torch.isfinite(torch.tensor(m["grad_norm"])) for m in metrics)
    assert metrics[-1]["mtp/loss"] < metrics[0]["mtp/loss"]
    assert not torch.equal(after["mtp.layers.0.eh_proj.weight"].float().cpu(), before["mtp.layers.0.eh_proj.weight"])
    assert set(after) == set(before)
