"""Device-side stand-ins for megatron's multi-tensor fallbacks, used when neither transformer-engine
nor apex is installed.

megatron-core's optimizer computes the gradient norm, clips and copies the fp32 main parameters into
the bf16 model through ``multi_tensor_applier`` ops. Without transformer-engine or apex it falls back
to ``megatron.core.utils.local_multi_tensor_l2_norm`` / ``local_multi_tensor_scale``: the norm reads
every parameter's norm back to the host (``torch.tensor`` of device scalars: one synchronisation
per parameter, 647 per step at the bench's shape) and the scale/copy launches two kernels per
parameter. Here the same contracts run as ``torch._foreach_*`` ops: a few launches per call, and
the norm stays on the device. With a tensor-valued scale op installed too (megatron-core >= 0.19
looks for ``multi_tensor_scale_tensor_impl``), megatron keeps the total norm and the clip
coefficient on the device, so clipping needs no host read either.
"""

from __future__ import annotations

import torch


def l2_norm(_chunk_size, _noop_flag, tensor_lists, per_tensor, *_args):
    """``amp_C.multi_tensor_l2norm``: ``(total L2 norm as a [1] fp32 tensor, per-tensor norms or None)``."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32), None
    norms = torch.stack(torch._foreach_norm(tensors)).float()
    return torch.linalg.vector_norm(norms).reshape(1), norms if per_tensor else None


def scale(_chunk_size, _noop_flag, tensor_lists, factor):
    """``amp_C.multi_tensor_scale``: ``dst[i] = src[i] * factor`` (a float or a one-element tensor),
    cast to each destination's dtype."""
    sources, destinations = tensor_lists
    if not sources:
        return
    if isinstance(factor, torch.Tensor):  # megatron's clip coefficient: a [1] tensor
        factor = factor.reshape(())
    elif factor == 1.0:
        torch._foreach_copy_(destinations, sources)
        return
    if sources is destinations:  # clipping: in place
        torch._foreach_mul_(destinations, factor)
    else:
        torch._foreach_copy_(destinations, torch._foreach_mul(sources, factor))


def install_device_multi_tensor_ops() -> bool:
    """Swap megatron's local (host-reading) multi-tensor fallbacks for ``l2_norm`` and ``scale``;
    transformer-engine's or apex's kernels, where megatron found them, stay. Returns whether it swapped."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is not utils.local_multi_tensor_l2_norm:
        return False
    clip_grads.l2_norm_impl = l2_norm
    clip_grads.multi_tensor_scale_impl = scale
    if hasattr(clip_grads, "multi_tensor_scale_tensor_impl"):
        clip_grads.multi_tensor_scale_tensor_impl = scale
    if optimizer.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
        optimizer.multi_tensor_scale_impl = scale
    return True
