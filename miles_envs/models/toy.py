"""Weight edits that make a random-init checkpoint a useful speculative-decoding target.

A random MTP layer never guesses what a random main model will say, so acceptance is ~0. Scaling
every residual branch of the main model by ``residual_scale`` moves it towards a bigram model
(at 0 its next token depends only on the current one), and setting each MTP layer to pass the
next token's embedding straight through (``eh_proj = [I | 0]``, block branches zeroed) makes
depth 0 predict exactly what that bigram model predicts one step later. ``residual_scale``
between 0 and 1 gives a draft that is right only part of the time.
"""

from __future__ import annotations

import torch
from torch import nn

from miles_envs.models.routing import decoder_layers

_BRANCH_OUTPUTS = ("o_proj.weight", "down_proj.weight", "experts.down_proj")


def _scale_branches(layer: nn.Module, scale: float) -> None:
    for name, parameter in layer.named_parameters():
        if name.endswith(_BRANCH_OUTPUTS):
            parameter.mul_(scale)


@torch.no_grad()
def make_draftable(model: nn.Module, mtp: nn.Module, residual_scale: float = 0.0) -> None:
    for layer in decoder_layers(model):
        _scale_branches(layer, residual_scale)
    for mtp_layer in mtp.layers:
        hidden = mtp_layer.eh_proj.weight.shape[0]
        mtp_layer.eh_proj.weight.zero_()
        mtp_layer.eh_proj.weight[:, :hidden] = torch.eye(hidden)
        _scale_branches(mtp_layer.mtp_block, 0.0)
