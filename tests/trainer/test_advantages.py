import math

import pytest
import torch

from miles_envs.trainer.advantages import ADVANTAGES, dr_grpo, group_index, grpo, rloo
from miles_envs.trainer.plugins import PluginError, resolve

# group "a": rewards 1, 0, 0.5 (mean 0.5, unbiased std 0.5); group "b": 2, 4 (mean 3, std sqrt 2)
REWARDS = torch.tensor([1.0, 2.0, 0.0, 4.0, 0.5, 7.0])
GROUP_IDS = ["a", "b", "a", "b", "a", None]


def test_group_index_is_dense_in_first_appearance_order_and_none_is_alone():
    assert group_index(GROUP_IDS).tolist() == [0, 1, 0, 1, 0, 2]
    assert group_index([None, None]).tolist() == [0, 1]


def test_grpo_normalises_by_group_mean_and_unbiased_std():
    got = grpo(REWARDS, group_index(GROUP_IDS))
    s2 = 1 / math.sqrt(2)
    expected = [0.5 / (0.5 + 1e-6), -s2, -0.5 / (0.5 + 1e-6), s2, 0.0, 0.0]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_dr_grpo_only_subtracts_the_group_mean():
    got = dr_grpo(REWARDS, group_index(GROUP_IDS))
    assert got.tolist() == pytest.approx([0.5, -1.0, -0.5, 1.0, 0.0, 0.0])


def test_rloo_subtracts_the_leave_one_out_mean():
    got = rloo(REWARDS, group_index(GROUP_IDS))
    # a: 1 - (0+0.5)/2, 0 - (1+0.5)/2, 0.5 - (1+0)/2 ; b: 2 - 4, 4 - 2 ; lone trajectory: 0
    assert got.tolist() == pytest.approx([0.75, -2.0, -0.75, 2.0, 0.0, 0.0])


def test_all_equal_rewards_give_zero_advantage():
    for fn in ADVANTAGES.values():
        assert fn(torch.ones(4), torch.zeros(4, dtype=torch.long)).abs().max() == 0


def double_reward_advantage(rewards, groups):
    return rewards * 2


def test_custom_advantage_by_import_path_and_unknown_name_is_explained():
    fn = resolve("advantage", f"{__name__}:double_reward_advantage", ADVANTAGES)
    assert fn(torch.tensor([1.5]), torch.zeros(1, dtype=torch.long)).tolist() == [3.0]
    with pytest.raises(PluginError, match="Did you mean grpo"):
        resolve("advantage", "grpp", ADVANTAGES)
    with pytest.raises(PluginError, match="cannot import"):
        resolve("advantage", "no_such_module_xyz:fn", ADVANTAGES)


# statuses of a batch with infrastructure trouble: group "a" keeps two scored members, group "b" lost all
STATUSES = ["completed", "aborted", "truncated", "failed", "aborted", "failed", "completed", "completed"]
MIXED_REWARDS = torch.tensor([1.0, 5.0, 0.0, 9.0, 3.0, 2.0, 4.0, 4.0])
MIXED_GROUPS = ["a", "a", "a", "a", "b", "b", "c", "c"]


def test_aborted_and_failed_members_stay_out_of_the_group_statistics():
    from miles_envs.trainer.advantages import scored_advantages

    result = scored_advantages(grpo, MIXED_REWARDS, MIXED_GROUPS, STATUSES)
    # group a over rewards 1 and 0 only: mean 0.5, unbiased std sqrt(0.5); c: equal rewards -> 0
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert result.advantages.tolist() == pytest.approx([a, 0.0, -a, 0.0, 0.0, 0.0, 0.0, 0.0], abs=1e-6)
    assert (result.groups, result.groups_dropped) == (3, 1)
    rloo_result = scored_advantages(rloo, MIXED_REWARDS, MIXED_GROUPS, STATUSES)
    assert rloo_result.advantages.tolist() == pytest.approx([1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0])


def test_trainer_scores_only_completed_and_truncated_members(moe_model):
    from miles_envs.trainer import Trainer, TrainerConfig
    from miles_envs.trajectory import Status
    from tests.trainer.tiny import make_trajectory

    trajectories = [
        make_trajectory([1, 2], [3, 4], reward=float(r), group_id=g, status=Status(s), error=None if s != "failed" else "env raised")
        for r, g, s in zip(MIXED_REWARDS.tolist(), MIXED_GROUPS, STATUSES)
    ]
    trainer = Trainer(moe_model, TrainerConfig(algo="dr_grpo", device="cpu"))
    assert trainer.advantages(trajectories).tolist() == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert trainer.train_step(trajectories)["groups_dropped"] == 1.0
