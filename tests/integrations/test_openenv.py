"""OpenEnv servers (openenv-core's own FastAPI app on 127.0.0.1) through the HTTP client adapter."""

from __future__ import annotations

import pytest

pytest.importorskip("openenv")

from miles_envs.checker import check_env  # noqa: E402
from miles_envs.env import assistant  # noqa: E402
from miles_envs.integrations.foreign import foreign_spec  # noqa: E402

from .openenv_servers import EchoEnvironment, GuessEnvironment, serving  # noqa: E402


@pytest.mark.parametrize("environment", [EchoEnvironment, GuessEnvironment])
def test_openenv_servers_pass_check_env(environment):
    with serving(environment) as url:
        env = foreign_spec("openenv:HTTP").make(base_url=url, observation_field="text")
        report = check_env(env, raise_on_failure=False, name=environment.__name__)
    assert report.ok, report.summary()


def test_openenv_episode_carries_text_reward_and_done():
    with serving(EchoEnvironment) as url:
        env = foreign_spec("openenv/HTTP-v0").make(base_url=url)
        observation, _ = env.reset(seed=1)
        assert observation == [{"role": "user", "content": '{"text": "Say something."}'}]
        steps = [env.step(assistant("hello")) for _ in range(3)]
        env.close()
    assert [s[0][0]["content"] for s in steps] == ['{"text": "echo: hello"}'] * 3
    assert [s[1] for s in steps] == [5.0, 5.0, 5.0]
    assert [s[2] for s in steps] == [False, False, True]
