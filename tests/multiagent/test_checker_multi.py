"""``check_env`` on multi-agent envs: the built-ins pass, each kind of breakage fails readably."""

import textwrap

import pytest

from miles_envs import EnvCheckError, MultiAgentEnv, check_env, user
from miles_envs.envs.negotiation import NegotiationEnv
from miles_envs.envs.proposer_solver import ProposerSolverEnv
from miles_envs.envs.tictactoe import TicTacToeEnv
from miles_envs.multiagent import AgentStep, TurnBasedEnv
from tests.conftest import run_cli


class Relay(TurnBasedEnv):
    """Two agents take turns; each sees the other's reply. Four moves, then it ends."""

    possible_agents = ["a", "b"]
    max_turns = 4

    def start(self, seed, options):
        self.moves = 0
        infos = {agent: {"private_view": [f"secret card of {agent}"]} for agent in self.possible_agents}
        return {agent: [user(f"you hold the secret card of {agent}")] for agent in self.possible_agents}, infos, "a"

    def play(self, agent, action):
        self.moves += 1
        other = self.next_after(agent)
        over = self.moves >= 4
        return AgentStep(observations={other: [self.relay(agent, action)]}, next_agent=other, terminated=over)

    def relay(self, agent, action):
        return user(f"{agent} said {action['content']}")


class LeaksPrivateView(Relay):
    def relay(self, agent, action):
        return user(f"{agent} said {action['content']} (psst: secret card of {agent})")


class LeaksReasoning(Relay):
    def relay(self, agent, action):
        return user(f"{agent} thought {action.get('reasoning_content')}")


class SharesMessageObjects(Relay):
    def play(self, agent, action):
        result = super().play(agent, action)
        shared = user("everyone sees this")
        result.observations = {a: [shared] for a in self.possible_agents}
        return result


class SelectsUnknownAgent(Relay):
    def play(self, agent, action):
        result = super().play(agent, action)
        self.agent_selection = "c"
        result.next_agent = None
        return result


class KeepsFinishedAgents(Relay):
    def step(self, action):
        result = super().step(action)
        self.agents = list(self.possible_agents)
        return result


class Unseeded(Relay):
    episodes = 0

    def start(self, seed, options):
        Unseeded.episodes += 1
        observations, infos, first = super().start(seed, options)
        observations["a"].append(user(f"episode {Unseeded.episodes}"))
        return observations, infos, first


class NeverEnds(Relay):
    max_turns = 6

    def play(self, agent, action):
        return AgentStep(next_agent=self.next_after(agent))


class SingleAgentShaped(MultiAgentEnv):
    possible_agents = ["a"]
    max_turns = 2

    def reset(self, seed=None, options=None):
        self.agents, self.agent_selection = ["a"], "a"
        return [user("hi")], {}

    def step(self, action):
        return [], 1.0, True, False, {}


class RaisesInStep(Relay):
    def play(self, agent, action):
        raise KeyError("board state lost")


@pytest.mark.parametrize("env", [TicTacToeEnv(), TicTacToeEnv(opening_moves=3), NegotiationEnv(), ProposerSolverEnv(), Relay()])
def test_builtins_pass(env):
    report = check_env(env)
    assert report.ok and [r.name for r in report.results] == [
        "is a MultiAgentEnv", "reset/step types", "legal agent order", "observation isolation",
        "terminates within max_turns", "same seed, same episode", "sync and async agree", "close() idempotent",
    ]


@pytest.mark.parametrize(
    "env, check, detail",
    [
        (LeaksPrivateView(), "observation isolation", "step() #1 by 'a': 'b' sees 'a''s private text 'secret card of a'"),
        (LeaksReasoning(), "observation isolation", "'b' sees 'a''s private text 'private-reasoning-of-a-at-0'"),
        (SharesMessageObjects(), "observation isolation", "'a' and 'b' receive the same message object"),
        (SelectsUnknownAgent(), "legal agent order", "after step() #1 by 'a': agent_selection 'c' is not in env.agents ['a', 'b']"),
        (KeepsFinishedAgents(), "legal agent order", "every agent is done but env.agents is still ['a', 'b']"),
        (Unseeded(), "same seed, same episode", "first difference at reset"),
        (NeverEnds(), "terminates within max_turns", "agents ['a', 'b'] still live after max_turns=6"),
        (SingleAgentShaped(), "reset/step types", "reset() must return ({agent: messages}, {agent: info}), got a 2-tuple"),
        (RaisesInStep(), "reset/step types", "step() #1 by 'a' raised KeyError: 'board state lost'"),
    ],
)
def test_broken_envs_fail_naming_the_problem(env, check, detail):
    report = check_env(env, raise_on_failure=False)
    failed = {r.name: r.detail for r in report.results if not r.passed}
    assert check in failed, report.summary()
    assert detail in failed[check]


def test_failure_raises_with_the_summary():
    with pytest.raises(EnvCheckError) as caught:
        check_env(LeaksPrivateView(), name="demo/Leaky-v0")
    summary = str(caught.value)
    assert summary.startswith("demo/Leaky-v0: FAILED")
    assert "[FAIL] observation isolation: step() #1 by 'a': 'b' sees 'a''s private text" in summary


LEAKY_MODULE = textwrap.dedent(
    """
    from miles_envs import user
    from miles_envs.multiagent import AgentStep, TurnBasedEnv

    class Leaky(TurnBasedEnv):
        possible_agents = ["a", "b"]
        max_turns = 2

        def start(self, seed, options):
            infos = {a: {"private_view": ["card " + a]} for a in self.possible_agents}
            return {a: [user("card " + a)] for a in self.possible_agents}, infos, "a"

        def play(self, agent, action):
            other = self.next_after(agent)
            return AgentStep(observations={other: [user("they hold card " + agent)]}, next_agent=other,
                             terminated=agent == "b")
    """
)


def test_cli_check_passes_a_builtin_and_fails_a_leaky_env(tmp_path):
    env = {"MILES_ENVS_HOME": str(tmp_path / "home"), "COLUMNS": "400"}
    (tmp_path / "leaky.py").write_text(LEAKY_MODULE)
    run_cli("register", "miles_envs.envs.tictactoe:TicTacToeEnv", "--id", "demo/TicTacToe-v0", cwd=tmp_path, env=env)
    run_cli("register", "leaky.py:Leaky", "--id", "demo/Leaky-v0", cwd=tmp_path, env=env)
    good = run_cli("check", "demo/TicTacToe-v0", cwd=tmp_path, env=env)
    assert "observation isolation" in good.stdout and "FAIL" not in good.stdout
    bad = run_cli("check", "demo/Leaky-v0", cwd=tmp_path, env=env, check=False)
    assert bad.returncode == 1
    assert "step() #1 by 'a': 'b' sees 'a''s private text 'card a'" in bad.stdout
