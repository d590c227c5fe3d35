"""The vocabulary head's per-token results, chunk by chunk over tokens, never all logits at once.

At a small hidden size with a ~150k vocabulary the head is most of a step: its logits ([tokens,
vocab]) in fp32, and the passes over them for log-softmax, the target gather, the entropy and the
MTP cross-entropy, cost more memory traffic than the matmuls cost time. ``vocab_head`` multiplies
one chunk of tokens by the output weight (in the weight's dtype, as the output layer does), reduces
it in fp32 to the target's logprob, the entropy and the argmax, and drops it; the backward
recomputes each chunk's logits and accumulates the gradients of the hidden states and the weight.
Values and gradients equal ``token_logprobs_and_entropy`` on the full logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_CHUNK_TOKENS = 4096


@dataclass
class HeadOutput:
    logprobs: torch.Tensor  # [tokens] fp32, log-probability of each target
    entropy: torch.Tensor | None  # [tokens] fp32 (None when not asked for)
    argmax: torch.Tensor  # [tokens] long, the most likely token (no gradient)


def _chunk_log_probs(hidden: torch.Tensor, weight: torch.Tensor, scale: float, argmax: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 log-softmax of one chunk's logits (computed in the weight's dtype, as the output layer
    does); writes the logits' argmax into ``argmax`` when given."""
    logits = hidden @ weight.t()
    if argmax is not None:
        argmax.copy_(logits.argmax(-1))
    logits = logits.float()
    if scale != 1.0:
        logits.mul_(scale)
    return torch.log_softmax(logits, dim=-1)


class _ChunkedVocabHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, scale: float, with_entropy: bool):
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logprobs) if with_entropy else logprobs.new_empty(0)
        argmax = torch.empty(n, dtype=torch.long, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            log_p = _chunk_log_probs(hidden[rows], weight, scale, argmax[rows])
            logprobs[rows] = log_p.gather(-1, targets[rows, None]).squeeze(-1)
            if with_entropy:  # -sum(p * log p) per row, without a [chunk, vocab] product
                entropy[rows] = -torch.bmm(log_p.exp().unsqueeze(1), log_p.unsqueeze(2)).view(-1)
        ctx.save_for_backward(hidden, weight, targets, entropy)
        ctx.chunk, ctx.scale = chunk, scale
        ctx.mark_non_differentiable(argmax)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return logprobs, entropy, argmax

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_argmax):
        hidden, weight, targets, entropy = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        if grad_logprobs is None:
            grad_logprobs = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            log_p = _chunk_log_probs(hidden[rows], weight, ctx.scale)
            # d logprob/dz = onehot - p;  d entropy/dz = -p * (log p + entropy)
            neg_coef = grad_logprobs[rows, None].neg()
            if grad_entropy is not None:
                neg_coef = (log_p + entropy[rows, None]).mul_(grad_entropy[rows, None]).add_(grad_logprobs[rows, None]).neg_()
            grad_z = log_p.exp_().mul_(neg_coef)
            grad_z.scatter_add_(-1, targets[rows, None], grad_logprobs[rows, None])
            if ctx.scale != 1.0:
                grad_z.mul_(ctx.scale)
            grad_z = grad_z.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_z @ weight
            if grad_weight is not None:
                grad_weight += (grad_z.t() @ hidden[rows]).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def vocab_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    entropy: bool = True,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> HeadOutput:
    """Per-token results of the head ``weight`` ([vocab, hidden]) on ``hidden`` ([tokens, hidden],
    cast to the weight's dtype) for ``targets`` ([tokens], valid token ids; mask the results, not
    the ids); logits are divided by ``temperature``. ``chunk_tokens`` bounds the logits held."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"vocab_head wants hidden [tokens, hidden] and targets [tokens]: got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be at least 1")
    logprobs, ent, argmax = _ChunkedVocabHead.apply(
        hidden.to(weight.dtype), weight, targets, chunk_tokens, 1.0 / temperature, entropy
    )
    return HeadOutput(logprobs, ent if entropy else None, argmax)
