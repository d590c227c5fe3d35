"""A pretraining corpus the repository makes itself, in the real Qwen3 chat template.

No weights or data can be downloaded for the GPU checks, so the model they measure is pretrained
on text generated here, deterministically from a seed:

- ``guess``: GuessNumber-v0 episodes played against the real env by a noisy binary search (the
  RL env of the MTP-SFT check, so RL starts from a policy that has something left to learn);
- ``calc``: arithmetic solved with the real ``calculator`` tool of ToolCalc-v0 (tool call, tool
  response, ``<answer>``);
- ``search``: Search-v0 questions answered by searching the built-in encyclopedia (its real
  system prompt and ``search`` tool; passages formatted as the env formats them);
- ``docs``: the encyclopedia's articles as plain text;
- ``echo``: Echo-v0 demonstrations.

Conversations are rendered by the tokenizer's own chat template (a trailing empty user turn makes
every assistant turn render as it does mid-conversation, which is how the env loop's token stream
looks), then tokenized in one batch. Documents are joined by the end-of-text token.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from miles_envs.env import Message
from miles_envs.envs.echo import EchoEnv
from miles_envs.envs.guess_number import GuessNumberEnv
from miles_envs.envs.search_env import BUILTIN_CORPUS, BUILTIN_QUESTIONS, SearchEnv
from miles_envs.envs.tool_calc import calculator
from miles_envs.envs.tool_env import ToolEnv
from miles_envs.search.documents import format_passages, read_corpus

MIXTURE = {"guess": 0.4, "calc": 0.25, "search": 0.15, "docs": 0.1, "echo": 0.1}
GUESS_NOISE = 0.3  # share of guesses drawn uniformly from the open interval instead of its midpoint


def guess_reply(low: int, high: int, rng: random.Random) -> str:
    """One move of the noisy binary search, in one of two reply styles."""
    guess = rng.randint(low, high) if rng.random() < GUESS_NOISE else (low + high) // 2
    if rng.random() < 0.5:
        return str(guess)
    return f"It is between {low} and {high}, so I guess {guess}."


def guess_episode(rng: random.Random) -> tuple[list[Message], Any]:
    env = GuessNumberEnv()
    messages, _ = env.reset(seed=rng.randrange(2**31))
    messages = list(messages)
    low, high = env.low, env.high
    while True:
        reply = guess_reply(low, high, rng)
        messages.append({"role": "assistant", "content": reply})
        observation, _, over, _, _ = env.step(messages[-1])
        messages.extend(observation)
        guess = int(reply.split()[-1].rstrip("."))
        if over:
            return messages, None
        if observation[0]["content"].startswith("higher"):
            low = guess + 1
        else:
            high = guess - 1


def _tool_call(name: str, arguments: dict[str, Any]) -> Message:
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


def calc_episode(rng: random.Random) -> tuple[list[Message], Any]:
    a, b, c = rng.randint(100, 99999), rng.randint(12, 9999), rng.randint(2, 999)
    op1, op2 = rng.choice("+-*"), rng.choice("+-*")
    expression = f"({a} {op1} {b}) {op2} {c}"
    words = {"+": "plus", "-": "minus", "*": "times"}
    question = rng.choice([
        f"What is {a} {words[op1]} {b}, {words[op2]} {c}?",
        f"Compute ({a} {op1} {b}) {op2} {c}.",
        f"Take {a}, then {words[op1]} {b}, then {words[op2]} {c}. What is the result?",
    ])
    value = calculator(expression)
    messages = [
        {"role": "system", "content": ToolEnv.system_prompt},
        {"role": "user", "content": question + " Give the final answer inside <answer></answer>."},
        _tool_call("calculator", {"expression": expression}),
        {"role": "tool", "content": value},
        {"role": "assistant", "content": f"<answer>{value}</answer>"},
    ]
    return messages, [calculator.spec]


class _Encyclopedia:
    """The search env's corpus and questions, loaded once."""

    def __init__(self) -> None:
        self.documents = list(read_corpus(BUILTIN_CORPUS))
        self.by_id = {doc.id: doc for doc in self.documents}
        with open(BUILTIN_QUESTIONS, encoding="utf-8") as handle:
            self.questions = [json.loads(line) for line in handle if line.strip()]


def search_episode(rng: random.Random, world: _Encyclopedia) -> tuple[list[Message], Any]:
    question = rng.choice(world.questions)
    messages: list[Message] = [
        {"role": "system", "content": SearchEnv.system_prompt},
        {"role": "user", "content": question["question"]},
    ]
    query = question["question"]
    for doc_id in question["supporting"]:
        support = world.by_id[doc_id]
        passages = [support, *rng.sample(world.documents, 2)]
        rng.shuffle(passages)
        messages.append(_tool_call("search", {"query": query}))
        messages.append({"role": "tool", "content": format_passages(passages)})
        query = support.title
    messages.append({"role": "assistant", "content": f"<answer>{question['answers'][0]}</answer>"})
    return messages, [SearchEnv.search.spec]


def echo_episode(rng: random.Random) -> tuple[list[Message], Any]:
    env = EchoEnv(words=rng.randint(2, 6))
    messages, _ = env.reset(seed=rng.randrange(2**31))
    return [*messages, env.demonstration(list(messages))], None


def render(tokenizer, messages: list[Message], tools: Any) -> str:
    """The conversation as the chat template renders it mid-conversation (no trailing user turn)."""
    text = tokenizer.apply_chat_template([*messages, {"role": "user", "content": ""}], tools=tools, tokenize=False)
    return text[: text.rindex("<|im_start|>user")]


def documents(count: int, seed: int, tokenizer) -> list[str]:
    """``count`` documents drawn from ``MIXTURE`` (deterministic in ``seed``)."""
    rng = random.Random(seed)
    world = _Encyclopedia()
    makers: dict[str, Callable[[], str]] = {
        "guess": lambda: render(tokenizer, *guess_episode(rng)),
        "calc": lambda: render(tokenizer, *calc_episode(rng)),
        "search": lambda: render(tokenizer, *search_episode(rng, world)),
        "docs": lambda: (lambda d: f"{d.title}\n{d.text}")(rng.choice(world.documents)),
        "echo": lambda: render(tokenizer, *echo_episode(rng)),
    }
    kinds, weights = zip(*MIXTURE.items())
    return [makers[kind]() for kind in rng.choices(kinds, weights, k=count)]


def _chunk(job: tuple[str, int, int]) -> list[int]:
    from miles_envs.tokenizers import load_tokenizer

    name, count, seed = job
    tokenizer = load_tokenizer(name)
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream: list[int] = []
    for ids in tokenizer(documents(count, seed, tokenizer), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(separator)
    return stream


def token_stream(tokenizer_name: str, count: int, seed: int, *, chunk: int = 1000, workers: int = 1) -> list[int]:
    """``count`` documents tokenized and joined by the end-of-text token, made in chunks of
    ``chunk`` documents (chunk ``i`` seeded by ``(seed, i)``) on ``workers`` processes."""
    jobs = [(tokenizer_name, min(chunk, count - start), seed * 1_000_003 + i) for i, start in enumerate(range(0, count, chunk))]
    if workers <= 1:
        parts = [_chunk(job) for job in jobs]
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_chunk, jobs)
    return [token for part in parts for token in part]
