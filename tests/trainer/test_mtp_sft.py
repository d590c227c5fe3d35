import pytest
import torch

from miles_envs.models.mtp import build_mtp
from miles_envs.trainer import Trainer, TrainerConfig, pack
from miles_envs.trainer.checkpoint import load_checkpoint, save_checkpoint
from miles_envs.trainer.mtp_sft import mtp_labels, mtp_sft_loss
from tests.trainer.tiny import make_trajectory, tiny_moe


def sft_data():
    return [
        make_trajectory([5, 6, 7], [8, 9, 10, 11, 12], reward=1.0),
        make_trajectory([20, 21], [22, 23, 24, 25], mask=[1, 1, 0, 1], logprobs=[-1.0, -1.0, 0.0, -1.0], reward=1.0),
    ]


def with_mtp(seed=0, **config):
    model = tiny_moe(seed)
    return Trainer(model, TrainerConfig(mtp_sft=True, device="cpu", **config), mtp=build_mtp(model, 1))


def test_mtp_labels_on_a_packed_row():
    [batch] = pack([make_trajectory([1, 2], [3, 4, 5]), make_trajectory([7], [8, 9], mask=[0, 1], logprobs=[0.0, -1.0])],
                   [0.0, 0.0], [1.0, 1.0])
    # inputs [1 2 3 4 | 7 8], targets [2 3 4 5 | 8 9]; depth 0 at t reads targets[t], predicts targets[t+1]
    tokens, positions, labels, label_mask = mtp_labels(batch, 0)
    assert tokens.tolist() == [[2, 3, 4, 5, 8, 9]]
    assert positions.tolist() == [[1, 2, 3, 4, 1, 2]]
    assert labels[0, :5].tolist() == [3, 4, 5, 8, 9]
    # labels must be model tokens of the same sequence: 3, 4, 5 yes; 8 is the next sequence; 9 yes
    assert label_mask.tolist() == [[1, 1, 1, 0, 1, 0]]


def test_packed_mtp_loss_equals_the_per_sequence_losses():
    trainer = with_mtp()
    data = sft_data()
    [packed] = pack(data, [0.0, 0.0], [1.0, 1.0])
    with torch.no_grad():
        together = mtp_sft_loss(trainer.mtp, trainer.forward(packed, replay=False, hidden_states=True).hidden_states, packed)
        alone = [mtp_sft_loss(trainer.mtp, trainer.forward(b, replay=False, hidden_states=True).hidden_states, b)
                 for t in data for b in pack([t], [0.0], [1.0])]
    assert together.tokens == sum(a.tokens for a in alone) == 5 + 3  # every model token but none across sequences
    assert float(together.loss_sum) == pytest.approx(sum(float(a.loss_sum) for a in alone), rel=1e-5)


def test_mtp_loss_projects_only_labelled_positions_and_matches_the_full_projection():
    from transformers.masking_utils import create_causal_mask

    from miles_envs.models.mtp import mtp_step

    trainer = with_mtp()
    [packed] = pack(sft_data(), [0.0, 0.0], [1.0, 1.0])
    with torch.no_grad():
        hidden = trainer.forward(packed, replay=False, hidden_states=True).hidden_states
        loss = mtp_sft_loss(trainer.mtp, hidden, packed)
        # reference: logits at every position of the row, cross-entropy masked afterwards
        inputs, positions, labels, label_mask = mtp_labels(packed, 0)
        mask = create_causal_mask(config=trainer.mtp.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions)
        _, logits = mtp_step(trainer.mtp, 0, inputs, hidden, positions, mask)
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    assert float(loss.loss_sum) == pytest.approx(float((ce * label_mask).sum()), rel=1e-5)
    assert loss.correct == int(((logits.argmax(-1) == labels).float() * label_mask).sum())


def test_mtp_sft_trains_only_the_mtp_layers_and_lowers_their_loss():
    trainer = with_mtp(lr=1e-2)
    trunk = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    first = trainer.train_step(sft_data())  # equal rewards: zero advantage, only MTP-SFT moves weights
    for _ in range(5):
        last = trainer.train_step(sft_data())
    assert all(torch.equal(p, trunk[n]) for n, p in trainer.model.named_parameters())
    assert last["mtp/loss"] < first["mtp/loss"] - 0.5
    assert 0.0 <= last["mtp/accuracy"] <= 1.0


def test_without_detach_the_shared_embedding_learns_from_mtp():
    trainer = with_mtp(lr=1e-2, mtp_detach_trunk=False)
    embed = trainer.model.get_input_embeddings().weight.detach().clone()
    trainer.train_step(sft_data())
    assert not torch.equal(trainer.model.get_input_embeddings().weight, embed)


def largest_change(before: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter]) -> float:
    return max(float((p.detach() - before[n]).abs().max()) for n, p in params.items())


def test_mtp_layers_step_at_their_own_learning_rate():
    trainer = with_mtp(lr=1e-4, mtp_lr=1e-2)
    trunk, mtp = dict(trainer.model.named_parameters()), trainer.mtp_parameters()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-4, 1e-2]
    assert {id(p) for p in trainer.optimizer.param_groups[1]["params"]} == {id(p) for p in mtp.values()}
    before = {n: p.detach().clone() for n, p in [*trunk.items(), *mtp.items()]}
    trainer.train_step([make_trajectory([5, 6, 7], [8, 9, 10], reward=1.0), make_trajectory([5, 6, 7], [11, 12, 13])])
    # Adam's first step moves every parameter with a gradient by its group's lr (times g/|g|)
    assert largest_change(before, mtp) == pytest.approx(1e-2, rel=1e-3)
    assert largest_change(before, trunk) == pytest.approx(1e-4, rel=1e-3)


def test_mtp_lr_needs_mtp_sft():
    with pytest.raises(ValueError, match="mtp_sft=True"):
        TrainerConfig(mtp_lr=1e-3).resolved()


def test_mtp_sft_needs_mtp_layers(moe_model):
    with pytest.raises(ValueError, match="--mtp 1"):
        Trainer(moe_model, TrainerConfig(mtp_sft=True, device="cpu"))


def test_mtp_weights_go_to_the_embedded_engine_and_into_checkpoints(tmp_path):
    from miles_envs.agents.embedded import EmbeddedEngine
    from miles_envs.models.factory import init_model

    folder = init_model(tmp_path / "model", arch="qwen3-moe", size="tiny", mtp=1)
    trainer = Trainer.from_pretrained(str(folder), TrainerConfig(mtp_sft=True, lr=1e-2, device="cpu"))
    trainer.train_step(sft_data())
    weights = trainer.state_dict()
    engine = EmbeddedEngine.from_path(folder, device="cpu")
    try:
        import asyncio

        asyncio.run(engine.update_weights(weights, version=trainer.weight_version))
        engine_mtp = dict(engine.mtp.named_parameters())
        for name, value in trainer.mtp_parameters().items():
            assert torch.equal(engine_mtp[name], value.detach())
    finally:
        asyncio.run(engine.close())

    path = save_checkpoint(trainer, tmp_path / "ckpt")
    resumed = Trainer.from_pretrained(str(folder), TrainerConfig(mtp_sft=True, lr=1e-2, device="cpu"))
    load_checkpoint(resumed, path)
    for name, value in resumed.mtp_parameters().items():
        assert torch.equal(value, trainer.mtp_parameters()[name])
