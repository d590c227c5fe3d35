"""The orchestration layer: rollout -> buffer -> train -> weight sync, synchronous or asynchronous.

The env loop (``miles_envs.loop``) plays episodes on an engine; this layer schedules them, hands
the finished trajectories to a trainer (which only turns batches into weights and metrics), and
pushes the new weights back through a :class:`~miles_envs.pipeline.weights.WeightSync`. The
``miles-envs train`` command parses its options into :class:`TrainSettings` and calls
:func:`run_training`.

- ``sync``: :func:`train`, one step after another; ``async_run``: :func:`train_async`, rollouts
  keep running within a staleness bound (``buffer``, ``staleness``);
- ``weights``: the weight-sync strategies; ``records``: the run folder (metrics lines, checkpoints,
  resume); ``demonstrations``: warm-start episodes played through the env loop;
- ``settings``, ``engines``, ``run``: one whole training run as the CLI runs it.
"""

from miles_envs.pipeline.async_run import AsyncSettings, LiveUpdateUnsupported, train_async
from miles_envs.pipeline.demonstrations import NoDemonstrationError, collect_demonstrations
from miles_envs.pipeline.run import run_training
from miles_envs.pipeline.settings import BackendUnavailable, TrainSettings
from miles_envs.pipeline.sync import train
from miles_envs.pipeline.weights import FanOut, InProcess, ThroughFolder, WeightSync

__all__ = [
    "AsyncSettings", "BackendUnavailable", "FanOut", "InProcess", "LiveUpdateUnsupported", "NoDemonstrationError",
    "ThroughFolder", "TrainSettings", "WeightSync", "collect_demonstrations", "run_training", "train", "train_async",
]
