"""Token-weighted running means for metrics gathered over micro-batches."""

from __future__ import annotations

from collections import defaultdict

import torch


class MeanAccumulator:
    def __init__(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._weights: dict[str, float] = defaultdict(float)

    def add(self, name: str, value: torch.Tensor | float, weight: float = 1.0) -> None:
        if weight <= 0:
            return
        self._sums[name] += float(value) * weight
        self._weights[name] += weight

    def means(self) -> dict[str, float]:
        return {name: self._sums[name] / self._weights[name] for name in self._sums}
