"""Ray orchestration: rollout workers running the env loop on task shards, trainer ranks on placement groups.

Imports Ray lazily (``pip install 'miles-envs[ray]'``); ``ray.init(...)`` is the caller's.
"""

from miles_envs.distributed.placement import rank_actors, trainer_placement_group
from miles_envs.distributed.rollout_workers import RolloutWorker, distributed_rollout, start_rollout_workers

__all__ = ["RolloutWorker", "distributed_rollout", "rank_actors", "start_rollout_workers", "trainer_placement_group"]
