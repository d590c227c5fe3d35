"""The multi-agent loop on scripted engines: per-agent token streams checked against exact ids."""

import asyncio

import pytest

from miles_envs import system, user
from miles_envs.engine import SamplingParams
from miles_envs.agents.scripted import ScriptedEngine, SyntheticRouting
from miles_envs.envs.negotiation import NegotiationEnv
from miles_envs.envs.proposer_solver import ProposerSolverEnv
from miles_envs.envs.tictactoe import TicTacToeEnv
from miles_envs.multi_loop import AgentPolicy, MultiLoopConfig, rollout_multi, run_multi_episode
from miles_envs.parsers import parser_for
from miles_envs.trajectory import Status

IM_END = 151645
RULES = (
    "You play tic-tac-toe as {me} against {other}. Cells are numbered 1-9, left to right, top to bottom. "
    "Three in a row wins. Reply with the number of a free cell."
)
EMPTY = "1 | 2 | 3\n---------\n4 | 5 | 6\n---------\n7 | 8 | 9"


def play(env, policies, renderer, tokenizer, config=None, **kwargs):
    config = config or MultiLoopConfig()
    return asyncio.run(run_multi_episode(env, policies, renderer, parser_for(tokenizer), config, **kwargs))


def model_spans(trajectory):
    return [trajectory.response_ids[t.start : t.end] for t in trajectory.turns if t.kind == "model"]


def contains(haystack, needle):
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def test_self_play_gives_each_agent_its_own_exact_stream(tokenizer, renderer, template_ids):
    engine = ScriptedEngine(tokenizer, ["1", "4", "2", "5", "3"])  # x: 1 2 3 wins; o: 4 5
    policy = AgentPolicy(engine, name="self")
    episode = play(TicTacToeEnv(), {"x": policy, "o": policy}, renderer, tokenizer, seed=7, env_id="ttt", episode_id="e0")

    assert episode.status is Status.COMPLETED and episode.returns == {"x": 1.0, "o": -1.0}
    x, o = episode.trajectories["x"], episode.trajectories["o"]
    x_messages = [
        system(RULES.format(me="X", other="O")), user(f"{EMPTY}\nYour move."),
        {"role": "assistant", "content": "1"},
        user("O took cell 4.\nX | 2 | 3\n---------\nO | 5 | 6\n---------\n7 | 8 | 9\nYour move."),
        {"role": "assistant", "content": "2"},
        user("O took cell 5.\nX | X | 3\n---------\nO | O | 6\n---------\n7 | 8 | 9\nYour move."),
        {"role": "assistant", "content": "3"},
    ]
    o_messages = [
        system(RULES.format(me="O", other="X")),
        user("X took cell 1.\nX | 2 | 3\n---------\n4 | 5 | 6\n---------\n7 | 8 | 9\nYour move."),
        {"role": "assistant", "content": "4"},
        user("X took cell 2.\nX | X | 3\n---------\nO | 5 | 6\n---------\n7 | 8 | 9\nYour move."),
        {"role": "assistant", "content": "5"},
    ]
    assert x.tokens == template_ids(x_messages)
    assert o.tokens == template_ids(o_messages)
    assert x.prompt_ids == renderer.prompt_ids(x_messages[:2]) and o.prompt_ids == renderer.prompt_ids(o_messages[:2])
    for trajectory, moves in ((x, "123"), (o, "45")):
        trajectory.validate()
        assert model_spans(trajectory) == [tokenizer.encode(m) + [IM_END] for m in moves]
        assert trajectory.num_model_tokens == 2 * len(moves)  # the move and the end-of-turn token, nothing else
        assert [t.kind for t in trajectory.turns] == ["model", "env"] * (len(moves) - 1) + ["model"]
        assert trajectory.status is Status.COMPLETED and trajectory.episode_id == "e0" and trajectory.seed == 7
    assert (x.agent_id, x.group_id, x.reward) == ("x", "ttt#7/x", 1.0)
    assert (o.agent_id, o.group_id, o.reward) == ("o", "ttt#7/o", -1.0)
    assert x.metadata["opponents"] == {"o": "self"} and x.metadata["trainable"]
    assert x.reward_components == {"win": 1.0, "illegal": 0.0}


def test_no_agent_sees_the_other_private_values_or_reasoning(tokenizer, renderer, template_ids):
    env = NegotiationEnv()
    alice_reply = "<think>\nalice-hidden-plan\n</think>\n\nPROPOSE book=1 hat=0 ball=0"
    alice = AgentPolicy(ScriptedEngine(tokenizer, [alice_reply]), name="alice-policy")
    bob = AgentPolicy(ScriptedEngine(tokenizer, ["ACCEPT"]), name="bob-policy")
    episode = play(env, {"alice": alice, "bob": bob}, renderer, tokenizer, seed=3)
    a, b = episode.trajectories["alice"], episode.trajectories["bob"]
    assert episode.status is Status.COMPLETED and a.reward + b.reward > 0

    private = {agent: f"Your private values: {' '.join(f'{i}={v}' for i, v in env.values[agent].items())}" for agent in ("alice", "bob")}
    assert env.values["alice"] != env.values["bob"]
    bob_text = tokenizer.decode(b.tokens)
    assert private["bob"] in bob_text and private["alice"] not in bob_text
    assert private["alice"] in tokenizer.decode(a.tokens)
    secret_ids = tokenizer.encode("alice-hidden-plan")
    assert contains(a.response_ids, secret_ids) and not contains(b.tokens, secret_ids)
    bob_messages = [
        *b.messages[:1],
        user(f"alice: PROPOSE book=1 hat=0 ball=0\n(Standing offer from alice: you would get book={env.counts['book'] - 1} "
             f"hat={env.counts['hat']} ball={env.counts['ball']}.)"),
        {"role": "assistant", "content": "ACCEPT"},
    ]
    assert b.tokens == template_ids(bob_messages)
    assert model_spans(b) == [tokenizer.encode("ACCEPT") + [IM_END]]


def test_proposer_and_solvers_each_get_a_trajectory_grouped_by_role(tokenizer, renderer, template_ids):
    proposer = AgentPolicy(ScriptedEngine(tokenizer, ["PROBLEM: 12*3+4"]), name="proposer")
    solver = AgentPolicy(ScriptedEngine(tokenizer, ["40", "It is 40", "41", "7"]), name="solver")
    seats = {"proposer": proposer, **{f"solver_{i}": solver for i in range(4)}}
    episode = play(ProposerSolverEnv(num_solvers=4), seats, renderer, tokenizer, seed=0, env_id="ps", episode_id="e1")

    assert set(episode.trajectories) == set(seats)
    assert episode.returns == {"proposer": 1.0, "solver_0": 1.0, "solver_1": 1.0, "solver_2": 0.0, "solver_3": 0.0}
    groups = {agent: t.group_id for agent, t in episode.trajectories.items()}
    assert groups == {"proposer": "ps#0/proposer", **{f"solver_{i}": "ps#0/solver" for i in range(4)}}
    assert {t.episode_id for t in episode.trajectories.values()} == {"e1"}
    question = user("Problem: 12*3+4\nWhat is its value?")
    solver_system = system("You solve arithmetic problems. End your reply with the integer answer.")
    for i, reply in enumerate(["40", "It is 40", "41", "7"]):
        # each solver sees the problem and its own answer only, never another solver's
        expected = template_ids([solver_system, question, {"role": "assistant", "content": reply}])
        assert episode.trajectories[f"solver_{i}"].tokens == expected
    assert episode.trajectories["proposer"].reward_components == {"valid": 1.0, "learnability": 1.0, "difficulty": 0.5}


def test_an_agent_that_never_moves_gets_no_trajectory(tokenizer, renderer):
    proposer = AgentPolicy(ScriptedEngine(tokenizer, ["PROBLEM: 2**100"]))
    solver = AgentPolicy(ScriptedEngine(tokenizer, ["0"]))
    episode = play(ProposerSolverEnv(num_solvers=2), {"proposer": proposer, "solver_0": solver, "solver_1": solver}, renderer, tokenizer)
    assert list(episode.trajectories) == ["proposer"] and episode.returns["proposer"] == -1.0


def test_illegal_move_retry_renders_the_complaint_before_the_second_try(tokenizer, renderer, template_ids):
    engine = ScriptedEngine(tokenizer, ["5", "5", "1", "9"])  # o repeats x's cell, then plays 1
    policy = AgentPolicy(engine)
    episode = play(TicTacToeEnv(), {"x": policy, "o": policy}, renderer, tokenizer, config=MultiLoopConfig(max_turns=4))
    o = episode.trajectories["o"]
    assert episode.status is Status.TRUNCATED and o.status is Status.TRUNCATED and "turn limit 4" in o.error
    complaint = "Illegal move: cell 5 is not free. Free cells: 1, 2, 3, 4, 6, 7, 8, 9. Your move."
    assert o.messages[2:5] == [{"role": "assistant", "content": "5"}, user(complaint), {"role": "assistant", "content": "1"}]
    assert o.tokens == template_ids(o.messages[:5])


def test_engine_failure_aborts_every_seat(tokenizer, renderer):
    class Broken:
        async def generate(self, *args, **kwargs):
            raise ConnectionError("server went away")

    x = AgentPolicy(ScriptedEngine(tokenizer, ["1"]))
    episode = play(TicTacToeEnv(), {"x": x, "o": AgentPolicy(Broken())}, renderer, tokenizer)
    assert episode.status is Status.ABORTED and list(episode.trajectories) == ["x"]
    assert episode.trajectories["x"].status is Status.ABORTED
    assert episode.error == "o: engine error: ConnectionError: server went away"


def test_env_exception_fails_the_episode_with_its_traceback(tokenizer, renderer):
    class Crashes(TicTacToeEnv):
        def play(self, agent, action):
            raise KeyError("board lost")

    policy = AgentPolicy(ScriptedEngine(tokenizer, ["1"]))
    episode = play(Crashes(), {"x": policy, "o": policy}, renderer, tokenizer)
    assert episode.status is Status.FAILED and "KeyError: 'board lost'" in episode.error
    assert episode.trajectories["x"].status is Status.FAILED


def test_context_limit_truncates(tokenizer, renderer):
    policy = AgentPolicy(ScriptedEngine(tokenizer, ["1", "4", "2"]))
    episode = play(TicTacToeEnv(), {"x": policy, "o": policy}, renderer, tokenizer, config=MultiLoopConfig(max_context=90))
    assert episode.status is Status.TRUNCATED and "context limit 90" in episode.error
    assert all(len(t.tokens) < 90 for t in episode.trajectories.values())


def test_missing_policy_is_a_configuration_error(tokenizer, renderer):
    policy = AgentPolicy(ScriptedEngine(tokenizer, ["1"]))
    with pytest.raises(ValueError, match=r"no policy for agents \['o'\]"):
        play(TicTacToeEnv(), {"x": policy}, renderer, tokenizer)


def test_routing_rows_cover_each_agent_stream(tokenizer, renderer):
    routing = SyntheticRouting(num_layers=2, topk=2, num_experts=8)
    policy = AgentPolicy(ScriptedEngine(tokenizer, ["1", "4", "2", "5", "3"], routing=routing))
    config = MultiLoopConfig(return_routed_experts=True)
    episode = play(TicTacToeEnv(), {"x": policy, "o": policy}, renderer, tokenizer, config=config)
    for t in episode.trajectories.values():
        assert t.routed_experts.shape == (len(t.tokens) - 1, 2, 2)
        t.validate()


async def test_rollout_swaps_seats_and_marks_frozen_opponents(tokenizer, renderer):
    learner = AgentPolicy(ScriptedEngine(tokenizer, ["1", "4", "2", "5", "3"], weight_version="3"), name="learner")
    frozen = AgentPolicy(ScriptedEngine(tokenizer, ["1", "4", "2", "5", "3"], weight_version="0"), trainable=False, name="pool:0")

    def seating(game, play):
        return {"x": learner, "o": frozen} if play == 0 else {"x": frozen, "o": learner}

    episodes = [e async for e in rollout_multi(TicTacToeEnv, seating, renderer, n=2, group_size=2, seed=10)]
    assert sorted(e.episode_id for e in episodes) == ["0:0", "0:1", "1:0", "1:1"]
    for e in episodes:
        (mine,) = e.trainable()
        assert mine.metadata["policy"] == "learner" and mine.agent_id == ("x" if e.episode_id.endswith(":0") else "o")
        assert {t.weight_version for t in mine.turns if t.kind == "model"} == {"3"}
        assert mine.group_id == f"TicTacToeEnv#{e.seed}/{mine.agent_id}"


def test_each_seat_calls_its_engine_with_its_own_adapter_and_sampling(tokenizer, renderer):
    seen = []

    def reply(context):
        seen.append((context.lora, context.sampling.temperature, context.sampling.seed))
        return {"x-adapter": "1", "o-adapter": "4"}[context.lora] if len(seen) < 3 else "2"

    engine = ScriptedEngine(tokenizer, reply)
    x = AgentPolicy(engine, SamplingParams(temperature=0.7, seed=100), lora="x-adapter")
    o = AgentPolicy(engine, SamplingParams(temperature=1.0), lora="o-adapter")
    play(TicTacToeEnv(), {"x": x, "o": o}, renderer, tokenizer, config=MultiLoopConfig(max_turns=3), sampling_seed=50)
    assert seen == [("x-adapter", 0.7, 50), ("o-adapter", 1.0, 51), ("x-adapter", 0.7, 50)]
