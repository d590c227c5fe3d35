"""Sampling for the embedded engine, and the speculative accept/reject rule.

Reported logprobs are taken under the distribution actually sampled from: logits divided by the
temperature, then top-k, then top-p (nucleus) filtering, renormalised (``log_softmax`` with
filtered tokens at ``-inf``). Temperature 0 means greedy decoding; its logprobs are those of the
untransformed model distribution (``log_softmax(logits)``), the useful quantity for training.

Rows of a batch carry their own settings and random stream (per-request seeds), but the
transforms run vectorised over the batch; a draw is one uniform per row mapped through the
row's cumulative distribution (inverse-CDF sampling). Draws stay on the device: a decode step
waits for the device once, when its tokens are read back, not once per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miles_envs.engine import SamplingParams


@dataclass
class RowSampler:
    """One sequence's sampling settings and its private random stream."""

    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator

    @classmethod
    def from_params(cls, params: SamplingParams, device: torch.device) -> RowSampler:
        generator = torch.Generator(device=device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(params.seed))
        return cls(float(params.temperature), int(params.top_k), float(params.top_p), generator)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def sample(self, probs: torch.Tensor) -> int:
        """One token from ``probs [V]`` (argmax when greedy)."""
        return sample_rows([self], probs[None])[0]


def distributions(samplers: list[RowSampler], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, logprobs)`` for ``logits [B, ..., V]``, row ``b`` under ``samplers[b]``.

    ``probs`` is what is sampled from (one-hot at the argmax for greedy rows); ``logprobs`` is
    what is reported.
    """
    logits = logits.float()
    shape = (len(samplers),) + (1,) * (logits.dim() - 1)
    row_temperature = [s.temperature if not s.greedy else 1.0 for s in samplers]
    scaled = logits  # x / 1.0 == x: a batch at temperature 1 skips a pass over the vocabulary
    if any(t != 1.0 for t in row_temperature):
        scaled = logits / torch.tensor(row_temperature, device=logits.device).view(shape)
    vocab = logits.shape[-1]
    row_top_k = [s.top_k if 0 < s.top_k < vocab and not s.greedy else vocab for s in samplers]
    if min(row_top_k) < vocab:
        top_k = torch.tensor(row_top_k, device=logits.device)
        kth = torch.topk(scaled, max(row_top_k), dim=-1).values
        kth = kth.gather(-1, (top_k - 1).view(shape).expand(*kth.shape[:-1], 1))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    row_top_p = [s.top_p if not s.greedy else 1.0 for s in samplers]
    if min(row_top_p) < 1.0:
        top_p = torch.tensor(row_top_p, device=logits.device)
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p.view(shape)
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    # Greedy rows keep temperature 1 and no filters, so this is log_softmax(logits) for them.
    logprobs = torch.log_softmax(scaled, dim=-1)
    probs = logprobs.exp()
    greedy_rows = [row for row, s in enumerate(samplers) if s.greedy]
    if greedy_rows:
        rows = torch.tensor(greedy_rows, device=logits.device)
        probs[rows] = torch.zeros_like(probs[rows]).scatter_(-1, probs[rows].argmax(dim=-1, keepdim=True), 1.0)
    return probs, logprobs


def uniforms(samplers: list[RowSampler], count: int, device: torch.device) -> torch.Tensor:
    """``[B, count]`` uniforms, row ``b`` from ``samplers[b]``'s stream, drawn on the device.

    Greedy rows draw nothing (any uniform picks the argmax of a one-hot and accepts an equal
    draft), so their streams are left untouched.
    """
    zeros = torch.zeros(count, device=device)
    return torch.stack(
        [zeros if s.greedy else torch.rand(count, generator=s.generator, device=s.generator.device).to(device) for s in samplers]
    )


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs [B, V]`` (unnormalised) for ``uniform [B]``: a device tensor."""
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[:, -1:].contiguous()
    tokens = torch.searchsorted(cdf, uniform.to(cdf.dtype)[:, None] * total, right=True)
    # Rounding can put the target at the top of the cdf, past every token: take the token that
    # completes the cdf then (a binary search per row, not another pass over the vocabulary).
    completing = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(tokens, completing).squeeze(-1)


def sample_tensor(samplers: list[RowSampler], probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs [B, V]`` using each row's own random stream, as a device tensor."""
    return inverse_cdf(probs, uniforms(samplers, 1, probs.device)[:, 0])


def sample_rows(samplers: list[RowSampler], probs: torch.Tensor) -> list[int]:
    """One token per row of ``probs [B, V]`` using each row's own random stream."""
    return sample_tensor(samplers, probs).tolist()


def accept_rows(
    samplers: list[RowSampler], target: torch.Tensor, draft: torch.Tensor, draft_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023) for a batch: ``(accepted [B], tokens [B, k+1])``.

    ``target [B, k+1, V]``: the target distribution at each draft position plus the bonus position;
    ``draft [B, k, V]``: the distributions the drafts ``draft_tokens [B, k]`` were sampled from.
    Draft ``j`` is kept with probability ``min(1, p_j(d) / q_j(d))``; at the first rejection the
    replacement is drawn from ``normalise(max(0, p_j - q_j))``, after ``k`` acceptances a bonus
    token from ``p_k``. Row ``b`` emits ``tokens[b, : accepted[b] + 1]``: the accepted drafts,
    then the replacement or bonus, distributed exactly as sampling from the target alone. All of
    it is tensor work on the device, with no per-row loop and no read-back.
    """
    rows, k = draft_tokens.shape
    draws = uniforms(samplers, k + 1, target.device)
    index = draft_tokens[..., None]
    p = target[:, :k].gather(-1, index).squeeze(-1)
    q = draft.gather(-1, index).squeeze(-1)
    kept = (q > 0) & (draws[:, :k] * q < p)
    accepted = kept.long().cumprod(dim=-1).sum(dim=-1)
    arange = torch.arange(rows, device=target.device)
    p_next = target[arange, accepted]
    q_next = draft[arange, accepted.clamp(max=k - 1)] * (accepted < k)[:, None]  # no draft at the bonus position
    residual = (p_next - q_next).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    tokens = torch.cat([draft_tokens, draft_tokens.new_zeros(rows, 1)], dim=1)
    tokens[arange, accepted] = inverse_cdf(residual, draws[:, k])
    return accepted, tokens


def accept_drafts(
    sampler: RowSampler, target: torch.Tensor, draft: torch.Tensor, draft_tokens: list[int]
) -> tuple[int, int]:
    """:func:`accept_rows` for one row (``target [k+1, V]``, ``draft [k, V]``): ``(accepted, next_token)``."""
    ids = torch.tensor([draft_tokens], dtype=torch.long, device=target.device)
    accepted, tokens = accept_rows([sampler], target[None], draft[None], ids)
    count = int(accepted[0])
    return count, int(tokens[0, count])
