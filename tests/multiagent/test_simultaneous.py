"""Simultaneous moves through the turn-based protocol: nobody sees a same-round move before moving."""

import asyncio

from miles_envs import check_env, user
from miles_envs.agents.scripted import ScriptedEngine
from miles_envs.multi_loop import AgentPolicy, MultiLoopConfig, run_multi_episode
from miles_envs.multiagent import AgentStep, SimultaneousMovesEnv
from miles_envs.parsers import parser_for

BEATS = {"rock": "scissors", "scissors": "paper", "paper": "rock"}


class RockPaperScissors(SimultaneousMovesEnv):
    possible_agents = ["p1", "p2"]
    max_turns = 6

    def begin(self, seed, options):
        self.round = 0
        return {a: [user("Rock, paper or scissors? Three rounds.")] for a in self.possible_agents}, {}

    def resolve(self, actions):
        self.round += 1
        moves = {a: next((m for m in BEATS if m in (act.get("content") or "").lower()), "rock") for a, act in actions.items()}
        p1, p2 = moves["p1"], moves["p2"]
        score = 0.0 if p1 == p2 else (1.0 if BEATS[p1] == p2 else -1.0)
        note = f"Round {self.round}: p1 played {p1}, p2 played {p2}."
        return AgentStep(
            observations={a: [user(note)] for a in self.possible_agents},
            rewards={"p1": score, "p2": -score}, terminated=self.round == 3,
        )


def test_actions_are_held_until_everyone_moved():
    env = RockPaperScissors()
    env.reset(seed=0)
    obs, rewards, *_ = env.step({"role": "assistant", "content": "rock"})
    assert obs == {} and rewards == {"p1": 0.0, "p2": 0.0} and env.agent_selection == "p2"
    obs, rewards, *_ = env.step({"role": "assistant", "content": "paper"})
    assert obs["p1"] == [user("Round 1: p1 played rock, p2 played paper.")]
    assert rewards == {"p1": -1.0, "p2": 1.0} and env.agent_selection == "p1"


def test_passes_the_checker():
    assert check_env(RockPaperScissors()).ok


def test_second_mover_context_holds_no_trace_of_the_first_move(tokenizer, renderer, template_ids):
    engine = ScriptedEngine(tokenizer, ["scissors", "paper"] * 3)
    policy = AgentPolicy(engine)
    episode = asyncio.run(run_multi_episode(
        RockPaperScissors(), {"p1": policy, "p2": policy}, renderer, parser_for(tokenizer), MultiLoopConfig()
    ))
    assert episode.returns == {"p1": 3.0, "p2": -3.0}
    p2 = episode.trajectories["p2"]
    first_generation = p2.prompt_ids
    assert first_generation == renderer.prompt_ids([user("Rock, paper or scissors? Three rounds.")])
    assert p2.tokens == template_ids([
        user("Rock, paper or scissors? Three rounds."), {"role": "assistant", "content": "paper"},
        user("Round 1: p1 played scissors, p2 played paper."), {"role": "assistant", "content": "paper"},
        user("Round 2: p1 played scissors, p2 played paper."), {"role": "assistant", "content": "paper"},
    ])
