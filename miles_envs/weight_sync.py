"""Typed weight updates: what a trainer hands ``Engine.update_weights``, and which engine takes what.

A new policy reaches an engine in one of three ways, and an engine can only take some of them:

- ``Tensors``: the state dict itself, in memory. Only an engine in the trainer's process can use it
  (the embedded engine); posting it to a server would send a stringified dict as a model path.
- ``CheckpointFolder``: a folder of weights (safetensors, or a peft adapter folder) that the engine
  can read from its own filesystem: the embedded engine loads it, an SGLang server reloads from it.
- ``BroadcastGroup``: the tensors travel over an already initialised ``torch.distributed`` group
  (NCCL) from the trainer's rank 0; the engine is told their names, dtypes and shapes (SGLang's
  ``/update_weights_from_distributed``) while the trainer broadcasts them.

Each engine declares the kinds it accepts in ``weight_sources``; ``accept`` turns a raw value into
its kind (a mapping is ``Tensors``, a ``str``/``PathLike`` a ``CheckpointFolder``) and raises
``WeightSourceNotAccepted`` naming the kind and what the engine takes otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

WeightSourceKind = Literal["tensors", "folder", "broadcast"]
ALL_KINDS: frozenset[str] = frozenset({"tensors", "folder", "broadcast"})


@dataclass(frozen=True)
class Tensors:
    """An in-memory state dict (parameter name → tensor), e.g. ``Trainer.state_dict()``."""

    state_dict: Mapping[str, Any]
    kind: ClassVar[str] = "tensors"

    def describe(self) -> str:
        return f"{len(self.state_dict)} in-memory tensors"


@dataclass(frozen=True)
class CheckpointFolder:
    """A weights folder the engine can read (the trainer wrote it; shared storage for a server)."""

    path: str
    kind: ClassVar[str] = "folder"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.fspath(self.path))

    def describe(self) -> str:
        return f"the folder {self.path}"


@dataclass(frozen=True)
class BroadcastGroup:
    """Tensors broadcast over an initialised distributed group, announced by name, dtype and shape.

    ``dtypes`` are torch dtype names without the ``torch.`` prefix (``bfloat16``), as SGLang expects.
    """

    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    kind: ClassVar[str] = "broadcast"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.dtypes) == len(self.shapes)):
            raise ValueError(
                f"BroadcastGroup needs one dtype and one shape per name: got {len(self.names)} names, "
                f"{len(self.dtypes)} dtypes, {len(self.shapes)} shapes"
            )

    @classmethod
    def of(cls, state_dict: Mapping[str, Any], **kwargs: Any) -> BroadcastGroup:
        """The announcement for broadcasting ``state_dict`` (its names, dtypes and shapes, in order)."""
        names = tuple(state_dict)
        dtypes = tuple(str(t.dtype).removeprefix("torch.") for t in state_dict.values())
        shapes = tuple(tuple(int(n) for n in t.shape) for t in state_dict.values())
        return cls(names, dtypes, shapes, **kwargs)

    def describe(self) -> str:
        return f"a broadcast of {len(self.names)} tensors over group {self.group_name!r}"

    def to_sglang(self) -> dict[str, Any]:
        """The body of SGLang's ``POST /update_weights_from_distributed`` (less ``weight_version``)."""
        return {
            "names": list(self.names), "dtypes": list(self.dtypes), "shapes": [list(s) for s in self.shapes],
            "group_name": self.group_name, "flush_cache": self.flush_cache, **self.extra,
        }


WeightSource = Union[Tensors, CheckpointFolder, BroadcastGroup]


class WeightSourceNotAccepted(TypeError):
    """An engine was handed a kind of weight source it cannot use."""


def weight_source(value: Any) -> WeightSource:
    """``value`` as a typed source: typed sources pass, a mapping is tensors, a path is a folder."""
    if isinstance(value, (Tensors, CheckpointFolder, BroadcastGroup)):
        return value
    if isinstance(value, Mapping):
        return Tensors(value)
    if isinstance(value, (str, os.PathLike)):
        return CheckpointFolder(value)
    raise WeightSourceNotAccepted(
        f"cannot update weights from a {type(value).__name__}: pass Tensors(state_dict), "
        "CheckpointFolder(path) or BroadcastGroup(...) from miles_envs.weight_sync"
    )


def accepted_kinds(engine: Any) -> frozenset[str]:
    """What ``engine`` declares in ``weight_sources``; an undeclared engine is assumed to take any kind."""
    return frozenset(getattr(engine, "weight_sources", ALL_KINDS))


# How to turn a source of one kind into another that an engine may accept.
_CONVERSIONS = {
    ("tensors", "folder"): "write the state dict to a folder the engine can read and pass CheckpointFolder(path)",
    ("folder", "tensors"): "load the folder and pass Tensors(state_dict)",
    ("tensors", "broadcast"): "broadcast the tensors over a weight-update group and pass BroadcastGroup.of(state_dict)",
}


def accept(value: Any, accepted: Iterable[str], engine: str) -> WeightSource:
    """``value`` as a typed source of a kind in ``accepted``, or an error naming both and the fix."""
    source = weight_source(value)
    accepted = frozenset(accepted)
    if source.kind not in accepted:
        fixes = [_CONVERSIONS[source.kind, kind] for kind in sorted(accepted) if (source.kind, kind) in _CONVERSIONS]
        raise WeightSourceNotAccepted(
            f"{engine} cannot take {source.describe()} (kind {source.kind!r}); it accepts "
            f"{', '.join(repr(k) for k in sorted(accepted))}" + (f": {'; or '.join(fixes)}" if fixes else "")
        )
    return source
