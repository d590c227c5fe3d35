"""Help and version as a newcomer first meets them."""

from importlib.metadata import version

from tests.conftest import run_cli


def test_flags_show_as_flags_and_valued_options_keep_their_type():
    text = run_cli("register", "--help", env={"COLUMNS": "200"}).stdout
    override = next(line for line in text.splitlines() if "--override" in line)
    assert "<bool>" not in text and "replace an existing registration" in override
    assert "<str>" in next(line for line in text.splitlines() if "--kwargs" in line)


def test_version_prints_the_installed_version():
    assert run_cli("--version").stdout.strip() == f"miles-envs {version('miles-envs')}"
