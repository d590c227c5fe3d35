"""The chunked head over a vocabulary split across two gloo ranks (tensor parallelism) against one
rank holding all of it (fp32, CPU): logprobs, entropy, argmax and the gradients of the hidden states
and of each rank's weight shard."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from miles_envs.trainer.megatron.vocab_head import vocab_head

TOKENS, HIDDEN, VOCAB, RANKS = 37, 16, 102, 2  # 51 rows a shard: padded to 64 for the matmuls
CASES = {  # name: vocab_head options
    "entropy_chunks_of_8": dict(chunk_tokens=8),
    "temperature_one_chunk_unpadded": dict(chunk_tokens=64, temperature=0.7, vocab_align=1),
    "cross_entropy_only": dict(chunk_tokens=5, entropy=False),
}


def _inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=gen, dtype=torch.float64).float()
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64).float()
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    targets[:4] = torch.tensor([0, VOCAB // 2 - 1, VOCAB // 2, VOCAB - 1])  # the shards' first and last rows
    mask = (torch.rand(TOKENS, generator=gen) > 0.3).float()
    coef = torch.randn(2, TOKENS, generator=gen)
    return hidden, weight, targets, mask, coef


def _run(weight_rows: slice, group, options: dict) -> dict:
    """Forward + backward of a masked loss on ``weight[weight_rows]``; results and gradients."""
    hidden, weight, targets, mask, coef = _inputs()
    hidden, weight = hidden.clone().requires_grad_(), weight[weight_rows].clone().requires_grad_()
    out = vocab_head(hidden, weight, targets, group=group, **options)
    loss = (coef[0] * out.logprobs * mask).sum()
    if out.entropy is not None:
        loss = loss + (coef[1] * out.entropy * mask).sum()
    loss.backward()
    return {"logprobs": out.logprobs.detach(), "entropy": None if out.entropy is None else out.entropy.detach(),
            "argmax": out.argmax, "grad_hidden": hidden.grad, "grad_weight": weight.grad}


def _rank(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        shard = VOCAB // RANKS
        rows = slice(rank * shard, (rank + 1) * shard)
        torch.save({name: _run(rows, dist.group.WORLD, options) for name, options in CASES.items()}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab_parallel")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(folder)), nprocs=RANKS, join=True)
    return [torch.load(folder / f"rank{r}.pt") for r in range(RANKS)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_vocabulary_shards_equal_one_rank(two_ranks, case):
    want = _run(slice(None), None, CASES[case])
    for rank, results in enumerate(two_ranks):
        got = results[case]
        torch.testing.assert_close(got["logprobs"], want["logprobs"], rtol=1e-5, atol=1e-5)
        if want["entropy"] is None:
            assert got["entropy"] is None
        else:
            torch.testing.assert_close(got["entropy"], want["entropy"], rtol=1e-5, atol=1e-5)
        assert torch.equal(got["argmax"], want["argmax"])
        torch.testing.assert_close(got["grad_hidden"], want["grad_hidden"], rtol=1e-5, atol=1e-5, msg=f"rank {rank}")
    shards = torch.cat([results[case]["grad_weight"] for results in two_ranks])
    torch.testing.assert_close(shards, want["grad_weight"], rtol=1e-5, atol=1e-5)
    assert set(want["argmax"].tolist()) & set(range(VOCAB // 2)) and set(want["argmax"].tolist()) & set(range(VOCAB // 2, VOCAB))


DATA = [([1, 2, 3], [4, 5, 6, 7]), ([9, 8, 2], [7, 6, 5, 4, 3]), ([5, 5, 5], [1, 2, 3]), ([6, 1], [2, 2, 9, 11, 12])]


def _trainer_run(tensor_parallel: int) -> dict:
    """A dense Qwen3 (tied head, one MTP layer) trainer with the chunked head: the forward's logprobs
    and entropy, one GRPO step's metrics (MTP-SFT and an entropy bonus on), this rank's updated
    embedding shard and final norm."""
    from miles_envs.trainer.batch import pack
    from miles_envs.trainer.config import TrainerConfig
    from miles_envs.trainer.megatron.backend import MegatronTrainer, hf_state_of
    from miles_envs.trainer.megatron.model import MegatronSettings
    from tests.trainer.megatron.models import tiny_qwen3_moe
    from tests.trainer.tiny import make_trajectory

    config, model, mtp = tiny_qwen3_moe(mtp=1, tie=True, arch="qwen3")
    trajectories = [make_trajectory(p, r, reward=float(i % 2)) for i, (p, r) in enumerate(DATA)]
    (batch,) = pack(trajectories, [0.0] * len(DATA), [1.0] * len(DATA), max_row_tokens=64)
    trainer = MegatronTrainer(
        config, hf_state_of(model, mtp),
        TrainerConfig(device="cpu", lr=1e-3, tis_cap=None, mtp_sft=True, entropy_coef=0.01, max_grad_norm=1e9),
        MegatronSettings(tensor_parallel=tensor_parallel, use_cpu_initialization=True, head_chunk_tokens=7),
    )
    assert trainer.fused_head
    with torch.no_grad():
        forward = trainer.forward(batch, replay=False)
    metrics = trainer.train_step(trajectories)
    gpt = trainer.gpt
    weights = {"embedding shard (the tied head)": gpt.shared_embedding_or_output_weight().detach().clone(),
               "final norm (through the hidden states' gradient)": gpt.decoder.final_layernorm.weight.detach().clone()}
    return {"logprobs": forward.logprobs, "entropy": forward.entropy, "metrics": metrics, "weights": weights}


def _trainer_rank(rank: int, port: int, folder: str) -> None:
    from tests.trainer.megatron.shim import cpu_megatron, cpu_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        with cpu_megatron(tensor_parallel=RANKS), cpu_optimizer():
            torch.save(_trainer_run(RANKS), f"{folder}/trainer{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_trainer_with_the_chunked_head_equals_one_rank(tmp_path):
    """TP=2 over gloo (each rank: half of the tied vocabulary, its chunked head all-reducing the
    softmax statistics) against TP=1: the same logprobs, entropy, loss terms and updated weights."""
    from tests.trainer.megatron.shim import cpu_megatron, cpu_optimizer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_trainer_rank, args=(port, str(tmp_path)), nprocs=RANKS, join=True)
    with cpu_megatron(), cpu_optimizer():
        want = _trainer_run(1)
    ranks = [torch.load(tmp_path / f"trainer{rank}.pt") for rank in range(RANKS)]
    for got in ranks:
        torch.testing.assert_close(got["logprobs"], want["logprobs"], atol=1e-5, rtol=0)
        torch.testing.assert_close(got["entropy"], want["entropy"], atol=1e-5, rtol=0)
        for key in ("loss", "pg_loss", "entropy", "mtp/loss", "mtp/accuracy"):
            assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=1e-5, abs=1e-6), key
    # Adam steps of lr 1e-3 move every weight: equal up to float noise
    embedding, norm = want["weights"]
    torch.testing.assert_close(torch.cat([r["weights"][embedding] for r in ranks]), want["weights"][embedding], atol=2e-5, rtol=0)
    for got in ranks:
        torch.testing.assert_close(got["weights"][norm], want["weights"][norm], atol=2e-5, rtol=0)
