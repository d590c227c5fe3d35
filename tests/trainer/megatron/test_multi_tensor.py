"""Device-side multi-tensor ops: megatron's contracts, no host read, installed only over the local fallbacks."""

import pytest
import torch

from miles_envs.trainer.megatron.host_reads import count_host_reads
from miles_envs.trainer.megatron.multi_tensor import install_device_multi_tensor_ops, l2_norm, scale


def _grads():
    torch.manual_seed(0)
    return [torch.randn(7, 5), torch.randn(3), torch.randn(2, 2, 4) * 10]


def test_l2_norm_is_the_norm_of_all_tensors_together_without_a_host_read():
    grads = _grads()
    with count_host_reads(include_host_tensors=True) as reads:
        total, per_tensor = l2_norm(65536, None, [grads], True)
    assert reads.total == 0
    flat = torch.cat([g.flatten() for g in grads])
    assert total.shape == (1,) and total.dtype == torch.float32
    torch.testing.assert_close(total, torch.linalg.vector_norm(flat).reshape(1), atol=0, rtol=1e-6)
    torch.testing.assert_close(per_tensor, torch.stack([g.norm() for g in grads]), atol=0, rtol=1e-6)
    assert l2_norm(65536, None, [grads], False)[1] is None


@pytest.mark.parametrize("factor", [0.25, 1.0, torch.tensor([0.5])])
def test_scale_copies_scaled_sources_into_destinations_of_their_own_dtype(factor):
    sources = _grads()
    destinations = [torch.zeros_like(s, dtype=torch.bfloat16) for s in sources]
    with count_host_reads(include_host_tensors=True) as reads:
        scale(65536, None, [sources, destinations], factor)
    assert reads.total == 0
    f = float(factor) if isinstance(factor, torch.Tensor) else factor
    for src, dst in zip(sources, destinations):
        assert dst.dtype == torch.bfloat16
        torch.testing.assert_close(dst, (src * f).to(torch.bfloat16), atol=0, rtol=0)


def test_scale_in_place_clips_like_megatron():
    grads = _grads()
    want = [g * 0.1 for g in grads]
    scale(65536, None, [grads, grads], torch.tensor([0.1]))
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_install_replaces_megatrons_local_fallbacks_only():
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    saved = {name: getattr(clip_grads, name, None) for name in ("l2_norm_impl", "multi_tensor_scale_impl", "multi_tensor_scale_tensor_impl")}
    saved_optimizer = optimizer.multi_tensor_scale_impl
    if saved["l2_norm_impl"] is not utils.local_multi_tensor_l2_norm:
        pytest.skip("megatron found transformer-engine or apex kernels here: nothing to replace")
    try:
        assert install_device_multi_tensor_ops()
        assert clip_grads.l2_norm_impl is l2_norm and clip_grads.multi_tensor_scale_impl is scale
        assert optimizer.multi_tensor_scale_impl is scale
        assert not install_device_multi_tensor_ops()  # already device ops: left as they are
    finally:
        for name, value in saved.items():
            if value is not None or hasattr(clip_grads, name):
                setattr(clip_grads, name, value)
        optimizer.multi_tensor_scale_impl = saved_optimizer
