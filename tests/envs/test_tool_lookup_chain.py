import json
import random
import re

from miles_envs.checker import check_env
from miles_envs.envs.lookup_chain import LookupChainEnv, make_directory
from miles_envs.envs.tool_env import PARSE_ERROR_MESSAGE


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def act(content=None, tool_calls=(), parse_error=None):
    action = {"role": "assistant", "content": content, "tool_calls": list(tool_calls)}
    if parse_error:
        action["parse_error"] = parse_error
    return action


def chain_solver(history):
    """Follows the ids in tool results, like a model would: one dependent call per turn."""
    question = history[1]["content"]
    results = [json.loads(m["content"]) for m in history if m["role"] == "tool"]
    step = len(results)
    name = re.search(r"(\w+ \w+)'s team", question).group(1)
    wants_sponsor = "sponsor" in question
    if step == 0:
        return act(tool_calls=[call("s0", "find_person", {"name": name})])
    if step == 1:
        return act(tool_calls=[call("s1", "get_team", {"team_id": results[0]["team_id"]})])
    if not wants_sponsor:
        if step == 2:
            return act(tool_calls=[call("s2", "get_office", {"office_id": results[1]["office_id"]})])
        return act(f"<answer>{results[2]['city']}</answer>")
    if step == 2:
        return act(tool_calls=[call("s2", "get_person", {"person_id": results[1]["sponsor_id"]})])
    if "city" not in question and "work" not in question:
        return act(f"<answer>{results[2]['name']}</answer>")
    if step == 3:
        return act(tool_calls=[call("s3", "get_team", {"team_id": results[2]["team_id"]})])
    if step == 4:
        return act(tool_calls=[call("s4", "get_office", {"office_id": results[3]["office_id"]})])
    return act(f"<answer>{results[4]['city']}</answer>")


def play(env, seed, policy):
    obs, info = env.reset(seed=seed)
    history, total, steps = list(obs), 0.0, 0
    while True:
        action = policy(history)
        obs, reward, terminated, truncated, info = env.step(action)
        history += [action, *obs]
        total, steps = total + reward, steps + 1
        if terminated or truncated:
            return total, steps, info


def test_chained_lookups_solve_every_question_kind():
    env = LookupChainEnv()
    kinds = {}
    for seed in range(30):
        reward, steps, info = play(env, seed, chain_solver)
        assert reward == 1.0 and info["reward_components"] == {"correct": 1.0, "format": 1.0}
        kinds[env.task.metadata["kind"]] = steps
    assert kinds == {"city": 4, "sponsor": 4, "sponsor_city": 6}


def test_exact_observations_for_a_scripted_episode():
    env = LookupChainEnv()
    obs, info = env.reset(seed=3)
    assert obs[1]["content"] == "In which city does the sponsor of Bruno Bishop's team work?"
    assert [spec["function"]["name"] for spec in info["tools"]] == ["find_person", "get_office", "get_person", "get_team"]
    assert env.step(act(tool_calls=[call("a", "find_person", {"name": "bruno bishop"}),
                                    call("b", "find_person", {"name": "Nobody Here"}),
                                    call("c", "get_team", {"team_id": 17})])) == (
        [
            {"role": "tool", "tool_call_id": "a", "name": "find_person",
             "content": '{"person_id":"P-5932","name":"Bruno Bishop","team_id":"T-7506"}'},
            {"role": "tool", "tool_call_id": "b", "name": "find_person",
             "content": "Error: find_person raised LookupError: no employee is named 'Nobody Here'"},
            {"role": "tool", "tool_call_id": "c", "name": "get_team",
             "content": "Error: invalid arguments for get_team: 'team_id': Input should be a valid string (got 17)"},
        ],
        0.0, False, False, {},
    )
    assert env.step(act("<tool_call>", parse_error="empty tool call"))[0] == [
        {"role": "user", "content": PARSE_ERROR_MESSAGE.format(error="empty tool call")}
    ]
    assert env.step(act(tool_calls=[call("d", "lookup_city", {"id": "T-7506"})]))[0][0]["content"] == (
        "Error: unknown tool 'lookup_city'. Available tools: find_person, get_office, get_person, get_team."
    )
    assert env.step(act("<answer>Lisbon</answer>")) == (
        [], 0.0, True, False, {"reward_components": {"correct": 0.0, "format": 1.0}}
    )


def test_directory_ids_change_with_the_seed_and_sponsors_come_from_other_teams():
    first, second = make_directory(random.Random(0)), make_directory(random.Random(1))
    assert set(first.people) != set(second.people)
    for team in first.teams.values():
        assert first.people[team.sponsor_id].team_id != team.team_id


def test_conformance():
    check_env(LookupChainEnv(), policy=chain_solver)
    check_env(LookupChainEnv(on_parse_error="terminate"), policy=lambda h: act("x", parse_error="bad"))
