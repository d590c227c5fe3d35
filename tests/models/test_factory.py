import json

import pytest
import torch
from safetensors import safe_open

from miles_envs.models.factory import build_config, init_model
from miles_envs.models.loading import load_checkpoint
from miles_envs.models.mtp import build_mtp, load_mtp_tensors, mtp_checkpoint_tensors
from miles_envs.tokenizers import load_tokenizer
from tests.models.tiny_checkpoints import tiny_checkpoint  # noqa: F401


@pytest.mark.parametrize("arch", ["qwen3-moe", "qwen3", "deepseek-v3"])
def test_init_model_writes_a_loadable_checkpoint_with_the_real_vocab(tiny_checkpoint, arch):  # noqa: F811
    folder = tiny_checkpoint(arch, mtp=1)
    for name in ("config.json", "model.safetensors", "mtp.safetensors", "generation_config.json", "vocab.json", "merges.txt"):
        assert (folder / name).is_file(), name
    loaded = load_checkpoint(folder, device="cpu")
    assert loaded.model.config.vocab_size == len(load_tokenizer("qwen3")) == 151669
    assert loaded.eos_token_ids == [151645, 151643]
    assert loaded.mtp is not None and len(loaded.mtp.layers) == 1
    assert loaded.tokenizer.encode("Hello world") == [9707, 1879]
    assert json.loads((folder / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_mtp_is_stored_as_extra_layers_in_the_deepseek_nextn_layout(tiny_checkpoint):  # noqa: F811
    folder = tiny_checkpoint("deepseek-v3", mtp=1)
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    with safe_open(str(folder / "mtp.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    prefix = f"model.layers.{layers}."
    assert all(key.startswith(prefix) for key in keys)
    for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "input_layernorm.weight",
                 "self_attn.kv_a_proj_with_mqa.weight", "mlp.gate.weight", "mlp.experts.0.down_proj.weight"):
        assert prefix + part in keys, part


@pytest.mark.parametrize("arch", ["qwen3-moe", "qwen3", "deepseek-v3"])
def test_mtp_checkpoint_round_trip_is_exact(arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(build_config(arch, "tiny", 1000, mtp=2))
    mtp = build_mtp(model, 2)
    again = build_mtp(model, 2)
    load_mtp_tensors(again, model, mtp_checkpoint_tensors(mtp, model))
    for name, value in mtp.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert again.embed_tokens is model.get_input_embeddings()


def test_bad_arguments_name_the_choices(tmp_path):
    with pytest.raises(ValueError, match="qwen3-moe, qwen3, deepseek-v3"):
        init_model(tmp_path, arch="gpt2")
    with pytest.raises(ValueError, match="qwen3, qwen2_5, llama3"):
        init_model(tmp_path, tokenizer="gpt2")


def test_unknown_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="init-model"):
        load_checkpoint(tmp_path / "missing")
