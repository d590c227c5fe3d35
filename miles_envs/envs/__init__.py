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
]
