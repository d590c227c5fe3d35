"""Built-in environments. Specs are plain records so listing them imports no env module."""

BUILTIN_SPECS: list[dict] = [
    {
        "id": "miles/GuessNumber-v0",
        "entry_point": "miles_envs.envs.guess_number:GuessNumberEnv",
        "max_turns": 8,
        "description": "Guess a secret integer with higher/lower feedback; verifiable reward.",
        "tags": ["game", "multi-turn"],
    },
    {
        "id": "miles/Echo-v0",
        "entry_point": "miles_envs.envs.echo:EchoEnv",
        "max_turns": 1,
        "description": "Repeat a phrase exactly; single turn.",
        "tags": ["toy", "single-turn"],
    },
    {
        "id": "miles/CodeExec-v0",
        "entry_point": "miles_envs.envs.code_exec:CodeExecEnv",
        "kwargs": {"sandbox": "local", "max_runs": 4, "timeout": 10.0, "per_test_s": 2.0},
        "max_turns": 6,
        "description": "Write a Python function; reward = fraction of hidden unit tests passed in a code sandbox; "
        "the model may run code with the `python` tool first.",
        "tags": ["code", "sandbox", "multi-turn", "tool-use"],
    },
]
