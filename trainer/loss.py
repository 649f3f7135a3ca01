"""Cross entropy over the logits in token chunks: fp32 exists for one chunk at a time, never for the micro-batch.

    loss = chunked_lm_loss(logits, labels, vocab_size)                                  # tp == 1
    loss = chunked_vocab_parallel_lm_loss(logits, labels, vocab_size, tp_rank, tp_group) # logits: this rank's shard

Why: the plain loss (`trainer.model.lm_loss`) casts the whole (B, T, V) logits to fp32 and autograd keeps that copy
for backward: at the 1B shape (micro 8 × 2048 tokens × 32,000) that is 2 GB of fp32 logits, then 2 GB of fp32
gradient in backward. Here the forward walks the tokens in chunks of `chunk_bytes` of fp32 and keeps only one fp32
number per token (its log-sum-exp); the backward walks the chunks again and writes softmax − one-hot (the closed-form
gradient, recomputed from the logits) straight into one buffer of the logits' own dtype: the tensor autograd would
have produced. Peak extra fp32 is ~2 chunks, whatever the micro-batch (bench/bench_loss_memory.py).

Same numbers as the plain loss: per token m + log Σ exp(x − m) − x_label with m the row max, averaged over the
tokens whose label is not `ignore_index`; gradient (softmax − one-hot) / n. Padded vocabulary columns (global index
>= vocab_size) never enter the softmax and get exactly zero gradient, as in `lm_loss` and `vocab_parallel_lm_loss`.
Under tensor parallelism each rank holds V/tp columns; the row max, Σ exp and the label's logit are reduced over the
TP group (two all-reduces per chunk, as megatron's vocab_parallel_cross_entropy does for the whole batch), so every
TP rank returns the same loss and its own shard's gradient.

With a `ZLoss` (train.z_loss_weight > 0) the gradient is that of cross entropy + weight · mean (log Z)², PaLM's
auxiliary z-loss (Z: the softmax normaliser, so log Z is the log-sum-exp each chunk computes anyway): its gradient
2 · weight · log Z · softmax joins the cross entropy's in the same per-chunk pass, nothing else is computed. The
returned loss stays the cross entropy (what HF's models report, what val_loss measures); the weighted z term of
each training micro-batch is summed into the `ZLoss` for the logs.

Plain torch: runs on CPU and GPU alike; the model stays eager here (the decoder layers are what trainer.compile
compiles).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

# fp32 bytes per chunk: 1,024 tokens of a 32k vocabulary (128 MiB); small enough to vanish next to the activations,
# large enough that the per-chunk kernel launches (and, under TP, the per-chunk all-reduces) stay negligible.
DEFAULT_CHUNK_BYTES = 128 * 2**20


@dataclass
class ZLoss:
    """PaLM's auxiliary z-loss: `weight` · (log Z)² per token, averaged like the cross entropy (PaLM and OLMo 2 use
    weight 1e-4): it keeps log Z near 0, so the output logits cannot drift (bf16 loses their precision as they
    grow). The loss functions put its gradient into backward and, for training calls, add the weighted term of the
    micro-batch to `total` (a device tensor: no host sync); `take` hands the sum to the logs and starts anew."""

    weight: float
    total: torch.Tensor | None = None
    micro_batches: int = 0
    # The weight of the next recorded micro-batch in the logged mean (train.mask_eos_loss: its share of the tokens
    # kept, see trainer.fit.token_weighted); the loss scales the gradient alike. Reset after each record.
    next_scale: torch.Tensor | float = 1.0

    def record(self, lse: torch.Tensor, keep: torch.Tensor, count: torch.Tensor) -> None:
        term = self.next_scale * self.weight * (lse.square() * keep).sum() / count.clamp(min=1)
        self.next_scale = 1.0
        self.total = term if self.total is None else self.total + term
        self.micro_batches += 1

    def take(self) -> tuple[torch.Tensor | None, int]:
        taken = self.total, self.micro_batches
        self.total, self.micro_batches = None, 0
        return taken


def chunked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None,
                    ignore_index: int = -100, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                    z_loss: ZLoss | None = None) -> torch.Tensor:
    """`trainer.model.lm_loss` without fp32 logits for the whole micro-batch. logits: (B, T, V_padded), any float
    dtype; labels: (B, T). Only the first `vocab_size` columns (None: all) enter the softmax."""
    real_columns = logits.shape[-1] if vocab_size is None else min(vocab_size, logits.shape[-1])
    return _chunked(logits, labels, real_columns, 0, None, ignore_index, chunk_bytes, z_loss)


def chunked_vocab_parallel_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, tp_rank: int,
                                   tp_group: Any, ignore_index: int = -100,
                                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, z_loss: ZLoss | None = None) -> torch.Tensor:
    """The same loss for vocab-parallel logits: (B, T, V_padded/tp) on each TP rank, labels (B, T) global ids.
    Every rank of `tp_group` must call it with its own shard; each returns the same loss."""
    shard_columns = logits.shape[-1]
    vocab_start = tp_rank * shard_columns
    real_columns = min(max(vocab_size - vocab_start, 0), shard_columns)  # the last ranks may hold only padding
    return _chunked(logits, labels, real_columns, vocab_start, tp_group, ignore_index, chunk_bytes, z_loss)


def _chunked(logits: torch.Tensor, labels: torch.Tensor, real_columns: int, vocab_start: int, group: Any,
             ignore_index: int, chunk_bytes: int, z_loss: ZLoss | None) -> torch.Tensor:
    # (T*B, V) in Llama's native (T, B) order: logits are a (B, T) view of a (T, B, V) tensor, so this is free.
    flat_logits = logits.transpose(0, 1).reshape(-1, logits.shape[-1])
    flat_labels = labels.transpose(0, 1).reshape(-1)
    # From the shard width, not the real columns: every TP rank must run the same number of chunks (collectives).
    rows_per_chunk = max(1, chunk_bytes // (4 * flat_logits.shape[-1]))
    if group is None and z_loss is None and 2 * flat_logits.shape[0] <= rows_per_chunk:
        # Half a chunk holds the whole micro-batch: torch's own cross entropy on an fp32 copy (its saved log-softmax
        # and fp32 gradient included: 3 such copies <= the 2 chunks the memory estimate counts) skips this module's
        # Python loop, 0.3 ms of each micro-batch on the tiny CPU model. Same value (1e-6) and gradient semantics:
        # autograd scales the fp32 gradient by the incoming one before rounding it to the logits' dtype.
        return F.cross_entropy(flat_logits[:, :real_columns].float(), flat_labels, ignore_index=ignore_index)
    return _ChunkedCrossEntropy.apply(flat_logits, flat_labels, real_columns, vocab_start, group, ignore_index,
                                      rows_per_chunk, z_loss)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward: loss and per-row log-sum-exp, chunk by chunk. Backward: (softmax − one-hot) · grad / count, chunk by
    chunk from the saved logits and log-sum-exp (no collective: the TP reductions happened in forward). The logits
    are alive until backward anyway (the training step holds them), so saving them costs no memory; computing the
    gradient only in backward means it is scaled by the incoming gradient (fp16 loss scale) *before* it is rounded
    to the logits' dtype, exactly as autograd does for the plain loss."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, real_columns: int, vocab_start: int,
                group: Any, ignore_index: int, rows_per_chunk: int, z_loss: ZLoss | None) -> torch.Tensor:
        keep = labels != ignore_index  # (N,); the same on every TP rank
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # (N,)
        loss_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            chunk_lse, label_logit = _lse_and_label_logit(logits[rows], labels[rows], keep[rows], real_columns,
                                                          vocab_start, group)
            lse[rows] = chunk_lse
            loss_sum += ((chunk_lse - label_logit) * keep[rows]).sum()
        count = keep.sum()
        if z_loss is not None and ctx.needs_input_grad[0]:  # training, not evaluation
            z_loss.record(lse, keep, count)
        ctx.save_for_backward(logits, labels, keep, lse, count)
        ctx.chunking = (real_columns, vocab_start, rows_per_chunk)
        ctx.z_loss_weight = 0.0 if z_loss is None else z_loss.weight
        return loss_sum / count  # all labels ignored: 0/0 = NaN, like torch's cross_entropy

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        logits, labels, keep, lse, count = ctx.saved_tensors
        real_columns, vocab_start, rows_per_chunk = ctx.chunking
        grad = torch.zeros_like(logits)  # padded columns: exactly zero
        scale = grad_loss.float() / count.clamp(min=1)
        for start in range(0, logits.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            grad[rows, :real_columns] = _softmax_minus_one_hot(logits[rows, :real_columns], lse[rows], labels[rows],
                                                               keep[rows], real_columns, vocab_start, scale,
                                                               ctx.z_loss_weight)
        return grad, None, None, None, None, None, None, None


def _local_labels(labels: torch.Tensor, keep: torch.Tensor, real_columns: int,
                  vocab_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(label's column in this shard, 0 where not here; whether this shard holds a kept row's label)."""
    local = labels - vocab_start
    in_shard = keep & (local >= 0) & (local < real_columns)
    return torch.where(in_shard, local, 0), in_shard


def _lse_and_label_logit(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, real_columns: int,
                         vocab_start: int, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of one chunk, in fp32: log Σ exp over the real columns of every shard, and the label's logit."""
    rows = logits.shape[0]
    real = logits[:, :real_columns]  # (n, V_real) view: padded columns are never read
    if real_columns:
        row_max = real.max(dim=-1).values.float()  # (n,)
    else:  # a TP shard that holds only padding: the other shards bring the max
        row_max = torch.full((rows,), -torch.inf, device=logits.device)
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    # (n, V_real) fp32, a copy even when the logits are fp32 already (the in-place exp must not touch them).
    shifted = real.to(torch.float32, copy=True).sub_(row_max[:, None])
    local, in_shard = _local_labels(labels, keep, real_columns, vocab_start)
    label_logit = torch.zeros(rows, device=logits.device)
    if real_columns:
        label_logit = torch.where(in_shard, shifted.gather(1, local[:, None]).squeeze(1), 0.0)
    sums = torch.stack((shifted.exp_().sum(dim=-1), label_logit))  # (2, n)
    if group is not None:
        dist.all_reduce(sums, group=group)  # Σ exp over all shards; the label's logit from the one shard holding it
    return row_max + sums[0].log(), row_max + sums[1]


# ---------------------------------------------------------------------------------------------------------------------
# Fused lm_head + cross entropy (parallel.lm_loss=fused_linear)


def fused_linear_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                         tp_rank: int = 0, tp_group: Any = None, ignore_index: int = -100,
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES, z_loss: ZLoss | None = None) -> torch.Tensor:
    """lm_head and the loss in one: hidden (B, T, H) after the final norm, weight (V_padded/tp, H) = this rank's
    lm_head.weight, labels (B, T) → the same mean loss as the chunked loss over `hidden @ weight.T`, but no logits
    exist beyond one chunk of tokens: neither the (B, T, V) logits nor their gradient (2 × 1 GB in bf16 at the 1B
    micro-batch). The gradients are computed chunk by chunk in the forward, while each chunk's logits exist (the
    method of Liger-Kernel's fused linear cross entropy, here in plain torch), and scaled by the incoming gradient in
    backward: the same three matmuls per chunk as lm_head's forward and backward, nothing recomputed. Kept for
    backward: the hidden states' gradient (B·T × H fp32) and the weight's (V/tp × H fp32). Without grad (evaluation)
    only the loss is computed.

    Under TP (tp_group given) each rank holds V/tp rows of the weight; per chunk the row max, Σ exp and the label's
    logit are reduced over the group as in `chunked_vocab_parallel_lm_loss`, so every rank returns the same loss, its
    own rows' weight gradient and its partial hidden-state gradient: the caller hands the hidden states through
    megatron's copy-to / gather-from-sequence-parallel region, whose backward sums those partials as lm_head's
    would."""
    flat_hidden = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])  # (T*B, H): free for Llama's (T, B) layout
    flat_labels = labels.transpose(0, 1).reshape(-1)
    shard_rows = weight.shape[0]
    vocab_start = tp_rank * shard_rows
    real_columns = min(max(vocab_size - vocab_start, 0), shard_rows)  # the last ranks may hold only padding
    # From the shard width, not the real columns: every TP rank must run the same number of chunks (collectives).
    rows_per_chunk = max(1, chunk_bytes // (4 * shard_rows))
    return _FusedLinearCrossEntropy.apply(flat_hidden, weight, flat_labels, real_columns, vocab_start, tp_group,
                                          ignore_index, rows_per_chunk, z_loss)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, real_columns: int,
                vocab_start: int, group: Any, ignore_index: int, rows_per_chunk: int,
                z_loss: ZLoss | None) -> torch.Tensor:
        keep = labels != ignore_index
        real_weight = weight[:real_columns]  # (V_real, H) view: padding rows never enter the softmax
        # needs_input_grad is False for both under torch.no_grad() (evaluation): then only the loss is computed.
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_grad else None
        grad_weight = torch.zeros(real_weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_weight = 0.0 if z_loss is None else z_loss.weight
        all_lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device) if z_weight else None
        for start in range(0, hidden.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            logits = hidden[rows] @ real_weight.t()  # (n, V_real): the only logits that exist
            lse, label_logit = _lse_and_label_logit(logits, labels[rows], keep[rows], real_columns, vocab_start,
                                                    group)
            loss_sum += ((lse - label_logit) * keep[rows]).sum()
            if all_lse is not None:
                all_lse[rows] = lse
            if want_grad:
                grad_logits = _softmax_minus_one_hot(logits, lse, labels[rows], keep[rows], real_columns,
                                                     vocab_start, z_loss_weight=z_weight).to(hidden.dtype)
                grad_hidden[rows] = grad_logits @ real_weight  # in the model dtype, as lm_head's backward would
                grad_weight += grad_logits.t() @ hidden[rows]  # (V, H) in the model dtype, summed in fp32
        count = keep.sum()
        if z_loss is not None and want_grad:
            z_loss.record(all_lse, keep, count)
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.padded_rows = weight.shape[0]
        return loss_sum / count  # all labels ignored: 0/0 = NaN, like torch's cross_entropy

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight, count = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        scale = grad_loss.float() / count.clamp(min=1)  # fp16: the loss scale is applied in fp32, then rounded once
        # Scaled and rounded straight into the outputs (out=): no second fp32 copy of either gradient.
        grad_w = torch.zeros((ctx.padded_rows, grad_weight.shape[1]), dtype=weight_dtype, device=grad_weight.device)
        torch.mul(grad_weight, scale, out=grad_w[: grad_weight.shape[0]])  # padding rows stay exactly zero
        grad_h = torch.mul(grad_hidden, scale, out=torch.empty(grad_hidden.shape, dtype=hidden_dtype,
                                                               device=grad_hidden.device))
        return grad_h, grad_w, None, None, None, None, None, None, None


def _softmax_minus_one_hot(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
                           real_columns: int, vocab_start: int, scale: torch.Tensor | None = None,
                           z_loss_weight: float = 0.0) -> torch.Tensor:
    """d(Σ loss)/d logits for one chunk of this shard's real columns, fp32: softmax − one-hot (the one where this
    shard holds the label), times `scale` if given, zero on ignored rows. lse: the log Σ exp over every shard.
    With a z-loss, + z_loss_weight · d(lse²)/d logits = 2 · z_loss_weight · lse · softmax."""
    probs = logits.to(torch.float32, copy=True).sub_(lse[:, None]).exp_()
    if z_loss_weight:
        probs.mul_((1.0 + 2.0 * z_loss_weight * lse)[:, None])
    local, in_shard = _local_labels(labels, keep, real_columns, vocab_start)
    hit = in_shard.nonzero().squeeze(1)
    probs[hit, local[hit]] -= 1.0
    return probs.mul_((keep if scale is None else keep * scale)[:, None])
