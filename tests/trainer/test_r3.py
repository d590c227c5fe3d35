import copy
import math

import numpy as np
import pytest
import torch

from miles_envs.trainer import Trainer, TrainerConfig, pack
from miles_envs.trainer.r3 import RoutingReplay, find_routers, mismatch_metrics
from tests.trainer.tiny import make_trajectory, rollout_routing, tiny_moe

TOKENS = [7, 99, 3, 250, 18, 42, 400, 5, 77, 123, 9, 311, 64]


def perturbed_rollout_model(model, scale=0.5):
    """The same model with noisy routers: its expert choices differ from the trainer's live ones."""
    rollout = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, router in find_routers(rollout):
            router.weight.add_(scale * router.weight.std() * torch.randn(router.weight.shape, generator=gen))
    return rollout


class ExpertInputs:
    """Records what each MoE block's experts receive (indices and gate weights) and what each router sees."""

    def __init__(self, model):
        self.indices, self.weights, self.router_inputs = [], [], []
        self.handles = []
        for _, router in find_routers(model):
            self.handles.append(router.register_forward_pre_hook(lambda m, a: self.router_inputs.append(a[0].detach().reshape(-1, a[0].shape[-1]))))
        for name, module in model.named_modules():
            if name.endswith("mlp.experts"):
                self.handles.append(module.register_forward_pre_hook(self._record))

    def _record(self, module, args):
        _, indices, weights = args
        self.indices.append(indices.detach())
        self.weights.append(weights.detach())

    def close(self):
        for h in self.handles:
            h.remove()


def replay_batch(routing):
    trajectory = make_trajectory(TOKENS[:5], TOKENS[5:], routed=routing)
    return pack([trajectory], [1.0], [1.0])[0]


def test_replayed_experts_equal_the_rollout_and_gates_come_from_the_trainer_router(moe_model):
    trace = rollout_routing(perturbed_rollout_model(moe_model), TOKENS)
    trainer = Trainer(moe_model, TrainerConfig(r3=True, device="cpu"))
    batch = replay_batch(trace)
    probe = ExpertInputs(trainer.model)
    result = trainer.forward(batch, replay=True)
    probe.close()
    assert result.routing.disagreement > 0  # the trainer would have chosen other experts
    for layer, (_, router) in enumerate(find_routers(trainer.model)):
        assert probe.indices[layer].tolist() == trace[:, layer, :].astype(np.int64).tolist()
        probs = torch.softmax(router.weight.detach() @ probe.router_inputs[layer].T, dim=0).T
        expected = probs.gather(-1, probe.indices[layer])
        expected = expected / expected.sum(-1, keepdim=True)  # norm_topk_prob=True
        assert torch.allclose(probe.weights[layer], expected, atol=1e-6)


def test_router_weights_receive_gradient_under_replay(moe_model):
    trace = rollout_routing(perturbed_rollout_model(moe_model), TOKENS)
    trainer = Trainer(moe_model, TrainerConfig(r3=True, device="cpu"))
    result = trainer.forward(replay_batch(trace), replay=True)
    (-(result.logprobs * replay_batch(trace).loss_mask).sum()).backward()
    for _, router in find_routers(trainer.model):
        assert router.weight.grad is not None
        assert torch.isfinite(router.weight.grad).all() and router.weight.grad.abs().sum() > 0


def test_padding_rows_fall_back_to_the_live_top_k(moe_model):
    trace = rollout_routing(perturbed_rollout_model(moe_model), TOKENS).astype(np.int64)
    trainer = Trainer(moe_model, TrainerConfig(r3=True, device="cpu"))
    batch = replay_batch(trace.astype(np.uint8))
    batch.routed_experts[0, 6:] = -1  # no replay for positions 6..
    probe = ExpertInputs(trainer.model)
    with torch.no_grad():
        trainer.forward(batch, replay=True)
    probe.close()
    fell_back = []
    for layer, (_, router) in enumerate(find_routers(trainer.model)):
        live = torch.topk(router.weight @ probe.router_inputs[layer].T, 2, dim=0).indices.T
        used = probe.indices[layer]
        assert used[:6].tolist() == trace[:6, layer].tolist()
        assert used[6:].sort(-1).values.tolist() == live[6:].sort(-1).values.tolist()
        fell_back.append((np.sort(live[6:].numpy(), -1) != np.sort(trace[6:, layer], -1)).any())
    assert any(fell_back)  # the fallback rows really differ from what replay would have forced


def test_replay_off_leaves_the_forward_untouched_but_measures_disagreement(moe_model):
    trace = rollout_routing(perturbed_rollout_model(moe_model), TOKENS)
    trainer = Trainer(moe_model, TrainerConfig(device="cpu"))
    batch = replay_batch(trace)
    with torch.no_grad():
        observed = trainer.forward(batch, replay=False)
        batch_plain = replay_batch(None)
        plain = trainer.forward(batch_plain, replay=False)
    assert torch.equal(observed.logprobs, plain.logprobs)
    own = rollout_routing(moe_model, TOKENS).astype(np.int64)
    differs = (np.sort(own, -1) != np.sort(trace.astype(np.int64), -1)).any(-1)
    assert observed.routing.disagreement == pytest.approx(differs.mean())
    assert differs.mean() > 0


def test_trace_layers_map_to_routers_when_some_layers_are_dense():
    model = tiny_moe(num_hidden_layers=3, mlp_only_layers=[1])
    replay = RoutingReplay(model)
    assert [layer for layer, _ in replay.routers] == [0, 2]
    assert replay.trace_slots(2) == [0, 1]  # trace of MoE layers only
    assert replay.trace_slots(3) == [0, 2]  # trace of every decoder layer
    with pytest.raises(ValueError, match="same architecture"):
        replay.trace_slots(5)


def test_r3_on_a_dense_model_is_a_configuration_error():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dense = Qwen3ForCausalLM(
        Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16)
    )
    with pytest.raises(ValueError, match="no MoE router"):
        Trainer(dense, TrainerConfig(r3=True, device="cpu"))


def test_mismatch_metrics_by_hand():
    trainer_lp = torch.tensor([-1.0, -1.0, -1.0, -9.0])
    rollout_lp = torch.tensor([-1.0, -1.8, -0.5, -1.0])  # deltas 0, 0.8, -0.5, (masked 8.0)
    got = mismatch_metrics(trainer_lp, rollout_lp, torch.tensor([1, 1, 1, 0]))
    deltas = [0.0, 0.8, -0.5]
    assert got["k3_kl"] == pytest.approx(sum(math.exp(d) - 1 - d for d in deltas) / 3)
    assert got["extreme_frac"] == pytest.approx(1 / 3)  # only 0.8 > ln 2
    assert got["mean_abs_delta"] == pytest.approx(1.3 / 3)


def test_deepseek_v3_replay_uses_the_rollout_experts_with_sigmoid_gates():
    from transformers import AutoModelForCausalLM

    from miles_envs.models.factory import build_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config("deepseek-v3", "tiny", 512)).eval()
    trace = rollout_routing(perturbed_rollout_model(model), TOKENS)  # layer 0 is dense: zero rows
    trainer = Trainer(model, TrainerConfig(r3=True, device="cpu"))
    batch = replay_batch(trace)
    probe = ExpertInputs(trainer.model)
    result = trainer.forward(batch, replay=True)
    probe.close()
    assert result.routing.disagreement > 0
    for slot, (layer, router) in enumerate(find_routers(trainer.model)):
        assert probe.indices[slot].tolist() == trace[:, layer, :].astype(np.int64).tolist()
        scores = torch.sigmoid(probe.router_inputs[slot].float() @ router.weight.detach().float().T)
        expected = scores.gather(-1, probe.indices[slot])
        expected = expected / expected.sum(-1, keepdim=True) * router.routed_scaling_factor
        assert torch.allclose(probe.weights[slot].float(), expected, atol=1e-5)
    (-(result.logprobs * batch.loss_mask).sum()).backward()
    assert all(router.weight.grad.abs().sum() > 0 for _, router in find_routers(trainer.model))
