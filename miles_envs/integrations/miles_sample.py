"""Trajectory → Miles ``Sample``: fills any object with Miles' ``Sample`` fields (miles.utils.types).

The object is duck-typed so the same code serves Miles, slime (same field set) and the mirror
dataclass the tests use. Conventions kept exactly: ``tokens = prompt + response``;
``loss_mask``/``rollout_log_probs`` have ``response_length`` entries (0 and 0.0 on env tokens);
``rollout_routed_experts`` is int32 ``[len(tokens) - 1, layers, topk]``; ``status`` is the sample
class's own ``Status`` member.
"""

from __future__ import annotations

import copy
from typing import Any

from miles_envs.trajectory import Trajectory


def fill_sample(sample: Any, trajectory: Trajectory, *, decode: Any = None, rollout_id: int | None = None, reward: float | None = None) -> Any:
    """Write ``trajectory`` into ``sample`` (in place) and return it."""
    fields = trajectory.to_sample()
    sample.tokens = fields["tokens"]
    sample.response_length = fields["response_length"]
    sample.loss_mask = fields["loss_mask"]
    sample.rollout_log_probs = fields["rollout_log_probs"]
    sample.rollout_routed_experts = fields["rollout_routed_experts"]
    sample.reward = trajectory.reward if reward is None else reward
    sample.status = type(sample).Status[fields["status"]]
    if decode is not None:
        sample.response = decode(trajectory.response_ids)
    # one entry per version span, so a turn that crossed a weight update lists both versions
    sample.weight_versions = [v for *_, v in trajectory.model_version_spans() if v is not None]
    oldest, newest = trajectory.version_range
    sample.metadata = {
        **(sample.metadata or {}), **fields["metadata"], "messages": trajectory.messages,
        "oldest_weight_version": oldest, "newest_weight_version": newest,
    }
    if rollout_id is not None:
        sample.rollout_id = rollout_id
    spec_info = getattr(sample, "spec_info", None)
    if spec_info is not None:
        model_turns = [t for t in trajectory.turns if t.kind == "model"]
        spec_info.spec_verify_ct += sum(t.spec_verify_ct for t in model_turns)
        spec_info.spec_accept_token_num += sum(t.spec_accepted_tokens for t in model_turns)
        spec_info.spec_draft_token_num += sum(t.spec_draft_tokens for t in model_turns)
        spec_info.completion_token_num += trajectory.num_model_tokens
    return sample


def siblings(sample: Any, trajectories: list[Trajectory], *, reward: float, decode: Any = None) -> list[Any]:
    """One Sample per trajectory of one rollout: they share ``rollout_id`` (the parent's, else its index) and ``reward``."""
    rollout_id = sample.rollout_id if getattr(sample, "rollout_id", None) is not None else sample.index
    return [fill_sample(copy.deepcopy(sample), t, decode=decode, rollout_id=rollout_id, reward=reward) for t in trajectories]
