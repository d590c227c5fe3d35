"""Trajectories for the viewer tests, tokenized with the real Qwen3 tokenizer, and a headless Chromium."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from miles_envs.tokenizers import load_tokenizer
from miles_envs.trajectory import Status, Trajectory, Turn

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
PROMPT = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
TOOL_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
TOOL_RESULT = "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
ANSWER = "The answer is 5.<|im_end|>"
ROUTING_LAYERS, ROUTING_TOPK, NUM_EXPERTS = 2, 2, 8
SANDBOX_ERROR = "sandbox crashed: exit code 137 (out of memory)"


@pytest.fixture(scope="session")
def qwen3():
    return load_tokenizer("qwen3")


def routing_for(num_tokens: int) -> np.ndarray:
    """Deterministic experts: token i, layer l, slot k -> (i + 3*l + k) % NUM_EXPERTS."""
    i = np.arange(num_tokens - 1)[:, None, None]
    layer = np.arange(ROUTING_LAYERS)[None, :, None]
    slot = np.arange(ROUTING_TOPK)[None, None, :]
    return ((i + 3 * layer + slot) % NUM_EXPERTS).astype(np.uint8)


def tool_episode(tokenizer) -> Trajectory:
    """A completed two-turn tool-use episode: model call, env tool result, model answer."""

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    prompt, call, result, answer = encode(PROMPT), encode(TOOL_CALL + "<|im_end|>"), encode(TOOL_RESULT), encode(ANSWER)
    spans = [("model", call), ("env", result), ("model", answer)]
    response, mask, logprobs, turns = [], [], [], []
    for kind, ids in spans:
        turns.append(Turn(kind=kind, start=len(response), end=len(response) + len(ids), finish_reason="stop" if kind == "model" else None))
        response += ids
        mask += [1 if kind == "model" else 0] * len(ids)
        logprobs += [-0.6931 if kind == "model" else 0.0 for _ in ids]
    return Trajectory(
        prompt_ids=prompt,
        response_ids=response,
        loss_mask=mask,
        logprobs=logprobs,
        routed_experts=routing_for(len(prompt) + len(response)),
        turns=turns,
        messages=[
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
            ]},
            {"role": "tool", "tool_call_id": "call_0", "content": "5"},
            {"role": "assistant", "content": "The answer is 5."},
        ],
        reward=1.0,
        reward_components={"correct": 1.0, "format": 0.5},
        env_id="test/Calculator-v0",
        group_id="g0",
        seed=7,
        flags=["tool_use"],
    ).validate()


def failed_episode() -> Trajectory:
    return Trajectory(
        prompt_ids=[151644, 872, 198],
        response_ids=[9707, 1879],
        loss_mask=[1, 1],
        logprobs=[-0.1, -0.2],
        messages=[{"role": "user", "content": "run <script>alert(1)</script> it"}],
        status=Status.FAILED,
        error=SANDBOX_ERROR,
        reward=0.0,
        env_id="test/Code-v0",
        flags=["sandbox_error"],
    ).validate()


def truncated_episode() -> Trajectory:
    return Trajectory(
        prompt_ids=[151644, 872],
        response_ids=[9707, 1879, 9707],
        loss_mask=[1, 1, 1],
        logprobs=[-1.0, float("-inf"), -0.5],
        status=Status.TRUNCATED,
        reward=0.25,
        env_id="test/Calculator-v0",
    ).validate()


def write_jsonl(path: Path, trajectories: list[Trajectory]) -> Path:
    path.write_text("".join(t.to_json() + "\n" for t in trajectories), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def browser_context():
    """One headless Chromium (Debian package) with a fresh profile, driven by playwright over CDP."""
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: run .ci/setup_browser.sh")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing: run .ci/setup_browser.sh")
    profile = tempfile.mkdtemp(prefix="miles-envs-chromium-")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 900}
        )
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def open_page(browser_context):
    """Open a page file; fails the test on any script error or any request that leaves the file."""
    opened = []

    def open_(path: Path):
        page = browser_context.new_page()
        errors, requests = [], []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("request", lambda request: requests.append(request.url))
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-ready=true]")
        opened.append((page, errors, requests))
        return page

    yield open_
    for page, errors, requests in opened:
        page.close()
        assert not errors, f"script errors in the page: {errors}"
        foreign = [url for url in requests if not url.startswith("file://")]
        assert not foreign, f"the page fetched from outside its file: {foreign}"
