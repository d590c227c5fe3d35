import numpy as np
import pytest
import torch
from tests.trainer.tiny import make_trajectory

from miles_envs.trainer import Trainer, TrainerConfig, pack

ROUTING_A = np.arange(16, dtype=np.uint8).reshape(4, 2, 2) % 8


def two_trajectories():
    a = make_trajectory([10, 11], [12, 13, 14], mask=[1, 0, 1], logprobs=[-0.5, 0.0, -0.25], routed=ROUTING_A)
    b = make_trajectory([20], [21, 22], logprobs=[-1.5, -2.0])
    return [a, b]


def test_one_row_layout_is_exact():
    [batch] = pack(two_trajectories(), [1.0, -2.0], [0.1, 0.2], max_row_tokens=8)
    assert batch.input_ids.tolist() == [[10, 11, 12, 13, 20, 21]]
    assert batch.targets.tolist() == [[11, 12, 13, 14, 21, 22]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1]]
    assert batch.loss_mask.tolist() == [[0, 1, 0, 1, 1, 1]]
    assert batch.rollout_logprobs.tolist() == [[0, -0.5, 0, -0.25, -1.5, -2.0]]
    assert batch.advantages.tolist() == [[1, 1, 1, 1, -2, -2]]
    assert batch.token_coef[0].tolist() == pytest.approx([0.1] * 4 + [0.2] * 2)
    assert batch.seq_index.tolist() == [[0, 0, 0, 0, 1, 1]]
    assert batch.trajectory_indices == [0, 1]
    assert batch.routed_experts.shape == (1, 6, 2, 2)
    assert batch.routed_experts[0, :4].tolist() == ROUTING_A.tolist()
    assert (batch.routed_experts[0, 4:] == -1).all()  # no trace for b: live routing


def test_rows_of_a_micro_batch_are_padded_as_a_separate_pseudo_sequence():
    [batch] = pack(two_trajectories(), [1.0, -2.0], [1.0, 1.0], max_row_tokens=4, rows_per_micro_batch=2)
    assert batch.input_ids.tolist() == [[10, 11, 12, 13], [20, 21, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]
    assert batch.loss_mask[1].tolist() == [1, 1, 0, 0]
    assert batch.seq_index.tolist() == [[0, 0, 0, 0], [1, 1, -1, -1]]
    assert (batch.routed_experts[1] == -1).all()


def test_rows_split_into_micro_batches_and_sequences_are_never_split():
    trajs = [make_trajectory([1, 2, 3], [4, 5, 6]) for _ in range(3)]  # 5 input positions each
    batches = pack(trajs, [0.0] * 3, [1.0] * 3, max_row_tokens=10)
    assert [b.input_ids.shape for b in batches] == [(1, 10), (1, 5)]
    assert sorted(i for b in batches for i in b.trajectory_indices) == [0, 1, 2]


def test_empty_responses_are_skipped_and_bad_routing_is_rejected():
    assert pack([make_trajectory([1, 2], [])], [0.0], [1.0]) == []
    bad = make_trajectory([1, 2], [3], routed=np.zeros((2, 2, 2), dtype=np.uint8))
    bad.routed_experts = np.zeros((5, 2, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="one row per token fed"):
        pack([bad], [0.0], [1.0])


def test_packed_sequences_do_not_attend_to_each_other(moe_model):
    trainer = Trainer(moe_model, TrainerConfig(device="cpu"))
    trajs = [
        make_trajectory([5, 6, 7], [8, 9]),
        make_trajectory([100, 101], [102, 103, 104, 105]),
        make_trajectory([300], [301, 302]),
    ]
    [packed] = pack(trajs, [0.0] * 3, [1.0] * 3, max_row_tokens=64)
    with torch.no_grad():
        alone = [trainer.forward(pack([t], [0.0], [1.0])[0], replay=False).logprobs[0] for t in trajs]
        together = trainer.forward(packed, replay=False).logprobs[0]
        for seq, index in enumerate(packed.trajectory_indices):
            assert torch.allclose(together[packed.seq_index[0] == seq], alone[index], atol=1e-5)
        # sensitivity: without restarting positions the packed row leaks context and the values change
        packed.position_ids = torch.arange(packed.input_ids.shape[1]).unsqueeze(0)
        leaked = trainer.forward(packed, replay=False).logprobs[0]
        later = packed.trajectory_indices[-1]
        assert not torch.allclose(leaked[packed.seq_index[0] == len(trajs) - 1], alone[later], atol=1e-3)
