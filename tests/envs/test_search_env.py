import json

import pytest

from miles_envs.checker import check_env
from miles_envs.envs import search_world
from miles_envs.envs.search_env import BUILTIN_CORPUS, BUILTIN_QUESTIONS, SearchEnv, load_questions
from miles_envs.envs.tool_env import PARSE_ERROR_MESSAGE
from miles_envs.search.bm25 import BM25Index
from miles_envs.search.documents import read_corpus


def search_call(call_id, query):
    return {"id": call_id, "type": "function", "function": {"name": "search", "arguments": json.dumps({"query": query})}}


def act(content=None, tool_calls=(), parse_error=None):
    action = {"role": "assistant", "content": content, "tool_calls": list(tool_calls)}
    if parse_error:
        action["parse_error"] = parse_error
    return action


LAMP_PASSAGES = (
    "Doc 1(Title: Leazul lamp) The leazul lamp is a device for grinding lenses. It was invented in 1873 by "
    "Beatres Tavocun, a shipwright.\n"
    "Doc 2(Title: Satri lamp) The satri lamp is a device for drying fish. It was invented in 1707 by "
    "Dotos Giothatai, an engineer.\n"
    "Doc 3(Title: Vusoth lamp) The vusoth lamp is a device for predicting storms. It was invented in 1676 by "
    "Depaim Fibavith, a poet."
)


def test_scripted_episode_exact_observations_and_rewards():
    env = SearchEnv()
    obs, info = env.reset(seed=1)
    assert obs == [{"role": "system", "content": SearchEnv.system_prompt},
                   {"role": "user", "content": "Who invented the leazul lamp?"}]
    assert info["task_id"] == "inventor-0008"
    assert [spec["function"]["name"] for spec in info["tools"]] == ["search"]
    assert env.step(act(tool_calls=[search_call("s1", "leazul lamp"), {
        "id": "s2", "type": "function", "function": {"name": "browse", "arguments": "{}"}}])) == (
        [
            {"role": "tool", "tool_call_id": "s1", "name": "search", "content": LAMP_PASSAGES},
            {"role": "tool", "tool_call_id": "s2", "name": "browse",
             "content": "Error: unknown tool 'browse'. Available tools: search."},
        ],
        0.0, False, False, {},
    )
    assert env.step(act("<tool_call>{", parse_error="unterminated JSON"))[0] == [
        {"role": "user", "content": PARSE_ERROR_MESSAGE.format(error="unterminated JSON")}
    ]
    assert env.step(act("It was <answer>Tavocun</answer>")) == (
        [], 0.0, True, False, {"reward_components": {"exact_match": 0.0, "f1": pytest.approx(2 / 3), "format": 1.0}}
    )


@pytest.mark.parametrize(
    ("content", "reward", "components"),
    [
        ("<answer>beatres tavocun.</answer>", 1.0, {"exact_match": 1.0, "f1": 1.0, "format": 1.0}),
        ("<answer>The Beatres Tavocun</answer>", 1.0, {"exact_match": 1.0, "f1": 1.0, "format": 1.0}),
        ("Beatres Tavocun", 0.0, {"exact_match": 0.0, "f1": 0.0, "format": 0.0}),
    ],
)
def test_answers_are_scored_by_exact_match(content, reward, components):
    env = SearchEnv()
    env.reset(seed=1)
    assert env.step(act(content)) == ([], reward, True, False, {"reward_components": components})


def test_f1_weighted_reward():
    env = SearchEnv(reward_weights={"f1": 1.0})
    env.reset(seed=1)
    assert env.step(act("<answer>Tavocun</answer>"))[1] == pytest.approx(2 / 3)


def test_shipped_data_is_the_generator_output(tmp_path):
    search_world.write_world(search_world.build_world(), tmp_path)
    assert (tmp_path / "search_corpus.jsonl").read_bytes() == BUILTIN_CORPUS.read_bytes()
    assert (tmp_path / "search_questions.jsonl").read_bytes() == BUILTIN_QUESTIONS.read_bytes()


def test_builtin_questions_are_answerable_from_the_corpus():
    documents = {doc.id: doc for doc in read_corpus(BUILTIN_CORPUS)}
    tasks = load_questions(BUILTIN_QUESTIONS)
    assert len(documents) >= 250 and len(tasks) >= 40
    index = BM25Index.build(documents.values())
    hits = index.query([task.prompt for task in tasks], k=3)
    for task, found in zip(tasks, hits):
        supporting = task.metadata["supporting"]
        assert supporting[0] in [doc.id for doc in found], task.prompt
        assert task.answer[0] in documents[supporting[-1]].text


def test_custom_questions_and_one_backend_only(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "x", "question": "Who invented the leazul lamp?", "golden_answers": ["B"]}) + "\n")
    env = SearchEnv(questions=questions)
    assert env.reset(seed=0)[0][1]["content"] == "Who invented the leazul lamp?" and env.task.answer == ["B"]
    questions.write_text(json.dumps({"question": "no answers"}) + "\n")
    with pytest.raises(ValueError, match="q.jsonl:1: a question row needs"):
        SearchEnv(questions=questions)
    with pytest.raises(ValueError, match="choose one search backend, got index_dir, retriever_url"):
        SearchEnv(index_dir=tmp_path, retriever_url="http://127.0.0.1:1/retrieve")


def test_conformance():
    def policy(history):
        if not any(m["role"] == "tool" for m in history):
            return act(tool_calls=[search_call("q", history[1]["content"])])
        return act("<answer>unknown</answer>")

    check_env(SearchEnv(), policy=policy)
