"""Trainer settings and the named algorithm presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

# algo name -> (advantage, policy loss, loss aggregation, clip range)
PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {"advantage": "grpo", "policy_loss": "ppo_clip", "loss_agg": "seq_mean_token_mean"},
    "dapo": {"advantage": "grpo", "policy_loss": "ppo_clip", "loss_agg": "token_mean", "eps_high": 0.28},
    "dr_grpo": {"advantage": "dr_grpo", "policy_loss": "ppo_clip", "loss_agg": "seq_mean_token_sum_norm"},
    "rloo": {"advantage": "rloo", "policy_loss": "ppo_clip", "loss_agg": "seq_mean_token_mean"},
    "gspo": {
        "advantage": "grpo",
        "policy_loss": "gspo",
        "loss_agg": "seq_mean_token_mean",
        "eps_low": 3e-4,
        "eps_high": 4e-4,
    },
}


@dataclass
class TrainerConfig:
    """Everything a training step depends on; ``algo`` fills the fields left as ``None``.

    ``advantage``, ``policy_loss`` and ``reward_fn`` take a built-in name or ``"pkg.mod:function"``.
    """

    algo: str = "grpo"
    advantage: str | None = None
    policy_loss: str | None = None
    loss_agg: str | None = None
    loss_norm_length: int | None = None  # Dr.GRPO's constant; default: longest response in the batch
    reward_fn: str | None = None  # (trajectory) -> float; default: trajectory.reward
    eps_low: float | None = None
    eps_high: float | None = None
    tis_cap: float | None = 2.0  # truncated IS against rollout logprobs; None disables
    staleness_decay: float = 1.0  # async: tokens k versions behind weigh decay**k more (losses.version_aware_weights)
    kl_coef: float = 0.0  # k3 KL to the initial policy (the base model for LoRA)
    entropy_coef: float = 0.0
    temperature: float = 1.0  # the rollout's sampling temperature; logits are divided by it
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    minibatches: int = 1  # optimizer steps per train_step (PPO-style); >1 recomputes old logprobs
    epochs: int = 1
    max_row_tokens: int = 4096
    rows_per_micro_batch: int = 1
    drop_statuses: tuple[str, ...] = ("failed", "aborted")  # zero loss weight for these
    r3: bool = False
    mtp_sft: bool = False
    mtp_loss_scale: float = 0.2
    mtp_detach_trunk: bool = True
    mtp_lr: float | None = None  # the MTP draft's own learning rate (its own param group); default: lr
    lora_rank: int = 0  # > 0 trains LoRA adapters only
    lora_alpha: int | None = None  # default 2 * rank
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainerConfig:
        """A copy with the preset's defaults filled in; unknown ``algo`` is a configuration error."""
        if self.algo not in PRESETS:
            raise ValueError(f"unknown algo {self.algo!r}: choose one of {', '.join(PRESETS)}")
        if self.mtp_lr is not None and not self.mtp_sft:
            raise ValueError("mtp_lr is the MTP draft's learning rate under MTP-SFT: set mtp_sft=True or leave mtp_lr unset")
        if not 0.0 < self.staleness_decay <= 1.0:
            raise ValueError(f"staleness_decay={self.staleness_decay}: must be in (0, 1] (1 weighs stale tokens like fresh ones)")
        defaults = {"eps_low": 0.2, "eps_high": 0.2, **PRESETS[self.algo]}
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerConfig:
        data = dict(data)
        for key in ("drop_statuses", "lora_targets"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)
