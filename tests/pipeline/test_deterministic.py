"""Deterministic runs: the same seed gives the same tokens, logprobs, metrics and weights, bit for bit."""

import pytest
import torch

from miles_envs.agents.embedded import EmbeddedEngine
from miles_envs.chat.renderer import ChatRenderer
from miles_envs.engine import SamplingParams
from miles_envs.loop import LoopConfig
from miles_envs.models.factory import init_model
from miles_envs.pipeline import TrainSettings, run_training
from miles_envs.pipeline.engines import DETERMINISTIC_ENGINE
from miles_envs.pipeline.settings import check_settings
from miles_envs.pipeline.sync import train
from miles_envs.trainer import Trainer, TrainerConfig

ENV = "miles/GuessNumber7-v0"


class Quiet:
    def resumed(self, step, warm_started): ...

    def sft_step(self, step, metrics): ...

    def train_step(self, metrics): ...

    def evaluated(self, step, reward, phase): ...


class RecordingTrainer(Trainer):
    """The real trainer, keeping each batch it is given: (episode id, token ids, rollout logprobs) per trajectory."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def train_step(self, trajectories):
        self.batches.append([(t.episode_id, t.prompt_ids + t.response_ids, t.logprobs) for t in trajectories])
        return super().train_step(trajectories)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("model"), arch="qwen3", size="tiny")


async def train_once(model, seed):
    engine = EmbeddedEngine.from_path(model, device="cpu", **DETERMINISTIC_ENGINE)
    try:
        trainer = RecordingTrainer.from_pretrained(str(model), TrainerConfig(lr=1e-2, device="cpu", seed=seed))
        history = await train(ENV, engine, trainer, 3, renderer=ChatRenderer(engine.tokenizer), tasks_per_step=2,
                              group_size=4, loop_config=LoopConfig(sampling=SamplingParams(max_new_tokens=4, seed=seed)),
                              seed=seed)
    finally:
        await engine.close()
    return history, trainer.batches, trainer.state_dict()


async def test_two_runs_with_one_seed_train_on_the_same_tokens_and_end_on_the_same_weights(model):
    first, second = await train_once(model, 0), await train_once(model, 0)
    (history, batches, weights), (history_again, batches_again, weights_again) = first, second
    assert history == history_again  # every metric of every step, exactly
    assert batches == batches_again  # token ids and rollout logprobs, in the same order
    assert weights.keys() == weights_again.keys()
    assert all(torch.equal(weights[name], weights_again[name]) for name in weights)
    # the batch is in task order whichever episode finished first
    assert [[episode for episode, _, _ in batch] for batch in batches] == [[f"{t}:{m}" for t in range(2) for m in range(4)]] * 3
    # the runs sampled: members of a group differ, and another seed plays other tokens
    assert len({tuple(ids) for _, ids, _ in batches[0][:4]}) > 1
    _, other_batches, _ = await train_once(model, 1)
    assert [ids for _, ids, _ in other_batches[0]] != [ids for _, ids, _ in batches[0]]


async def test_the_train_command_repeats_its_records_bit_for_bit(model, tmp_path):
    """Warm start, evals and RL steps through ``run_training`` with ``deterministic=True``, twice."""
    records = []
    for run in ("first", "second"):
        settings = TrainSettings(
            env_id=ENV, model=model, out=tmp_path / run, steps=2, tasks_per_step=2, group_size=4, max_new_tokens=4,
            lr=1e-2, sft_warmup=2, sft_batch=4, sft_episodes=8, sft_lr=1e-2, eval_every=1, eval_tasks=4, device="cpu",
            seed=3, deterministic=True,
        )
        await run_training(settings, Quiet())
        records.append({name: (tmp_path / run / name).read_text() for name in ("sft.jsonl", "metrics.jsonl", "eval.jsonl")})
    assert records[0] == records[1]
    assert len(records[0]["metrics.jsonl"].splitlines()) == 2 and len(records[0]["eval.jsonl"].splitlines()) == 4


@pytest.mark.parametrize("extra, named", [
    ({"async_mode": True}, "--async"),
    ({"engine": "sglang://127.0.0.1:1"}, "--engine"),
    ({"ray_workers": 2}, "--ray"),
])
def test_deterministic_refuses_schedules_it_cannot_repeat(model, tmp_path, extra, named):
    settings = TrainSettings(env_id=ENV, model=model, out=tmp_path / "run", steps=1, deterministic=True, **extra)
    with pytest.raises(ValueError, match=f"--deterministic .* {named}"):
        check_settings(settings)
