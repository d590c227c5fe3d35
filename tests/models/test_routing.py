import pytest
import torch

from miles_envs.models.loading import load_checkpoint
from miles_envs.models.routing import RoutingRecorder, moe_routers
from tests.models.tiny_checkpoints import tiny_checkpoint  # noqa: F401


def test_deepseek_dense_layers_give_zero_rows_and_moe_layers_match_router_logits(tiny_checkpoint):  # noqa: F811
    model = load_checkpoint(tiny_checkpoint("deepseek-v3"), device="cpu").model
    assert sorted(moe_routers(model)) == [1, 2]
    ids = torch.tensor([[9707, 1879, 11, 374, 264, 1273]])
    recorder = RoutingRecorder(model)
    with torch.no_grad(), recorder.record():
        model(ids)
    rows = recorder.take(1, ids.shape[1])[0]
    assert rows.shape == (6, 3, 2)
    assert not rows[:, 0].any()
    inputs = {}
    handles = [
        router.register_forward_pre_hook(lambda module, args, layer=layer: inputs.__setitem__(layer, args[0]))
        for layer, router in moe_routers(model).items()
    ]
    with torch.no_grad():
        model(ids)
        for handle in handles:
            handle.remove()
        for layer, router in moe_routers(model).items():
            assert torch.equal(rows[:, layer].long(), router(inputs[layer])[2].long())
