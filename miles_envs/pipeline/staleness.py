"""Per-step staleness statistics of the trajectories a step trains on.

A token's staleness is the trainer's version minus the version that sampled it; a trajectory's is
that of its oldest token. The histograms are fractions per staleness value, as flat metric keys
(``staleness/tokens_lag1`` = share of the step's model tokens sampled one version behind).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from miles_envs.pipeline.buffer import token_versions, trajectory_staleness
from miles_envs.trajectory import Trajectory


def staleness_metrics(trajectories: Sequence[Trajectory], version: int) -> dict[str, float]:
    by_trajectory = Counter(trajectory_staleness(t, version) for t in trajectories)
    by_token: Counter[int] = Counter()
    for trajectory in trajectories:
        for count, number in token_versions(trajectory):
            by_token[max(0, version - number) if number is not None else 0] += count
    metrics: dict[str, float] = {}
    for name, histogram in (("trajectories", by_trajectory), ("tokens", by_token)):
        total = sum(histogram.values())
        if not total:
            continue
        for lag, count in sorted(histogram.items()):
            metrics[f"staleness/{name}_lag{lag}"] = count / total
        metrics[f"staleness/{name}_mean"] = sum(lag * count for lag, count in histogram.items()) / total
        metrics[f"staleness/{name}_max"] = float(max(histogram))
    return metrics
