"""The chunked vocabulary head against the full-logits reference (fp32, CPU): values and gradients."""

import pytest
import torch

from miles_envs.trainer.losses import token_logprobs_and_entropy
from miles_envs.trainer.megatron.vocab_head import vocab_head

TOKENS, HIDDEN, VOCAB = 37, 16, 101


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=gen, dtype=torch.float64).float()
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64).float()
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    mask = (torch.rand(TOKENS, generator=gen) > 0.3).float()  # masked tokens: results kept, gradient zero
    coef = torch.randn(2, TOKENS, generator=gen)
    return hidden, weight, targets, mask, coef


def _grads(loss_of, hidden, weight):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_of(hidden, weight).backward()
    return hidden.grad, weight.grad


@pytest.mark.parametrize("chunk", [1, 8, TOKENS, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("align", [64, 1])  # vocabulary 101 padded to 128 for the matmuls, or not
def test_values_and_gradients_equal_full_logits(chunk, temperature, align):
    hidden, weight, targets, mask, coef = _inputs(0)

    def reference(h, w):
        logprobs, entropy = token_logprobs_and_entropy(h @ w.t() / temperature, targets)
        return (coef[0] * logprobs * mask).sum() + (coef[1] * entropy * mask).sum()

    def fused(h, w):
        out = vocab_head(h, w, targets, temperature=temperature, chunk_tokens=chunk, vocab_align=align)
        return (coef[0] * out.logprobs * mask).sum() + (coef[1] * out.entropy * mask).sum()

    out = vocab_head(hidden, weight, targets, temperature=temperature, chunk_tokens=chunk, vocab_align=align)
    logits = hidden @ weight.t() / temperature
    logprobs, entropy = token_logprobs_and_entropy(logits, targets)
    torch.testing.assert_close(out.logprobs, logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.argmax, logits.argmax(-1))
    for got, want in zip(_grads(fused, hidden, weight), _grads(reference, hidden, weight)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cross_entropy_without_entropy_matches_and_masks():
    """The MTP use: a masked cross-entropy sum, no entropy computed; masked tokens get no gradient."""
    hidden, weight, targets, mask, _ = _inputs(1)

    def reference(h, w):
        ce = torch.nn.functional.cross_entropy(h @ w.t(), targets, reduction="none")
        return (ce * mask).sum()

    def fused(h, w):
        return -(vocab_head(h, w, targets, entropy=False, chunk_tokens=5).logprobs * mask).sum()

    assert vocab_head(hidden, weight, targets, entropy=False).entropy is None
    grad_hidden, grad_weight = _grads(fused, hidden, weight)
    want_hidden, want_weight = _grads(reference, hidden, weight)
    torch.testing.assert_close(grad_hidden, want_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_weight, want_weight, rtol=1e-5, atol=1e-5)
    assert grad_hidden[mask == 0].abs().max() == 0 and grad_hidden[mask == 1].abs().max() > 0


def test_bf16_hidden_is_cast_to_the_weight_dtype_like_the_output_layer():
    hidden, weight, targets, _, _ = _inputs(2)
    out = vocab_head(hidden.double(), weight, targets, chunk_tokens=10)
    torch.testing.assert_close(out.logprobs, token_logprobs_and_entropy(hidden @ weight.t(), targets)[0])


def test_bad_shapes_and_chunk_fail_with_the_reason():
    hidden, weight, targets, _, _ = _inputs(3)
    with pytest.raises(ValueError, match=r"hidden \[tokens, hidden\]"):
        vocab_head(hidden.unsqueeze(0), weight, targets)
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        vocab_head(hidden, weight, targets, chunk_tokens=0)
    with pytest.raises(ValueError, match="vocab_align=0"):
        vocab_head(hidden, weight, targets, vocab_align=0)
