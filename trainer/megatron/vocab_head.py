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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def _chunk_log_probs(hidden: torch.Tensor, padded: torch.Tensor, vocab: int, scale: float, argmax: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 log-softmax of one chunk's logits over the first ``vocab`` columns (computed in the
    weight's dtype, as the output layer does); writes the logits' argmax into ``argmax`` when given."""
    logits = (hidden @ padded.t())[:, :vocab]
    if argmax is not None:
        argmax.copy_(logits.argmax(-1))
    logits = logits.float()
    if scale != 1.0:
        logits.mul_(scale)
    return torch.log_softmax(logits, dim=-1)


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
            log_p = _chunk_log_probs(hidden[rows], padded, vocab, scale, argmax[rows])
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
        vocab, padded = weight.shape[0], _padded(weight, ctx.align)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(padded.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        if grad_logprobs is None:
            grad_logprobs = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        grad_logits = None  # [chunk, padded vocab] in the weight's dtype; the padding columns stay 0
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            log_p = _chunk_log_probs(hidden[rows], padded, vocab, ctx.scale)
            # d logprob/dz = onehot - p;  d entropy/dz = -p * (log p + entropy)
            neg_coef = grad_logprobs[rows, None].neg()
            if grad_entropy is not None:
                neg_coef = (log_p + entropy[rows, None]).mul_(grad_entropy[rows, None]).add_(grad_logprobs[rows, None]).neg_()
            grad_z = log_p.exp_().mul_(neg_coef)
            grad_z.scatter_add_(-1, targets[rows, None], grad_logprobs[rows, None])
            if ctx.scale != 1.0:
                grad_z.mul_(ctx.scale)
            if grad_logits is None or grad_logits.shape[0] != grad_z.shape[0]:
                grad_logits = padded.new_zeros(grad_z.shape[0], padded.shape[0])
            grad_logits[:, :vocab] = grad_z
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ padded
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ hidden[rows]).float()
        if grad_weight is not None:
            grad_weight = grad_weight[:vocab].to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def vocab_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    entropy: bool = True,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    vocab_align: int = VOCAB_ALIGN,
) -> HeadOutput:
    """Per-token results of the head ``weight`` ([vocab, hidden]) on ``hidden`` ([tokens, hidden],
    cast to the weight's dtype) for ``targets`` ([tokens], valid token ids; mask the results, not
    the ids); logits are divided by ``temperature``. ``chunk_tokens`` bounds the logits held;
    ``vocab_align`` pads the matmuls' vocabulary (1: no padding)."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"vocab_head wants hidden [tokens, hidden] and targets [tokens]: got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if chunk_tokens < 1 or vocab_align < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}, vocab_align={vocab_align}: both must be at least 1")
    logprobs, ent, argmax = _ChunkedVocabHead.apply(
        hidden.to(weight.dtype), weight, targets, chunk_tokens, 1.0 / temperature, entropy, vocab_align
    )
    return HeadOutput(logprobs, ent if entropy else None, argmax)
