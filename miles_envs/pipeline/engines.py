"""The engines a training run rolls out on, each paired with the weight sync it takes.

- no ``--engine``: the embedded engine on ``--model`` in this process; the trainer's tensors go to it
  directly (under LoRA, as the served adapter's weights); with ``--deterministic`` it runs
  ``DETERMINISTIC_ENGINE``;
- ``--engine sglang://HOST:PORT``: an SGLang server reloading the checkpoints this run writes under
  ``OUT/serving`` (under LoRA, the adapter is unloaded and reloaded);
- ``--ray N``: N Ray actors with their own embedded engines play the rollouts; the local engine is
  kept for evaluation and every worker receives the same tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from miles_envs.loop import LoopConfig
from miles_envs.pipeline.settings import ADAPTER_NAME, TrainSettings
from miles_envs.pipeline.weights import FanOut, InProcess, ThroughFolder, WeightSync

# One request at a time, each prompt prefilled whole: a row's numbers then depend on its own tokens
# and the weights only. Batched, they also depend on the other rows (the padding width changes
# attention's sums in the last bits) and so on when each request happened to arrive.
DETERMINISTIC_ENGINE = {"max_running": 1, "prefix_cache_tokens": 0}


@dataclass
class Rollouts:
    """Where a run's episodes are played and how its weights reach them."""

    engine: Any  # the local engine: every rollout without Ray, and the evals
    weight_sync: WeightSync
    collect: Callable[..., Any] | None = None  # a synchronous step's rollout elsewhere (Ray)
    run_group: Callable[..., Any] | None = None  # one group elsewhere, for asynchronous training


async def local_rollouts(settings: TrainSettings, trainer: Any) -> Rollouts:
    """The embedded engine on ``--model`` (adapter served by name under LoRA), or an SGLang server
    reloading checkpoints that this run writes under ``OUT/serving``."""
    lora = ADAPTER_NAME if settings.lora_rank > 0 else None
    if settings.engine is None:
        from miles_envs.agents.embedded import EmbeddedEngine

        schedule = DETERMINISTIC_ENGINE if settings.deterministic else {}
        engine = EmbeddedEngine.from_path(settings.model, device=trainer.device, draft_tokens=settings.draft_tokens, **schedule)
        if lora:
            from miles_envs.trainer.lora import save_adapter

            await engine.load_lora_adapter(ADAPTER_NAME, save_adapter(trainer.model, settings.out / "serving" / "adapter"))
        return Rollouts(engine, InProcess(engine, lora=lora))

    from miles_envs.agents.factory import make_engine

    if not hasattr(trainer.model, "save_pretrained"):
        raise ValueError(f"--engine {settings.engine} reloads HF checkpoints, which only --backend torch writes")
    engine = make_engine(settings.engine)

    def save(folder: Path) -> None:
        trainer.model.save_pretrained(folder, safe_serialization=True)

    return Rollouts(engine, ThroughFolder(engine, save, settings.out / "serving", keep=settings.keep_serving, lora=lora))


def ray_rollouts(settings: TrainSettings, local: Rollouts, make_renderer: Callable[[], Any]) -> Rollouts:
    """Rollouts on ``settings.ray_workers`` Ray actors, each with its own embedded engine on ``--model``.

    ``make_renderer`` must pickle (each worker builds its own renderer).
    """
    if settings.engine is not None or settings.lora_rank:
        raise ValueError("--ray runs embedded engines on the workers: drop --engine and --lora")
    import ray

    from miles_envs.agents.embedded import EmbeddedEngine
    from miles_envs.distributed import distributed_rollout, start_rollout_workers

    if not ray.is_initialized():
        ray.init(num_cpus=max(2, settings.ray_workers), include_dashboard=False, log_to_driver=False)
    workers = start_rollout_workers(
        settings.ray_workers, functools.partial(EmbeddedEngine.from_path, str(settings.model), device="cpu"), make_renderer,
    )

    async def collect(n: int, group_size: int, config: LoopConfig, seed: int):
        return await distributed_rollout(workers, settings.env_id, n=n, group_size=group_size, config=config, seed=seed)

    async def run_group(index: int, group_size: int, config: LoopConfig, env_seed: int):
        """One group on worker ``index % N`` (asynchronous training streams groups, not steps)."""
        worker = workers[index % len(workers)]
        for trajectory in await worker.run.remote(settings.env_id, 0, 1, group_size, config, env_seed):
            yield trajectory

    return Rollouts(local.engine, FanOut(local.weight_sync, workers), collect, run_group)
