import pytest

from miles_envs import assistant, check_env
from miles_envs.envs.tictactoe import TicTacToeEnv


def play(env, moves):
    results = []
    for move in moves:
        mover = env.agent_selection
        results.append((mover, env.step(assistant(move))))
    return results


def test_x_wins_a_row_and_rewards_are_zero_sum():
    env = TicTacToeEnv()
    obs, _ = env.reset(seed=0)
    assert env.agent_selection == "x"
    assert obs["x"][-1]["content"].endswith("Your move.") and len(obs["o"]) == 1
    results = play(env, ["1", "4", "2", "5", "I take 3"])
    _, (final_obs, rewards, terms, truncs, infos) = results[-1]
    assert rewards == {"x": 1.0, "o": -1.0}
    assert terms == {"x": True, "o": True} and truncs == {"x": False, "o": False}
    assert infos["x"]["winner"] == "x" and env.agents == []
    assert "X took cell 3 and wins." in final_obs["o"][0]["content"]


def test_each_move_is_shown_to_the_opponent_only():
    env = TicTacToeEnv()
    env.reset(seed=0)
    obs, *_ = env.step(assistant("5"))
    assert list(obs) == ["o"]
    assert obs["o"][0]["content"].startswith("X took cell 5.\n1 | 2 | 3\n---------\n4 | X | 6")
    assert env.agent_selection == "o"


def test_illegal_move_is_retried_then_forfeits():
    env = TicTacToeEnv(illegal_retries=1)
    env.reset(seed=0)
    play(env, ["5"])
    (_, first), = play(env, ["5"])
    assert env.agent_selection == "o"
    assert first[0]["o"][0]["content"] == "Illegal move: cell 5 is not free. Free cells: 1, 2, 3, 4, 6, 7, 8, 9. Your move."
    (_, second), = play(env, ["no idea"])
    _, rewards, terms, _, infos = second
    assert rewards == {"x": 1.0, "o": -1.0} and all(terms.values())
    assert infos["o"]["forfeit"] and infos["o"]["reward_components"]["illegal"] == 2.0


def test_full_board_without_a_line_is_a_draw():
    env = TicTacToeEnv()
    env.reset(seed=0)
    results = play(env, ["1", "2", "3", "5", "4", "6", "8", "7", "9"])
    _, (_, rewards, terms, _, infos) = results[-1]
    assert rewards == {"x": 0.0, "o": 0.0} and all(terms.values()) and infos["x"]["winner"] is None


def test_opening_moves_follow_the_seed():
    boards = {seed: (TicTacToeEnv(opening_moves=3).reset(seed=seed)[0]) for seed in (0, 1)}
    again = TicTacToeEnv(opening_moves=3).reset(seed=0)[0]
    assert again == boards[0] and boards[0] != boards[1]
    env = TicTacToeEnv(opening_moves=3)
    env.reset(seed=0)
    assert env.agent_selection == "o" and len(env.free_cells()) == 6


def test_step_before_reset_names_the_fix():
    with pytest.raises(RuntimeError, match="call reset"):
        TicTacToeEnv().step(assistant("1"))


def test_passes_the_multi_agent_checker():
    assert check_env(TicTacToeEnv(opening_moves=2)).ok
