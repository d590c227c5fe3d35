"""Asynchronous training: the buffer's staleness bound, version-aware weights, the async run against
a real scripted engine and a real (tiny) trainer, and the synchronous loop pinned to its definition."""

import asyncio
import math
from dataclasses import replace

import pytest
import torch

from miles_envs.engine import SamplingParams
from miles_envs.agents.scripted import ScriptedEngine
from miles_envs.chat.renderer import ChatRenderer
from miles_envs.env import Env, user
from miles_envs.loop import LoopConfig, rollout
from miles_envs.models.factory import init_model
from miles_envs.tokenizers import load_tokenizer
from miles_envs.trainer import Trainer, TrainerConfig, pack
from miles_envs.pipeline.async_run import AsyncSettings, LiveUpdateUnsupported, train_async
from miles_envs.pipeline.buffer import GroupPosition, RolloutBuffer
from miles_envs.trainer.losses import version_aware_weights
from miles_envs.pipeline.sync import train
from miles_envs.trajectory import Trajectory, Turn, version_number

K = 1  # the staleness bound of the end-to-end runs


def sampled_by(versions: list[str], *, group: int = 0) -> Trajectory:
    """A trajectory with one two-token model turn per version (one env token between turns)."""
    response, mask, turns = [], [], []
    for i, version in enumerate(versions):
        if i:
            turns.append(Turn("env", len(response), len(response) + 1))
            response.append(7)
            mask.append(0)
        turns.append(Turn("model", len(response), len(response) + 2, weight_version=version))
        response += [5, 6]
        mask += [1, 1]
    logprobs = [-1.0 if m else 0.0 for m in mask]
    return Trajectory(prompt_ids=[1, 2], response_ids=response, loss_mask=mask, logprobs=logprobs, turns=turns,
                      group_id=f"g{group}").validate()


async def test_buffer_hands_out_groups_k_behind_and_never_k_plus_1():
    buffer = RolloutBuffer(group_size=2, max_staleness=2)
    trainer_version = 10
    buffer.add(0, sampled_by(["step-8"]))  # 2 behind: within the bound
    buffer.add(0, sampled_by(["step-10"]))
    buffer.add(1, sampled_by(["step-7", "step-10"]))  # its oldest token is 3 behind: the whole group is stale
    buffer.add(1, sampled_by(["step-10"]))
    buffer.add(2, sampled_by(["step-9"]))  # incomplete: not handed out
    assert buffer.ready_groups == 2 and buffer.partial_groups == 1
    stale_seen = []
    waiting = asyncio.ensure_future(buffer.take(2, trainer_version, stale_seen.extend))
    await asyncio.sleep(0)
    assert not waiting.done() and [g.index for g in stale_seen] == [1]  # reported while the take still waits
    buffer.add(2, sampled_by(["unlabelled"]))  # unknown versions count as fresh
    taken = await asyncio.wait_for(waiting, 5)
    assert [g.index for g in taken.groups] == [0, 2] and [g.index for g in taken.stale] == [1]
    assert buffer.tokens == 0 and buffer.ready_groups == 0
    with pytest.raises(ValueError, match="max_staleness must be >= 0"):
        RolloutBuffer(2, max_staleness=-1)


def test_group_position_replays_what_was_handed_out_but_not_settled():
    position = GroupPosition()
    for _ in range(6):
        position.issue()
    for index in (0, 1, 3, 5):
        position.settle(index)
    restored = GroupPosition.from_dict(position.to_dict())
    assert restored.settled_below == 2 and restored.unsettled() == [2, 4] and restored.issue() == 6


def test_version_aware_weights_equal_hand_computed_values_on_a_trajectory_spanning_two_versions():
    # one model turn of four tokens: the first two sampled by step-2, the rest by step-3 after an update
    turn = Turn("model", 0, 4, weight_version="step-3", version_spans=[(0, "step-2"), (2, "step-3")])
    rollout_lp = [-1.0, -2.0, -0.5, -1.5]
    trajectory = Trajectory(prompt_ids=[1, 2, 3], response_ids=[10, 11, 12, 13], loss_mask=[1] * 4, logprobs=rollout_lp,
                            turns=[turn]).validate()
    assert trajectory.version_range == (2, 3)
    (batch,) = pack([trajectory], [1.0], [1.0])
    mask = batch.loss_mask.bool()
    assert batch.rollout_versions[mask].tolist() == [2, 2, 3, 3]
    assert batch.rollout_versions[~mask].tolist() == [-1, -1]
    # the trainer (version 3) gives ratios 1.5, 3.0 (capped at 2), 0.5 and 1.0 against each token's own sampler
    old = batch.rollout_logprobs.clone()
    old[mask] = torch.tensor(rollout_lp) + torch.tensor([math.log(1.5), math.log(3.0), math.log(0.5), 0.0])
    weights = version_aware_weights(old, batch.rollout_logprobs, batch.rollout_versions, 3, cap=2.0, decay=0.5)
    # step-2 tokens are one version stale: x 0.5; step-3 tokens are current: x 1
    assert weights[mask].tolist() == pytest.approx([1.5 * 0.5, 2.0 * 0.5, 0.5, 1.0])
    plain = version_aware_weights(old, batch.rollout_logprobs, batch.rollout_versions, 3, cap=2.0, decay=1.0)
    assert plain[mask].tolist() == pytest.approx([1.5, 2.0, 0.5, 1.0])  # decay 1: truncated IS alone


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("model"), arch="qwen3", size="tiny")


@pytest.fixture(scope="module")
def renderer(model):
    return ChatRenderer(load_tokenizer(str(model)))


def test_the_trainer_weighs_each_token_by_the_staleness_of_its_own_version(model):
    trainer = Trainer.from_pretrained(str(model), TrainerConfig(lr=1e-3, device="cpu", staleness_decay=0.5, tis_cap=2.0))
    trainer.step = 3
    turn = Turn("model", 0, 4, weight_version="step-3", version_spans=[(0, "step-2"), (2, "step-3")])
    response = [100, 200, 300, 400]
    probe = Trajectory(prompt_ids=[1, 2, 3], response_ids=response, loss_mask=[1] * 4, logprobs=[-1.0] * 4, turns=[turn])
    (batch,) = pack([probe], [1.0], [1.0])
    own = trainer.forward(batch, replay=False).logprobs[batch.loss_mask.bool()].tolist()
    # rollout logprobs equal to the trainer's own: every ratio is 1, so the weights are the decay alone
    sampled = replace(probe, logprobs=own, group_id="a")
    metrics = trainer.train_step([sampled, replace(sampled, id="b", reward=1.0)])
    assert metrics["tis_weight_mean"] == pytest.approx((0.5 + 0.5 + 1.0 + 1.0) / 4, abs=1e-4)


class GatedEnv(Env):
    """Two turns; on seeds ``SLOW``, the first step waits until the trainer is ``K + 2`` versions past
    the version it had at reset, so that episode's first turn is certainly more than ``K`` stale."""

    max_turns = 2
    trainer = None
    seen: set = set()
    slow_once = False

    async def areset(self, seed=None, options=None):
        self.seed, self.turn, self.version_at_reset = seed, 0, GatedEnv.trainer.step
        self.slow = seed % 5 == 2 and not (GatedEnv.slow_once and seed in GatedEnv.seen)
        GatedEnv.seen.add(seed)
        return [user("say ok")], {}

    async def astep(self, action):
        self.turn += 1
        if self.turn == 1:
            while self.slow and GatedEnv.trainer.step < self.version_at_reset + K + 2:
                await asyncio.sleep(0.01)
            return [user("once more")], 0.0, False, False, {}
        return [], float(self.seed % 3), True, False, {}


class RecordingTrainer(Trainer):
    """The real trainer, keeping what each step trained on."""

    def train_step(self, trajectories):
        self.batches = getattr(self, "batches", []) + [(self.step, list(trajectories))]
        return super().train_step(trajectories)


def oldest_version(trajectory):
    return min(version_number(t.weight_version) for t in trajectory.turns if t.kind == "model")


async def run_gated(model, renderer, on_stale, steps=6):
    trainer = RecordingTrainer.from_pretrained(str(model), TrainerConfig(lr=1e-4, device="cpu"))
    GatedEnv.trainer, GatedEnv.seen, GatedEnv.slow_once = trainer, set(), on_stale == "resample"
    engine = ScriptedEngine(renderer.tokenizer, ["ok"], eos_token_id=renderer.turn_end_id)
    history = await train_async(
        GatedEnv, engine, trainer, steps, renderer=renderer, tasks_per_step=2, group_size=2,
        loop_config=LoopConfig(sampling=SamplingParams(max_new_tokens=4)),
        settings=AsyncSettings(max_staleness=K, on_stale=on_stale, oversample=1.5),
    )
    return trainer, history


async def test_async_run_never_trains_on_a_trajectory_more_than_k_versions_stale(model, renderer):
    trainer, history = await run_gated(model, renderer, "drop")
    assert [int(m["step"]) for m in history] == list(range(1, 7))
    trained = [(step, t) for step, batch in trainer.batches for t in batch]
    assert len(trained) == 6 * 4
    assert all(step - oldest_version(t) <= K for step, t in trained)  # checked from the turns, independently
    assert not any(t.seed % 5 == 2 for _, t in trained)  # every slow group went stale and was dropped
    dropped = sum(m["buffer/dropped_groups"] for m in history)
    assert dropped >= 1 and history[-1]["buffer/dropped_groups_total"] == dropped
    assert sum(m["buffer/dropped_trajectories"] for m in history) == 2 * dropped
    trained_groups = [g for m in history for g in m["groups"]]
    assert len(trained_groups) == len(set(trained_groups)) == 12
    for m in history:
        lags = {k: v for k, v in m.items() if k.startswith("staleness/trajectories_lag")}
        assert sum(lags.values()) == pytest.approx(1.0) and max(int(k[-1]) for k in lags) <= K
        assert 0.0 <= m["time/rollout_busy_frac"] <= 1.0 and 0.0 < m["time/trainer_busy_frac"] <= 1.0


async def test_resample_plays_a_stale_group_again_and_trains_on_it(model, renderer):
    trainer, history = await run_gated(model, renderer, "resample", steps=8)
    trained = [(step, t) for step, batch in trainer.batches for t in batch]
    assert all(step - oldest_version(t) <= K for step, t in trained)
    assert sum(m["buffer/resampled_groups"] for m in history) >= 1
    assert any(t.seed % 5 == 2 for _, t in trained)  # the replayed slow task made it in, fresh
    trained_groups = [g for m in history for g in m["groups"]]
    assert len(trained_groups) == len(set(trained_groups))


async def test_bad_async_settings_and_engines_without_live_updates_fail_before_any_rollout(model, renderer):
    class FrozenEngine(ScriptedEngine):
        async def update_weights(self, source):  # no version=: its tokens could not be labelled
            raise AssertionError("never called")

    engine = FrozenEngine(renderer.tokenizer, ["ok"], eos_token_id=renderer.turn_end_id)
    trainer = Trainer.from_pretrained(str(model), TrainerConfig(device="cpu"))
    common = dict(renderer=renderer, tasks_per_step=1, group_size=1)
    with pytest.raises(LiveUpdateUnsupported, match="does not take version"):
        await train_async("miles/Echo-v0", engine, trainer, 1, **common)
    declared = ScriptedEngine(renderer.tokenizer, ["ok"], eos_token_id=renderer.turn_end_id)
    declared.live_weight_updates, declared.live_weight_updates_reason = False, "this server reloads between requests"
    with pytest.raises(LiveUpdateUnsupported, match="this server reloads between requests"):
        await train_async("miles/Echo-v0", declared, trainer, 1, **common)
    for bad, message in ((dict(max_staleness=-1), "max_staleness=-1"), (dict(on_stale="keep"), "on_stale='keep'"),
                         (dict(oversample=0.5), "oversample=0.5")):
        with pytest.raises(ValueError, match=message):
            await train_async("miles/Echo-v0", declared, trainer, 1, settings=AsyncSettings(**bad), **common)
    assert trainer.step == 0 and next(engine._calls) == 0 and next(declared._calls) == 0


async def test_synchronous_training_is_rollout_then_train_then_sync_every_step(model, renderer):
    """Pins the synchronous loop to its definition: each step rolls out on the newest weights only."""
    config = LoopConfig(sampling=SamplingParams(max_new_tokens=4, seed=0))

    def setup():
        trainer = RecordingTrainer.from_pretrained(str(model), TrainerConfig(lr=1e-3, device="cpu"))
        return trainer, ScriptedEngine(renderer.tokenizer, ["red blue", "ok", "seven"], eos_token_id=renderer.turn_end_id)

    trainer, engine = setup()
    history = await train("miles/Echo-v0", engine, trainer, 3, renderer=renderer, tasks_per_step=2, group_size=2,
                          loop_config=config, seed=5)
    reference, ref_engine = setup()
    expected = []
    for step in range(3):
        batch = [t async for t in rollout("miles/Echo-v0", ref_engine, renderer, n=2, group_size=2, config=config, seed=5 + step * 2)]
        expected.append(reference.train_step(batch))
        await ref_engine.update_weights(reference.state_dict(), version=reference.weight_version)
    assert [{k: v for k, v in m.items() if not k.startswith("rollout/")} for m in history] == expected
    for name, value in reference.state_dict().items():
        assert torch.equal(trainer.state_dict()[name], value), name
    assert engine.weight_version == "step-3"
    for step, batch in trainer.batches:  # staleness 0: every token sampled by the weights being trained
        assert [t.seed for t in batch if t.turns] and all(oldest_version(t) == step for t in batch)
