"""train.z_loss_weight: the losses of trainer.loss put the gradient of cross entropy + weight · mean (log Z)² into
backward, return the cross entropy alone, and record the weighted z term of training calls for the logs.

The reference is autograd on the formula (PaLM's z-loss over the real vocabulary columns, averaged over the tokens
the cross entropy averages over) applied to the whole logits. Same awkward shapes as test_loss.py: a padded vocabulary
(389 real of 512), chunks that do not divide the tokens, ignored labels. The whole training objective against HF's
model is in test_hf_reference.py."""

from __future__ import annotations

import pytest
import torch

from test_fused_linear_loss import _inputs
from test_loss import PADDED, VOCAB, _logits_tbv_and_labels
from trainer.loss import ZLoss, chunked_lm_loss, chunked_vocab_parallel_lm_loss, fused_linear_lm_loss
from trainer.model import lm_loss
from trainer.testing import run_distributed

# Large, so the z term moves the gradient far beyond the tolerances (PaLM's 1e-4 would be within fp32 noise here).
WEIGHT = 0.05


def _reference(logits_btv: torch.Tensor, labels: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross entropy, weighted z term) by autograd-able formula."""
    keep = labels != -100
    lse = logits_btv[..., :vocab].float().logsumexp(-1)
    return lm_loss(logits_btv, labels, vocab), WEIGHT * (lse.square() * keep).sum() / keep.sum()


def _reference_grad(logits_tbv: torch.Tensor, labels: torch.Tensor, vocab: int, grad_scale: float):  # noqa: ANN202
    leaf = logits_tbv.clone().requires_grad_()
    ce, z = _reference(leaf.transpose(0, 1), labels, vocab)
    ((ce + z) * grad_scale).backward()
    return ce.detach(), z.detach(), leaf.grad


@pytest.mark.parametrize("chunk_tokens", [1, 5, 1000])  # 1000: where the loss without z takes torch's own path
def test_chunked_loss_adds_the_z_gradient_and_returns_the_cross_entropy(chunk_tokens: int) -> None:
    logits_tbv, labels = _logits_tbv_and_labels(torch.float32)
    want_ce, want_z, want_grad = _reference_grad(logits_tbv, labels, VOCAB, grad_scale=0.25)
    z_loss = ZLoss(WEIGHT)
    leaf = logits_tbv.clone().requires_grad_()
    loss = chunked_lm_loss(leaf.transpose(0, 1), labels, VOCAB, chunk_bytes=chunk_tokens * PADDED * 4, z_loss=z_loss)
    (loss * 0.25).backward()
    assert loss.item() == pytest.approx(want_ce.item(), rel=1e-6)
    torch.testing.assert_close(leaf.grad, want_grad, rtol=1e-5, atol=1e-8)
    assert not leaf.grad[..., VOCAB:].any()
    total, micro_batches = z_loss.take()
    assert micro_batches == 1 and total.item() == pytest.approx(want_z.item(), rel=1e-6)
    assert z_loss.take() == (None, 0)
    # Without the z term the gradient is a different one: the test above can fail.
    assert (_ce_grad(logits_tbv, labels) * 0.25 - want_grad).abs().max() > 100 * 1e-5 * want_grad.abs().max()


def _ce_grad(logits_tbv: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    leaf = logits_tbv.clone().requires_grad_()
    lm_loss(leaf.transpose(0, 1), labels, VOCAB).backward()
    return leaf.grad


def test_evaluation_records_nothing() -> None:
    logits_tbv, labels = _logits_tbv_and_labels(torch.float32)
    z_loss = ZLoss(WEIGHT)
    with torch.no_grad():
        loss = chunked_lm_loss(logits_tbv.transpose(0, 1), labels, VOCAB, z_loss=z_loss)
        hidden, weight, fused_labels = _inputs(torch.float32)
        fused_linear_lm_loss(hidden.transpose(0, 1), weight, fused_labels, VOCAB, z_loss=z_loss)
    assert loss.item() == pytest.approx(lm_loss(logits_tbv.transpose(0, 1), labels, VOCAB).item(), rel=1e-6)
    assert z_loss.take() == (None, 0)


@pytest.mark.parametrize("chunk_tokens", [1, 5, 1000])
def test_fused_loss_adds_the_z_gradient_to_both_gradients(chunk_tokens: int) -> None:
    hidden_tbh, weight, labels = _inputs(torch.float32)
    leaves = hidden_tbh.clone().requires_grad_(), weight.clone().requires_grad_()
    ce, z = _reference(leaves[0].transpose(0, 1) @ leaves[1].t(), labels, VOCAB)
    ((ce + z) * 1024.0).backward()
    z_loss = ZLoss(WEIGHT)
    got = hidden_tbh.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_lm_loss(got[0].transpose(0, 1), got[1], labels, VOCAB, chunk_bytes=4 * VOCAB * chunk_tokens,
                                z_loss=z_loss)
    (loss * 1024.0).backward()
    assert loss.item() == pytest.approx(ce.item(), rel=1e-6)
    for mine, want in zip(got, leaves, strict=True):
        torch.testing.assert_close(mine.grad, want.grad, rtol=1e-5, atol=1e-5 * want.grad.abs().max().item())
    assert not got[1].grad[VOCAB:].any()
    assert z_loss.take()[0].item() == pytest.approx(z.item(), rel=1e-6)


def _vocab_parallel(rank: int, world_size: int) -> tuple[float, float, torch.Tensor, float, torch.Tensor]:
    """tp 2: the chunked loss's logits gradient shard, and the fused loss's weight gradient shard, each with the z
    term this rank recorded."""
    import torch.distributed as dist

    logits_tbv, labels = _logits_tbv_and_labels(torch.float32)
    shard = logits_tbv.chunk(world_size, dim=-1)[rank].contiguous().requires_grad_()
    z_loss = ZLoss(WEIGHT)
    loss = chunked_vocab_parallel_lm_loss(shard.transpose(0, 1), labels, VOCAB, rank, dist.group.WORLD,
                                          chunk_bytes=5 * 256 * 4, z_loss=z_loss)
    (loss * 0.5).backward()
    hidden, weight, fused_labels = _inputs(torch.float32)
    rows = PADDED // world_size
    weight_shard = weight[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    fused_z = ZLoss(WEIGHT)
    fused_linear_lm_loss(hidden.transpose(0, 1), weight_shard, fused_labels, VOCAB, rank, dist.group.WORLD,
                         chunk_bytes=4 * rows * 5, z_loss=fused_z).backward()
    return loss.item(), z_loss.take()[0].item(), shard.grad, fused_z.take()[0].item(), weight_shard.grad


@pytest.mark.slow
def test_vocab_parallel_losses_add_the_same_z_gradient() -> None:
    logits_tbv, labels = _logits_tbv_and_labels(torch.float32)
    want_ce, want_z, want_grad = _reference_grad(logits_tbv, labels, VOCAB, grad_scale=0.5)
    hidden, weight, fused_labels = _inputs(torch.float32)
    weight_leaf = weight.clone().requires_grad_()
    fused_ce, fused_z = _reference(hidden.transpose(0, 1) @ weight_leaf.t(), fused_labels, VOCAB)
    (fused_ce + fused_z).backward()
    results = run_distributed(_vocab_parallel, 2, timeout_s=120)
    for loss, z, _, rank_fused_z, _ in results:  # every TP rank: the global cross entropy and z term
        assert loss == pytest.approx(want_ce.item(), rel=1e-6) and z == pytest.approx(want_z.item(), rel=1e-6)
        assert rank_fused_z == pytest.approx(fused_z.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat([r[2] for r in results], dim=-1), want_grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(torch.cat([r[4] for r in results]), weight_leaf.grad, rtol=1e-5, atol=1e-6)
