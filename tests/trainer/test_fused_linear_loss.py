"""parallel.lm_loss=fused_linear: lm_head and the cross entropy in one (trainer.loss.fused_linear_lm_loss) equal
lm_head followed by the plain loss, in value and in both gradients, and train every layout it runs in to the checked-in
single-process trace. Awkward shapes as in test_loss.py: a padded vocabulary (389 real of 512), chunks that do not
divide the tokens, ignored labels."""

from __future__ import annotations

import json
from pathlib import Path

import deepspeed  # noqa: F401  (imported once in the parent: forked ranks start in ~0.3 s)
import megatron.core.tensor_parallel  # noqa: F401
import pytest
import torch

from test_parallel_training import GOLDEN, REL_TOL, max_rel_diff, run_and_read
from trainer.loss import fused_linear_lm_loss
from trainer.model import lm_loss
from trainer.testing import run_distributed

VOCAB, PADDED, HIDDEN = 389, 512, 24
ZERO3_HEAD_PARTITIONED = "zero.stage3_param_persistence_threshold_elements=0"


def _inputs(dtype: torch.dtype, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden_tbh = torch.randn(7, 3, HIDDEN, generator=generator).to(dtype)  # the model's (T, B, H) layout
    weight = (torch.randn(PADDED, HIDDEN, generator=generator) * 0.5).to(dtype)
    weight[vocab:] = 0  # padding rows, as the trainer initialises them
    labels = torch.randint(0, vocab, (3, 7), generator=generator)
    labels[0, 2] = labels[2, 6] = -100
    return hidden_tbh, weight, labels


def _loss_and_grads(loss_of, hidden_tbh, weight, grad_scale):  # noqa: ANN001, ANN202
    hidden_leaf, weight_leaf = hidden_tbh.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_of(hidden_leaf.transpose(0, 1), weight_leaf)
    (loss * grad_scale).backward()
    return loss.detach(), hidden_leaf.grad, weight_leaf.grad


def _unfused(labels: torch.Tensor):  # noqa: ANN202
    return lambda hidden, weight: lm_loss(hidden @ weight.t(), labels, VOCAB)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 21, 1000])  # one row per chunk .. everything in one chunk
def test_fused_loss_equals_lm_head_then_loss_in_value_and_both_gradients(dtype: torch.dtype, rtol: float,
                                                                           chunk_tokens: int) -> None:
    """bf16: the reference rounds the whole gradient of the logits to bf16 once; the fused loss rounds each chunk's
    and sums the weight gradient in fp32, so they differ by bf16 rounding (2e-2 of the largest element)."""
    hidden, weight, labels = _inputs(dtype)
    want = _loss_and_grads(_unfused(labels), hidden, weight, grad_scale=1024.0)  # a loss scale, as fp16 runs use
    fused = lambda h, w: fused_linear_lm_loss(h, w, labels, VOCAB, chunk_bytes=4 * VOCAB * chunk_tokens)  # noqa: E731
    got = _loss_and_grads(fused, hidden, weight, grad_scale=1024.0)
    for name, g, w in zip(("loss", "hidden grad", "weight grad"), got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert (g.float() - w.float()).abs().max() <= rtol * w.float().abs().max(), name
    assert torch.equal(got[2][VOCAB:], torch.zeros_like(got[2][VOCAB:]))  # padding rows: exactly zero gradient


def _vocab_parallel_fused(rank: int, world_size: int, vocab: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """This rank's loss, its rows' weight gradient, and the hidden-state gradient summed over the TP group."""
    import torch.distributed as dist

    hidden, weight, labels = _inputs(torch.float32, vocab)
    rows = PADDED // world_size
    hidden_leaf = hidden.clone().requires_grad_()
    shard = weight[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    loss = fused_linear_lm_loss(hidden_leaf.transpose(0, 1), shard, labels, vocab, rank, dist.group.WORLD,
                                chunk_bytes=4 * rows * 5)
    (loss * 0.5).backward()
    dist.all_reduce(hidden_leaf.grad)  # what megatron's copy-to-TP-region backward does
    return loss.item(), shard.grad, hidden_leaf.grad


@pytest.mark.slow
@pytest.mark.parametrize(("world_size", "vocab"), [(2, VOCAB), (4, 300)], ids=["tp2", "tp4-a-shard-of-padding"])
def test_vocab_parallel_fused_loss_equals_the_full_vocabulary_loss(world_size: int, vocab: int) -> None:
    hidden, weight, labels = _inputs(torch.float32, vocab)
    want_loss, want_hidden_grad, want_weight_grad = _loss_and_grads(
        lambda h, w: lm_loss(h @ w.t(), labels, vocab), hidden, weight, grad_scale=0.5)
    results = run_distributed(_vocab_parallel_fused, world_size, vocab, timeout_s=120)
    assert [loss for loss, _, _ in results] == pytest.approx([want_loss.item()] * world_size, rel=1e-6)
    torch.testing.assert_close(torch.cat([grad for _, grad, _ in results]), want_weight_grad, rtol=1e-5, atol=1e-7)
    for _, _, hidden_grad in results:
        torch.testing.assert_close(hidden_grad, want_hidden_grad, rtol=1e-5, atol=1e-7)


def test_without_grad_only_the_loss_is_computed() -> None:
    hidden, weight, labels = _inputs(torch.float32)
    with torch.no_grad():
        loss = fused_linear_lm_loss(hidden.transpose(0, 1), weight, labels, VOCAB)
    assert torch.allclose(loss, lm_loss(hidden.transpose(0, 1) @ weight.t(), labels, VOCAB), rtol=1e-6)
    assert loss.grad_fn is None


def test_all_labels_ignored_gives_nan_like_torch() -> None:
    hidden, weight, labels = _inputs(torch.float32)
    assert fused_linear_lm_loss(hidden.transpose(0, 1), weight, torch.full_like(labels, -100), VOCAB).isnan()


@pytest.mark.slow
@pytest.mark.parametrize(("world_size", "overrides"), [
    pytest.param(1, [], id="1proc"),
    pytest.param(2, ["zero.stage=2"], id="dp2-zero2"),
    # The persistence threshold 0 partitions tiny's lm_head too (by default a weight this small stays whole): the
    # loss must then run inside lm_head's call, where ZeRO-3 gathers the weight (read outside, it is empty).
    pytest.param(2, ["zero.stage=3", ZERO3_HEAD_PARTITIONED], id="dp2-zero3"),
    pytest.param(2, ["parallel.pp=2"], id="pp2"),
    pytest.param(2, ["parallel.tp=2"], id="tp2"),
    pytest.param(2, ["parallel.tp=2", "parallel.sequence_parallel=true"], id="tp2-sp"),
    pytest.param(1, ["parallel.activation_checkpointing=full", "parallel.compile=aot_eager"],
                 id="1proc-full_ac-compiled"),
])
def test_training_with_the_fused_loss_matches_the_golden_trace(world_size: int, overrides: list[str],
                                                               tmp_path: Path) -> None:
    """Train and eval losses of every step (eval runs the no-grad path) equal the single-process eager trace that
    every chunked-loss layout matches (test_parallel_training.py)."""
    golden = json.loads(GOLDEN.read_text())
    got = run_and_read(world_size, ["parallel.lm_loss=fused_linear", *overrides], tmp_path)
    assert max_rel_diff(got["losses"], golden["train_losses"]) <= REL_TOL, (got["losses"], golden["train_losses"])
    assert max_rel_diff([got["val_loss"]], [golden["val_loss"]]) <= REL_TOL


@pytest.mark.slow
def test_tied_embeddings_train_alike_with_either_loss(tmp_path: Path) -> None:
    """Tied: lm_head's weight is the embedding's, so the fused loss' weight gradient adds to the embedding's own; under
    ZeRO-3 (the shared weight partitioned) that one weight is gathered for the embedding and again for the loss."""
    tied = ["model.tie_embeddings=true"]
    chunked = run_and_read(1, tied, tmp_path / "chunked")
    for world_size, layout in ((1, []), (2, ["zero.stage=3", ZERO3_HEAD_PARTITIONED])):
        fused = run_and_read(world_size, [*tied, "parallel.lm_loss=fused_linear", *layout],
                             tmp_path / f"fused{world_size}")
        assert max_rel_diff(fused["losses"], chunked["losses"]) <= REL_TOL, (layout, fused["losses"], chunked["losses"])
        assert max_rel_diff(fused["grad_norms"], chunked["grad_norms"]) <= 1e-4, layout
        assert max_rel_diff([fused["val_loss"]], [chunked["val_loss"]]) <= REL_TOL, layout
