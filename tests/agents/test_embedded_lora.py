"""EmbeddedEngine LoRA serving: peft adapters by name, unmerged, per request, updated by weight sync."""

import asyncio

import numpy as np
import pytest
import torch

from miles_envs.agents.embedded import EmbeddedEngine
from miles_envs.engine import SamplingParams
from miles_envs.models.loading import load_checkpoint
from miles_envs.trainer.lora import LoraSettings, adapter_state_dict, apply_lora, save_adapter
from tests.models.tiny_checkpoints import tiny_checkpoint  # noqa: F401

PROMPT = [9707, 1879, 11, 419, 374, 264]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0)


def random_adapter(folder, seed: int, rank: int = 4, rslora: bool = False):
    """A peft LoRA on the attention and MLP projections with non-zero B, so it changes the output."""
    from peft import LoraConfig, get_peft_model

    model = load_checkpoint(folder, device="cpu").model
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False, use_rslora=rslora,
                        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    peft_model = get_peft_model(model, config).eval()
    with torch.no_grad():  # make the delta large enough to move greedy tokens
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    return peft_model


def peft_logprobs(peft_model, ids: list[int], prompt_len: int) -> list[float]:
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return [float(logprobs[p, t]) for p, t in zip(range(prompt_len - 1, len(ids) - 1), ids[prompt_len:])]


@pytest.fixture
async def dense(tiny_checkpoint):  # noqa: F811
    engine = EmbeddedEngine.from_path(tiny_checkpoint("qwen3"), device="cpu")
    yield engine
    await engine.close()


async def test_a_served_adapter_matches_the_peft_model_and_leaves_the_base_untouched(dense, tiny_checkpoint, tmp_path):  # noqa: F811
    adapter = random_adapter(tiny_checkpoint("qwen3"), seed=1, rslora=True)
    save_adapter(adapter, tmp_path / "a")
    base = await dense.generate(PROMPT, GREEDY)
    base_weights = {k: v.clone() for k, v in dense.model.state_dict().items()}

    await dense.load_lora_adapter("a", tmp_path / "a")
    # one batch holding a request with the adapter and one without
    adapted, plain = await asyncio.gather(dense.generate(PROMPT, GREEDY, lora="a"), dense.generate(PROMPT, GREEDY))
    assert plain.output_ids == base.output_ids and plain.logprobs == pytest.approx(base.logprobs, abs=1e-5)
    assert adapted.output_ids != base.output_ids
    with torch.no_grad():
        want = adapter.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None)[0, len(PROMPT):]
    assert adapted.output_ids == want.tolist()
    reference = peft_logprobs(adapter, PROMPT + adapted.output_ids, len(PROMPT))
    assert np.abs(np.array(reference) - np.array(adapted.logprobs)).max() <= 1e-4
    assert all(torch.equal(v, base_weights[k]) for k, v in dense.model.state_dict().items())  # never merged
    assert dense.lora_adapters == ["a"]

    await dense.unload_lora_adapter("a")
    with pytest.raises(ValueError, match="unknown LoRA adapter 'a'"):
        await dense.generate(PROMPT, GREEDY, lora="a")


async def test_update_weights_of_an_adapter_from_the_trainer_state_dict(dense, tiny_checkpoint, tmp_path):  # noqa: F811
    first, second = random_adapter(tiny_checkpoint("qwen3"), seed=1), random_adapter(tiny_checkpoint("qwen3"), seed=2)
    save_adapter(first, tmp_path / "first")
    await dense.load_lora_adapter("policy", tmp_path / "first")
    before = await dense.generate(PROMPT, GREEDY, lora="policy")

    await dense.update_weights(adapter_state_dict(second), version="step-1", lora="policy")
    after = await dense.generate(PROMPT, GREEDY, lora="policy")
    assert after.weight_version == "step-1" and after.output_ids != before.output_ids
    reference = peft_logprobs(second, PROMPT + after.output_ids, len(PROMPT))
    assert np.abs(np.array(reference) - np.array(after.logprobs)).max() <= 1e-4

    with pytest.raises(ValueError, match="pass lora=NAME"):
        await dense.update_weights(adapter_state_dict(second))
    with pytest.raises(ValueError, match="unknown LoRA adapter 'other'"):
        await dense.update_weights(adapter_state_dict(second), lora="other")


async def test_the_trainers_lora_adapter_loads_by_name(tiny_checkpoint, tmp_path):  # noqa: F811
    model = load_checkpoint(tiny_checkpoint("qwen3-moe"), device="cpu").model
    trained = apply_lora(model, LoraSettings(rank=2, alpha=4))
    save_adapter(trained, tmp_path / "adapter")
    engine = EmbeddedEngine.from_path(tiny_checkpoint("qwen3-moe"), device="cpu")
    try:
        await engine.load_lora_adapter("fresh", tmp_path / "adapter")
        # peft initialises B to zero: a fresh adapter is exactly the base model, routing included
        with_adapter = await engine.generate(PROMPT, GREEDY, lora="fresh", return_routed_experts=True)
        without = await engine.generate(PROMPT, GREEDY, return_routed_experts=True)
        assert with_adapter.output_ids == without.output_ids
        assert np.array_equal(with_adapter.routed_experts, without.routed_experts)
    finally:
        await engine.close()


async def test_bad_adapters_are_clear_errors(dense, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter folder"):
        await dense.load_lora_adapter("x", tmp_path)
    await dense.load_lora_adapter("ok", _write_adapter(tmp_path / "ok", {"model.layers.0.self_attn.q_proj": (4, 64, 64)}))
    with pytest.raises(ValueError, match="not a linear layer"):
        await dense.load_lora_adapter("bad", _write_adapter(tmp_path / "bad", {"model.layers.9.nope": (4, 64, 64)}))
    with pytest.raises(ValueError, match="do not fit"):
        await dense.load_lora_adapter("bad", _write_adapter(tmp_path / "shape", {"model.layers.0.self_attn.q_proj": (4, 63, 64)}))
    assert dense.lora_adapters == ["ok"]


def _write_adapter(folder, modules: dict[str, tuple[int, int, int]]):
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    tensors = {}
    for module, (rank, n_in, n_out) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(rank, n_in)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(n_out, rank)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    return folder


async def test_a_weight_update_before_the_first_request(dense, tiny_checkpoint):  # noqa: F811
    await dense.update_weights(load_checkpoint(tiny_checkpoint("qwen3"), device="cpu").model.state_dict(), version="1")
    assert await dense.health()
    assert len((await dense.generate(PROMPT, GREEDY)).output_ids) == 8
