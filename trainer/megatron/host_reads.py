"""Count the host's reads of device values: each one makes the host wait for the GPU's queue to drain.

A read is an op whose result the host needs before it can go on: a scalar read (``.item()``,
``float(t)``, ``int(t)``, ``bool(t)``), an op whose output size depends on the data (``nonzero``,
``masked_select``, boolean indexing, ``unique``), a comparison returning a Python bool
(``torch.equal``) or a copy to host memory (``.cpu()``, ``.tolist()``, ``.numpy()``).
``count_host_reads`` sees every op dispatched while it is active, backward included, through a
``TorchDispatchMode``: slow, for one counted step beside the timed ones. Compiled regions
(megatron-core compiles some router helpers) run eagerly while counting: a dispatch mode cannot see
inside a compiled graph. Blind spot: ``torch.tensor([...])`` of device scalars reads each one with
the dispatch mode excluded (megatron's fallback gradient norm does that once per parameter); a
profiler's count of stream synchronisations sees those.

On a GPU only reads of device tensors count. On a CPU every tensor lives on the host, so nothing
syncs; ``include_host_tensors=True`` counts the reads that would sync if those tensors lived on a
GPU, which lets a CPU test pin where they happen (copies from host to host are invisible there).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::equal",
          "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive"}


def _tensors(args) -> list[torch.Tensor]:
    out = []
    for value in args:
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(v for v in value if isinstance(v, torch.Tensor))
    return out


class HostReadCounter(TorchDispatchMode):
    """Counts host reads by op name (see module docstring)."""

    def __init__(self, include_host_tensors: bool = False) -> None:
        super().__init__()
        self.include_host_tensors = include_host_tensors
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _on_device(self, tensors: list[torch.Tensor]) -> bool:
        return any(self.include_host_tensors or t.device.type != "cpu" for t in tensors)

    def _is_read(self, name: str, args, kwargs) -> bool:
        if name in _READS:
            return self._on_device(_tensors(args))
        if name == "aten::index":  # boolean-mask indexing sizes its output by the mask's count
            masks = [t for t in _tensors(args[1:]) if t.dtype == torch.bool]
            return bool(masks) and self._on_device(masks)
        if name == "aten::_to_copy":
            device = kwargs.get("device")
            return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"
        if name == "aten::copy_":
            return args[0].device.type == "cpu" and args[1].device.type != "cpu"
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if self._is_read(name, args, kwargs):
            self.counts[name] += 1
        return func(*args, **kwargs)


@contextmanager
def count_host_reads(include_host_tensors: bool = False) -> Iterator[HostReadCounter]:
    """Within: every host read is counted in the yielded ``HostReadCounter``."""
    counter = HostReadCounter(include_host_tensors)
    with torch._dynamo.config.patch(disable=True), counter:
        yield counter
