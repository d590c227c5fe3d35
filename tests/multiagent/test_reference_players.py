"""The fixed reference players of tic-tac-toe and the problem generator of proposer–solver."""

import random

import pytest

from miles_envs.envs.proposer_solver import count_operators, evaluate, random_problem
from miles_envs.envs.tictactoe import TicTacToeEnv, one_ply_move, random_move, read_board, winning_cell


def shown(env: TicTacToeEnv, agent: str) -> str:
    """The conversation text a seat has seen: its rules, then the current board."""
    return f"{env._rules(agent)}\n{env.render()}\nYour move."


def board(marks: str) -> list:
    return [None if c == "." else c for c in marks]


def test_read_board_returns_the_readers_seat_and_the_last_board():
    env = TicTacToeEnv()
    env.reset(seed=0)
    env.board = board("x.o......")
    earlier = shown(env, "o")
    env.board = board("x.o.x....")
    assert read_board(earlier + "\n" + shown(env, "o")) == ("o", board("x.o.x...."))


def test_read_board_names_the_problem_on_text_without_a_board():
    with pytest.raises(ValueError, match="no tic-tac-toe seat and board"):
        read_board("Reply with the number of a free cell.")


def test_one_ply_takes_a_win_before_blocking():
    position = board("xx.oo....")  # x can win at 3, o threatens 6
    assert winning_cell(position, "x") == 3 and winning_cell(position, "o") == 6
    assert one_ply_move(position, "x", random.Random(0)) == 3
    assert one_ply_move(position, "o", random.Random(0)) == 6


def test_one_ply_blocks_when_it_cannot_win():
    position = board("x...x....")  # x threatens the diagonal at 9
    assert {one_ply_move(position, "o", random.Random(seed)) for seed in range(20)} == {9}


def test_random_move_covers_exactly_the_free_cells():
    position = board("xo.xo.x..")
    moves = {random_move(position, "o", random.Random(seed)) for seed in range(200)}
    assert moves == {3, 6, 8, 9}


def test_one_ply_beats_random_more_often_than_random_does():
    def game(x_move, o_move, seed):
        rng, position = random.Random(seed), [None] * 9
        for turn in range(9):
            agent, move = ("x", x_move) if turn % 2 == 0 else ("o", o_move)
            cell = move(position, agent, rng)
            position[cell - 1] = agent
            if winning_cell([None if i == cell - 1 else m for i, m in enumerate(position)], agent) == cell:
                return agent
        return None

    random_wins = sum(game(random_move, random_move, s) == "o" for s in range(400))
    heuristic_wins = sum(game(random_move, one_ply_move, s) == "o" for s in range(400))
    assert heuristic_wins > 2 * random_wins


@pytest.mark.parametrize("operators", [1, 2, 4])
def test_random_problem_has_the_asked_operator_count_and_is_valid(operators):
    for seed in range(50):
        problem = random_problem(random.Random(seed), operators)
        assert count_operators(problem) == operators
        assert evaluate(problem, max_operators=operators) == eval(problem)  # noqa: S307 - digits and + - * only


def test_random_problem_needs_an_operator():
    with pytest.raises(ValueError, match="at least one operator"):
        random_problem(random.Random(0), 0)
