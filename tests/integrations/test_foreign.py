"""Foreign env libraries through the registry bridge: id mapping, listing, conformance, the env loop."""

from __future__ import annotations

import pytest

from miles_envs.checker import check_env
from miles_envs.env import assistant
from miles_envs.integrations.foreign import LIBRARIES, foreign_spec, foreign_specs, is_foreign_id, registry_id
from miles_envs.registry import EnvNotFound

CHECKED = {
    "gem": ["gem:game:GuessTheNumber-v0-easy", "gem:game:Mastermind-v0-easy", "gem:game:TowerofHanoi-v0-easy"],
    "textarena": ["textarena:GuessTheNumber-v0", "textarena:TicTacToe-v0", "textarena:Nim-v0"],
    "skyrl": ["skyrl:gsm8k", "skyrl:gsm8k_multi_turn", "skyrl:aime"],
    "pz": ["pz:classic.tictactoe_v3", "pz:classic.connect_four_v3"],
}


def installed(namespace: str):
    return pytest.mark.skipif(not LIBRARIES[namespace].installed, reason=f"{LIBRARIES[namespace].distribution} not installed")


@pytest.mark.parametrize(
    ("namespace", "foreign_id", "expected"),
    [
        ("gem", "game:GuessTheNumber-v0-hard", "gem/game:GuessTheNumber-hard-v0"),
        ("gem", "math:GSM8K", "gem/math:GSM8K-v0"),
        ("textarena", "Wordle-v0-long-hardcore", "textarena/Wordle-long-hardcore-v0"),
        ("skyrl", "gsm8k", "skyrl/gsm8k-v0"),
        ("pz", "classic.tictactoe_v3", "pz/classic.tictactoe-v3"),
    ],
)
def test_foreign_ids_map_to_registry_ids(namespace, foreign_id, expected):
    from miles_envs.registry import parse_id

    assert registry_id(namespace, foreign_id) == expected
    assert parse_id(expected)[0] == namespace


def test_only_known_prefixes_are_foreign():
    assert is_foreign_id("gem:game:GuessTheNumber-v0") and is_foreign_id("pz/classic.tictactoe-v3")
    assert not is_foreign_id("miles/GuessNumber-v0")


@pytest.mark.parametrize("namespace", sorted(CHECKED))
def test_each_installed_library_passes_check_env(namespace):
    if not LIBRARIES[namespace].installed:
        pytest.skip(f"{LIBRARIES[namespace].distribution} not installed")
    for env_id in CHECKED[namespace]:
        spec = foreign_spec(env_id)
        assert spec.source == f"foreign:{namespace}" and spec.kwargs["env_id"] == env_id.split(":", 1)[1]
        assert foreign_spec(spec.id).kwargs == spec.kwargs  # both spellings reach the same spec
        report = check_env(spec.make(), raise_on_failure=False, name=spec.id)
        assert report.ok, report.summary()


def test_listing_shows_installed_libraries_only():
    specs = foreign_specs()
    sources = {s.source for s in specs}
    for namespace, lib in LIBRARIES.items():
        assert (f"foreign:{namespace}" in sources) == lib.installed
    ids = {s.id for s in specs}
    if LIBRARIES["gem"].installed:
        assert "gem/game:GuessTheNumber-easy-v0" in ids
    assert len(ids) == len(specs)


@installed("gem")
def test_unknown_foreign_id_suggests_close_matches():
    with pytest.raises(EnvNotFound, match="did you mean: gem/game:GuessTheNumber-easy-v0"):
        foreign_spec("gem:game:GuessTheNumbr-v0-easy")


@installed("gem")
def test_gem_episodes_in_parallel_match_episodes_alone():
    """GEM draws from the global RNG; each adapter keeps its own stream, so interleaving changes nothing."""
    spec = foreign_spec("gem:game:GuessTheNumber-v0-easy")

    def play(env, guesses):
        env.reset(seed=7)
        return [env.step(assistant(f"\\boxed{{{g}}}"))[0][0]["content"] for g in guesses]

    alone = play(spec.make(), [1, 2, 3])
    a, b = spec.make(), spec.make()
    a.reset(seed=7)
    b.reset(seed=11)
    interleaved = []
    for g in (1, 2, 3):
        interleaved.append(a.step(assistant(f"\\boxed{{{g}}}"))[0][0]["content"])
        b.step(assistant(f"\\boxed{{{g}}}"))
    assert interleaved == alone


@installed("skyrl")
def test_skyrl_env_without_tasks_says_what_to_pass():
    with pytest.raises(ValueError, match="tasks="):
        foreign_spec("skyrl:text2sql").make()


@installed("pz")
def test_pettingzoo_illegal_move_ends_the_game_with_a_penalty():
    env = foreign_spec("pz:classic.tictactoe_v3").make()
    observations, _ = env.reset(seed=0)
    mover = env.agent_selection
    assert "Legal moves: [0, 1, 2, 3, 4, 5, 6, 7, 8]" in observations[mover][0]["content"]
    env.step(assistant("4"))
    _, rewards, terminations, _, _ = env.step(assistant("4"))  # the centre is taken
    assert env.agents == [] and all(terminations.values())
    assert rewards[env.possible_agents[1]] == -1.0 and rewards[mover] == 0.0


@installed("gem")
async def test_a_foreign_env_runs_in_the_token_loop():
    from miles_envs.agents.scripted import ScriptedEngine
    from miles_envs.chat import ChatRenderer
    from miles_envs.loop import LoopConfig, run_episode
    from miles_envs.parsers import parser_for
    from miles_envs.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("qwen2_5")
    renderer = ChatRenderer(tokenizer)
    engine = ScriptedEngine(tokenizer, [f"\\boxed{{{g}}}" for g in range(1, 11)])
    env = foreign_spec("gem:game:GuessTheNumber-v0-easy").make()
    trajectory = await run_episode(env, engine, renderer, parser_for(tokenizer), LoopConfig(), seed=3)
    trajectory.validate()
    assert trajectory.status.value in ("completed", "truncated") and trajectory.num_turns >= 1
    assert "Guess The Number" in trajectory.messages[0]["content"]
