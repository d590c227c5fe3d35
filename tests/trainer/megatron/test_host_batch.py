"""The micro-batch the megatron trainer moves to its device keeps its host copy through every re-layout."""

import torch

from miles_envs.trainer.batch import PackedBatch, pack
from miles_envs.trainer.megatron.forward import HostBackedBatch, host_of, pad_width
from tests.trainer.tiny import make_trajectory


def _batch() -> PackedBatch:
    trajectories = [make_trajectory([1, 2, 3], [4, 5, 6], mask=[1, 0, 1]), make_trajectory([7, 8], [9, 10, 11, 12])]
    (batch,) = pack(trajectories, [1.0, -1.0], [0.5, 0.5], max_row_tokens=64)
    return batch


def test_host_backed_batch_keeps_its_host_copy_when_moved_and_padded():
    host = _batch()
    moved = HostBackedBatch.of(host, "cpu")
    assert host_of(moved) is host and host_of(host) is host
    assert moved.num_loss_tokens == host.num_loss_tokens == 6
    again = moved.to("cpu")
    assert isinstance(again, HostBackedBatch) and again.host is host
    width = host.input_ids.shape[1]
    padded = pad_width(moved, width + 3)
    assert isinstance(padded, HostBackedBatch)
    assert padded.input_ids.shape[1] == padded.host.input_ids.shape[1] == width + 3
    assert torch.equal(padded.host.seq_index[:, width:], torch.full((1, 3), -1))
    assert torch.equal(padded.seq_index, padded.host.seq_index)
    assert padded.num_loss_tokens == 6
