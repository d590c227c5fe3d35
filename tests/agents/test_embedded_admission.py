"""A failure while the embedded engine admits requests answers them with the error (no hang)."""

import asyncio

from miles_envs.agents.embedded import EmbeddedEngine
from miles_envs.engine import SamplingParams
from tests.models.tiny_checkpoints import tiny_checkpoint  # noqa: F401


async def test_a_failure_while_admitting_answers_the_request_with_the_error(tiny_checkpoint):  # noqa: F811
    engine = EmbeddedEngine.from_path(tiny_checkpoint("qwen3-moe", mtp=1), device="cpu", draft_tokens=2)
    engine.mtp.layers.to("meta")  # MTP layers on another device than the model: the first draft fails
    try:
        generation = await asyncio.wait_for(engine.generate([9707, 1879], SamplingParams(max_new_tokens=4, seed=0)), 60)
        healthy = await engine.health()
    finally:
        await engine.close()
    assert generation.finish_reason == "abort"
    assert generation.error and "meta" in generation.error
    assert not healthy
