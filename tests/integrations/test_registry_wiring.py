"""Foreign envs reach the registry and the CLI: make/check by `lib:` id, `list --all`."""

import json

import pytest

from miles_envs import check_env, make
from tests.conftest import run_cli


@pytest.mark.parametrize("env_id", ["textarena:TicTacToe-v0", "textarena/TicTacToe-v0"])
def test_make_by_foreign_id(env_id):
    env = make(env_id)
    assert check_env(env).ok


def test_cli_check_and_list_all(tmp_path):
    env = {"MILES_ENVS_HOME": str(tmp_path)}
    assert "close() idempotent" in run_cli("check", "textarena:TicTacToe-v0", env=env).stdout
    rows = json.loads(run_cli("list", "--all", "--json", env=env).stdout)
    sources = {row["source"] for row in rows}
    assert {"builtin", "foreign:textarena", "foreign:gem"} <= sources
    plain = json.loads(run_cli("list", "--json", env=env).stdout)
    assert all(not row["source"].startswith("foreign:") for row in plain)
