import json
import re

import typer
from typer.testing import CliRunner

from miles_envs.cli.view import register
from miles_envs.trajectory_io import write_parquet

from .conftest import failed_episode, tool_episode, truncated_episode, write_jsonl


def run_view(*args: str):
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # keeps `view` a named subcommand, as in the full CLI
    result = CliRunner().invoke(app, ["view", *args])
    result.text = " ".join(result.output.split())  # rich wraps long lines
    return result


def embedded(page: str, script_id: str) -> str:
    return re.search(rf'<script type="application/json" id="{script_id}">(.*?)</script>', page, re.DOTALL).group(1)


def test_view_writes_a_page_with_every_episode_and_token_text(tmp_path, qwen3):
    source = write_jsonl(tmp_path / "run.jsonl", [tool_episode(qwen3), failed_episode(), truncated_episode()])
    result = run_view(str(source), "-o", str(tmp_path / "page.html"), "--tokenizer", "qwen3")
    assert result.exit_code == 0, result.output
    assert "3 episodes" in result.text
    page = (tmp_path / "page.html").read_text(encoding="utf-8")
    summary = json.loads(embedded(page, "viewer-summary"))
    status = summary["columns"].index("status")
    assert [row[status] for row in summary["rows"]] == ["completed", "failed", "truncated"]
    assert summary["vocab"]["151657"] == "<tool_call>"
    details = embedded(page, "viewer-details")
    offset, length = summary["rows"][1][-2:]
    assert json.loads(details[offset : offset + length])["error"] == failed_episode().error
    assert "http://" not in page and "https://" not in page  # nothing fetched from outside


def test_view_reads_parquet_and_defaults_output_beside_input(tmp_path, qwen3):
    write_parquet([tool_episode(qwen3), failed_episode()], tmp_path / "run.parquet")
    result = run_view(str(tmp_path / "run.parquet"), "--no-routing")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "run.html").read_text(encoding="utf-8")
    summary = json.loads(embedded(page, "viewer-summary"))
    assert summary["vocab"] is None and len(summary["rows"]) == 2
    assert '"b64"' not in embedded(page, "viewer-details")


def test_view_reports_a_missing_file_and_an_unknown_tokenizer(tmp_path):
    result = run_view(str(tmp_path / "absent.jsonl"))
    assert result.exit_code == 1 and "no trajectory file" in result.text
    source = write_jsonl(tmp_path / "run.jsonl", [failed_episode()])
    result = run_view(str(source), "--tokenizer", "gpt9")
    assert result.exit_code == 1 and "give one of qwen3" in result.text
