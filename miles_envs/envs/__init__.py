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
        "id": "miles/GuessNumber7-v0",
        "entry_point": "miles_envs.envs.guess_number:GuessNumberEnv",
        "kwargs": {"low": 1, "high": 7, "max_guesses": 3, "demo_strategy": "mid_then_scan", "list_left": True},
        "max_turns": 3,
        "description": "GuessNumber on 1..7 in 3 guesses, feedback lists the numbers left; demonstrations "
        "open in the middle then scan up (5 wins in 7), bisection always wins.",
        "tags": ["game", "multi-turn"],
    },
    {
        "id": "miles/Echo-v0",
        "entry_point": "miles_envs.envs.echo:EchoEnv",
        "max_turns": 1,
        "description": "Repeat a phrase; reward = share of words in place (1.0 when exact); has demonstrations.",
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
    {
        "id": "miles/TicTacToe-v0",
        "entry_point": "miles_envs.envs.tictactoe:TicTacToeEnv",
        "max_turns": 18,
        "description": "Two-player zero-sum tic-tac-toe as text; win +1, loss -1, illegal moves forfeit after retries.",
        "tags": ["game", "multi-agent", "zero-sum"],
    },
    {
        "id": "miles/Negotiation-v0",
        "entry_point": "miles_envs.envs.negotiation:NegotiationEnv",
        "max_turns": 6,
        "description": "Split books, hats and balls with private values; a deal pays each side its own value / 10.",
        "tags": ["game", "multi-agent", "general-sum"],
    },
    {
        "id": "miles/ProposerSolver-v0",
        "entry_point": "miles_envs.envs.proposer_solver:ProposerSolverEnv",
        "max_turns": 5,
        "description": "A proposer writes arithmetic problems, solvers answer in isolation; the proposer earns "
        "1 - |2 solve_rate - 1|.",
        "tags": ["multi-agent", "co-evolution", "verifiable"],
    },
]
