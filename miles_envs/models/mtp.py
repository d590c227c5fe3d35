"""Multi-token-prediction (MTP) draft layers in the DeepSeek-V3 NextN layout.

The module itself is transformers' ``MtpModel``: per depth one ``MtpLayer`` holding ``enorm``,
``hnorm``, ``eh_proj``, one decoder block of the main model's class and a final norm, with the
embedding, rotary table and LM head shared with the main model. Depth ``i`` at position ``t``
reads ``eh_proj([enorm(embed(x[t+1+i])), hnorm(h[t])])`` where ``h`` is the previous depth's
output (depth 0: the main model's last hidden state *after* its final norm, i.e.
``model.model(...).last_hidden_state``, as SGLang passes it) and predicts ``x[t+2+i]``.

On disk the layers are stored the way DeepSeek-V3 stores them: as extra decoder layers
``model.layers.{num_hidden_layers + i}.{enorm,hnorm,eh_proj,self_attn.*,mlp.*,input_layernorm,
post_attention_layernorm,shared_head.norm}`` in the main model's weight format (e.g. per-expert
MoE weights). ``embed_tokens`` and ``shared_head.head`` are shared with the main model and not
duplicated. The config records the depth count as ``num_nextn_predict_layers`` (DeepSeek/SGLang
name) and ``num_mtp_layers`` (transformers name).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

MTP_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def mtp_layer_count(config) -> int:
    """Depths declared by a config (0 when it declares none)."""
    for name in ("num_nextn_predict_layers", "num_mtp_layers"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 0


def build_mtp(main_model: nn.Module, num_layers: int):
    """A fresh MTP stack for ``main_model``, initialised with the main model's init rules."""
    from transformers.modeling_layers import MtpModel

    config = main_model.config
    config.num_mtp_layers = num_layers
    if getattr(config, "layer_types", None) is not None and not getattr(config, "mtp_layer_types", None):
        config.mtp_layer_types = ["full_attention"] * num_layers
    mtp = MtpModel(main_model, num_layers).to(next(main_model.parameters()).device)
    for module in mtp.layers.modules():
        main_model._init_weights(module)
    return mtp.to(next(main_model.parameters()).dtype).eval()


def _is_shared(key: str) -> bool:
    return key.startswith(("embed_tokens.", "shared_head.", "rotary_emb."))


def mtp_checkpoint_tensors(mtp, main_model: nn.Module) -> dict[str, torch.Tensor]:
    """MTP weights under their on-disk names (see the module docstring)."""
    from transformers.core_model_loading import revert_weight_conversion

    base = main_model.config.num_hidden_layers
    renamed = {}
    for key, tensor in mtp.state_dict().items():
        if _is_shared(key):
            continue
        depth, rest = re.match(r"layers\.(\d+)\.(.*)", key).groups()
        if rest.startswith("mtp_block."):
            rest = rest[len("mtp_block.") :]
        elif rest.startswith("post_norm."):
            rest = "shared_head.norm." + rest[len("post_norm.") :]
        renamed[f"model.layers.{base + int(depth)}.{rest}"] = tensor.detach().contiguous()
    return {key: value.contiguous() for key, value in revert_weight_conversion(main_model, renamed).items()}


def is_mtp_key(key: str, num_hidden_layers: int) -> bool:
    match = MTP_KEY.match(key)
    return bool(match) and int(match.group(1)) >= num_hidden_layers


def load_mtp_tensors(mtp, main_model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load on-disk-named MTP tensors into ``mtp`` (transformers' own NextN conversion rules)."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    info, _ = convert_and_load_state_dict_in_model(
        model=mtp,
        state_dict=dict(tensors),
        load_config=LoadStateDictConfig(
            weight_mapping=mtp.get_weight_conversions(main_model), dtype=next(main_model.parameters()).dtype
        ),
    )
    missing = sorted(key for key in info.missing_keys if not _is_shared(key))
    if missing or info.unexpected_keys:
        raise ValueError(
            f"MTP weights do not match the model: missing {missing[:5]}, unexpected {sorted(info.unexpected_keys)[:5]}"
        )
    # the loader swaps in the given tensors (on the CPU when read from disk): bring them to the model
    mtp.to(next(main_model.parameters()).device)
    mtp.tie_with_main_model(main_model)


def read_mtp_tensors(path: Path, num_hidden_layers: int) -> dict[str, torch.Tensor]:
    """Every ``model.layers.{>= num_hidden_layers}.*`` tensor in the folder's safetensors files."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if is_mtp_key(key, num_hidden_layers):
                    tensors[key] = handle.get_tensor(key)
    return tensors


def load_mtp(main_model: nn.Module, path: Path):
    """The MTP stack stored in checkpoint folder ``path``, or None when it has no MTP weights."""
    count = mtp_layer_count(main_model.config)
    tensors = read_mtp_tensors(path, main_model.config.num_hidden_layers) if count else {}
    if not tensors:
        return None
    mtp = build_mtp(main_model, count)
    load_mtp_tensors(mtp, main_model, tensors)
    return mtp


def mtp_hidden(mtp, depth: int, token_ids, hidden, position_ids, attention_mask, cache=None):
    """Run MTP layer ``depth`` once and return its output hidden states (see :func:`mtp_step`)."""
    embeds = mtp.embed_tokens(token_ids)
    position_embeddings = mtp.rotary_emb(embeds, position_ids=position_ids)
    return mtp.layers[depth](
        embeds,
        hidden,
        position_embeddings=position_embeddings,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
    )


def mtp_step(mtp, depth: int, token_ids, hidden, position_ids, attention_mask, cache=None):
    """Run MTP layer ``depth`` once: returns ``(hidden_out, logits)`` for every input position.

    ``token_ids[:, t]`` is the token after the one whose hidden state is ``hidden[:, t]``;
    ``position_ids`` are those tokens' positions; ``attention_mask`` is a 4D additive mask (or
    None for plain causal attention over the inputs); ``cache`` is the layer's KV cache.
    """
    out = mtp_hidden(mtp, depth, token_ids, hidden, position_ids, attention_mask, cache)
    return out, mtp._project_to_logits(out)
