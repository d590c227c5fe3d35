"""The vocabulary head's per-token results, chunk by chunk over tokens, never all logits at once.

At a small hidden size with a ~150k vocabulary the head is most of a step: its logits ([tokens,
vocab]) in fp32, and the passes over them for log-softmax, the target gather, the entropy and the
MTP cross-entropy, cost more memory traffic than the matmuls cost time. ``vocab_head`` multiplies
one chunk of tokens by the output weight (in the weight's dtype, as the output layer does), reduces
it in fp32 to the target's logprob, the entropy and the argmax, and drops it; the backward
recomputes each chunk's logits and accumulates the gradients of the hidden states and the weight.
Values and gradients equal ``token_logprobs_and_entropy`` on the full logits.

The logits' row stride is the vocabulary size; an odd one (Qwen3's tokenizer has 151,669 tokens)
leaves cuBLAS only its unaligned GEMM kernels, several times slower on a Hopper card than the
aligned ones. The weight is therefore padded with zero rows to a multiple of ``VOCAB_ALIGN`` for
the matmuls, and the padding columns are dropped before any reduction (forward) or set to zero
(backward), so they change no value.

Under tensor parallelism the output weight is split by vocabulary rows: with ``group`` each rank
multiplies by its shard, and per chunk the softmax statistics (max, sum of exponentials, the
target's logit, the expected logit) and the argmax are all-reduced over the group, so every rank
gets the full-vocabulary results; the hidden states (the same on every rank) get the sum of the
shards' gradients, each rank's weight shard its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_CHUNK_TOKENS = 4096
VOCAB_ALIGN = 64  # vocabulary rows of the matmuls: 128 bytes of bf16, what cuBLAS's fast kernels want


@dataclass
class HeadOutput:
    logprobs: torch.Tensor  # [tokens] fp32, log-probability of each target
    entropy: torch.Tensor | None  # [tokens] fp32 (None when not asked for)
    argmax: torch.Tensor  # [tokens] long, the most likely token (no gradient)


def _padded(weight: torch.Tensor, align: int) -> torch.Tensor:
    """``weight`` ([vocab, hidden]) with zero rows up to a multiple of ``align``."""
    extra = -weight.shape[0] % align
    return torch.cat([weight, weight.new_zeros(extra, weight.shape[1])]) if extra else weight


def _chunk_matmul(hidden: torch.Tensor, padded: torch.Tensor, vocab: int, argmax: torch.Tensor | None = None) -> torch.Tensor:
    """One chunk's logits over the first ``vocab`` rows of ``padded``, in the weight's dtype as the
    output layer computes them; writes their argmax into ``argmax`` when given."""
    logits = (hidden @ padded.t())[:, :vocab]
    if argmax is not None:
        argmax.copy_(logits.argmax(-1))
    return logits


def _chunk_logits(hidden: torch.Tensor, padded: torch.Tensor, vocab: int, scale: float, argmax: torch.Tensor | None = None) -> torch.Tensor:
    """``_chunk_matmul``'s logits in fp32, times ``scale``; their argmax into ``argmax`` when given."""
    logits = _chunk_matmul(hidden, padded, vocab, argmax).float()
    return logits.mul_(scale) if scale != 1.0 else logits


def _logit_grad(log_p, grad_logprobs, entropy, grad_entropy, target_index, target_grad, scale: float) -> torch.Tensor:
    """The loss gradient at one chunk's logits, in place of ``log_p`` ([chunk, vocab] fp32):
    g_lp (onehot - p) - g_ent p (log p + entropy) = p (coef - g_ent log p) + g_lp onehot with
    coef = -(g_lp + g_ent entropy), times ``scale`` (three passes over the chunk with entropy, two
    without); ``target_grad`` is added at ``target_index`` (zero where the target is not in these
    columns)."""
    if grad_entropy is None:
        grad_z = log_p.exp_().mul_(grad_logprobs[:, None].neg())
    else:
        coef = (grad_logprobs + grad_entropy * entropy).neg_()
        grad_z = torch.addcmul(coef[:, None], log_p, grad_entropy[:, None], value=-1.0)
        grad_z.mul_(log_p.exp_())
    grad_z.scatter_add_(-1, target_index[:, None], target_grad[:, None])
    return grad_z.mul_(scale) if scale != 1.0 else grad_z


def _into_padded(grad_z: torch.Tensor, padded: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """``grad_z`` in the weight's dtype with the padding columns zero (``buffer`` reused when it fits)."""
    if buffer is None or buffer.shape[0] != grad_z.shape[0]:
        buffer = padded.new_zeros(grad_z.shape[0], padded.shape[0])
    buffer[:, : grad_z.shape[1]] = grad_z
    return buffer


class _ChunkedVocabHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, scale: float, with_entropy: bool, align: int):
        n, vocab = hidden.shape[0], weight.shape[0]
        padded = _padded(weight, align)
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logprobs) if with_entropy else logprobs.new_empty(0)
        argmax = torch.empty(n, dtype=torch.long, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            log_p = torch.log_softmax(_chunk_logits(hidden[rows], padded, vocab, scale, argmax[rows]), dim=-1)
            logprobs[rows] = log_p.gather(-1, targets[rows, None]).squeeze(-1)
            if with_entropy:  # -sum(p * log p) per row, without a [chunk, vocab] product
                entropy[rows] = -torch.bmm(log_p.exp().unsqueeze(1), log_p.unsqueeze(2)).view(-1)
        ctx.save_for_backward(hidden, weight, targets, entropy)
        ctx.chunk, ctx.scale, ctx.align = chunk, scale, align
        ctx.mark_non_differentiable(argmax)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return logprobs, entropy, argmax

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_argmax):
        hidden, weight, targets, entropy = ctx.saved_tensors
        log_probs = lambda logits, rows: torch.log_softmax(logits, dim=-1)  # noqa: E731
        return _chunked_backward(ctx, hidden, weight, targets, None, entropy, grad_logprobs, grad_entropy, log_probs) + (None,) * 5


def _chunked_backward(ctx, hidden, weight, targets, owned, entropy, grad_logprobs, grad_entropy, log_probs):
    """Gradients of hidden and weight, recomputing each chunk's logits; ``log_probs(logits, rows)`` turns
    them into log-probabilities (a local softmax, or a shard's logits less the group's log Z) and
    ``owned`` marks targets in this shard (None: all are)."""
    vocab, padded = weight.shape[0], _padded(weight, ctx.align)
    grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
    grad_weight = torch.zeros(padded.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
    if grad_logprobs is None:
        grad_logprobs = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    on_target = grad_logprobs if owned is None else torch.where(owned, grad_logprobs, 0.0)
    grad_logits = None  # [chunk, padded vocab] in the weight's dtype; the padding columns stay 0
    for start in range(0, hidden.shape[0], ctx.chunk):
        rows = slice(start, start + ctx.chunk)
        log_p = log_probs(_chunk_logits(hidden[rows], padded, vocab, ctx.scale), rows)
        grad_z = _logit_grad(log_p, grad_logprobs[rows], entropy[rows] if grad_entropy is not None else None,
                             None if grad_entropy is None else grad_entropy[rows], targets[rows], on_target[rows], ctx.scale)
        grad_logits = _into_padded(grad_z, padded, grad_logits)
        if grad_hidden is not None:
            grad_hidden[rows] = grad_logits @ padded
        if grad_weight is not None:
            grad_weight += (grad_logits.t() @ hidden[rows]).float()
    if grad_weight is not None:
        grad_weight = grad_weight[:vocab].to(weight.dtype)
    return grad_hidden, grad_weight


class _VocabParallelChunkedHead(torch.autograd.Function):
    """``_ChunkedVocabHead`` over a vocabulary split by rows across ``group`` (module docstring); the
    hidden states' gradient is this shard's share (``vocab_head`` sums it over the group)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, scale: float, with_entropy: bool, align: int, group, vocab_start: int):
        n, vocab = hidden.shape[0], weight.shape[0]
        padded = _padded(weight, align)
        local = targets - vocab_start
        owned = (local >= 0) & (local < vocab)
        local = local.clamp(0, vocab - 1)
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        log_z = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if with_entropy else logprobs.new_empty(0)
        argmax = torch.empty(n, dtype=torch.long, device=hidden.device)
        beyond = torch.iinfo(torch.long).max
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logits = _chunk_logits(hidden[rows], padded, vocab, scale)
            best, where = logits.max(-1)
            top = best.clone()
            dist.all_reduce(top, dist.ReduceOp.MAX, group=group)
            candidate = torch.where(best == top, where + vocab_start, beyond)  # the first index holding the max
            dist.all_reduce(candidate, dist.ReduceOp.MIN, group=group)
            argmax[rows] = candidate
            exp = (logits - top[:, None]).exp_()
            target = torch.where(owned[rows], logits.gather(-1, local[rows, None]).squeeze(-1), 0.0)
            expected = (exp * logits).sum(-1) if with_entropy else torch.zeros_like(top)
            sums = torch.stack([exp.sum(-1), target, expected])
            dist.all_reduce(sums, group=group)
            log_z[rows] = top + sums[0].log()
            logprobs[rows] = sums[1] - log_z[rows]
            if with_entropy:  # -sum(p log p) = log Z - E_p[logit]
                entropy[rows] = log_z[rows] - sums[2] / sums[0]
        ctx.save_for_backward(hidden, weight, local, owned, log_z, entropy)
        ctx.chunk, ctx.scale, ctx.align = chunk, scale, align
        ctx.mark_non_differentiable(argmax)
        ctx.set_materialize_grads(False)
        return logprobs, entropy, argmax

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_argmax):
        hidden, weight, local, owned, log_z, entropy = ctx.saved_tensors
        log_probs = lambda logits, rows: logits.sub_(log_z[rows, None])  # noqa: E731  (the group's log Z)
        return _chunked_backward(ctx, hidden, weight, local, owned, entropy, grad_logprobs, grad_entropy, log_probs) + (None,) * 7


class _SumGradOver(torch.autograd.Function):
    """Identity forward; the backward all-reduces the gradient over ``group`` (each rank's head
    shard contributes a share of the replicated hidden states' gradient)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def vocab_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    entropy: bool = True,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    vocab_align: int = VOCAB_ALIGN,
    group: dist.ProcessGroup | None = None,
) -> HeadOutput:
    """Per-token results of the head ``weight`` ([vocab, hidden]) on ``hidden`` ([tokens, hidden],
    cast to the weight's dtype) for ``targets`` ([tokens], valid token ids; mask the results, not
    the ids); logits are divided by ``temperature``. ``chunk_tokens`` bounds the logits held;
    ``vocab_align`` pads the matmuls' vocabulary (1: no padding). With a ``group`` of several ranks,
    ``weight`` is this rank's shard of equal vocabulary shards in rank order, ``hidden`` and
    ``targets`` are the same on every rank, and the results are the full vocabulary's."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"vocab_head wants hidden [tokens, hidden] and targets [tokens]: got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if chunk_tokens < 1 or vocab_align < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}, vocab_align={vocab_align}: both must be at least 1")
    if group is None or dist.get_world_size(group) == 1:
        logprobs, ent, argmax = _ChunkedVocabHead.apply(
            hidden.to(weight.dtype), weight, targets, chunk_tokens, 1.0 / temperature, entropy, vocab_align
        )
    else:
        vocab_start = dist.get_rank(group) * weight.shape[0]
        logprobs, ent, argmax = _VocabParallelChunkedHead.apply(
            _SumGradOver.apply(hidden.to(weight.dtype), group), weight, targets, chunk_tokens, 1.0 / temperature, entropy,
            vocab_align, group, vocab_start,
        )
    return HeadOutput(logprobs, ent if entropy else None, argmax)
