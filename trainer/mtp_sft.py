"""Online MTP-SFT: train the multi-token-prediction draft layers on the rollout's own tokens.

The MTP stack (``miles_envs.models.mtp``, DeepSeek-V3 NextN layout) reads the trunk's final
hidden state at position ``t`` plus the embedding of the next token and predicts the token after
it. On a packed batch (inputs ``tokens[:-1]``, targets ``tokens[1:]``) depth ``i`` at position
``t`` reads ``targets[t + i]`` and is labelled ``targets[t + i + 1]``; a label counts when it is a
model token (loss mask 1) of the same sequence. Position ids are the packed ones shifted by
``i + 1``, so they still restart per sequence and the attention mask stays block-diagonal.

With ``detach_trunk`` (default, like Megatron's ``mtp_detach_heads``) the MTP loss trains only the
MTP layers: the hidden state is detached and the embedding and LM head it shares with the trunk
take no gradient from it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from miles_envs.models.mtp import mtp_hidden
from miles_envs.trainer.batch import PackedBatch


@dataclass
class MtpOutput:
    loss_sum: torch.Tensor  # summed cross-entropy over labelled tokens, averaged over depths
    tokens: int  # labelled tokens per depth-0
    correct: int  # depth-0 top-1 hits (the draft's greedy acceptance proxy)


def _shift_left(x: torch.Tensor, k: int, fill: float | int) -> torch.Tensor:
    if k == 0:
        return x
    return torch.cat([x[:, k:], torch.full_like(x[:, :k], fill)], dim=1)


def mtp_labels(batch: PackedBatch, depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input tokens, position ids, labels, label mask)`` of MTP depth ``depth`` on a packed batch."""
    tokens = _shift_left(batch.targets, depth, 0)
    labels = _shift_left(batch.targets, depth + 1, 0)
    same_sequence = (_shift_left(batch.seq_index, depth + 1, -1) == batch.seq_index) & (batch.seq_index >= 0)
    label_mask = _shift_left(batch.loss_mask, depth + 1, 0.0) * same_sequence
    return tokens, batch.position_ids + depth + 1, labels, label_mask


def count_mtp_tokens(batches: list[PackedBatch]) -> int:
    return sum(int(mtp_labels(b, 0)[3].sum()) for b in batches)


@contextmanager
def _no_grad_for(params: list[nn.Parameter]) -> Iterator[None]:
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def mtp_sft_loss(mtp: nn.Module, hidden: torch.Tensor, batch: PackedBatch, *, detach_trunk: bool = True) -> MtpOutput:
    """Cross-entropy of every MTP depth on the batch's model tokens (sum over tokens)."""
    from transformers.masking_utils import create_causal_mask

    shared = [*mtp.embed_tokens.parameters(), *mtp.shared_head.parameters()] if detach_trunk else []
    hidden = hidden.detach() if detach_trunk else hidden
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    tokens = correct = 0
    with _no_grad_for(shared):
        for depth in range(len(mtp.layers)):
            inputs, positions, labels, label_mask = mtp_labels(batch, depth)
            mask = create_causal_mask(config=mtp.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions)
            hidden = mtp_hidden(mtp, depth, inputs, hidden, positions, mask)
            # the vocabulary projection only where a label is trained (prompt and env tokens carry none)
            trained = label_mask > 0
            weight, picked = label_mask[trained], labels[trained]
            logits = mtp._project_to_logits(hidden[trained])
            ce = F.cross_entropy(logits.float(), picked, reduction="none")
            loss_sum = loss_sum + (ce * weight).sum() / len(mtp.layers)
            if depth == 0:
                tokens = int(label_mask.sum())
                correct = int(((logits.argmax(-1) == picked).float() * weight).sum())
    return MtpOutput(loss_sum, tokens, correct)
