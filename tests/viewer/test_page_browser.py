"""The page as rendered by a real headless Chromium: list, filters, detail, token view."""

import pytest

from miles_envs.viewer import write_page

from .conftest import ROUTING_LAYERS, ROUTING_TOPK, SANDBOX_ERROR, TOOL_CALL, failed_episode, routing_for, tool_episode, truncated_episode


@pytest.fixture
def page_file(tmp_path, qwen3):
    path = tmp_path / "page.html"
    write_page([tool_episode(qwen3), failed_episode(), truncated_episode()], path, tokenizer=qwen3, title="run.jsonl")
    return path


def shown(page) -> int:
    return int(page.get_attribute("#count", "data-shown"))


def test_filters_by_env_status_and_reward(open_page, page_file):
    page = open_page(page_file)
    assert shown(page) == 3 and page.locator("#rows .row").count() == 3
    page.select_option("#filter-env", "test/Calculator-v0")
    assert shown(page) == 2
    page.select_option("#filter-status", "truncated")
    assert shown(page) == 1
    assert page.locator("#rows .row").get_attribute("data-index") == "2"
    page.select_option("#filter-status", "")
    page.fill("#filter-reward-min", "0.5")
    assert shown(page) == 1 and page.locator("#rows .row").get_attribute("data-index") == "0"
    page.select_option("#filter-env", "")
    page.fill("#filter-reward-min", "")
    page.fill("#filter-reward-max", "0.3")
    assert [row.get_attribute("data-index") for row in page.locator("#rows .row").all()] == ["1", "2"]
    assert page.locator("#filter-status option").all_inner_texts() == ["all", "completed", "truncated", "failed"]


def test_failed_episode_shows_badge_and_error(open_page, page_file):
    page = open_page(page_file)
    row = page.locator('#rows .row[data-index="1"]')
    assert row.locator(".badge").inner_text() == "failed"
    assert "status-failed" in row.locator(".badge").get_attribute("class")
    assert row.locator(".error").inner_text() == SANDBOX_ERROR
    row.click()
    assert page.inner_text("#detail h2 .badge") == "failed"
    assert page.inner_text("#error") == SANDBOX_ERROR
    assert "sandbox_error" in page.inner_text("#detail .facts")
    assert page.inner_text("#conversation .role-user pre") == "run <script>alert(1)</script> it"


def test_arrow_keys_move_the_selection(open_page, page_file):
    page = open_page(page_file)
    page.click('#rows .row[data-index="0"]')
    page.focus("#list")
    page.keyboard.press("ArrowDown")
    assert page.get_attribute("#rows .row.selected", "data-index") == "1"
    assert page.inner_text("#detail h2 .badge") == "failed"
    page.keyboard.press("ArrowUp")
    assert page.get_attribute("#rows .row.selected", "data-index") == "0"


def test_token_view_shows_mask_text_tool_call_and_heat(open_page, page_file, qwen3):
    trajectory = tool_episode(qwen3)
    page = open_page(page_file)
    page.click('#rows .row[data-index="0"]')
    prompt_length = len(trajectory.prompt_ids)
    classes = page.eval_on_selector_all("#tokens .tok", "spans => spans.map(s => s.className)")
    assert len(classes) == len(trajectory.tokens)
    expected = ["prompt"] * prompt_length + ["model" if m else "env" for m in trajectory.loss_mask]
    assert [c.split()[1] for c in classes] == expected
    texts = page.eval_on_selector_all("#tokens .tok", "spans => spans.map(s => s.textContent)")
    assert "".join(texts) == qwen3.decode(trajectory.tokens).replace("\n", "↵\n")
    tool_text = "".join(page.eval_on_selector_all("#tokens .tok.tool", "spans => spans.map(s => s.textContent)"))
    assert tool_text == TOOL_CALL.replace("\n", "↵\n")
    assert page.get_attribute(f'#tokens .tok[data-i="{prompt_length}"]', "style") == "--heat:0.50"
    assert "logprob -0.6931" in page.get_attribute(f'#tokens .tok[data-i="{prompt_length}"]', "title")
    assert page.locator("#reward-components tr").count() == 3
    assert page.locator("#conversation .message").count() == 4
    assert page.inner_text("#conversation .role-assistant .tool-calls") == 'call_0 → add({"a": 2, "b": 3})'

    page.check("#show-ids")
    ids = page.eval_on_selector_all("#tokens .tok", "spans => spans.map(s => Number(s.textContent))")
    assert ids == trajectory.tokens


def test_routed_expert_presence_and_hits(open_page, page_file, qwen3):
    trajectory = tool_episode(qwen3)
    page = open_page(page_file)
    page.click('#rows .row[data-index="0"]')
    routed = page.locator("#tokens .tok.routed").count()
    assert routed == len(trajectory.tokens) - 1  # the last token was never fed to the model
    layer, expert = ROUTING_LAYERS - 1, 5
    page.fill("#routing-layer", str(layer))
    page.fill("#routing-expert", str(expert))
    hits = page.eval_on_selector_all("#tokens .tok.hit", "spans => spans.map(s => Number(s.dataset.i))")
    experts = routing_for(len(trajectory.tokens))
    assert hits == [i for i in range(len(experts)) if expert in experts[i, layer, :ROUTING_TOPK]]
    assert hits  # the pattern puts expert 5 on some tokens


def test_episode_without_tokenizer_shows_ids_and_non_finite_logprob(open_page, tmp_path):
    path = tmp_path / "ids.html"
    write_page([truncated_episode()], path)
    page = open_page(path)
    page.click('#rows .row[data-index="0"]')
    assert page.is_disabled("#show-ids")
    texts = page.eval_on_selector_all("#tokens .tok", "spans => spans.map(s => s.textContent)")
    assert texts == [str(i) for i in truncated_episode().tokens]
    assert "logprob -Infinity" in page.get_attribute('#tokens .tok[data-i="3"]', "title")
    assert page.get_attribute('#tokens .tok[data-i="3"]', "style") == "--heat:1.00"
