"""The torch backend: one HF ``transformers`` causal LM trained in-process on CPU or GPU.

``Trainer.train_step(trajectories)`` computes advantages, packs the batch, runs the policy loss
(with TIS, optional KL and entropy terms, optional R3 replay) and steps the optimizer;
``state_dict()`` is what the engine loads at weight sync. See ``config.TrainerConfig`` for knobs.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from miles_envs.trainer.advantages import ADVANTAGES, GroupAdvantages, scored_advantages
from miles_envs.trainer.batch import PackedBatch, pack
from miles_envs.trainer.config import TrainerConfig
from miles_envs.trainer.lora import LoraSettings, adapter_state_dict, apply_lora, is_peft_model
from miles_envs.trainer.losses import (
    POLICY_LOSSES,
    PolicyLossInput,
    aggregation_coefficients,
    k3_kl,
    masked_mean,
    token_logprobs_and_entropy,
    version_aware_weights,
)
from miles_envs.trainer.metrics import MeanAccumulator
from miles_envs.trainer.mtp_sft import count_mtp_tokens, mtp_sft_loss
from miles_envs.trainer.plugins import resolve
from miles_envs.trainer.r3 import RoutingRecord, RoutingReplay, find_routers, mismatch_sums
from miles_envs.trajectory import Trajectory


@dataclass
class ForwardResult:
    logprobs: torch.Tensor  # [rows, T] fp32, log p(target)
    entropy: torch.Tensor  # [rows, T] fp32
    routing: RoutingRecord
    hidden_states: torch.Tensor | None = None  # the trunk's final (normed) hidden state, when requested


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Policy-gradient trainer for an HF causal LM (dense or MoE), optionally with LoRA and MTP-SFT.

    ``mtp`` is the model's MTP draft stack (``miles_envs.models.mtp``), needed for ``mtp_sft``.
    """

    def __init__(self, model: nn.Module, config: TrainerConfig | None = None, mtp: nn.Module | None = None) -> None:
        self.config = (config or TrainerConfig()).resolved()
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.device = pick_device(cfg.device)
        if cfg.mtp_sft and mtp is None:
            raise ValueError(
                "mtp_sft=True needs the model's MTP layers: load a checkpoint that has them "
                "(`miles-envs init-model --mtp 1`, Trainer.from_pretrained) or pass mtp=build_mtp(model, 1)"
            )
        model = model.to(device=self.device, dtype=getattr(torch, cfg.dtype))
        self.base_model = model
        self.mtp = mtp.to(device=self.device, dtype=getattr(torch, cfg.dtype)).train() if mtp is not None else None
        self.ref_model = None
        if cfg.kl_coef > 0 and cfg.lora_rank == 0:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if cfg.lora_rank > 0:
            settings = LoraSettings(cfg.lora_rank, cfg.lora_alpha or 2 * cfg.lora_rank, target_modules=cfg.lora_targets)
            model = apply_lora(model, settings)
        self.model = model.train()
        self.replay = RoutingReplay(model) if find_routers(model) else None
        self.ref_replay = RoutingReplay(self.ref_model) if self.ref_model is not None and self.replay else None
        if cfg.r3 and self.replay is None:
            raise ValueError(f"r3=True but {type(model).__name__} has no MoE router to replay; turn r3 off")
        self.advantage_fn = resolve("advantage", cfg.advantage, ADVANTAGES)
        self.policy_loss_fn = resolve("policy loss", cfg.policy_loss, POLICY_LOSSES)
        self.reward_fn: Callable[[Trajectory], float] | None = resolve("reward_fn", cfg.reward_fn, {}) if cfg.reward_fn else None
        for param in self.mtp_parameters().values():
            param.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0

    @classmethod
    def from_pretrained(cls, path: str, config: TrainerConfig | None = None, **model_kwargs: Any) -> Trainer:
        """Load an HF checkpoint folder, with its MTP layers when the folder stores them."""
        from transformers import AutoModelForCausalLM

        from miles_envs.models.mtp import load_mtp

        model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
        return cls(model, config, mtp=load_mtp(model, Path(path)))

    def mtp_parameters(self) -> dict[str, nn.Parameter]:
        """The MTP stack's own parameters (the embedding and LM head belong to the trunk)."""
        if self.mtp is None:
            return {}
        return {n: p for n, p in self.mtp.named_parameters() if not n.startswith(("embed_tokens.", "shared_head."))}

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        seen = {id(p) for p in params}
        return params + [p for p in self.mtp_parameters().values() if id(p) not in seen]

    def param_groups(self) -> list[dict[str, Any]]:
        """The policy at ``lr``; the MTP draft in a group of its own at ``mtp_lr``, because the draft
        has to keep up with a policy that RL moves every step."""
        mtp = list(self.mtp_parameters().values())
        mtp_ids = {id(p) for p in mtp}
        groups: list[dict[str, Any]] = [{"params": [p for p in self.trainable_parameters() if id(p) not in mtp_ids]}]
        if mtp:
            lr = self.config.lr if self.config.mtp_lr is None else self.config.mtp_lr
            groups.append({"params": mtp, "lr": lr})
        return groups

    # -- weights -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights for the engine: the adapter (peft key names) under LoRA, else the full model;
        plus the MTP layers as ``mtp.<key>`` (the embedded engine's ``update_weights`` naming)."""
        if is_peft_model(self.model):
            weights = adapter_state_dict(self.model)
        else:
            weights = {name: tensor.detach() for name, tensor in self.model.state_dict().items()}
        return weights | {f"mtp.{name}": p.detach() for name, p in self.mtp_parameters().items()}

    @property
    def weight_version(self) -> str:
        return f"step-{self.step}"

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self, batch: PackedBatch, *, replay: bool, model: nn.Module | None = None, hidden_states: bool = False
    ) -> ForwardResult:
        """Logprobs/entropy of the batch's targets; routers replay the rollout when ``replay``."""
        model = model or self.model
        captured: list[torch.Tensor] = []
        hook = (
            self.base_model.get_decoder().register_forward_hook(lambda _m, _i, out: captured.append(out.last_hidden_state))
            if hidden_states
            else None
        )
        hooks = self.ref_replay if model is self.ref_model else self.replay
        routing = hooks.apply(batch.routed_experts, replay=replay) if hooks else nullcontext(RoutingRecord())
        # The vocabulary projection dominates small models' cost: project only the positions some
        # row trains on (prompt and env tokens carry no loss); the others read 0.
        keep = batch.loss_mask.any(dim=0).nonzero().flatten()
        try:
            with routing as record:
                out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, logits_to_keep=keep)
        finally:
            if hook is not None:
                hook.remove()
        logits = out.logits if self.config.temperature == 1.0 else out.logits / self.config.temperature
        kept_logprobs, kept_entropy = token_logprobs_and_entropy(logits, batch.targets[:, keep])
        logprobs = kept_logprobs.new_zeros(batch.targets.shape).index_copy(1, keep, kept_logprobs)
        entropy = kept_entropy.new_zeros(batch.targets.shape).index_copy(1, keep, kept_entropy)
        return ForwardResult(logprobs, entropy, record, captured[-1] if captured else None)

    @torch.no_grad()
    def _reference_logprobs(self, batch: PackedBatch) -> torch.Tensor:
        if is_peft_model(self.model):
            with self.model.disable_adapter():
                return self.forward(batch, replay=self.config.r3).logprobs
        return self.forward(batch, replay=self.config.r3, model=self.ref_model).logprobs

    # -- batch preparation ---------------------------------------------------------------------
    def advantages(self, trajectories: Sequence[Trajectory]) -> torch.Tensor:
        return self.group_advantages(trajectories).advantages

    def group_advantages(self, trajectories: Sequence[Trajectory]) -> GroupAdvantages:
        """Group statistics over completed/truncated members only (aborted/failed get 0)."""
        rewards = torch.tensor([self._reward(t) for t in trajectories], dtype=torch.float32)
        statuses = [t.status.value for t in trajectories]
        return scored_advantages(self.advantage_fn, rewards, [t.group_id for t in trajectories], statuses)

    def _reward(self, trajectory: Trajectory) -> float:
        return float(self.reward_fn(trajectory)) if self.reward_fn else float(trajectory.reward)

    def _weight(self, trajectory: Trajectory) -> float:
        if trajectory.status.value in self.config.drop_statuses:
            return 0.0
        return float(trajectory.metadata.get("loss_weight", 1.0))

    def _pack_minibatch(self, trajectories: Sequence[Trajectory], advantages: Sequence[float]) -> list[PackedBatch]:
        cfg = self.config
        coefs = aggregation_coefficients(
            cfg.loss_agg, [t.num_model_tokens for t in trajectories], [self._weight(t) for t in trajectories], cfg.loss_norm_length
        )
        batches = pack(
            trajectories, advantages, coefs, max_row_tokens=cfg.max_row_tokens, rows_per_micro_batch=cfg.rows_per_micro_batch
        )
        return [self._to_device(b) for b in batches]

    def _to_device(self, batch: PackedBatch) -> PackedBatch:
        """A packed micro-batch on the trainer's device (a backend may keep host facts beside it)."""
        return batch.to(self.device)

    # -- the step ------------------------------------------------------------------------------
    def train_step(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """One rollout batch -> ``minibatches * epochs`` optimizer steps; returns metrics."""
        cfg = self.config
        if not trajectories:
            raise ValueError("train_step needs at least one trajectory")
        grouped = self.group_advantages(trajectories)
        advantages = grouped.advantages.tolist()
        chunks = [c.tolist() for c in torch.arange(len(trajectories)).tensor_split(cfg.minibatches) if len(c)]
        plan = [self._pack_minibatch([trajectories[i] for i in c], [advantages[i] for i in c]) for c in chunks]
        stats = MeanAccumulator()
        mismatch = _MismatchCollector(stats)
        fixed_old = len(plan) * cfg.epochs > 1
        old_logprobs = {id(b): self._first_pass(b, mismatch) for mb in plan for b in mb} if fixed_old else {}
        ref_logprobs = {id(b): self._reference_logprobs(b) for mb in plan for b in mb} if cfg.kl_coef > 0 else {}
        for _ in range(cfg.epochs):
            for micro_batches in plan:
                self.optimizer.zero_grad(set_to_none=True)
                mtp_tokens = self._count_mtp_tokens(micro_batches) if cfg.mtp_sft else 0
                step_loss = 0.0  # a device tensor after the first micro-batch: read once per step, in stats.means()
                for batch in micro_batches:
                    loss = self._micro_batch_loss(
                        batch,
                        old_logprobs.get(id(batch)),
                        ref_logprobs.get(id(batch)),
                        stats,
                        None if fixed_old else mismatch,
                        mtp_tokens,
                    )
                    loss.backward()
                    step_loss = step_loss + loss.detach()
                stats.add("loss", step_loss)
                stats.add("grad_norm", self._optimizer_step())
        self.step += 1
        rewards = torch.tensor([self._reward(t) for t in trajectories])
        return {
            **stats.means(),
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "advantage_abs_mean": float(torch.tensor(advantages).abs().mean()),
            "response_tokens_mean": float(sum(t.num_model_tokens for t in trajectories) / len(trajectories)),
            "trajectories": float(len(trajectories)),
            "groups_dropped": float(grouped.groups_dropped),
            "step": float(self.step),
        }

    @torch.no_grad()
    def _first_pass(self, batch: PackedBatch, mismatch: _MismatchCollector) -> torch.Tensor:
        result = self.forward(batch, replay=self.config.r3)
        mismatch.add(result, batch)
        return result.logprobs

    def _micro_batch_loss(
        self,
        batch: PackedBatch,
        old_logprobs: torch.Tensor | None,
        ref_logprobs: torch.Tensor | None,
        stats: MeanAccumulator,
        mismatch: _MismatchCollector | None,
        mtp_tokens: int,
    ) -> torch.Tensor:
        cfg = self.config
        result = self.forward(batch, replay=cfg.r3, hidden_states=cfg.mtp_sft)
        if mismatch is not None:
            mismatch.add(result, batch)
        logprobs, mask = result.logprobs, batch.loss_mask
        old = result.logprobs.detach() if old_logprobs is None else old_logprobs
        per_token, policy_stats = self.policy_loss_fn(
            PolicyLossInput(
                logprobs=logprobs.flatten(),
                old_logprobs=old.flatten(),
                advantages=batch.advantages.flatten(),
                loss_mask=mask.flatten(),
                seq_index=batch.seq_index.flatten(),
                num_sequences=batch.num_sequences,
                eps_low=cfg.eps_low,
                eps_high=cfg.eps_high,
            )
        )
        per_token = per_token.view_as(logprobs)
        tokens = batch.num_loss_tokens
        stats.add("pg_loss", masked_mean(per_token.detach(), mask), tokens)
        if cfg.tis_cap is not None or cfg.staleness_decay != 1.0:
            weights = version_aware_weights(
                old, batch.rollout_logprobs, batch.rollout_versions, self.step, cap=cfg.tis_cap, decay=cfg.staleness_decay
            )
            per_token = per_token * weights
            stats.add("tis_weight_mean", masked_mean(weights, mask), tokens)
        if ref_logprobs is not None:
            kl = k3_kl(logprobs, ref_logprobs)
            per_token = per_token + cfg.kl_coef * kl
            stats.add("kl_ref", masked_mean(kl.detach(), mask), tokens)
        if cfg.entropy_coef:
            per_token = per_token - cfg.entropy_coef * result.entropy
        stats.add("entropy", masked_mean(result.entropy.detach(), mask), tokens)
        for name, value in policy_stats.items():
            stats.add(name, value, tokens)
        loss = (per_token * batch.token_coef * mask).sum()
        mtp_loss = self._mtp_loss(batch, result, mtp_tokens, stats)
        return loss if mtp_loss is None else loss + mtp_loss

    def _count_mtp_tokens(self, micro_batches: Sequence[PackedBatch]) -> int:
        """Labelled MTP tokens of a minibatch (a backend that keeps host copies counts on them)."""
        return count_mtp_tokens(micro_batches)

    def _mtp_loss(self, batch: PackedBatch, result: ForwardResult, mtp_tokens: int, stats: MeanAccumulator) -> torch.Tensor | None:
        """MTP-SFT's share of the micro-batch loss, or ``None`` when there is none to add.

        ``mtp_tokens`` counts the minibatch's labelled tokens, so the micro-batches sum to
        ``mtp_loss_scale`` x the minibatch's mean cross-entropy. Called for every micro-batch after
        the forward and before the backward; a backend whose forward already holds the MTP loss
        overrides it to scale that loss and report its metrics.
        """
        cfg = self.config
        if not (cfg.mtp_sft and mtp_tokens):
            return None
        mtp = mtp_sft_loss(self.mtp, result.hidden_states, batch, detach_trunk=cfg.mtp_detach_trunk)
        stats.add("mtp/loss", mtp.loss_sum.detach() / max(1, mtp.tokens), mtp.tokens)
        stats.add("mtp/accuracy", mtp.correct / max(1, mtp.tokens), mtp.tokens)
        return cfg.mtp_loss_scale * mtp.loss_sum / mtp_tokens

    def _optimizer_step(self) -> torch.Tensor | float:
        """Clip the gradients to ``max_grad_norm``, step, and return the norm before clipping (a device
        tensor: ``MeanAccumulator`` reads it with the step's other metrics)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        return grad_norm


class _MismatchCollector:
    """Rollout-vs-trainer logprob deltas and router disagreement, from the first forward of a step,
    summed on the device into the step's ``stats`` as ``mismatch/*`` (read with the other metrics;
    masking or reading here would make the host wait for the forward before it queues the backward).
    The means are ``mismatch_metrics``' over the step's loss tokens."""

    def __init__(self, stats: MeanAccumulator) -> None:
        self.stats = stats

    def add(self, result: ForwardResult, batch: PackedBatch) -> None:
        sums, tokens = mismatch_sums(result.logprobs, batch.rollout_logprobs, batch.loss_mask)
        for name, total in sums.items():
            self.stats.add_sum(f"mismatch/{name}", total, tokens)
        self.stats.add_sum("mismatch/router_disagreement", result.routing.disagreements, result.routing.pairs)
