import pytest

from miles_envs import assistant, check_env
from miles_envs.envs.proposer_solver import InvalidProblem, ProposerSolverEnv, evaluate, extract_problem


@pytest.mark.parametrize(
    "expression, value", [("(17*23)-4", 387), ("-3 * 2", -6), ("999*999*999", 997002999)]
)
def test_evaluate_computes_exact_integers(expression, value):
    assert evaluate(expression, max_operators=4) == value


@pytest.mark.parametrize(
    "expression, reason",
    [("7", "0 operators"), ("2**3", "not allowed"), ("__import__('os')", "not allowed"), ("1000+1", "above 999"),
     ("1/2", "not allowed"), ("1+1+1+1+1+1", "5 operators"), ("1+" * 300 + "1", "300 operators"), ("1+" * 50000 + "1", "nested too deeply"),
     ("(" * 500 + "1" + ")" * 500, "not an arithmetic expression")],
)
def test_evaluate_rejects_what_is_not_allowed(expression, reason):
    with pytest.raises(InvalidProblem, match=reason):
        evaluate(expression, max_operators=4)


def test_extract_problem_takes_the_last_marked_line():
    assert extract_problem("thinking...\nPROBLEM: 1+2\nPROBLEM: 3*4\nbye") == "3*4"
    assert extract_problem("5*5\nmore") == "5*5"


def test_half_solved_problem_earns_the_proposer_most():
    env = ProposerSolverEnv(num_solvers=4)
    obs, _ = env.reset(seed=0)
    assert env.agent_selection == "proposer" and len(obs["solver_0"]) == 1
    obs, *_ = env.step(assistant("PROBLEM: 12*3+4"))
    assert set(obs) == {"solver_0", "solver_1", "solver_2", "solver_3"}
    assert obs["solver_2"][0]["content"] == "Problem: 12*3+4\nWhat is its value?"
    for reply in ("40", "It is 40", "41", "4"):
        _, rewards, terms, _, infos = env.step(assistant(reply))
    assert rewards == {"proposer": 1.0, "solver_0": 1.0, "solver_1": 1.0, "solver_2": 0.0, "solver_3": 0.0}
    assert all(terms.values()) and infos["proposer"]["solve_rate"] == 0.5


@pytest.mark.parametrize("answers, proposer_reward", [(["40", "40"], 0.0), (["1", "2"], 0.0), (["40", "2"], 1.0)])
def test_trivial_and_impossible_problems_earn_nothing(answers, proposer_reward):
    env = ProposerSolverEnv(num_solvers=2)
    env.reset(seed=0)
    env.step(assistant("PROBLEM: 12*3+4"))
    for answer in answers:
        _, rewards, *_ = env.step(assistant(answer))
    assert rewards["proposer"] == proposer_reward


@pytest.mark.parametrize("problem, proposer_reward", [("12*3+4", 0.5), ("(12*3+4)*2-1", 1.0)])
def test_difficulty_weighted_reward_pays_harder_problems_more(problem, proposer_reward):
    env = ProposerSolverEnv(num_solvers=2, max_operators=4, difficulty_weighted=True)
    env.reset(seed=0)
    env.step(assistant(f"PROBLEM: {problem}"))
    right = str(evaluate(problem, max_operators=4))
    for answer in (right, "-1"):  # half the solvers right: learnability 1
        _, rewards, _, _, infos = env.step(assistant(answer))
    assert rewards["proposer"] == proposer_reward
    assert infos["proposer"]["reward_components"] == {"valid": 1.0, "learnability": 1.0, "difficulty": proposer_reward}


def test_invalid_problem_is_penalised_and_ends_the_episode():
    env = ProposerSolverEnv(num_solvers=2, invalid_penalty=-0.5)
    env.reset(seed=0)
    obs, rewards, terms, _, infos = env.step(assistant("PROBLEM: 2**100"))
    assert rewards["proposer"] == -0.5 and all(terms.values()) and env.agents == []
    assert obs == {"proposer": [{"role": "user", "content": "Invalid problem: '2 ** 100' is not allowed: use integers, + - * and parentheses."}]}
    assert infos["solver_1"] == {"valid": False, "reason": "'2 ** 100' is not allowed: use integers, + - * and parentheses"}


def test_roles_group_the_solvers():
    env = ProposerSolverEnv(num_solvers=3)
    assert env.possible_agents == ["proposer", "solver_0", "solver_1", "solver_2"]
    assert set(env.agent_roles.values()) == {"proposer", "solver"}


def test_passes_the_multi_agent_checker():
    assert check_env(ProposerSolverEnv()).ok
