"""Warm start on env demonstrations: token-exact demonstration episodes and a supervised step that learns them."""

import pytest

from miles_envs.agents.embedded import EmbeddedEngine
from miles_envs.engine import SamplingParams
from miles_envs.chat.renderer import ChatRenderer
from miles_envs.envs.echo import EchoEnv
from miles_envs.models.factory import init_model
from miles_envs.registry import make
from miles_envs.tokenizers import load_tokenizer
from miles_envs.trainer import Trainer, TrainerConfig
from miles_envs.pipeline.demonstrations import NoDemonstrationError, collect_demonstrations
from miles_envs.trainer.sft import warm_start


@pytest.fixture(scope="module")
def renderer():
    return ChatRenderer(load_tokenizer("qwen3"))


async def test_echo_demonstrations_are_the_loops_token_stream(renderer):
    demos = await collect_demonstrations("miles/Echo-v0", renderer, [3, 4])
    for seed, demo in zip([3, 4], demos):
        env = EchoEnv()
        observation, _ = env.reset(seed=seed)
        assert demo.prompt_ids == renderer.prompt_ids(observation)
        assert demo.response_ids == renderer.encode(env.phrase) + [renderer.turn_end_id]
        assert demo.loss_mask == [1] * len(demo.response_ids)
        assert (demo.reward, demo.status.value, demo.seed) == (1.0, "completed", seed)


async def test_guess_number_demonstrations_play_binary_search_with_env_turns_masked(renderer):
    (demo,) = await collect_demonstrations("miles/GuessNumber-v0", renderer, [11])
    env = make("miles/GuessNumber-v0")
    env.reset(seed=11)
    secret = env.secret
    guesses = [int(m["content"]) for m in demo.messages if m["role"] == "assistant"]
    low, high, expected = 1, 100, []
    while True:
        expected.append((low + high) // 2)
        if expected[-1] == secret:
            break
        low, high = (expected[-1] + 1, high) if expected[-1] < secret else (low, expected[-1] - 1)
    assert guesses == expected and demo.reward == pytest.approx(1.0)
    model_turns = [t for t in demo.turns if t.kind == "model"]
    env_turns = [t for t in demo.turns if t.kind == "env"]
    assert len(model_turns) == len(expected) and len(env_turns) == len(expected) - 1
    for turn in model_turns:
        ids = demo.response_ids[turn.start : turn.end]
        assert renderer.decode(ids[:-1]) in {str(g) for g in expected} and ids[-1] == renderer.turn_end_id
    assert all(demo.loss_mask[i] == 0 for t in env_turns for i in range(t.start, t.end))


async def test_an_env_without_demonstrations_is_a_clear_error(renderer):
    with pytest.raises(NoDemonstrationError, match="ToolCalcEnv defines no demonstration"):
        await collect_demonstrations("miles/ToolCalc-v0", renderer, [0])


async def test_warm_start_teaches_the_demonstration_to_greedy_decoding(tmp_path, renderer):
    folder = init_model(tmp_path / "model", arch="qwen3", size="tiny")
    trainer = Trainer.from_pretrained(str(folder), TrainerConfig(device="cpu"))
    demos = await collect_demonstrations("miles/Echo-v0", renderer, [5])
    history = warm_start(trainer, demos, 25, batch_size=1, lr=1e-2)
    assert history[-1]["sft/loss"] < 0.1 * history[0]["sft/loss"]
    assert history[-1]["sft/confident_token_frac"] == 1.0
    assert trainer.step == 0 and not trainer.optimizer.state  # the RL optimizer starts clean

    engine = EmbeddedEngine.from_path(folder, device="cpu")
    try:
        sampling = SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=renderer.stop_token_ids)
        untrained = await engine.generate(demos[0].prompt_ids, sampling)
        await engine.update_weights(trainer.state_dict())
        trained = await engine.generate(demos[0].prompt_ids, sampling)
    finally:
        await engine.close()
    assert untrained.output_ids != demos[0].response_ids
    assert trained.output_ids == demos[0].response_ids


def test_warm_start_needs_demonstrations(tmp_path):
    folder = init_model(tmp_path / "model", arch="qwen3", size="tiny")
    trainer = Trainer.from_pretrained(str(folder), TrainerConfig(device="cpu"))
    with pytest.raises(ValueError, match="at least one demonstration"):
        warm_start(trainer, [], 1)
