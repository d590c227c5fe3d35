"""make_engine: every spec form, and clear errors for the wrong ones."""

import importlib.util

import pytest

from miles_envs.agents.factory import EngineSpecError, make_engine
from miles_envs.engine import SamplingParams
from miles_envs.agents.scripted import ScriptedEngine
from miles_envs.agents.sglang import SGLangEngine
from tests.models.tiny_checkpoints import tiny_checkpoint  # noqa: F401


async def test_scripted_specs(qwen3):
    engine = make_engine("scripted:Hello world", tokenizer=qwen3)
    assert isinstance(engine, ScriptedEngine)
    assert (await engine.generate([1], SamplingParams())).output_ids == [9707, 1879, 151645]
    listed = make_engine("scripted", tokenizer=qwen3, replies=["Hello", "world"])
    outputs = [(await listed.generate([1], SamplingParams())).output_ids for _ in range(2)]
    assert outputs == [[9707, 151645], [14615, 151645]]
    with pytest.raises(EngineSpecError, match="needs a tokenizer"):
        make_engine("scripted")


async def test_sglang_spec_with_options():
    engine = make_engine("sglang://127.0.0.1:30000?timeout=5&context_length=4096&num_layers=48&topk=8&retries=1")
    assert isinstance(engine, SGLangEngine)
    assert (engine.base_url, engine.timeout, engine.context_length) == ("http://127.0.0.1:30000", 5.0, 4096)
    assert (engine.routing_shape, engine.retries) == ((48, 8), 1)
    await engine.close()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sglang://127.0.0.1", "needs a host and a port"),
        ("sglang://127.0.0.1:30000?colour=red", "unknown sglang option 'colour'"),
        ("sglang://127.0.0.1:30000?timeout=soon", "is not a float"),
        ("vllm://127.0.0.1:8000", "unknown engine spec"),
        ("embedded:", "needs a model directory"),
    ],
)
def test_bad_specs_say_what_to_do(spec, message):
    with pytest.raises(EngineSpecError, match=message):
        make_engine(spec)


EMBEDDED_INSTALLED = importlib.util.find_spec("miles_envs.agents.embedded") is not None


@pytest.mark.skipif(EMBEDDED_INSTALLED, reason="the embedded engine is installed")
def test_embedded_before_it_exists():
    with pytest.raises(EngineSpecError, match="not available yet"):
        make_engine("embedded:/models/tiny")


@pytest.mark.skipif(not EMBEDDED_INSTALLED, reason="the embedded engine is not installed")
async def test_embedded_spec_loads_the_checkpoint(tiny_checkpoint):  # noqa: F811
    engine = make_engine(f"embedded:{tiny_checkpoint()}")
    try:
        gen = await engine.generate([9707, 1879], SamplingParams(max_new_tokens=2, temperature=0.0))
        assert len(gen.output_ids) == 2 and len(gen.logprobs) == 2
    finally:
        await engine.close()
