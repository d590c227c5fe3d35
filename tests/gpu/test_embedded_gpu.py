"""The embedded engine on a GPU: bf16 logprobs against a teacher-forced forward, and speculative
decoding with MTP drafts emitting exactly the plain greedy tokens."""

import asyncio

import numpy as np
import pytest

from tests.gpu.marks import GPU, torch

pytestmark = GPU
pytest.importorskip("transformers")

from miles_envs.agents.embedded import EmbeddedEngine  # noqa: E402
from miles_envs.engine import SamplingParams  # noqa: E402
from miles_envs.models.factory import init_model  # noqa: E402
from miles_envs.models.loading import load_checkpoint  # noqa: E402
from miles_envs.models.toy import make_draftable  # noqa: E402

PROMPTS = [[9707, 1879, 11], [151644, 872, 198, 9707, 1879], [1273, 315], [374, 264, 1273, 315, 279, 13458]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("moe"), arch="qwen3-moe", size="tiny", mtp=1)


def _generate(engine, sampling, **kwargs):
    async def run():
        try:
            return await asyncio.gather(*[engine.generate(p, s, **kwargs) for p, s in zip(PROMPTS, sampling)])
        finally:
            await engine.close()

    return asyncio.run(run())


def test_bf16_logprobs_equal_a_teacher_forced_bf16_forward(folder):
    engine = EmbeddedEngine.from_path(folder, device="cuda", dtype=torch.bfloat16)
    model = engine.model
    sampling = [SamplingParams(max_new_tokens=16, seed=i) for i in range(len(PROMPTS))]
    generations = _generate(engine, sampling)
    diffs = []
    for prompt, generation in zip(PROMPTS, generations):
        assert len(generation.output_ids) == 16
        ids = prompt + generation.output_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids], device="cuda")).logits[0].float()
        expected = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1].gather(-1, torch.tensor(generation.output_ids, device="cuda")[:, None])
        diffs.append(np.abs(expected[:, 0].cpu().numpy() - np.array(generation.logprobs)))
    diffs = np.concatenate(diffs)
    # bf16: the incremental (KV-cached, batched) forward and the full forward round differently
    assert diffs.mean() < 0.02 and diffs.max() < 0.15, (diffs.mean(), diffs.max())


def test_speculative_greedy_output_equals_plain_greedy(folder):
    checkpoint = load_checkpoint(folder, device="cuda")
    make_draftable(checkpoint.model, checkpoint.mtp, residual_scale=0.5)
    sampling = [SamplingParams(max_new_tokens=24, temperature=0)] * len(PROMPTS)
    want = _generate(EmbeddedEngine(checkpoint), sampling, return_routed_experts=True)
    got = _generate(EmbeddedEngine(checkpoint, draft_tokens=3), sampling, return_routed_experts=True)
    for a, b in zip(want, got):
        assert b.output_ids == a.output_ids
        assert np.array_equal(b.routed_experts, a.routed_experts)
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-3)
    accepted = sum(g.spec.accepted_tokens for g in got)
    drafted = sum(g.spec.draft_tokens for g in got)
    assert 0 < accepted < drafted, "drafts must be partly accepted and partly rejected to test both paths"
