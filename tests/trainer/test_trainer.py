import json

import pytest
import torch
from safetensors import safe_open

from miles_envs.trainer import Trainer, TrainerConfig, pack
from miles_envs.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from miles_envs.trainer.lora import save_adapter
from miles_envs.trainer.r3 import find_routers
from miles_envs.trajectory import Status
from tests.trainer.tiny import make_trajectory, rollout_routing, tiny_moe

PROMPT = [11, 12, 13, 14]
GOOD, BAD = [40, 41, 42, 43], [200, 201, 202, 203]


@torch.no_grad()
def response_logprob(trainer, trajectory):
    """Sum of the trainer's logprobs over the trajectory's model tokens."""
    [batch] = pack([trajectory], [0.0], [1.0])
    result = trainer.forward(batch.to(trainer.device), replay=False)
    return float((result.logprobs * batch.loss_mask).sum())


@torch.no_grad()
def on_policy(trainer, trajectory):
    """Give the trajectory the trainer's own logprobs, as a same-weights rollout would have."""
    [batch] = pack([trajectory], [0.0], [1.0])
    logprobs = trainer.forward(batch, replay=False).logprobs[0]
    start = len(trajectory.prompt_ids) - 1
    trajectory.logprobs = [float(lp) if m else 0.0 for lp, m in zip(logprobs[start:].tolist(), trajectory.loss_mask)]
    return trajectory


def group(trainer, routed=False):
    model = trainer.model
    def traj(response, reward):
        tokens = PROMPT + response
        return on_policy(trainer, make_trajectory(PROMPT, response, reward=reward,
                                                  routed=rollout_routing(model, tokens) if routed else None))
    return [traj(GOOD, 1.0), traj(BAD, 0.0), traj(GOOD, 1.0), traj(BAD, 0.0)]


def test_grpo_steps_raise_the_rewarded_response_and_lower_the_other(moe_model):
    trainer = Trainer(moe_model, TrainerConfig(algo="grpo", lr=3e-3, device="cpu"))
    before_good, before_bad = (response_logprob(trainer, group(trainer)[i]) for i in (0, 1))
    for _ in range(3):
        metrics = trainer.train_step(group(trainer))
    assert metrics["reward_mean"] == 0.5 and metrics["step"] == 3.0
    assert metrics["tis_weight_mean"] == pytest.approx(1.0, abs=1e-5)  # on-policy data
    after_good, after_bad = (response_logprob(trainer, group(trainer)[i]) for i in (0, 1))
    assert after_good > before_good + 0.1
    assert after_bad < before_bad - 0.1


def test_r3_step_on_same_weight_rollouts_has_no_mismatch(moe_model):
    trainer = Trainer(moe_model, TrainerConfig(r3=True, device="cpu"))
    metrics = trainer.train_step(group(trainer, routed=True))
    assert metrics["mismatch/router_disagreement"] == 0.0
    assert metrics["mismatch/k3_kl"] < 1e-10 and metrics["mismatch/extreme_frac"] == 0.0


@pytest.mark.parametrize("algo", ["dr_grpo", "rloo", "gspo", "dapo"])
def test_every_algorithm_preset_trains(moe_model, algo):
    trainer = Trainer(moe_model, TrainerConfig(algo=algo, lr=1e-3, device="cpu"))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step(group(trainer))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_several_minibatches_clip_against_the_pre_update_policy(moe_model):
    trainer = Trainer(moe_model, TrainerConfig(minibatches=2, epochs=2, lr=5e-2, eps_low=0.01, eps_high=0.01, device="cpu"))
    metrics = trainer.train_step(group(trainer))
    assert metrics["clipfrac"] > 0  # later optimizer steps moved the policy past the clip range
    assert "mismatch/k3_kl" in metrics


@pytest.mark.parametrize("r3", [False, True])
def test_kl_to_the_initial_policy_starts_at_zero_and_grows(moe_model, r3):
    trainer = Trainer(moe_model, TrainerConfig(kl_coef=0.1, lr=1e-2, r3=r3, device="cpu"))
    first = trainer.train_step(group(trainer, routed=r3))
    second = trainer.train_step(group(trainer, routed=r3))
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-7)
    assert second["kl_ref"] > 1e-6


def test_dropped_statuses_and_zero_weights_do_not_move_the_model(moe_model):
    trainer = Trainer(moe_model, TrainerConfig(lr=1e-2, device="cpu"))
    trajs = group(trainer)
    trajs[0].status, trajs[0].error = Status.FAILED, "env crashed"
    for t in trajs[1:]:
        t.metadata["loss_weight"] = 0.0
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step(trajs)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def negated_ppo(batch):
    from miles_envs.trainer.losses import ppo_clip

    loss, stats = ppo_clip(batch)
    return -loss, stats


def test_custom_policy_loss_by_import_path_reverses_learning(moe_model):
    trainer = Trainer(moe_model, TrainerConfig(policy_loss=f"{__name__}:negated_ppo", lr=3e-3, device="cpu"))
    before = response_logprob(trainer, group(trainer)[0])
    for _ in range(2):
        trainer.train_step(group(trainer))
    assert response_logprob(trainer, group(trainer)[0]) < before


def test_unknown_algo_is_a_configuration_error(moe_model):
    with pytest.raises(ValueError, match="grpo"):
        Trainer(moe_model, TrainerConfig(algo="ppo2"))


def test_lora_trains_only_adapters_and_saves_the_sglang_adapter_layout(moe_model, tmp_path):
    trainer = Trainer(moe_model, TrainerConfig(lora_rank=4, lr=1e-2, kl_coef=0.05, device="cpu"))
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".lora_B." in n}
    metrics = trainer.train_step(group(trainer))
    assert metrics["kl_ref"] == pytest.approx(0.0, abs=1e-7)  # reference = base model with adapters off
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, lora_b[n]) for n, p in trainer.model.named_parameters() if n in lora_b)

    weights = trainer.state_dict()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in weights
    assert all("lora_" in k for k in weights)
    out = save_adapter(trainer.model, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(weights)


def test_checkpoint_resume_continues_exactly(tmp_path):
    def fresh():
        return Trainer(tiny_moe(), TrainerConfig(lr=1e-2, device="cpu"))

    reference = fresh()
    batches = [group(reference) for _ in range(3)]
    reference.train_step(batches[0])
    path = save_checkpoint(reference, tmp_path / "ckpt")
    reference.train_step(batches[1])
    save_checkpoint(reference, tmp_path / "ckpt", keep=1)
    assert latest_checkpoint(tmp_path / "ckpt").name == "step_000002"
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == ["step_000002"]

    reference.train_step(batches[2])
    resumed = fresh()
    load_checkpoint(resumed, latest_checkpoint(tmp_path / "ckpt"))
    assert resumed.step == 2 and path.name == "step_000001"
    resumed.train_step(batches[2])
    for a, b in zip(reference.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_resume_trains_at_the_rate_it_is_given_not_the_checkpoints(tmp_path):
    trainer = Trainer(tiny_moe(), TrainerConfig(lr=1e-2, device="cpu"))
    trainer.train_step(group(trainer))
    path = save_checkpoint(trainer, tmp_path)
    resumed = Trainer(tiny_moe(), TrainerConfig(lr=3e-4, device="cpu"))
    load_checkpoint(resumed, path)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [3e-4] * len(resumed.optimizer.param_groups)
    saved_moments = torch.load(path / "optimizer.pt", weights_only=False)["state"]
    assert resumed.optimizer.state_dict()["state"].keys() == saved_moments.keys()


def test_lora_checkpoint_resume_restores_adapters(moe_model, tmp_path):
    trainer = Trainer(moe_model, TrainerConfig(lora_rank=4, lr=1e-2, device="cpu"))
    trainer.train_step(group(trainer))
    saved = trainer.state_dict()
    path = save_checkpoint(trainer, tmp_path)
    assert (path / "model" / "adapter_model.safetensors").is_file()
    resumed = Trainer(tiny_moe(), TrainerConfig(lora_rank=4, lr=1e-2, device="cpu"))
    load_checkpoint(resumed, path)
    assert all(torch.equal(saved[k], v) for k, v in resumed.state_dict().items())
    with pytest.raises(ValueError, match="LoRA"):
        load_checkpoint(Trainer(tiny_moe(), TrainerConfig(device="cpu")), path)


def test_state_dict_is_the_full_model_for_weight_sync(moe_model):
    trainer = Trainer(moe_model, TrainerConfig(device="cpu"))
    weights = trainer.state_dict()
    assert set(weights) == set(tiny_moe().state_dict())
    assert len(find_routers(trainer.model)) == 2
