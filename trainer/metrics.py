"""Token-weighted running means for metrics gathered over micro-batches."""

from __future__ import annotations

from collections import defaultdict

import torch


class MeanAccumulator:
    """Tensor values stay on their device until ``means()``: reading one per micro-batch would make
    the host wait for the GPU to drain its queue every time."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self._weights: dict[str, float] = defaultdict(float)

    def add(self, name: str, value: torch.Tensor | float, weight: float = 1.0) -> None:
        if weight <= 0:
            return
        value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
        self._sums[name] = self._sums[name] + value * weight
        self._weights[name] += weight

    def means(self) -> dict[str, float]:
        return {name: float(self._sums[name]) / self._weights[name] for name in self._sums}
