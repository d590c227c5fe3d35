"""Ray rollout workers on a real local cluster give the single-process loop's trajectories."""

import asyncio
import os
import sys

import cloudpickle
import pytest

ray = pytest.importorskip("ray")

from miles_envs.agents.scripted import ScriptContext, ScriptedEngine, SyntheticRouting  # noqa: E402
from miles_envs.chat import ChatRenderer  # noqa: E402
from miles_envs.distributed import distributed_rollout, rank_actors, start_rollout_workers, trainer_placement_group  # noqa: E402
from miles_envs.loop import LoopConfig, rollout  # noqa: E402
from miles_envs.engine import SamplingParams  # noqa: E402
from miles_envs.tokenizers import load_tokenizer  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the test module


def guess(context: ScriptContext) -> str:
    """A reply that depends only on the request (so it is the same in any process, any order)."""
    return str((sum(context.input_ids) * 31 + (context.sampling.seed or 0)) % 100)


def make_engine():
    return ScriptedEngine(load_tokenizer("qwen3"), guess, routing=SyntheticRouting(num_layers=2, topk=2, num_experts=8))


def make_renderer():
    return ChatRenderer(load_tokenizer("qwen3"))


@pytest.fixture(scope="module")
def cluster():
    # Ray fixes its auth mode for the whole process at the first init; a private local cluster needs
    # none, and later tests in this process attach to clusters started the same way.
    saved = dict(os.environ)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("MILES_ENVS_")}})
    yield
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def _key(t):
    return (
        t.episode_id, t.group_id, t.seed, t.prompt_ids, t.response_ids, t.loss_mask, t.logprobs,
        None if t.routed_experts is None else t.routed_experts.tolist(), t.reward, t.status.value,
    )


def test_workers_reproduce_the_single_process_rollout(cluster):
    config = LoopConfig(max_turns=3, return_routed_experts=True, sampling=SamplingParams(seed=7))
    local = asyncio.run(_collect(rollout("miles/GuessNumber-v0", make_engine(), make_renderer(), n=5, group_size=2, config=config, seed=11)))
    workers = start_rollout_workers(2, make_engine, make_renderer)
    remote = asyncio.run(distributed_rollout(workers, "miles/GuessNumber-v0", n=5, group_size=2, config=config, seed=11))
    assert len(remote) == 10 and len({t.episode_id for t in remote}) == 10
    assert [_key(t) for t in remote] == sorted((_key(t) for t in local), key=lambda k: tuple(map(int, k[0].split(":"))))
    assert any(len(t.turns) > 1 for t in remote) and all(t.routed_experts is not None for t in remote)


class _Rank:
    def env(self):
        return {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def test_trainer_ranks_get_one_bundle_and_the_torch_distributed_environment(cluster):
    group = trainer_placement_group(2, gpus_per_rank=0, cpus_per_rank=0.5)
    ranks = rank_actors(_Rank, group, master_port=29611)
    envs = ray.get([r.env.remote() for r in ranks])
    assert [e["RANK"] for e in envs] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {"2"} and {e["MASTER_PORT"] for e in envs} == {"29611"}
    ray.util.remove_placement_group(group)


def test_impossible_placement_is_a_clear_error(cluster):
    with pytest.raises(TimeoutError, match="cannot place 3 trainer ranks"):
        trainer_placement_group(3, gpus_per_rank=1, timeout_s=2)


async def _collect(stream):
    return [t async for t in stream]
