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
    {
        "id": "miles/ToolCalc-v0",
        "entry_point": "miles_envs.envs.tool_calc:ToolCalcEnv",
        "max_turns": 6,
        "description": "Arithmetic word problems with large numbers, solved with a calculator tool; exact integer "
        "answer in <answer>.",
        "tags": ["tool-use", "math", "multi-turn"],
    },
    {
        "id": "miles/LookupChain-v0",
        "entry_point": "miles_envs.envs.lookup_chain:LookupChainEnv",
        "max_turns": 10,
        "description": "Questions over a company directory generated per episode; needs 3 or 5 dependent lookups.",
        "tags": ["tool-use", "multi-step", "multi-turn"],
    },
    {
        "id": "miles/Search-v0",
        "entry_point": "miles_envs.envs.search_env:SearchEnv",
        "max_turns": 6,
        "description": "Search-R1-style QA: search(query) tool over a built-in BM25 corpus, answer in <answer>; "
        "exact-match and F1 reward components.",
        "tags": ["search", "tool-use", "qa", "multi-turn"],
    },
]
