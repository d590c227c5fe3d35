"""Writing the self-contained HTML page: templates, CSS and JS inlined, data in JSON script tags.

Detail records are streamed into the page one per line; the summary, written after them, holds each
record's character offset so the page parses a record only when its episode is opened.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from miles_envs.trajectory import Trajectory
from miles_envs.viewer.encode import SUMMARY_COLUMNS, TokenTexts, episode_detail, summary_row, to_script_json

_TEMPLATES = resources.files("miles_envs.viewer") / "templates"
_PLACEHOLDER = re.compile(r"__([A-Z]+)__")


@dataclass
class PageStats:
    episodes: int
    bytes: int


def write_page(
    trajectories: Iterable[Trajectory],
    out: str | Path,
    *,
    tokenizer: Any = None,
    include_routing: bool = True,
    title: str = "trajectories",
) -> PageStats:
    """Write the viewer page for ``trajectories`` to ``out``.

    ``tokenizer`` (a transformers tokenizer) adds token text and tool-call spans; without it the
    token view shows ids. ``include_routing=False`` keeps only which tokens carry routing, not the
    experts, for files whose routing would make the page too large.
    """
    out = Path(out)
    head, tail = _fill(_template("page.html"), TITLE=html.escape(title), CSS=_template("viewer.css")).split("__DATA__")
    token_texts = TokenTexts(tokenizer) if tokenizer is not None else None
    with out.open("w", encoding="utf-8") as page:
        page.write(head)
        rows = _write_details(page, trajectories, token_texts, include_routing)
        page.write('<script type="application/json" id="viewer-summary">')
        page.write(
            to_script_json(
                {
                    "title": title,
                    "columns": [*SUMMARY_COLUMNS, "detail_offset", "detail_length"],
                    "rows": rows,
                    "vocab": None if token_texts is None else token_texts.table,
                }
            )
        )
        page.write("</script>\n")
        page.write(_fill(tail, JS=_template("viewer.js")))
    return PageStats(episodes=len(rows), bytes=out.stat().st_size)


def _write_details(
    page: TextIO, trajectories: Iterable[Trajectory], token_texts: TokenTexts | None, include_routing: bool
) -> list[list[Any]]:
    page.write('<script type="application/json" id="viewer-details">')
    rows, offset = [], 0
    for trajectory in trajectories:
        record = to_script_json(episode_detail(trajectory, token_texts, include_routing))
        page.write(record + "\n")
        rows.append([*summary_row(trajectory), offset, len(record)])
        offset += len(record) + 1
    page.write("</script>\n")
    return rows


def _template(name: str) -> str:
    return (_TEMPLATES / name).read_text(encoding="utf-8")


def _fill(template: str, **parts: str) -> str:
    """Replace ``__NAME__`` placeholders in one pass (inserted text is never scanned again)."""
    return _PLACEHOLDER.sub(lambda m: parts.get(m.group(1), m.group(0)), template)
