"""On a GPU: the megatron trainer's real stack (NCCL, Float16Module bf16, DDP + optimizer, RouterReplay)."""

import pytest

from tests.gpu.marks import GPU

pytestmark = GPU
pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'miles-envs[megatron]')")

import torch  # noqa: E402

from miles_envs.trainer.batch import pack  # noqa: E402
from miles_envs.trainer.config import TrainerConfig  # noqa: E402
from miles_envs.trainer.megatron.backend import MegatronTrainer, hf_state_of  # noqa: E402
from miles_envs.trainer.megatron.model import MegatronSettings  # noqa: E402
from tests.trainer.megatron.models import tiny_qwen3_moe  # noqa: E402
from tests.trainer.tiny import make_trajectory, rollout_routing  # noqa: E402

DATA = [([1, 2, 3], [4, 5, 6, 7]), ([9, 8, 2], [7, 6, 5, 4, 3]), ([5, 5, 5], [1, 2, 3])]


def _trajectories(model):
    return [make_trajectory(p, r, reward=float(i), routed=rollout_routing(model, p + r)) for i, (p, r) in enumerate(DATA)]


def test_bf16_trainer_step_with_r3_and_mtp_builds_its_own_parallel_state():
    from megatron.core import parallel_state

    config, model, mtp = tiny_qwen3_moe(mtp=1)
    settings = MegatronSettings(bf16=True, routing_replay=True)
    trainer = MegatronTrainer(
        config, hf_state_of(model, mtp), TrainerConfig(device="cuda", dtype="bfloat16", r3=True, mtp_sft=True, lr=1e-3), settings
    )
    assert parallel_state.model_parallel_is_initialized()
    before = {k: v.float().cpu().clone() for k, v in trainer.state_dict().items()}
    trajectories = _trajectories(model)
    metrics = [trainer.train_step(trajectories) for _ in range(3)]
    after = trainer.state_dict()
    assert metrics[0]["mismatch/router_disagreement"] < 0.2  # bf16 trainer vs fp32 rollout
    assert all(torch.isfinite(torch.tensor(m["grad_norm"])) for m in metrics)
    assert metrics[-1]["mtp/loss"] < metrics[0]["mtp/loss"]
    assert not torch.equal(after["mtp.layers.0.eh_proj.weight"].float().cpu(), before["mtp.layers.0.eh_proj.weight"])
    assert set(after) == set(before)


def test_per_sequence_attention_equals_megatrons_masked_attention_on_gpu():
    """fp32 so the two attention kernels (flash/efficient vs masked softmax) differ only in rounding."""
    config, model, mtp = tiny_qwen3_moe(mtp=1)
    trajectories = _trajectories(model)
    (batch,) = pack(trajectories, [0.0] * 3, [1.0] * 3, max_row_tokens=16, rows_per_micro_batch=4)
    assert batch.input_ids.shape[0] > 1  # several packed rows
    out = {}
    for attention in ("packed", "dense"):
        trainer = MegatronTrainer(
            config, hf_state_of(model, mtp), TrainerConfig(device="cuda", r3=True, mtp_sft=True),
            MegatronSettings(routing_replay=True, attention=attention),
        )
        with torch.no_grad():
            out[attention] = trainer.forward(batch, replay=True).logprobs[batch.loss_mask.bool()]
    torch.testing.assert_close(out["packed"], out["dense"], atol=1e-4, rtol=1e-4)
