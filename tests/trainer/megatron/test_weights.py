"""HF <-> megatron conversion: bit-exact round trip and the same logits as the HF model."""

import pytest
import torch

from miles_envs.trainer.batch import pack
from miles_envs.trainer.megatron.backend import hf_state_of
from miles_envs.trainer.megatron.attention import install_packed_attention
from miles_envs.trainer.megatron.forward import run_forward
from miles_envs.trainer.megatron.model import MegatronSettings, build_gpt_model
from miles_envs.trainer.megatron.weights import export_hf_weights, load_hf_weights
from miles_envs.models.mtp import mtp_step
from tests.trainer.megatron.models import tiny_qwen3_moe
from tests.trainer.megatron.shim import cpu_megatron
from tests.trainer.tiny import make_trajectory

CPU = MegatronSettings(token_dispatcher="allgather", use_cpu_initialization=True)


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_is_bit_exact(tie):
    config, model, mtp = tiny_qwen3_moe(mtp=1, tie=tie)
    state = hf_state_of(model, mtp)
    with cpu_megatron():
        gpt = build_gpt_model(config, CPU)
        load_hf_weights(gpt, config, state)
        back = export_hf_weights(gpt, config)
    expected = {k for k in state if not (tie and k == "lm_head.weight")}
    assert set(back) == expected
    for key in expected:
        assert back[key].dtype == state[key].dtype
        assert torch.equal(back[key], state[key]), key


def test_missing_hf_weight_is_named():
    config, model, mtp = tiny_qwen3_moe(mtp=1)
    state = hf_state_of(model, mtp)
    del state["model.layers.1.mlp.experts.down_proj"]
    with cpu_megatron():
        gpt = build_gpt_model(config, CPU)
        with pytest.raises(KeyError, match="model.layers.1.mlp.experts.down_proj"):
            load_hf_weights(gpt, config, state)


@pytest.mark.parametrize("attention", ["packed", "dense"])
def test_megatron_logits_equal_hf_per_packed_sequence(attention):
    """Two sequences packed in one row: each matches the HF model run on it alone, MTP depth 0 too,
    with per-sequence attention and with megatron's own attention under a block-diagonal mask."""
    from transformers.masking_utils import create_causal_mask

    config, model, mtp = tiny_qwen3_moe(mtp=1)
    trajectories = [make_trajectory([1, 2, 3], [4, 5, 6, 7]), make_trajectory([9, 8], [7, 6, 5, 4, 3])]
    (batch,) = pack(trajectories, [0.0, 0.0], [1.0, 1.0], max_row_tokens=64)
    assert batch.input_ids.shape[0] == 1 and batch.num_sequences == 2
    with cpu_megatron():
        gpt = build_gpt_model(config, CPU)
        load_hf_weights(gpt, config, hf_state_of(model, mtp))
        if attention == "packed":
            assert len(install_packed_attention(gpt)) == 3  # two decoder layers and the MTP layer
        gpt.eval()
        with torch.no_grad():
            out = run_forward(gpt, gpt, batch, "cpu")
    start = 0
    for index in batch.trajectory_indices:
        tokens = trajectories[index].tokens
        span = slice(start, start + len(tokens) - 1)
        with torch.no_grad():
            ids = torch.tensor([tokens[:-1]])
            torch.testing.assert_close(out.logits[0, span], model(input_ids=ids).logits[0], atol=1e-5, rtol=1e-5)
            hidden = model.model(input_ids=ids).last_hidden_state
            nxt, positions = torch.tensor([tokens[1:]]), torch.arange(1, len(tokens))[None]
            mask = create_causal_mask(config=mtp.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions)
            _, mtp_logits = mtp_step(mtp, 0, nxt, hidden, positions, mask)
        # the last position's MTP input is the next sequence's token (never a label): skip it
        torch.testing.assert_close(out.mtp_logits[0][0, span][:-1], mtp_logits[0, :-1], atol=1e-5, rtol=1e-5)
        start = span.stop


def test_unsupported_architecture_is_a_clear_error():
    from miles_envs.models.factory import build_config

    config = build_config("deepseek-v3", "tiny", 300)
    with pytest.raises(ValueError, match="no mapping for model_type 'deepseek_v3'"):
        build_gpt_model(config, CPU)


def test_exported_folder_loads_in_the_embedded_engine_loader(tmp_path):
    """HF -> megatron -> HF folder: the loader the embedded engine uses gets the same model and MTP."""
    from miles_envs.models.loading import load_checkpoint
    from miles_envs.tokenizers import tokenizer_path
    from miles_envs.trainer.megatron.export import save_hf_checkpoint

    config, model, mtp = tiny_qwen3_moe(mtp=1)
    state = hf_state_of(model, mtp)
    with cpu_megatron():
        gpt = build_gpt_model(config, CPU)
        load_hf_weights(gpt, config, state)
        folder = save_hf_checkpoint(export_hf_weights(gpt, config), config, tmp_path / "ckpt", tokenizer_from=tokenizer_path("qwen3"))
    loaded = load_checkpoint(folder, device="cpu", dtype=torch.float32)
    assert loaded.mtp is not None
    for key, value in hf_state_of(loaded.model, loaded.mtp).items():
        assert torch.equal(value, state[key]), key
