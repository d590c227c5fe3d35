"""A per-episode sandbox budget: how many executions and how many sandbox seconds one episode may
spend, so one runaway episode cannot hold a shared pool's sandboxes for the whole step."""

from __future__ import annotations

from dataclasses import dataclass

from miles_envs.sandbox.base import ExecResult


@dataclass(frozen=True)
class SandboxBudget:
    """``runs``: executions per episode; ``seconds``: their summed wall time. None = unbounded."""

    runs: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.runs is not None and self.runs < 0:
            raise ValueError(f"SandboxBudget.runs must be >= 0 or None, got {self.runs}")
        if self.seconds is not None and self.seconds <= 0:
            raise ValueError(f"SandboxBudget.seconds must be positive or None, got {self.seconds}")

    def meter(self) -> BudgetMeter:
        return BudgetMeter(self)


class BudgetMeter:
    """One episode's spending against a :class:`SandboxBudget`."""

    def __init__(self, budget: SandboxBudget) -> None:
        self.budget = budget
        self.runs = 0
        self.seconds = 0.0

    def refusal(self, *, run: bool = True) -> str | None:
        """Why the next execution is refused, or None while budget remains. ``run=False`` asks for
        an execution that spends only time (a file read, say), not one of the counted runs."""
        budget = self.budget
        if run and budget.runs is not None and self.runs >= budget.runs:
            return f"no runs left ({budget.runs} used)"
        if budget.seconds is not None and self.seconds >= budget.seconds:
            return f"no sandbox time left ({budget.seconds:g} s used)"
        return None

    def timeout(self, default: float) -> float:
        """The next execution's timeout: ``default``, cut to the sandbox seconds that remain."""
        if self.budget.seconds is None:
            return default
        return max(min(default, self.budget.seconds - self.seconds), 0.0)

    def charge(self, result: ExecResult, *, run: bool = True) -> None:
        self.runs += run
        self.seconds += result.duration

    def usage(self) -> dict[str, float]:
        return {"sandbox_runs": self.runs, "sandbox_seconds": round(self.seconds, 4)}
