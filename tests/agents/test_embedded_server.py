"""The embedded engine behind the SGLang protocol server, driven by the real SGLang client over loopback."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from miles_envs.engine import SamplingParams
from miles_envs.agents.sglang import SGLangEngine
from tests.models.tiny_checkpoints import tiny_checkpoint  # noqa: F401

SERVE = "import typer; from miles_envs.cli.models import register; app = typer.Typer(); register(app); app()"


@pytest.fixture
def served(tiny_checkpoint):  # noqa: F811
    """`serve-engine PATH --port 0` in a subprocess; yields its URL."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve-engine", str(tiny_checkpoint("qwen3-moe")), "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("listening on "), line
        yield line.split()[-1]
    finally:
        process.terminate()
        process.wait(timeout=30)


async def test_serve_engine_gives_sglang_clients_exact_logprobs_and_routing(served, tiny_checkpoint):  # noqa: F811
    from miles_envs.models.loading import load_checkpoint

    model = load_checkpoint(tiny_checkpoint("qwen3-moe"), device="cpu").model
    client = SGLangEngine(served, num_layers=2, topk=2)
    prompt = [151644, 872, 198, 9707, 1879]
    try:
        assert await client.health()
        first = await client.generate(prompt, SamplingParams(max_new_tokens=6, seed=3), return_routed_experts=True)
        ids = prompt + first.output_ids
        turn_two = ids + [151645, 198]
        start = len(ids) - 1
        second = await client.generate(
            turn_two, SamplingParams(max_new_tokens=3, seed=4), return_routed_experts=True, routed_experts_start=start
        )
    finally:
        await client.close()
    assert first.finish_reason == "length" and len(first.output_ids) == 6
    with torch.no_grad():
        out = model(torch.tensor([turn_two + second.output_ids]), output_router_logits=True)
    logprobs = torch.log_softmax(out.logits[0].float(), -1)
    reference = [float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(first.output_ids)]
    assert np.abs(np.array(reference) - np.array(first.logprobs)).max() <= 1e-4
    routing = torch.stack([torch.topk(torch.softmax(r.float(), -1), 2, -1).indices for r in out.router_logits], 1)
    rows = np.concatenate([first.routed_experts, second.routed_experts])
    assert np.array_equal(rows, routing[: len(turn_two) + len(second.output_ids) - 1].numpy())
