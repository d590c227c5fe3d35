"""``miles/TicTacToe-v0``: two-player zero-sum tic-tac-toe rendered as text.

Agents ``x`` and ``o`` alternate; X moves first. A move is the number (1-9) of a free cell; the last
number in the reply counts. An illegal move is explained and may be retried ``illegal_retries``
times, after which the mover forfeits. Rewards: win +1, loss -1, draw 0. ``opening_moves`` random
moves (drawn from the seed) may be pre-placed, so seeds give different positions.

``read_board``, ``random_move`` and ``one_ply_move`` are the fixed reference players a learning
policy is measured against: they read the last board the env showed.
"""

from __future__ import annotations

import random
import re
from typing import Any

from miles_envs.env import Message, system, user
from miles_envs.multiagent.text import last_integer
from miles_envs.multiagent.turn_based import AgentStep, TurnBasedEnv

LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))
MARKS = {"x": "X", "o": "O"}
_BOARD_ROW = re.compile(r"^(\S) \| (\S) \| (\S)$", re.MULTILINE)
_SEAT = re.compile(r"You play tic-tac-toe as ([XO])")


def read_board(text: str) -> tuple[str, list[str | None]]:
    """(the reader's seat, the last board rendered in ``text``) from a player's conversation."""
    seat = _SEAT.search(text)
    rows = _BOARD_ROW.findall(text)[-3:]
    if seat is None or len(rows) < 3:
        raise ValueError("no tic-tac-toe seat and board in the text: pass the conversation the env rendered")
    marks = {mark: agent for agent, mark in MARKS.items()}
    return marks[seat.group(1)], [marks.get(cell) for row in rows for cell in row]


def free_cells(board: list[str | None]) -> list[int]:
    return [i + 1 for i, mark in enumerate(board) if mark is None]


def winning_cell(board: list[str | None], agent: str) -> int | None:
    """A free cell that completes a line of ``agent``'s, if any."""
    for line in LINES:
        marks = [board[i] for i in line]
        if marks.count(agent) == 2 and marks.count(None) == 1:
            return line[marks.index(None)] + 1
    return None


def random_move(board: list[str | None], agent: str, rng: random.Random) -> int:
    return rng.choice(free_cells(board))


def one_ply_move(board: list[str | None], agent: str, rng: random.Random) -> int:
    """Win if possible, else block the opponent's win, else a random free cell."""
    opponent = "o" if agent == "x" else "x"
    for cell in (winning_cell(board, agent), winning_cell(board, opponent)):
        if cell is not None:
            return cell
    return random_move(board, agent, rng)


class TicTacToeEnv(TurnBasedEnv):
    possible_agents = ["x", "o"]
    max_turns = 18

    def __init__(self, illegal_retries: int = 1, opening_moves: int = 0) -> None:
        if not 0 <= opening_moves <= 4:
            raise ValueError(f"opening_moves={opening_moves}: choose 0..4 so the game is still open")
        super().__init__()
        self.illegal_retries, self.opening_moves = illegal_retries, opening_moves
        self.max_turns = 9 * (1 + illegal_retries)  # every cell, each after the allowed illegal tries
        self.board: list[str | None] = [None] * 9
        self.illegal: dict[str, int] = {}

    def start(self, seed: int | None, options: dict[str, Any] | None):
        rng = random.Random(seed)
        self.board = [None] * 9
        self.illegal = {agent: 0 for agent in self.possible_agents}
        for i in range(self.opening_moves):
            self.board[rng.choice(self.free_cells()) - 1] = "xo"[i % 2]
        first = "xo"[self.opening_moves % 2]
        observations = {agent: [system(self._rules(agent))] for agent in self.possible_agents}
        observations[first].append(user(f"{self.render()}\nYour move."))
        return observations, {}, first

    def play(self, agent: str, action: Message) -> AgentStep:
        opponent = self.next_after(agent)
        cell = last_integer(action.get("content"))
        free = self.free_cells()
        if cell not in free:
            problem = "no cell number in your reply" if cell is None else f"cell {cell} is not free"
            self.illegal[agent] += 1
            if self.illegal[agent] <= self.illegal_retries:
                retry = user(f"Illegal move: {problem}. Free cells: {', '.join(map(str, free))}. Your move.")
                return AgentStep(observations={agent: [retry]}, next_agent=agent)
            note = f"{MARKS[agent]} forfeits ({problem})."
            return self._finish(winner=opponent, note=note, forfeit=True)
        self.board[cell - 1] = agent
        if any(all(self.board[i] == agent for i in line) for line in LINES):
            return self._finish(winner=agent, note=f"{MARKS[agent]} took cell {cell} and wins.")
        if not self.free_cells():
            return self._finish(winner=None, note=f"{MARKS[agent]} took cell {cell}. Draw.")
        prompt = user(f"{MARKS[agent]} took cell {cell}.\n{self.render()}\nYour move.")
        return AgentStep(observations={opponent: [prompt]}, next_agent=opponent)

    def free_cells(self) -> list[int]:
        return free_cells(self.board)

    def render(self) -> str:
        cells = [MARKS[m] if m else str(i + 1) for i, m in enumerate(self.board)]
        rows = [" | ".join(cells[r : r + 3]) for r in (0, 3, 6)]
        return "\n---------\n".join(rows)

    def _rules(self, agent: str) -> str:
        return (
            f"You play tic-tac-toe as {MARKS[agent]} against {MARKS[self.next_after(agent)]}. Cells are numbered "
            "1-9, left to right, top to bottom. Three in a row wins. Reply with the number of a free cell."
        )

    def _finish(self, winner: str | None, note: str, forfeit: bool = False) -> AgentStep:
        final = user(f"{note}\n{self.render()}")
        rewards = {a: 0.0 if winner is None else (1.0 if a == winner else -1.0) for a in self.possible_agents}
        infos = {
            a: {"winner": winner, "forfeit": forfeit, "reward_components": {"win": float(a == winner), "illegal": float(self.illegal[a])}}
            for a in self.possible_agents
        }
        return AgentStep(
            observations={a: [dict(final)] for a in self.possible_agents}, rewards=rewards, terminated=True, infos=infos
        )
