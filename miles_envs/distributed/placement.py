"""Trainer ranks on a Ray placement group: one bundle (GPU + CPUs) per rank, ranks packed together.

Each rank actor starts with the ``torch.distributed`` environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) that ``trainer.megatron.parallel.init_parallel``
reads, so a trainer rank runs the same code under Ray as under ``torchrun``.
"""

from __future__ import annotations

from typing import Any


def trainer_placement_group(num_ranks: int, *, gpus_per_rank: float = 1, cpus_per_rank: float = 1, timeout_s: float = 600):
    """A ready placement group of ``num_ranks`` bundles (``PACK``: as few nodes as possible)."""
    import ray
    from ray.util.placement_group import placement_group

    bundle = {"CPU": cpus_per_rank} | ({"GPU": gpus_per_rank} if gpus_per_rank else {})
    group = placement_group([dict(bundle) for _ in range(num_ranks)], strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        raise TimeoutError(
            f"the cluster cannot place {num_ranks} trainer ranks of {bundle} within {timeout_s:.0f}s: "
            "lower the rank count or add nodes"
        )
    return group


def rank_actors(actor_class: type, group, *args: Any, master_port: int = 29500, **kwargs: Any) -> list[Any]:
    """One ``actor_class`` actor per bundle of ``group``, bundle ``i`` = rank ``i``."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = group.bundle_specs
    master = ray.util.get_node_ip_address()
    actors = []
    for rank, bundle in enumerate(bundles):
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": str(len(bundles)),
            "LOCAL_RANK": "0",  # Ray shows each rank only its own GPU
            "MASTER_ADDR": master,
            "MASTER_PORT": str(master_port),
        }
        options = dict(
            num_cpus=bundle.get("CPU", 0),
            num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
            runtime_env={"env_vars": env},
        )
        actors.append(ray.remote(actor_class).options(**options).remote(*args, **kwargs))
    return actors
