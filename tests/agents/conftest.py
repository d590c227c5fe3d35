import pytest

from miles_envs.tokenizers import load_tokenizer


@pytest.fixture(scope="session")
def qwen3():
    return load_tokenizer("qwen3")
