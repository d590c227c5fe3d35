"""Token-weighted running means for metrics gathered over micro-batches."""

from __future__ import annotations

from collections import defaultdict

import torch


class MeanAccumulator:
    """Tensor values (and tensor weights) stay on their device until ``means()``, which reads them all
    in one transfer: reading one per micro-batch, or one per metric, would make the host wait for the
    GPU each time."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self._weights: dict[str, torch.Tensor | float] = defaultdict(float)

    def add(self, name: str, value: torch.Tensor | float, weight: float = 1.0) -> None:
        """Add ``value`` (a mean over ``weight`` items) to ``name``'s running mean."""
        if weight <= 0:
            return
        value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
        self.add_sum(name, value * weight, weight)

    def add_sum(self, name: str, total: torch.Tensor | float, weight: torch.Tensor | float) -> None:
        """Add a sum ``total`` over ``weight`` items; either may be a device tensor (a count the host
        has not read). A name whose tensor weight reads 0 at ``means()`` is left out."""
        if isinstance(total, torch.Tensor):
            total = total.detach().double()
        self._sums[name] = self._sums[name] + total
        self._weights[name] = self._weights[name] + weight

    def means(self) -> dict[str, float]:
        names = list(self._sums)
        sums, weights = [self._sums[n] for n in names], [self._weights[n] for n in names]
        on_device = [v for v in sums + weights if isinstance(v, torch.Tensor)]
        device = next((v.device for v in on_device if v.device.type != "cpu"), torch.device("cpu"))
        read = iter(torch.stack([v.to(device, torch.float64).reshape(()) for v in on_device]).tolist() if on_device else [])
        sums = [next(read) if isinstance(v, torch.Tensor) else v for v in sums]
        weights = [next(read) if isinstance(v, torch.Tensor) else v for v in weights]
        return {name: s / w for name, s, w in zip(names, sums, weights) if w > 0}
