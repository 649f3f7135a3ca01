"""The chunked losses (trainer.loss) equal the unchunked references in value and gradient.

References: `trainer.model.lm_loss` (tp 1) and the full-vocabulary cross entropy over the real columns (tp > 1, what
`vocab_parallel_lm_loss` is proven against in test_parallelize.py). Awkward shapes on purpose: a padded vocabulary
(389 real of 512), chunks that do not divide the tokens, ignored labels, a TP shard that holds only padding.
"""

from __future__ import annotations

import pytest
import torch

from trainer.loss import chunked_lm_loss, chunked_vocab_parallel_lm_loss
from trainer.model import lm_loss
from trainer.testing import run_distributed

VOCAB, PADDED = 389, 512


def _logits_tbv_and_labels(dtype: torch.dtype, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits_tbv = (torch.randn(7, 3, PADDED, generator=generator) * 3).to(dtype)  # the model's (T, B, V) layout
    labels = torch.randint(0, vocab, (3, 7), generator=generator)  # (B, T)
    labels[0, 2] = labels[2, 6] = -100
    return logits_tbv, labels


def _loss_and_grad(loss_fn, logits_tbv: torch.Tensor, labels: torch.Tensor,  # noqa: ANN001
                   grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits_tbv.clone().requires_grad_()
    loss = loss_fn(leaf.transpose(0, 1), labels)
    (loss * grad_scale).backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# One row per chunk .. all rows in one chunk (21) .. a chunk twice the rows: the unchunked fast path (1000).
@pytest.mark.parametrize("chunk_tokens", [1, 5, 21, 1000])
def test_chunked_loss_equals_the_unchunked_loss_in_value_and_gradient(dtype: torch.dtype, chunk_tokens: int) -> None:
    logits_tbv, labels = _logits_tbv_and_labels(dtype)
    want_loss, want_grad = _loss_and_grad(lambda x, y: lm_loss(x, y, VOCAB), logits_tbv, labels, grad_scale=0.25)
    got_loss, got_grad = _loss_and_grad(
        lambda x, y: chunked_lm_loss(x, y, VOCAB, chunk_bytes=chunk_tokens * PADDED * 4), logits_tbv, labels,
        grad_scale=0.25)  # 1/grad_accum, as the engine scales it
    assert got_grad.dtype == dtype
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    # bf16: both round the same fp32 gradient once, so they agree to the bit; fp32: summation order only.
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-5, atol=1e-8)
    assert not got_grad[..., VOCAB:].any()  # padded columns: exactly zero gradient


def test_fp16_gradient_is_scaled_before_it_is_rounded() -> None:
    """Under fp16 loss scaling (scale 2**16) small gradient entries must survive as they do with autograd."""
    logits_tbv, labels = _logits_tbv_and_labels(torch.float16)
    want_loss, want_grad = _loss_and_grad(lambda x, y: lm_loss(x, y, VOCAB), logits_tbv, labels, 2.0**16)
    got_loss, got_grad = _loss_and_grad(lambda x, y: chunked_lm_loss(x, y, VOCAB, chunk_bytes=4096), logits_tbv,
                                        labels, 2.0**16)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-3, atol=0)
    assert (got_grad != 0).sum() == (want_grad != 0).sum()


def test_all_labels_ignored_gives_nan_like_cross_entropy_and_eval_needs_no_grad() -> None:
    logits_tbv, labels = _logits_tbv_and_labels(torch.float32)
    assert chunked_lm_loss(logits_tbv.transpose(0, 1), torch.full_like(labels, -100), VOCAB).isnan()
    with torch.no_grad():
        got = chunked_lm_loss(logits_tbv.transpose(0, 1), labels, VOCAB)
    assert got.item() == pytest.approx(lm_loss(logits_tbv.transpose(0, 1), labels, VOCAB).item(), rel=1e-6)


def _vocab_parallel(rank: int, world_size: int, vocab: int) -> tuple[float, torch.Tensor]:
    import torch.distributed as dist

    logits_tbv, labels = _logits_tbv_and_labels(torch.float32, vocab)
    shard = logits_tbv.chunk(world_size, dim=-1)[rank].contiguous()
    loss, grad = _loss_and_grad(
        lambda x, y: chunked_vocab_parallel_lm_loss(x, y, vocab, rank, dist.group.WORLD, chunk_bytes=5 * 128 * 4),
        shard, labels, grad_scale=0.5)
    return loss.item(), grad


@pytest.mark.slow
@pytest.mark.parametrize(("world_size", "vocab"), [(2, VOCAB), (4, 384)])  # 384 at tp 4: the last shard is padding
def test_chunked_vocab_parallel_loss_equals_the_full_vocabulary_loss(world_size: int, vocab: int) -> None:
    logits_tbv, labels = _logits_tbv_and_labels(torch.float32, vocab)
    want_loss, want_grad = _loss_and_grad(lambda x, y: lm_loss(x, y, vocab), logits_tbv, labels, grad_scale=0.5)
    results = run_distributed(_vocab_parallel, world_size, vocab, timeout_s=120)
    assert [loss for loss, _ in results] == pytest.approx([want_loss.item()] * world_size, rel=1e-6)
    got_grad = torch.cat([grad for _, grad in results], dim=-1)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-8)
    assert not got_grad[..., vocab:].any()
