"""Causal attention per sequence of a packed row, for megatron's decoder and MTP layers.

A packed row holds several sequences; megatron's local attention would need a dense block-diagonal
mask over the whole row (T x T scores, most of them masked). ``PackedAttention`` replaces each
layer's core attention: the tokens of every sequence are gathered into a padded
``[sequences, L_max]`` batch and run through causal ``scaled_dot_product_attention`` (flash on a
GPU), then scattered back. Right padding is harmless under a causal mask (a real query never sees
a later pad key) and pad queries are dropped. The gather indices are built on the host from the
batch before it moves to the device, so the forward never waits on the GPU for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PackedLayout:
    """Where each sequence's tokens sit in megatron's ``[T * rows]`` token order."""

    gather: torch.Tensor  # [sequences * L_max]: token index per padded slot (T * rows = the zero row)
    scatter: torch.Tensor  # [T * rows]: padded slot per token (sequences * L_max = the zero row)
    sequences: int
    max_len: int

    @classmethod
    def of(cls, seq_index: torch.Tensor, position_ids: torch.Tensor, sequences: int) -> PackedLayout:
        """From a packed batch's ``seq_index``/``position_ids`` ([rows, T], host tensors)."""
        seq = seq_index.cpu().t().reshape(-1)  # megatron order: token t of row b is t * rows + b
        pos = position_ids.cpu().t().reshape(-1)
        valid = seq >= 0
        max_len = int(pos[valid].max()) + 1 if bool(valid.any()) else 1
        slots = sequences * max_len
        slot = torch.where(valid, seq * max_len + pos, torch.full_like(seq, slots))
        gather = torch.full((slots + 1,), seq.numel(), dtype=torch.long)
        gather[slot] = torch.arange(seq.numel())
        return cls(gather[:slots].contiguous(), slot, sequences, max_len)

    def to(self, device: torch.device) -> PackedLayout:
        return PackedLayout(self.gather.to(device, non_blocking=True), self.scatter.to(device, non_blocking=True), self.sequences, self.max_len)


def _with_zero_row(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])])


class PackedAttention(nn.Module):
    """Drop-in for megatron's core attention (``[s, b, heads, dim]`` in, ``[s, b, heads * dim]`` out)."""

    def __init__(self, softmax_scale: float | None) -> None:
        super().__init__()
        self.softmax_scale = softmax_scale
        self.layout: PackedLayout | None = None

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None, packed_seq_params=None, **_):
        layout = self.layout
        if layout is None:
            raise RuntimeError("PackedAttention runs inside run_forward, which sets the packed layout")
        s, b, heads, dim = query.shape

        def padded(x: torch.Tensor) -> torch.Tensor:  # [s, b, h, d] -> [S, h, L, d]
            rows = _with_zero_row(x.reshape(s * b, x.shape[2], dim))[layout.gather]
            return rows.view(layout.sequences, layout.max_len, x.shape[2], dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            padded(query), padded(key), padded(value), is_causal=True, scale=self.softmax_scale,
            enable_gqa=key.shape[2] != heads,
        )
        out = out.transpose(1, 2).reshape(layout.sequences * layout.max_len, heads * dim)
        return _with_zero_row(out)[layout.scatter].view(s, b, heads * dim)


def install_packed_attention(gpt_model: nn.Module) -> list[PackedAttention]:
    """Replace the core attention of every decoder and MTP layer; returns the replacements."""
    installed = []
    for module in list(gpt_model.modules()):
        inner = getattr(module, "core_attention", None)
        if inner is None:
            continue
        if not isinstance(inner, PackedAttention):
            module.core_attention = PackedAttention(getattr(inner, "softmax_scale", None))
        installed.append(module.core_attention)
    return installed
