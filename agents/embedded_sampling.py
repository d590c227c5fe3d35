"""Sampling for the embedded engine, and the speculative accept/reject rule.

Reported logprobs are taken under the distribution actually sampled from: logits divided by the
temperature, then top-k, then top-p (nucleus) filtering, renormalised (``log_softmax`` with
filtered tokens at ``-inf``). Temperature 0 means greedy decoding; its logprobs are those of the
untransformed model distribution (``log_softmax(logits)``), the useful quantity for training.

Rows of a batch carry their own settings and random stream (per-request seeds), but the
transforms run vectorised over the batch; a draw is one uniform per row mapped through the
row's cumulative distribution (inverse-CDF sampling).
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

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, device=self.generator.device))

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
    temperature = torch.tensor([s.temperature if not s.greedy else 1.0 for s in samplers], device=logits.device)
    scaled = logits / temperature.view(shape)
    vocab = logits.shape[-1]
    top_k = torch.tensor([s.top_k if 0 < s.top_k < vocab and not s.greedy else vocab for s in samplers], device=logits.device)
    if bool((top_k < vocab).any()):
        kth = torch.topk(scaled, int(top_k.max()), dim=-1).values
        kth = kth.gather(-1, (top_k - 1).view(shape).expand(*kth.shape[:-1], 1))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    top_p = torch.tensor([s.top_p if not s.greedy else 1.0 for s in samplers], device=logits.device)
    if bool((top_p < 1.0).any()):
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


def sample_rows(samplers: list[RowSampler], probs: torch.Tensor) -> list[int]:
    """One token per row of ``probs [B, V]`` using each row's own random stream."""
    uniforms = torch.tensor([s.uniform() for s in samplers], device=probs.device, dtype=probs.dtype)
    cdf = torch.cumsum(probs, dim=-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    # Rounding at the top of the cdf can land past the last non-zero token: take that token then.
    stray = probs.gather(-1, tokens[:, None]).squeeze(-1) <= 0
    if bool(stray.any()):
        last_nonzero = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)
        tokens = torch.where(stray, last_nonzero, tokens)
    return tokens.tolist()


def accept_drafts(
    sampler: RowSampler, target: torch.Tensor, draft: torch.Tensor, draft_tokens: list[int]
) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023): returns ``(accepted, next_token)``.

    ``target [k+1, V]``: the target distribution at each draft position plus the bonus position;
    ``draft [k, V]``: the distributions the drafts were sampled from. Draft ``j`` is kept with
    probability ``min(1, p_j(d) / q_j(d))``; on the first rejection the replacement is drawn from
    ``normalise(max(0, p_j - q_j))``, otherwise a bonus token from ``p_k``. The emitted tokens
    are distributed exactly as sampling from the target alone.
    """
    for j, token in enumerate(draft_tokens):
        p, q = float(target[j, token]), float(draft[j, token])
        if q > 0 and sampler.uniform() * q < p:
            continue
        residual = (target[j] - draft[j]).clamp(min=0)
        return j, sampler.sample(residual if float(residual.sum()) > 0 else target[j])
    return len(draft_tokens), sampler.sample(target[len(draft_tokens)])
