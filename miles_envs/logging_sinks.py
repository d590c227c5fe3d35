"""Where run metrics go besides the metrics JSON: JSON lines, TensorBoard, Weights & Biases.

A sink takes one metrics dict per step: a rollout's ``RolloutMetrics.summary()`` (nested dicts such
as ``status`` or ``reward_components_mean`` become ``status/completed``-style tags) or a trainer's
flat step metrics (``loss``, ``mtp/loss``, ...). TensorBoard and W&B are imported only when such a
sink is opened, so the core install stays light.

    sink = open_sinks(["tensorboard:runs/tb", "json:runs/metrics.jsonl"])
    sink.log(metrics.summary(), step=0)
    sink.close()
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

SINK_KINDS = ("json", "tensorboard", "wandb")


@runtime_checkable
class MetricsSink(Protocol):
    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record one step's metrics."""

    def close(self) -> None:
        """Flush and release files or runs."""


def flatten_scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts as ``parent/child`` keys; strings, lists and None are left out
    (dashboards plot scalars), booleans become 0/1."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_scalars(value, f"{name}/"))
        elif isinstance(value, (bool, int, float)):
            flat[name] = float(value)
        elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
            flat[name] = float(value.item())
    return flat


class JsonSink:
    """One JSON object per line: ``{"step": N, **metrics}``, nested dicts kept as they are."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}, default=_json_default) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """Scalars into a TensorBoard event file, through ``torch.utils.tensorboard`` (needs the
    ``tensorboard`` package) or else ``tensorboardX``."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer = _summary_writer_class()(log_dir=str(self.log_dir))

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for name, value in flatten_scalars(metrics).items():
            if math.isfinite(value):
                self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """A W&B run; ``mode="offline"`` writes under ``dir`` without an account (``wandb sync`` later).
    With ``run_id`` the run of that id is continued when it exists (a resumed training run)."""

    def __init__(self, project: str, *, name: str | None = None, dir: str | Path | None = None,
                 mode: str | None = None, config: Mapping[str, Any] | None = None, run_id: str | None = None) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("the wandb sink needs the wandb package: pip install wandb") from exc
        self._run = wandb.init(project=project, name=name, dir=None if dir is None else str(dir), mode=mode,
                               config=dict(config or {}), reinit="create_new", id=run_id,
                               resume="allow" if run_id else None)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self._run.log(flatten_scalars(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


class FanOutSink:
    """Several sinks behind one."""

    def __init__(self, sinks: Iterable[MetricsSink]) -> None:
        self.sinks = list(sinks)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_sink(spec: str) -> MetricsSink:
    """``json:FILE``, ``tensorboard:DIR`` or ``wandb:PROJECT`` (W&B honours ``WANDB_MODE``, e.g. offline)."""
    kind, sep, target = spec.partition(":")
    if not sep or not target or kind not in SINK_KINDS:
        raise ValueError(f"metrics sink {spec!r}: write KIND:TARGET with KIND one of {', '.join(SINK_KINDS)}, "
                         "e.g. tensorboard:runs/tb, json:runs/metrics.jsonl or wandb:my-project")
    if kind == "json":
        return JsonSink(target)
    if kind == "tensorboard":
        return TensorBoardSink(target)
    return WandbSink(target)


def open_sinks(specs: Iterable[str]) -> FanOutSink:
    return FanOutSink(open_sink(spec) for spec in specs)


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "the tensorboard sink needs the tensorboard package (with torch) or tensorboardX: "
                "pip install tensorboard"
            ) from exc
    return SummaryWriter


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"metric value of type {type(value).__name__} is not JSON-serialisable")
