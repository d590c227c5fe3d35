import pytest

from miles_envs import Env, EnvCheckError, check_env, make, user


class FourTuple(Env):
    max_turns = 3

    def reset(self, seed=None, options=None):
        return [user("hi")], {}

    def step(self, action):
        return [user("x")], 1.0, True, {}


class Unseeded(Env):
    max_turns = 3
    counter = 0

    def reset(self, seed=None, options=None):
        Unseeded.counter += 1
        return [user(f"episode {Unseeded.counter}")], {}

    def step(self, action):
        return [], 0.0, True, False, {}


class Endless(Env):
    max_turns = 5

    def reset(self, seed=None, options=None):
        return [user("go")], {}

    def step(self, action):
        return [user("again")], 0.0, False, False, {}


class RaisesInReset(Env):
    def reset(self, seed=None, options=None):
        raise KeyError("missing task file")

    def step(self, action):
        return [], 0.0, True, False, {}


class WrongObservation(Env):
    max_turns = 2

    def reset(self, seed=None, options=None):
        return "hello", {}

    def step(self, action):
        return [], 0.0, True, False, {}


class AsyncDisagrees(Env):
    max_turns = 2

    def reset(self, seed=None, options=None):
        return [user("sync")], {}

    async def areset(self, seed=None, options=None):
        return [user("async")], {}

    def step(self, action):
        return [], 0.0, True, False, {}


class CloseTwiceFails(Env):
    max_turns = 1
    closed = False

    def reset(self, seed=None, options=None):
        return [user("a")], {}

    def step(self, action):
        return [], 0.0, True, False, {}

    def close(self):
        if self.closed:
            raise RuntimeError("already closed")
        self.closed = True


def failures(env):
    report = check_env(env, raise_on_failure=False)
    assert not report.ok
    return {r.name: r.detail for r in report.results if not r.passed}


def test_step_returning_a_four_tuple():
    assert "got a 4-tuple" in failures(FourTuple())["reset/step types"]


def test_different_episodes_under_the_same_seed():
    detail = failures(Unseeded())["same seed, same episode"]
    assert "first difference at reset" in detail and "episode 1" in detail


def test_never_terminating():
    assert "max_turns=5" in failures(Endless())["terminates within max_turns"]


def test_raising_in_reset_reports_the_env_traceback():
    detail = failures(RaisesInReset())["reset/step types"]
    assert "reset() raised KeyError" in detail
    assert "missing task file" in detail and "test_checker.py" in detail


def test_wrong_observation_type():
    assert "observation must be a list of message dicts, got str" in failures(WrongObservation())["reset/step types"]


def test_sync_and_async_disagree():
    assert "first difference at reset" in failures(AsyncDisagrees())["sync and async agree"]


def test_close_not_idempotent():
    assert "already closed" in failures(CloseTwiceFails())["close() idempotent"]


def test_raises_with_readable_summary():
    with pytest.raises(EnvCheckError, match=r"\[FAIL\] terminates within max_turns"):
        check_env(Endless())


from miles_envs.envs import BUILTIN_SPECS


@pytest.mark.parametrize("env_id", [record["id"] for record in BUILTIN_SPECS])
def test_builtins_pass(env_id):
    assert check_env(make(env_id)).ok
