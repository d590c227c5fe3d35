import pytest

from miles_envs.chat import ChatRenderer
from miles_envs.tokenizers import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """Qwen2.5: its chat template is append-only, so whole-conversation renderings are exact oracles."""
    return load_tokenizer("qwen2_5")


@pytest.fixture(scope="session")
def renderer(tokenizer):
    return ChatRenderer(tokenizer)


@pytest.fixture(scope="session")
def template_ids(tokenizer):
    """The chat template's ids for a whole conversation that ends on an assistant turn, without the
    template's newline after the final end-of-turn token (the model's stream stops at that token)."""

    def render(messages):
        ids = list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)["input_ids"])
        assert ids[-1] == tokenizer.encode("\n")[0]
        return ids[:-1]

    return render
