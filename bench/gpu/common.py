"""Shared by the GPU checks: the machine line, confidence intervals, results files."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"

# two-sided 95% Student-t quantiles by degrees of freedom (beyond 30: the normal's)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t95(df: int) -> float:
    if df <= 0:
        return float("nan")
    known = [d for d in _T95 if d <= df]
    return _T95[max(known)] if df <= 30 else 1.96


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean, standard error and 95% t-interval half-width over independent repeats (e.g. seeds)."""
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    half = t95(len(values) - 1) * se
    return {"mean": mean, "se": se, "ci95": [mean - half, mean + half], "n": len(values), "values": values}


def ratio_ci(numerators: list[float], denominators: list[float]) -> dict[str, float]:
    """Geometric-mean ratio over paired repeats with a 95% t-interval on the log ratios."""
    logs = [math.log(a / b) for a, b in zip(numerators, denominators)]
    stats = mean_ci(logs)
    return {"ratio": math.exp(stats["mean"]), "ci95": [math.exp(v) for v in stats["ci95"]], "n": stats["n"],
            "values": [a / b for a, b in zip(numerators, denominators)]}


def machine() -> dict[str, str | None]:
    """Card, torch, transformers and megatron-core versions: every GPU result carries this line."""
    import transformers

    try:
        from importlib.metadata import version

        megatron = version("megatron-core")
    except Exception:  # not installed: say so rather than guess
        megatron = None
    return {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "megatron_core": megatron,
    }


def write(path: str | Path, report: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path


def fmt_ci(stats: dict, digits: str = ".3g") -> str:
    low, high = stats["ci95"]
    return f"{stats['mean']:{digits}} [{low:{digits}}, {high:{digits}}]"
