"""One megatron forward over a ``PackedBatch`` (the torch backend's packed layout).

Packed rows hold several sequences whose position ids restart at 0. With ``PackedAttention``
installed (``attention.py``) every sequence attends causally within itself; without it megatron's
own attention gets a block-diagonal causal mask built from ``seq_index`` (the dense reference). The
rotary table is indexed by the packed position ids (``PackedRotary``), so every sequence sees the
positions it had at rollout. The result equals running each sequence alone, as the HF path does.

The logits are taken from the output layer's calls (the MTP depths first, the main head last):
with MTP the model returns its LM loss instead of logits (megatron computes the MTP loss only when
labels are given), and its vocab-parallel cross-entropy then works in place on the logits, so the
hook keeps a copy. ``run_to_hidden`` stops before the output layer (``GPTModel.post_process``
off for the call) and returns the final hidden states of the decoder and of every MTP depth, for
the chunked head (``vocab_head.py``), which never holds those logits.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Iterator

import torch
from torch import nn

from miles_envs.trainer.batch import PackedBatch
from miles_envs.trainer.megatron.attention import PackedAttention, PackedLayout


def packed_attention_mask(seq_index: torch.Tensor) -> torch.Tensor:
    """``[rows, 1, T, T]`` bool, True where attention is *blocked* (megatron's convention)."""
    same = seq_index.unsqueeze(-1) == seq_index.unsqueeze(-2)
    causal = torch.ones(seq_index.shape[-1], seq_index.shape[-1], dtype=torch.bool, device=seq_index.device).tril()
    return ~(same & causal).unsqueeze(1)


def mtp_loss_mask(batch: PackedBatch, depth: int) -> torch.Tensor:
    """The loss mask handed to megatron so that its rolled masks count only same-sequence labels.

    megatron rolls this mask left once per MTP depth; zeroing the first ``depth`` positions of every
    sequence keeps a label from the next sequence out of the loss.
    """
    keep = batch.position_ids >= depth
    return batch.loss_mask * keep


class PackedRotary(nn.Module):
    """Wraps megatron's ``RotaryEmbedding``: the table is gathered at ``positions`` ([rows, T])."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.positions: torch.Tensor | None = None

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.inner.get_rotary_seq_len(*args, **kwargs)

    def forward(self, seq_len: int, *args, **kwargs) -> torch.Tensor:
        if self.positions is None:
            return self.inner(seq_len, *args, **kwargs)
        table = self.inner(self.positions.shape[-1], *args, **kwargs)  # [T, 1, 1, dim]: positions < T
        return table[:, 0, 0, :][self.positions.t()].unsqueeze(2)  # [T, rows, 1, dim]


def install_packed_rotary(gpt_model: nn.Module) -> PackedRotary:
    if not isinstance(gpt_model.rotary_pos_emb, PackedRotary):
        gpt_model.rotary_pos_emb = PackedRotary(gpt_model.rotary_pos_emb)
    return gpt_model.rotary_pos_emb


_PAD = {"position_ids": 0, "rollout_versions": -1, "seq_index": -1, "routed_experts": -1}


def pad_width(batch: PackedBatch, multiple: int) -> PackedBatch:
    """``batch`` with its rows padded to a multiple of ``multiple`` tokens (sequence parallelism
    splits every row's positions evenly over the tensor-parallel ranks); padding is no sequence."""
    extra = -batch.input_ids.shape[1] % multiple
    if not extra:
        return batch
    padded = {}
    for f in fields(PackedBatch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            tail = value.new_full((value.shape[0], extra, *value.shape[2:]), _PAD.get(f.name, 0))
            value = torch.cat([value, tail], dim=1)
        padded[f.name] = value
    if isinstance(batch, HostBackedBatch):
        return HostBackedBatch(**padded, host=pad_width(batch.host, multiple))
    return PackedBatch(**padded)


def _moved(batch: PackedBatch, device: torch.device | str) -> dict:
    """``PackedBatch``'s own fields of ``batch``, tensors on ``device``."""
    values = {f.name: getattr(batch, f.name) for f in fields(PackedBatch)}
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in values.items()}


@dataclass
class HostBackedBatch(PackedBatch):
    """A micro-batch on the device that keeps the host batch it was copied from: the forward's
    layout, masks and token counts are read from ``host``, so they never wait on the GPU."""

    host: PackedBatch | None = field(default=None, repr=False)

    @classmethod
    def of(cls, batch: PackedBatch, device: torch.device | str) -> HostBackedBatch:
        return cls(**_moved(batch, device), host=batch)

    def to(self, device: torch.device | str) -> HostBackedBatch:
        return HostBackedBatch(**_moved(self, device), host=self.host)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.host.loss_mask.sum())


def host_of(batch: PackedBatch) -> PackedBatch:
    """The host copy of ``batch`` when it keeps one (else ``batch`` itself: reads from it may sync)."""
    return getattr(batch, "host", None) or batch


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [rows, T, vocab]
    mtp_logits: list[torch.Tensor]  # per depth, [rows, T, vocab]


@dataclass
class HiddenOutput:
    hidden: torch.Tensor  # [rows, T, hidden]: the decoder's final (normed) hidden states
    mtp_hidden: list[torch.Tensor]  # per MTP depth, [rows, T, hidden]


@contextmanager
def _capture_output_layer(gpt_model: nn.Module, copy: bool) -> Iterator[list[torch.Tensor]]:
    calls: list[torch.Tensor] = []
    handle = gpt_model.output_layer.register_forward_hook(lambda _m, _i, out: calls.append(out[0].clone() if copy else out[0]))
    try:
        yield calls
    finally:
        handle.remove()


@contextmanager
def _without_output_layer(gpt_model: nn.Module) -> Iterator[None]:
    """``GPTModel`` returns the hidden states after its MTP block (main and every depth,
    concatenated over positions) instead of running its output layer and losses."""
    gpt_model.post_process = False
    try:
        yield
    finally:
        gpt_model.post_process = True


def _call_packed(model: nn.Module, gpt_model: nn.Module, batch: PackedBatch, device, **extra):
    """``model``'s forward on ``batch`` with the packed rotary table and attention layout (or the
    dense mask) installed; the layout comes from the host copy (``host_of``)."""
    rotary = install_packed_rotary(gpt_model)
    packed = [m for m in gpt_model.modules() if isinstance(m, PackedAttention)]
    host = host_of(batch)
    if packed:
        layout = PackedLayout.of(host.seq_index, host.position_ids, host.num_sequences).to(torch.device(device))
        mask = None
    else:
        mask = packed_attention_mask(host.seq_index).to(device)
    rotary.positions = batch.position_ids
    for module in packed:
        module.layout = layout
    try:
        return model(batch.input_ids, batch.position_ids, mask, **extra)
    finally:
        rotary.positions = None
        for module in packed:
            module.layout = None


def run_forward(model: nn.Module, gpt_model: nn.Module, batch: PackedBatch, device: torch.device | str) -> ForwardOutput:
    """Forward ``batch`` through ``model`` (``gpt_model`` is the ``GPTModel`` inside it) to the logits."""
    depth = gpt_model.config.mtp_num_layers or 0
    loss_mask = mtp_loss_mask(host_of(batch), depth) if depth else None
    batch = batch.to(device)
    extra = {"labels": batch.targets, "loss_mask": loss_mask.to(device, non_blocking=True)} if depth else {}
    with _capture_output_layer(gpt_model, copy=bool(depth)) as calls:
        _call_packed(model, gpt_model, batch, device, **extra)
    if gpt_model.config.tensor_model_parallel_size > 1:  # vocab-parallel logits: every rank gets all
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        calls = [gather_from_tensor_model_parallel_region(c) for c in calls]
    logits = [c.transpose(0, 1) for c in calls]  # [T, rows, V] -> [rows, T, V]
    return ForwardOutput(logits=logits[-1], mtp_logits=logits[:-1])


def run_to_hidden(model: nn.Module, gpt_model: nn.Module, batch: PackedBatch, device: torch.device | str) -> HiddenOutput:
    """Forward ``batch`` to the final hidden states of the decoder and of every MTP depth, without
    the output layer (the same on every tensor-parallel rank; under sequence parallelism they would
    be split by position)."""
    if gpt_model.config.sequence_parallel:
        raise ValueError("run_to_hidden needs sequence_parallel off: the hidden states would be split by position")
    with _without_output_layer(gpt_model):
        hidden = _call_packed(model, gpt_model, batch.to(device), device)
    states = [h.transpose(0, 1) for h in hidden.chunk(1 + (gpt_model.config.mtp_num_layers or 0), dim=0)]
    return HiddenOutput(hidden=states[0], mtp_hidden=states[1:])
