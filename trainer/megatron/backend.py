"""The megatron backend: the torch backend's training step on a megatron-core ``GPTModel``.

``MegatronTrainer`` is a ``Trainer`` whose forward runs megatron (packed rows, R3 through
``RouterReplay``, MTP through ``mtp_num_layers``); advantages, packing, policy losses, TIS,
aggregation and the step structure are the torch backend's own code. The model is bf16 through
``Float16Module`` when ``dtype="bfloat16"``, wrapped in megatron's DDP with the distributed
optimizer (gradient clipping happens inside it). ``state_dict()`` returns HF-named weights, so the
embedded engine's ``update_weights`` and ``save_hf_checkpoint`` take them as they are.

The head is ``vocab_head``'s chunked one by default: the forward stops at the final hidden states
of the decoder and the MTP depths, and the logprobs, entropy and MTP cross-entropy come chunk by
chunk from them and the output weight, never as full logits. The MTP loss is then the torch
backend's: ``mtp_loss_scale x`` the minibatch's mean cross-entropy, added to each micro-batch's loss.
Under tensor parallelism each rank runs the head on its vocabulary shard and the per-token
statistics are all-reduced (``vocab_head``'s ``group``). With ``vocab_head="unfused"`` (and always
under sequence parallelism) megatron's output layer runs and
the MTP loss is megatron's own (``MTPLossAutoScaler`` injects its gradient at the hidden states): a
mean over the micro-batch's labelled tokens, its backward scale set per micro-batch to
``micro-batch tokens / minibatch tokens``, which gives the same sum (exact for one MTP depth).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from miles_envs.trainer.advantages import ADVANTAGES
from miles_envs.trainer.batch import PackedBatch
from miles_envs.trainer.config import TrainerConfig
from miles_envs.trainer.losses import POLICY_LOSSES, token_logprobs_and_entropy
from miles_envs.trainer.megatron.attention import install_packed_attention
from miles_envs.trainer.megatron.forward import HostBackedBatch, host_of, pad_width, run_forward, run_to_hidden
from miles_envs.trainer.megatron.model import MegatronSettings, build_gpt_model
from miles_envs.trainer.megatron.multi_tensor import install_device_multi_tensor_ops
from miles_envs.trainer.megatron.parallel import MegatronUnavailable, ensure_parallel
from miles_envs.trainer.megatron.replay import MegatronRoutingReplay
from miles_envs.trainer.megatron.vocab_head import vocab_head
from miles_envs.trainer.megatron.weights import export_hf_weights, load_hf_weights
from miles_envs.trainer.mtp_sft import count_mtp_tokens, mtp_labels
from miles_envs.trainer.plugins import resolve
from miles_envs.trainer.r3 import RoutingRecord
from miles_envs.trainer.torch_backend import ForwardResult, Trainer, pick_device


class _MegatronStep:
    """Gives megatron's DDP + optimizer the ``zero_grad``/``step`` surface the training step uses;
    ``step`` returns the gradient norm megatron measured before clipping."""

    def __init__(self, ddp_model, optimizer) -> None:
        self.ddp_model = ddp_model
        self.optimizer = optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none)

    def step(self) -> torch.Tensor | float:
        """The norm stays a device tensor where megatron keeps it there (read with the step's metrics)."""
        self.ddp_model.finish_grad_sync()
        succeeded, grad_norm, _ = self.optimizer.step()
        if not succeeded:
            raise FloatingPointError("megatron optimizer skipped the step (non-finite gradients)")
        return grad_norm

    def state_dict(self) -> dict:
        if self.ddp_model.ddp_config.use_distributed_optimizer:
            raise NotImplementedError(
                "checkpointing the distributed optimizer (sharded over data-parallel ranks) is not implemented: "
                "build the trainer with MegatronSettings(distributed_optimizer=False) to write checkpoints"
            )
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def _wrap_for_training(gpt_model, cfg: TrainerConfig, settings: MegatronSettings):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    install_device_multi_tensor_ops()
    model = Float16Module(gpt_model.config, gpt_model) if settings.bf16 else gpt_model
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=settings.distributed_optimizer
    )
    ddp = DistributedDataParallel(config=gpt_model.config, ddp_config=ddp_config, module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            clip_grad=cfg.max_grad_norm,
            bf16=settings.bf16,
            params_dtype=gpt_model.config.params_dtype,
            use_distributed_optimizer=settings.distributed_optimizer,
        ),
        [ddp],
    )
    return ddp, _MegatronStep(ddp, optimizer)


class MegatronTrainer(Trainer):
    """Policy-gradient trainer on megatron-core (see module docstring).

    Building one sets up megatron's parallel state when the process has none (``ensure_parallel``):
    on a machine without CUDA that fails with ``MegatronUnavailable`` naming the torch backend.
    """

    def __init__(
        self,
        hf_config,
        hf_weights: dict[str, torch.Tensor],
        config: TrainerConfig | None = None,
        settings: MegatronSettings | None = None,
    ) -> None:
        cfg = (config or TrainerConfig()).resolved()
        if cfg.lora_rank or cfg.kl_coef:
            raise ValueError("the megatron backend trains full weights without a KL reference: set lora_rank=0, kl_coef=0")
        if cfg.mtp_lr is not None:
            raise ValueError("the megatron backend trains the MTP layers at the policy's lr: leave mtp_lr unset")
        self.config = cfg
        self.settings = settings or MegatronSettings(
            bf16=cfg.dtype == "bfloat16", routing_replay=cfg.r3, mtp_loss_scale=cfg.mtp_loss_scale
        )
        if cfg.r3 and not self.settings.routing_replay:
            raise ValueError("r3=True needs MegatronSettings(routing_replay=True)")
        ensure_parallel(self.settings, cfg.seed)
        torch.manual_seed(cfg.seed)
        self.device = pick_device(cfg.device)
        self.hf_config = hf_config
        self.gpt = build_gpt_model(hf_config, self.settings)
        if self.settings.tensor_parallel > 1 and self.gpt.config.num_moe_experts and not self.gpt.config.sequence_parallel:
            raise MegatronUnavailable(
                "training an MoE with tensor_parallel > 1 needs sequence parallelism, which megatron-core supports only "
                "with transformer-engine's norms (not installed): install transformer-engine or use expert_parallel"
            )
        if cfg.mtp_sft and not self.gpt.config.mtp_num_layers:
            raise ValueError("mtp_sft=True needs a config with MTP layers (num_nextn_predict_layers > 0)")
        load_hf_weights(self.gpt, hf_config, hf_weights)
        if self.settings.attention == "packed":
            install_packed_attention(self.gpt)
        self.model, self.optimizer = _wrap_for_training(self.gpt, cfg, self.settings)
        self.base_model = self.model
        self.mtp = self.ref_model = None
        self.replay = MegatronRoutingReplay(self.gpt) if self.settings.routing_replay else None
        self.advantage_fn = resolve("advantage", cfg.advantage, ADVANTAGES)
        self.policy_loss_fn = resolve("policy loss", cfg.policy_loss, POLICY_LOSSES)
        self.reward_fn = resolve("reward_fn", cfg.reward_fn, {}) if cfg.reward_fn else None
        # under sequence parallelism (transformer-engine's norms) the hidden states are split by position: megatron's head
        self.fused_head = self.settings.vocab_head == "fused" and not self.gpt.config.sequence_parallel
        self.step = 0
        self._mtp_outputs: list[torch.Tensor] = []  # per MTP depth: logits, or hidden states with the fused head

    @classmethod
    def from_pretrained(cls, path: str, config: TrainerConfig | None = None, settings: MegatronSettings | None = None, **_: Any):
        """Build from an HF checkpoint folder, with its MTP layers when the folder stores them."""
        from miles_envs.models.loading import load_checkpoint

        loaded = load_checkpoint(path, device="cpu", dtype=torch.float32)
        return cls(loaded.model.config, hf_state_of(loaded.model, loaded.mtp), config, settings)

    # -- weights -------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []  # the megatron optimizer owns the parameters and clips their gradients

    def mtp_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """HF-named weights (``mtp.*`` for the MTP layers): what ``Trainer.state_dict`` returns."""
        return export_hf_weights(self.gpt, self.hf_config)

    def save_model_files(self, folder) -> None:
        """A checkpoint's model folder: an HF folder (with ``mtp.safetensors``) that engines load too."""
        from miles_envs.trainer.megatron.export import save_hf_checkpoint

        save_hf_checkpoint(self.state_dict(), self.hf_config, folder)

    def load_model_files(self, folder) -> None:
        """Weights from a checkpoint's model folder, into the model and the optimizer's fp32 copies."""
        from miles_envs.models.loading import load_checkpoint

        loaded = load_checkpoint(str(folder), device="cpu", dtype=torch.float32)
        load_hf_weights(self.gpt, self.hf_config, hf_state_of(loaded.model, loaded.mtp))
        reload = getattr(self.optimizer.optimizer, "reload_model_params", None)
        if reload is not None:
            reload()

    # -- forward -------------------------------------------------------------------------------
    def _to_device(self, batch: PackedBatch) -> HostBackedBatch:
        return HostBackedBatch.of(batch, self.device)

    def forward(self, batch: PackedBatch, *, replay: bool, model=None, hidden_states: bool = False) -> ForwardResult:
        width = batch.input_ids.shape[1]
        if self.gpt.config.sequence_parallel:
            batch = pad_width(batch, self.settings.tensor_parallel)
        routing = self.replay.apply(batch.routed_experts, replay=replay) if self.replay else nullcontext(RoutingRecord())
        with routing as record:
            if self.fused_head:
                out = run_to_hidden(self.model, self.gpt, batch, self.device)
                main, mtp = out.hidden, out.mtp_hidden
            else:
                out = run_forward(self.model, self.gpt, batch, self.device)
                main, mtp = out.logits, out.mtp_logits
        if self.settings.recompute and self.replay is not None and replay and main.requires_grad:
            main.register_hook(lambda grad: (self.replay.for_recompute(), grad)[1])
        self._mtp_outputs = [m[:, :width] for m in mtp]
        main, targets = main[:, :width], batch.targets[:, :width].to(main.device)
        if self.fused_head:
            logprobs, entropy, _ = self._head(main, targets, host_of(batch).loss_mask[:, :width], temperature=self.config.temperature)
            return ForwardResult(logprobs, entropy, record)
        logits = main if self.config.temperature == 1.0 else main / self.config.temperature
        logprobs, entropy = token_logprobs_and_entropy(logits, targets)
        return ForwardResult(logprobs, entropy, record)

    def _head(self, hidden: torch.Tensor, targets: torch.Tensor, host_mask: torch.Tensor, **kwargs):
        """``vocab_head`` of ``hidden`` ([rows, T, hidden]) with the model's output weight (tied or
        not), run only where the host mask ``host_mask`` ([rows, T]) is set: prompts, padding and
        unlabelled positions cost no head FLOPs. Returns ``(logprobs, entropy, argmax)`` as
        [rows, T], zero elsewhere."""
        gpt = self.gpt
        weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else gpt.output_layer.weight
        index = host_mask.flatten().nonzero().squeeze(1).to(hidden.device, non_blocking=True)
        out = vocab_head(hidden.flatten(0, 1).index_select(0, index), weight, targets.flatten().index_select(0, index),
                         chunk_tokens=self.settings.head_chunk_tokens, vocab_align=self.settings.head_vocab_align,
                         group=self._vocab_group(), **kwargs)

        def spread(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values.new_zeros(targets.numel()).index_copy(0, index, values).view_as(targets)

        return spread(out.logprobs), spread(out.entropy), spread(out.argmax)

    def _vocab_group(self):
        """The tensor-parallel group the output weight's vocabulary is split over (None on one rank)."""
        if self.settings.tensor_parallel == 1:
            return None
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_group()

    # -- the step ------------------------------------------------------------------------------
    def _optimizer_step(self) -> torch.Tensor | float:
        return self.optimizer.step()  # megatron's optimizer clips (``clip_grad``) and reports the norm

    def _count_mtp_tokens(self, micro_batches) -> int:
        return count_mtp_tokens([host_of(b) for b in micro_batches])  # host copies: no read of the device

    def _mtp_loss(self, batch: PackedBatch, result: ForwardResult, mtp_tokens: int, stats) -> torch.Tensor | None:
        """With the fused head: the MTP cross-entropy from the depths' hidden states (``None``
        without MTP-SFT, which leaves the MTP layers untouched). Else the MTP loss is already in
        megatron's forward: set its backward scale for this micro-batch (0 without MTP-SFT)."""
        if self.fused_head:
            return self._fused_mtp_loss(batch, mtp_tokens, stats) if self.config.mtp_sft and mtp_tokens else None
        from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

        train_mtp = self.config.mtp_sft and mtp_tokens > 0
        share = int(mtp_labels(host_of(batch), 0)[3].sum()) / mtp_tokens if train_mtp else 0.0
        MTPLossAutoScaler.set_loss_scale(torch.tensor(share))
        if train_mtp:
            self._mtp_stats(batch, stats)
        return None

    def _fused_mtp_loss(self, batch: PackedBatch, mtp_tokens: int, stats) -> torch.Tensor:
        """``settings.mtp_loss_scale x`` this micro-batch's share of the minibatch's mean MTP cross-entropy
        (mean over depths), with ``_mtp_stats``'s metrics; metrics stay on the device."""

        def token_ce(hidden, labels, host_mask):
            logprobs, _, argmax = self._head(hidden, labels, host_mask, entropy=False)
            return logprobs.neg(), argmax

        return self.settings.mtp_loss_scale * self._mtp_depths(batch, token_ce, stats) / mtp_tokens

    @torch.no_grad()
    def _mtp_stats(self, batch: PackedBatch, stats) -> None:
        """``mtp/loss`` and ``mtp/accuracy`` from megatron's MTP logits (its forward holds the loss)."""

        def token_ce(logits, labels, _host_mask):
            ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
            return ce, logits.argmax(-1)

        self._mtp_depths(batch, token_ce, stats)

    def _mtp_depths(self, batch: PackedBatch, token_ce, stats) -> torch.Tensor:
        """Sum over labelled tokens of the MTP cross-entropy, mean over depths; reports ``mtp/loss`` (the
        per-token mean, as in the torch backend) and depth-0 ``mtp/accuracy``, both left on the device
        (``MeanAccumulator`` reads them once per step). ``token_ce(output, labels, host_mask)`` gives a
        depth's per-token cross-entropy and argmax."""
        depths, ce_total, loss_mean = len(self._mtp_outputs), 0.0, 0.0
        for depth, output in enumerate(self._mtp_outputs):
            _, _, labels, host_mask = mtp_labels(host_of(batch), depth)  # host tensors: their counts need no sync
            labelled = int(host_mask.sum())
            labels, mask = labels.to(output.device, non_blocking=True), host_mask.to(output.device, non_blocking=True)
            ce, argmax = token_ce(output, labels, host_mask)
            ce_sum = (ce * mask).sum()
            ce_total = ce_total + ce_sum / depths
            loss_mean = loss_mean + ce_sum.detach() / max(1, labelled) / depths
            if depth == 0:
                tokens, hits = labelled, ((argmax == labels).float() * mask).sum()
        stats.add("mtp/loss", loss_mean, tokens)
        stats.add("mtp/accuracy", hits / max(1, tokens), tokens)
        return ce_total


def hf_state_of(model: torch.nn.Module, mtp: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """An HF model's weights (plus its MTP stack as ``mtp.*``) in the naming the backend converts."""
    state = dict(model.state_dict())
    if mtp is not None:
        shared = ("embed_tokens.", "shared_head.", "rotary_emb.")
        state |= {f"mtp.{k}": v for k, v in mtp.state_dict().items() if not k.startswith(shared)}
    return state
