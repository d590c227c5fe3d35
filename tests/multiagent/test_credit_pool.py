import random

import pytest
import torch

from miles_envs.agents.scripted import ScriptedEngine
from miles_envs.multi_loop import AgentPolicy
from miles_envs.multiagent import OpponentPool, group_by_role, role_baselines, role_group_id
from miles_envs.trainer.advantages import grpo, group_index
from miles_envs.trajectory import Trajectory


def game(seed, x_reward):
    return [
        Trajectory(prompt_ids=[1], env_id="ttt", agent_id="x", seed=seed, reward=x_reward, metadata={"role": "x"}),
        Trajectory(prompt_ids=[1], env_id="ttt", agent_id="o", seed=seed, reward=-x_reward, metadata={"role": "o"}),
    ]


def advantages(trajectories):
    rewards = torch.tensor([t.reward for t in trajectories])
    return grpo(rewards, group_index([t.group_id for t in trajectories])).tolist()


def test_role_groups_remove_the_first_mover_advantage():
    batch = [t for seed, r in enumerate([1.0, 1.0, 1.0, 0.0]) for t in game(seed, r)]
    for t in batch:
        t.group_id = "ttt"  # one shared baseline: x's seat looks good, o's bad, whatever the moves
    shared = advantages(batch)
    assert all(a > 0 for a in shared[0:6:2]) and all(a < 0 for a in shared[1:6:2])

    group_by_role(batch)
    assert {t.group_id for t in batch} == {"ttt/x", "ttt/o"}
    per_role = advantages(batch)
    # x's three wins beat x's draw, o's draw beats o's three losses: the moves are judged within a seat
    assert per_role[0] == per_role[2] == per_role[4] > 0 > per_role[6]
    assert per_role[1] == per_role[3] == per_role[5] < 0 < per_role[7]
    assert role_baselines(batch) == {"ttt/x": 0.75, "ttt/o": -0.75}


def test_group_per_seed_and_role():
    batch = group_by_role(game(4, 1.0), per_seed=True)
    assert [t.group_id for t in batch] == ["ttt#4/x", "ttt#4/o"]
    assert role_group_id(None, "solver") == "env/solver"


def test_pool_freezes_snapshots_samples_and_keeps_scores(tokenizer):
    pool = OpponentPool(max_size=2)
    for version in ("0", "1", "2"):
        frozen = pool.add(version, AgentPolicy(ScriptedEngine(tokenizer, ["1"], weight_version=version)))
        assert frozen.trainable is False and frozen.name == f"pool:{version}"
    assert pool.versions == ["1", "2"] and len(pool) == 2
    assert pool.policy("2").name == "pool:2" and pool.policy("2").engine.weight_version == "2"
    rng = random.Random(0)
    drawn = {pool.sample(rng)[0] for _ in range(20)}
    assert drawn == {"1", "2"}
    version, policy = pool.sample(random.Random(1))
    assert policy.engine.weight_version == version
    pool.record("1", 1.0)
    pool.record("1", 0.5)
    assert pool.win_rates() == {"1": 0.75}
    with pytest.raises(ValueError, match="already holds weight version '2'"):
        pool.add("2", policy)
    with pytest.raises(LookupError, match="empty"):
        OpponentPool().sample(rng)


def test_pool_draws_the_snapshots_the_learner_loses_to_more_often(tokenizer):
    pool = OpponentPool()
    for version in ("beaten", "strong", "new"):
        pool.add(version, AgentPolicy(ScriptedEngine(tokenizer, ["1"], weight_version=version)))
    for _ in range(10):
        pool.record("beaten", 1.0)
        pool.record("strong", 0.0)
    rng = random.Random(0)
    drawn = [pool.sample(rng, hardness=2.0)[0] for _ in range(2000)]
    # weights (1 - score)**2 with a 0.05 floor: strong 1, new (no games yet: 0.5) 0.25, beaten 0.0025
    assert drawn.count("strong") > 3 * drawn.count("new") > 0
    assert drawn.count("beaten") < 20
    assert {pool.sample(rng)[0] for _ in range(100)} == {"beaten", "strong", "new"}
    with pytest.raises(ValueError, match="hardness=-1"):
        pool.sample(rng, hardness=-1)
