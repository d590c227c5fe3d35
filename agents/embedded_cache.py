"""Per-sequence KV caches kept as one padded batch, so that concurrent sequences share a forward.

Layout: one transformers ``DynamicCache`` whose tensors are ``[rows, heads, columns, dim]`` plus a
boolean ``valid[rows, columns]``. Columns are in time order for every row; a column is invalid
when it is left padding (rows joined with different lengths) or a rejected speculative draft.
Attention uses a 4D additive mask built from ``valid`` and the column order, and RoPE uses
explicit per-row positions, so holes cost compute but never change results. Rows leave with
:meth:`select`, join with :meth:`concat`, and :meth:`compact` squeezes holes out when they pile up.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class BatchedKVCache:
    def __init__(self, rows: int, device: torch.device):
        self.cache = DynamicCache()
        self.valid = torch.zeros(rows, 0, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(rows, dtype=torch.long, device=device)

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def columns(self) -> int:
        return self.valid.shape[1]

    def inputs_for(self, new_valid: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(4D additive attention mask, position ids) for appending ``new_valid.shape[1]`` columns.

        A query column that may see nothing (padding) is allowed to see itself so softmax never
        meets an all-masked row.
        """
        rows, width = new_valid.shape
        past = self.columns
        kv_valid = torch.cat([self.valid, new_valid], dim=1)
        kv_index = torch.arange(past + width, device=kv_valid.device)
        q_index = torch.arange(width, device=kv_valid.device) + past
        allowed = kv_valid[:, None, :] & (kv_index[None, None, :] <= q_index[None, :, None])
        diagonal = kv_index[None, None, :] == q_index[None, :, None]
        allowed |= diagonal & ~allowed.any(dim=-1, keepdim=True)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        positions = self.next_position[:, None] + torch.cumsum(new_valid.long(), dim=1) - 1
        return mask[:, None], positions.clamp(min=0)

    def commit(self, new_valid: torch.Tensor) -> None:
        """Record the columns the forward just appended to ``self.cache``."""
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        self.next_position += new_valid.long().sum(dim=1)

    def drop_last(self, counts: torch.Tensor) -> None:
        """Invalidate each row's newest ``counts[row]`` valid columns (rejected drafts), all rows at once."""
        valid_from_right = self.valid.flip(1).cumsum(dim=1).flip(1)  # valid columns at or right of each column
        self.valid &= valid_from_right > counts[:, None]
        self.next_position -= counts

    def _layers(self):
        return [layer for layer in self.cache.layers if layer.keys is not None and layer.keys.numel()]

    def select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order) and drop columns no remaining row uses."""
        index = torch.tensor(keep, dtype=torch.long, device=self.valid.device)
        valid = self.valid.index_select(0, index)
        used = valid.any(dim=0)
        first = int(used.nonzero()[0]) if used.any() else valid.shape[1]
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self.valid = valid[:, first:]
        self.next_position = self.next_position.index_select(0, index)
        if not keep:
            self.cache = DynamicCache()

    @staticmethod
    def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
        if width == 0:
            return tensor
        pad = tensor.new_zeros(*tensor.shape[:-2], width, tensor.shape[-1])
        return torch.cat([pad, tensor], dim=-2)

    def concat(self, other: BatchedKVCache) -> None:
        """Append ``other``'s rows below this batch's, aligning both on their newest column."""
        if self.rows == 0:
            self.cache, self.valid, self.next_position = other.cache, other.valid, other.next_position
            return
        width = max(self.columns, other.columns)
        mine, theirs = self._layers(), other._layers()
        for a, b in zip(mine, theirs):
            a.keys = torch.cat([self._pad_left(a.keys, width - self.columns), self._pad_left(b.keys, width - other.columns)])
            a.values = torch.cat(
                [self._pad_left(a.values, width - self.columns), self._pad_left(b.values, width - other.columns)]
            )
        pad = lambda valid, w: torch.cat([valid.new_zeros(valid.shape[0], w), valid], dim=1)  # noqa: E731
        self.valid = torch.cat([pad(self.valid, width - self.columns), pad(other.valid, width - other.columns)])
        self.next_position = torch.cat([self.next_position, other.next_position])

    def compact(self, min_hole_fraction: float = 0.5) -> None:
        """Remove holes when more than ``min_hole_fraction`` of the cache is invalid."""
        if self.rows == 0 or self.columns == 0:
            return
        counts = self.valid.sum(dim=1)
        width = int(counts.max())
        if 1 - counts.sum().item() / (self.rows * self.columns) <= min_hole_fraction:
            return
        # Stable sort puts each row's invalid columns first, keeping valid ones in time order.
        order = torch.sort(self.valid.to(torch.int8), dim=1, stable=True).indices[:, -width:]
        for layer in self._layers():
            gather = order[:, None, :, None]
            layer.keys = torch.gather(layer.keys, 2, gather.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
            layer.values = torch.gather(
                layer.values, 2, gather.expand(-1, layer.values.shape[1], -1, layer.values.shape[3])
            )
        self.valid = torch.gather(self.valid, 1, order)
