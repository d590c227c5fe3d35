"""Speculative decoding with MTP drafts: exactness under greedy, the target distribution when sampling."""

import asyncio
import math

import numpy as np
import pytest
import torch

from miles_envs.agents.embedded import EmbeddedEngine
from miles_envs.agents.embedded_sampling import RowSampler, accept_drafts, accept_rows, distributions, inverse_cdf
from miles_envs.engine import SamplingParams
from miles_envs.models.loading import load_checkpoint
from miles_envs.models.toy import make_draftable
from tests.models.tiny_checkpoints import tiny_checkpoint  # noqa: F401


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of zero target probability was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum() - 1)


def test_accept_rule_emits_the_target_distribution_for_a_bad_draft():
    target = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6], [0.2, 0.2, 0.2, 0.2, 0.2]])
    draft = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4], [0.6, 0.1, 0.1, 0.1, 0.1]])
    sampler = RowSampler.from_params(SamplingParams(seed=0), torch.device("cpu"))
    first, second = np.zeros(5), np.zeros(5)
    accepted_total = 0
    for _ in range(20000):
        drafts = [sampler.sample(draft[0]), sampler.sample(draft[1])]
        accepted, token = accept_drafts(sampler, target, draft, drafts)
        emitted = drafts[:accepted] + [token]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
        accepted_total += accepted
    for counts, probs in ((first, target[0]), (second, target[1])):
        stat, df = chi_square(counts, probs.numpy())
        assert stat < chi_square_critical(df), (counts, stat)
    assert 0 < accepted_total < 2 * 20000


def test_accept_rule_takes_a_perfect_draft_every_time():
    p = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])
    sampler = RowSampler.from_params(SamplingParams(seed=3), torch.device("cpu"))
    for _ in range(200):
        drafts = [sampler.sample(p[0]), sampler.sample(p[1])]
        assert accept_drafts(sampler, p, p[:2], drafts) == (2, 0)


def test_batched_accept_rule_decides_each_row_by_its_own_distributions():
    """One batch: a greedy row with a wrong second draft, a perfect draft, a draft the target rules out."""
    one_hot = lambda *ids: torch.nn.functional.one_hot(torch.tensor(ids), 4).float()  # noqa: E731
    target = torch.stack([one_hot(1, 2, 0), one_hot(0, 3, 2), torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 3)])
    draft = torch.stack([one_hot(1, 0), one_hot(0, 3), torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25] * 4])])
    drafts = torch.tensor([[1, 0], [0, 3], [0, 2]])
    samplers = [RowSampler.from_params(SamplingParams(temperature=t, seed=7), torch.device("cpu")) for t in (0, 1, 1)]
    accepted, tokens = accept_rows(samplers, target, draft, drafts)
    assert accepted.tolist() == [1, 2, 0]
    assert tokens[0, :2].tolist() == [1, 2]  # kept draft, then the target's argmax
    assert tokens[1].tolist() == [0, 3, 2]  # both drafts, then the bonus token
    assert tokens[2, 0].item() in (2, 3)  # replacement from the residual of the rejected draft


@pytest.fixture(scope="module")
def draftable(tiny_checkpoint):  # noqa: F811
    """A tiny MoE whose first MTP layer is a good but imperfect draft (some drafts get rejected)."""
    checkpoint = load_checkpoint(tiny_checkpoint("qwen3-moe", mtp=1), device="cpu")
    make_draftable(checkpoint.model, checkpoint.mtp, residual_scale=0.5)
    return checkpoint


PROMPTS = [[9707, 1879, 11], [151644, 872, 198, 9707, 1879], [1273, 315], [374, 264, 1273, 315, 279, 13458]]


async def test_greedy_output_and_routing_are_identical_with_and_without_speculation(draftable):
    plain, spec = EmbeddedEngine(draftable), EmbeddedEngine(draftable, draft_tokens=3)
    sampling = SamplingParams(max_new_tokens=24, temperature=0)
    try:
        want = await asyncio.gather(*[plain.generate(p, sampling, return_routed_experts=True) for p in PROMPTS])
        got = await asyncio.gather(*[spec.generate(p, sampling, return_routed_experts=True) for p in PROMPTS])
    finally:
        await plain.close()
        await spec.close()
    total = sum((g.spec for g in got), start=type(got[0].spec)())
    for a, b in zip(want, got):
        assert b.output_ids == a.output_ids
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
        assert np.array_equal(b.routed_experts, a.routed_experts)
        assert a.spec is None
        assert b.spec.draft_tokens == 3 * b.spec.verify_ct
        # Every verify step emits accepted drafts + one token; the prefill emits the first.
        assert b.spec.accepted_tokens + b.spec.verify_ct >= len(b.output_ids) - 1
    assert 0 < total.accepted_tokens < total.draft_tokens, "drafts must be partly rejected to test both paths"
    assert 1 < total.accept_length <= 4


async def test_sampled_tokens_follow_the_target_distribution(draftable):
    """First two tokens over many seeds vs p(t1) p(t2 | t1) from teacher-forced forwards (top-k 3)."""
    prompt = PROMPTS[0]
    spec = EmbeddedEngine(draftable, draft_tokens=2, max_running=256)
    make = lambda seed: SamplingParams(max_new_tokens=2, temperature=0.3, top_k=3, seed=seed)  # noqa: E731
    try:
        generations = await asyncio.gather(*[spec.generate(prompt, make(seed)) for seed in range(512)])
    finally:
        await spec.close()
    assert sum(g.spec.accepted_tokens for g in generations) > 0
    assert sum(g.spec.accepted_tokens for g in generations) < sum(g.spec.draft_tokens for g in generations)

    def top3(ids):
        with torch.no_grad():
            logits = draftable.model(torch.tensor([ids])).logits[0, -1].float() / 0.3
        values, tokens = torch.topk(logits, 3)
        return tokens.tolist(), torch.softmax(values, -1).tolist()

    cells, probs = {}, []
    first_tokens, first_probs = top3(prompt)
    for t1, p1 in zip(first_tokens, first_probs):
        for t2, p2 in zip(*top3(prompt + [t1])):
            cells[t1, t2] = len(probs)
            probs.append(p1 * p2)
    counts = np.zeros(len(probs))
    for g in generations:
        counts[cells[tuple(g.output_ids)]] += 1
    stat, df = chi_square(counts, np.array(probs))
    assert stat < chi_square_critical(df), (counts, probs)


async def test_greedy_output_is_identical_while_rows_join_and_leave_the_speculative_batch(draftable):
    """Two running rows at most, uneven lengths: rows retire mid-batch and waiting ones join it."""
    lengths = [6, 24, 12, 20]
    plain, spec = EmbeddedEngine(draftable, max_running=2), EmbeddedEngine(draftable, draft_tokens=3, max_running=2)
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in lengths]
    try:
        want = await asyncio.gather(*[plain.generate(p, s) for p, s in zip(PROMPTS, params)])
        got = await asyncio.gather(*[spec.generate(p, s) for p, s in zip(PROMPTS, params)])
    finally:
        await plain.close()
        await spec.close()
    assert [len(g.output_ids) for g in got] == lengths
    for a, b in zip(want, got):
        assert b.output_ids == a.output_ids
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    assert 0 < sum(g.spec.accepted_tokens for g in got) < sum(g.spec.draft_tokens for g in got)


def test_inverse_cdf_picks_the_first_token_whose_cdf_passes_the_draw():
    """Dyadic probabilities keep every cdf exact, so each draw has one right answer, zeros included."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.randint(0, 4, (64, 9), generator=generator).float() / 64
    probs[:, 0] = 0  # a leading zero-probability token is never picked, even for a draw of 0
    probs[:, -2:] = 0  # nor trailing ones, even for a draw at the top of the cdf
    probs[:, 3] += 1 / 64  # every row has mass
    uniform = torch.rand(64, generator=generator)
    uniform[:3] = torch.tensor([0.0, 1.0, 1 - 2**-24])
    tokens = inverse_cdf(probs, uniform)
    cdf = probs.double().cumsum(-1)
    for row in range(64):
        target = uniform[row].double() * cdf[row, -1]
        passed = (cdf[row] > target).nonzero().flatten()
        want = int(passed[0]) if len(passed) else int(probs[row].nonzero().max())
        assert tokens[row].item() == want
        assert probs[row, tokens[row]] > 0


def test_distributions_at_temperature_one_are_the_model_distribution():
    logits = torch.randn(3, 2, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0), SamplingParams(temperature=1.0)]
    probs, logprobs = distributions([RowSampler.from_params(p, torch.device("cpu")) for p in params], logits)
    assert torch.equal(logprobs, torch.log_softmax(logits, dim=-1))
    assert torch.equal(probs[[0, 2]], torch.log_softmax(logits[[0, 2]], dim=-1).exp())
    assert probs[1].argmax(-1).tolist() == logits[1].argmax(-1).tolist() and probs[1].sum().item() == 2
    hot = RowSampler.from_params(SamplingParams(temperature=0.5), torch.device("cpu"))
    _, scaled = distributions([hot, hot], logits[:2])
    assert torch.equal(scaled, torch.log_softmax(logits[:2] / 0.5, dim=-1))
