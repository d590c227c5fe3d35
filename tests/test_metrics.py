from miles_envs.metrics import RolloutMetrics
from miles_envs.trajectory import Status, Trajectory, Turn


def trajectory(status=Status.COMPLETED, error=None, reward=1.0, spec=(0, 0, 0), **metadata):
    return Trajectory(
        prompt_ids=[1, 2], response_ids=[3, 4, 5], loss_mask=[1, 1, 0], logprobs=[-0.1, -0.2, 0.0],
        turns=[Turn("model", 0, 2, "stop", None, *spec), Turn("env", 2, 3)], reward=reward,
        reward_components={"em": reward}, status=status, error=error, flags=["non_append_only_template"],
        metadata={"tool_calls": 2, "parse_errors": 1, **metadata},
    )


def test_summary_counts_rates_tokens_and_speculation():
    metrics = RolloutMetrics()
    metrics.add(trajectory(spec=(2, 3, 4)))
    metrics.add(trajectory(Status.FAILED, "TimeoutError: env step() did not finish within 60s", reward=0.0, spec=(1, 1, 2)))
    metrics.add(trajectory(Status.ABORTED, "engine aborted the request", reward=0.5))
    metrics.add(trajectory(Status.TRUNCATED, reward=0.5))
    s = metrics.summary()
    assert s["episodes"] == 4 and s["status"] == {"completed": 1, "failed": 1, "aborted": 1, "truncated": 1}
    assert s["failed_rate"] == s["aborted_rate"] == s["truncated_rate"] == s["completed_rate"] == 0.25
    assert s["reward_mean"] == 0.5 and s["reward_components_mean"] == {"em": 0.5}
    assert s["timeouts"] == 1 and s["tool_calls"] == 8 and s["parse_errors"] == 4
    assert s["model_tokens"] == 8 and s["prompt_tokens"] == 8 and s["turns_mean"] == 1.0
    assert s["spec_accept_rate"] == 4 / 6 and s["spec_accept_length"] == (4 + 3) / 3
    assert s["flags"] == {"non_append_only_template": 4}
