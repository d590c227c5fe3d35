"""Every test marked ``gpu`` lives under tests/gpu, the only folder ``pytest -m gpu`` collects."""

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_gpu_marked_tests_live_under_tests_gpu():
    marked = {p.relative_to(TESTS).as_posix() for p in TESTS.rglob("*.py") if re.search(r"mark\.gpu\b", p.read_text())}
    assert marked and all(name.startswith("gpu/") for name in marked), marked
