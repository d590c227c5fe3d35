"""Rollout metrics accumulated over trajectories (written as JSON beside every run's output)."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any

from miles_envs.trajectory import Status, Trajectory


SUMMED = ("tool_calls", "parse_errors", "generate_s", "env_s")


def digest(t: Trajectory) -> dict[str, Any]:
    """What the metrics keep of one episode: small enough to store per episode in a run's index."""
    sums = {
        "reward": t.reward,
        "turns": t.num_turns,
        "prompt_tokens": len(t.prompt_ids),
        "response_tokens": len(t.response_ids),
        "model_tokens": t.num_model_tokens,
        **{key: float(t.metadata.get(key, 0.0)) for key in SUMMED},
        "spec_verify_ct": sum(turn.spec_verify_ct for turn in t.turns),
        "spec_accepted_tokens": sum(turn.spec_accepted_tokens for turn in t.turns),
        "spec_draft_tokens": sum(turn.spec_draft_tokens for turn in t.turns),
        "timeouts": int(bool(t.error) and ("timed out" in t.error or "did not finish within" in t.error)),
    }
    out: dict[str, Any] = {"status": t.status.value, "sums": {k: v for k, v in sums.items() if v}}
    if t.flags:
        out["flags"] = list(t.flags)
    if t.reward_components:
        out["components"] = dict(t.reward_components)
    return out


class RolloutMetrics:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.episodes = 0
        self.status: Counter[str] = Counter()
        self.flags: Counter[str] = Counter()
        self.sums: defaultdict[str, float] = defaultdict(float)
        self.components: defaultdict[str, float] = defaultdict(float)

    def add(self, t: Trajectory) -> None:
        self.add_digest(digest(t))

    def add_digest(self, d: dict[str, Any]) -> None:
        """Accumulate one episode's ``digest`` (as stored in a run's index)."""
        self.episodes += 1
        self.status[d["status"]] += 1
        self.flags.update(d.get("flags", ()))
        for key, value in d["sums"].items():
            self.sums[key] += value
        for name, value in d.get("components", {}).items():
            self.components[name] += value

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def summary(self) -> dict[str, Any]:
        n = max(self.episodes, 1)
        s = self.sums
        out: dict[str, Any] = {
            "episodes": self.episodes,
            "wall_s": round(self.elapsed, 3),
            "episodes_per_s": self.episodes / self.elapsed if self.elapsed else 0.0,
            "model_tokens_per_s": s["model_tokens"] / self.elapsed if self.elapsed else 0.0,
            "reward_mean": s["reward"] / n,
            "turns_mean": s["turns"] / n,
            "tool_calls": int(s["tool_calls"]),
            "parse_errors": int(s["parse_errors"]),
            "timeouts": int(s["timeouts"]),
            "prompt_tokens": int(s["prompt_tokens"]),
            "response_tokens": int(s["response_tokens"]),
            "model_tokens": int(s["model_tokens"]),
            "generate_s": s["generate_s"],
            "non_generation_s": s["env_s"],
            "status": dict(self.status),
            "flags": dict(self.flags),
            "reward_components_mean": {k: v / n for k, v in self.components.items()},
        }
        for status in Status:
            out[f"{status.value}_rate"] = self.status[status.value] / n
        if s["spec_draft_tokens"]:
            out["spec_accept_rate"] = s["spec_accepted_tokens"] / s["spec_draft_tokens"]
            out["spec_accept_length"] = (s["spec_accepted_tokens"] + s["spec_verify_ct"]) / s["spec_verify_ct"]
        return out
