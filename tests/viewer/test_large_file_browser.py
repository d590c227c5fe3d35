"""A 10k-episode file in a real headless Chromium: it opens, filters stay quick, the list stays
virtual. Timings are measured inside the page and reported (printed, and tests/artifacts/viewer.json)
with only a sanity bound; the screenshot is kept as an artifact (tests/artifacts/viewer.png). Both go
to the ignored artifacts folder: a test run never rewrites tracked files."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from miles_envs.trajectory import Status, Trajectory, Turn
from miles_envs.trajectory_io import read_trajectories
from miles_envs.viewer import write_page

from .conftest import ANSWER, PROMPT, TOOL_CALL, TOOL_RESULT, routing_for, tool_episode, write_jsonl

EPISODES = 10_000
ENVS = ("test/Calculator-v0", "test/Code-v0", "test/Search-v0", "test/SelfPlay-v0")
SANITY_BOUND_MS = 10_000  # catches a hang or a quadratic blow-up, not a regression in speed
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def synthetic_episodes(tokenizer, count: int, seed: int = 0) -> list[Trajectory]:
    """Tool-use episodes of 1-4 calls built from real Qwen3 token pieces, with varied outcomes."""
    rng = np.random.default_rng(seed)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    prompt, call, result, answer = encode(PROMPT), encode(TOOL_CALL + "<|im_end|>"), encode(TOOL_RESULT), encode(ANSWER)
    statuses = [Status.COMPLETED, Status.TRUNCATED, Status.ABORTED, Status.FAILED]
    episodes = [tool_episode(tokenizer)]
    for n in range(1, count):
        pieces = [("model", call), ("env", result)] * int(rng.integers(1, 5)) + [("model", answer)]
        response, mask, turns = [], [], []
        for kind, ids in pieces:
            turns.append(Turn(kind=kind, start=len(response), end=len(response) + len(ids)))
            response += ids
            mask += [int(kind == "model")] * len(ids)
        logprobs = np.where(np.array(mask) == 1, -rng.exponential(0.4, len(mask)).round(4), 0.0).tolist()
        status = statuses[int(rng.choice(4, p=[0.7, 0.15, 0.05, 0.1]))]
        correct = float(rng.integers(0, 2))
        episodes.append(
            Trajectory(
                prompt_ids=prompt,
                response_ids=response,
                loss_mask=mask,
                logprobs=logprobs,
                routed_experts=routing_for(len(prompt) + len(response)),
                turns=turns,
                messages=[{"role": "user", "content": "What is 2+3?"}],
                reward=correct + 0.1 * len(turns),
                reward_components={"correct": correct, "turns": 0.1 * len(turns)},
                status=status,
                error=f"episode {n}: tool timed out" if status is Status.FAILED else None,
                env_id=ENVS[n % len(ENVS)],
                group_id=f"g{n // 8}",
            )
        )
    return episodes


def last_filter_ms(page) -> float:
    return page.evaluate("window.viewer.stats.filterMs.at(-1)")


@pytest.fixture(scope="module")
def large_page(tmp_path_factory, qwen3):
    folder = tmp_path_factory.mktemp("viewer-10k")
    trajectories = synthetic_episodes(qwen3, EPISODES)
    source = write_jsonl(folder / "run.jsonl", trajectories)
    start = time.perf_counter()
    stats = write_page(read_trajectories(source), folder / "run.html", tokenizer=qwen3, title="run.jsonl")
    return folder / "run.html", trajectories, stats, time.perf_counter() - start


def test_ten_thousand_episodes_open_filter_and_stay_virtual(open_page, large_page):
    path, trajectories, page_stats, build_s = large_page
    page = open_page(path)
    figures = {"episodes": EPISODES, "page_mb": round(page_stats.bytes / 1e6, 1), "build_page_s": round(build_s, 2)}
    figures["ready_ms"] = page.evaluate("window.viewer.stats.readyMs")
    figures["script_start_ms"] = page.evaluate("window.viewer.stats.scriptMs")
    assert int(page.get_attribute("#count", "data-shown")) == EPISODES
    assert page.locator("#rows .row").count() < 100  # only the rows in view (plus overscan) exist

    def expect(predicate) -> int:
        return sum(1 for t in trajectories if predicate(t))

    page.select_option("#filter-env", ENVS[1])
    figures["filter_env_ms"] = last_filter_ms(page)
    assert int(page.get_attribute("#count", "data-shown")) == expect(lambda t: t.env_id == ENVS[1])
    page.select_option("#filter-status", "failed")
    figures["filter_status_ms"] = last_filter_ms(page)
    assert int(page.get_attribute("#count", "data-shown")) == expect(lambda t: t.env_id == ENVS[1] and t.status is Status.FAILED)
    page.select_option("#filter-env", "")
    page.select_option("#filter-status", "")
    page.fill("#filter-reward-min", "1")
    figures["filter_reward_ms"] = last_filter_ms(page)
    assert int(page.get_attribute("#count", "data-shown")) == expect(lambda t: t.reward >= 1)
    page.fill("#filter-reward-min", "")
    figures["filter_clear_ms"] = last_filter_ms(page)

    page.evaluate("document.getElementById('list-viewport').scrollTop = 1e9")
    page.wait_for_function(f"document.querySelector('#rows .row:last-child').dataset.index === '{EPISODES - 1}'")
    assert page.locator("#rows .row").count() < 100

    longest = max(range(EPISODES), key=lambda i: len(trajectories[i].tokens))
    page.evaluate(f"window.viewer.select({longest})")
    figures["open_longest_tokens"] = len(trajectories[longest].tokens)
    figures["open_longest_token_view_ms"] = page.evaluate("window.viewer.stats.tokenViewMs.at(-1)")
    assert page.locator("#tokens .tok").count() == len(trajectories[longest].tokens)

    timings = [v for k, v in figures.items() if k.endswith("_ms")]
    assert max(timings) < SANITY_BOUND_MS, figures
    report(figures)


def test_screenshot_of_a_tool_episode(open_page, large_page, tmp_path):
    page = open_page(large_page[0])
    page.click('#rows .row[data-index="0"]')
    page.fill("#routing-expert", "5")
    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "viewer.png")


def report(figures: dict) -> None:
    rounded = {k: round(v, 1) if isinstance(v, float) else v for k, v in figures.items()}
    print("\nviewer, headless Chromium")
    for key, value in rounded.items():
        print(f"  {key:<28} {value}")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "viewer.json").write_text(json.dumps(rounded, indent=2) + "\n")
