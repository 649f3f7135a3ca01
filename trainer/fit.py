"""The training loop: `fit` runs optimizer steps and calls the hooks; `train_step` is one optimizer step.

Everything that is not the step itself (logging, throughput, checkpoints, preemption) is a hook (trainer.hooks).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from trainer.downstream import score_tasks
from trainer.hooks import EvalOutput, Hook, RunContext, StepOutput, TrainState


class TimedBatches:
    """The training iterator, timing how long each `next` waits for the data loader (and leaving the eos positions
    out of the labels under train.mask_eos_loss)."""

    def __init__(self, batches: Iterator[Any], eos_loss_masked: int | None = None) -> None:
        self._batches = batches
        self._eos_loss_masked = eos_loss_masked
        self._wait_s = 0.0

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> Any:
        start_s = time.perf_counter()
        batch = next(self._batches)
        self._wait_s += time.perf_counter() - start_s
        return mask_eos_labels(batch, self._eos_loss_masked)

    def take_wait_s(self) -> float:
        wait_s, self._wait_s = self._wait_s, 0.0
        return wait_s

    def close(self) -> None:
        """Stop the loader's worker processes now (the data pipeline's iterator shuts them down when closed). Left
        to interpreter exit, multiprocessing would SIGTERM them and join: a worker forked after the stop-signal hook
        installed its handler only sets a flag, and the rank hangs in that join (seen under PP, where DeepSpeed's
        engine keeps the iterator alive past `fit`)."""
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()


def mask_eos_labels(batch: tuple[torch.Tensor, torch.Tensor], eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) with labels ignored (-100, the losses' ignore_index) where the input token is `eos_id`: the
    prediction made from a document's end (train.mask_eos_loss). Unchanged when eos_id is None."""
    if eos_id is None:
        return batch
    tokens, labels = batch
    return tokens, labels.masked_fill(tokens == eos_id, -100)


def token_weighted(batches: list[tuple[torch.Tensor, torch.Tensor]], run: RunContext) -> list[tuple[Any, Any]]:
    """`batches` (this DP rank's micro-batches of one global batch) as (tokens, (labels, scale)): scale = kept_i ×
    micro-batches × dp / kept in the whole global batch (summed over DP). The engine averages the micro-batch losses
    over micro-steps and DP ranks; each being its mean over its kept tokens times its scale, that average is the mean
    over every kept token of the global batch, as HF computes it, whatever the split (parallelize._token_weighted
    applies the scale). Collective over the DP group."""
    kept = torch.tensor([float((labels != -100).sum()) for _, labels in batches], dtype=torch.float64)
    total = kept.sum().to(run.ctx.device)
    dist.all_reduce(total, group=run.ctx.dp_group)
    scales = (kept * len(batches) * run.ctx.dp / total.cpu()).float()
    return [(tokens, (labels, scale)) for (tokens, labels), scale in zip(batches, scales, strict=True)]


def fit(run: RunContext, hooks: Hook) -> TrainState:
    """Train until train.max_steps (or until a hook sets state.stop_reason); return the final state."""
    state = TrainState()
    hooks.on_train_start(run, state)  # a checkpointer restores engine, loader and state.step here
    # After on_train_start: the iterator starts where the (possibly just restored) loader state says.
    batches = TimedBatches(iter(run.train_loader), run.eos_loss_masked)
    max_steps, eval_interval = run.cfg.train.max_steps, run.cfg.train.eval_interval_steps
    ramp_sizes = run.cfg.train.ramp_batch_sizes()
    try:
        while state.step < max_steps and state.stop_reason is None:
            hooks.on_step_start(run, state)
            batch_size = run.cfg.train.batch_size_at(state.step, ramp_sizes)
            if ramp_sizes:  # batch-size warmup: this step's accumulation steps
                run.engine.set_train_batch_size(batch_size)
            lr = run.engine.get_lr()[0]  # read before the step: the engine advances the schedule inside it
            start_s = time.perf_counter()
            loss = train_step(run, batches, explicit_boundary=bool(ramp_sizes))
            state.step += 1
            state.consumed_tokens += batch_size * run.cfg.train.seq_len
            hooks.on_step_end(run, state, StepOutput(state.step, loss, lr, time.perf_counter() - start_s,
                                                     batches.take_wait_s(), batch_size))
            if run.eval_loader is not None and eval_interval and (
                    state.step % eval_interval == 0 or state.step == max_steps):
                hooks.on_eval(run, state, evaluate(run, state.step))
    finally:
        batches.close()
    hooks.on_train_end(run, state)
    return state


def train_step(run: RunContext, batches: Iterator[Any], explicit_boundary: bool = False) -> torch.Tensor:
    """One optimizer step over the engine's gradient_accumulation_steps() micro-batches. Returns the mean loss as a
    tensor (no host sync). `explicit_boundary`: tell DeepSpeed which micro-step ends the step; its own rule, a running
    micro-step count modulo the accumulation steps, is wrong once a batch-size warmup changes them."""
    engine = run.engine
    accumulation_steps = engine.gradient_accumulation_steps()
    if run.eos_loss_masked is not None:  # a mean over the kept tokens of the whole step, not per micro-batch
        batches = iter(token_weighted([next(batches) for _ in range(accumulation_steps)], run))
    if run.model.is_pipeline:
        # DeepSpeed's 1F1B schedule pulls grad_accum micro-batches (first and last stage), interleaves forward and
        # backward across stages, reduces gradients over DP and steps the optimizer. Its loss is the global mean.
        return engine.train_batch(batches)
    total = torch.zeros((), device=run.ctx.device)
    for micro_step in range(accumulation_steps):
        if explicit_boundary:
            engine.set_gradient_accumulation_boundary(micro_step == accumulation_steps - 1)
        tokens, labels = next(batches)
        # The logits; under parallel.lm_loss=fused_linear the normed hidden states, which the loss turns into logits.
        outputs = engine(tokens.to(run.ctx.device, non_blocking=True))
        loss = run.model.loss_fn(outputs, _to_device(labels, run.ctx.device))
        engine.backward(loss)  # scales by 1/grad_accum; the last micro-step reduces gradients over DP
        engine.step()  # steps optimizer and LR schedule only at the accumulation boundary
        total += loss.detach()
    return total / accumulation_steps


@torch.no_grad()
def evaluate(run: RunContext, step: int) -> EvalOutput:
    """Mean loss over the validation pass of every DP rank (every rank gets the same value): over every micro-batch
    of every validation dataset, and, with several datasets, each one's own."""
    assert run.eval_loader is not None
    passes = getattr(run.eval_loader, "passes", {"": run.eval_loader})  # name -> loader
    means = {name: _eval_pass(run, loader) for name, loader in passes.items()}
    sizes = {name: len(loader) for name, loader in passes.items()}
    num_microbatches = sum(sizes.values())
    loss = sum(means[name] * sizes[name] for name in passes) / num_microbatches
    tasks = score_tasks(run, run.tasks) if run.tasks is not None else []
    return EvalOutput(step, loss, num_microbatches, means if len(passes) > 1 else {}, tasks)


def _eval_pass(run: RunContext, loader: Any) -> float:
    """Mean loss over one validation dataset's micro-batches on every DP rank."""
    batches: Any = loader
    if run.eos_loss_masked is not None:  # the pass's mean over its kept tokens, as in training
        batches = token_weighted([mask_eos_labels(batch, run.eos_loss_masked) for batch in loader], run)
    if run.model.is_pipeline:
        # Runs the forward schedule over the stages, averages over micro-batches and DP, broadcasts to every stage.
        return float(run.engine.eval_batch(iter(batches), num_micro_batches=len(loader)))
    run.engine.eval()
    total = torch.zeros((), device=run.ctx.device)
    for tokens, labels in batches:
        outputs = run.engine(tokens.to(run.ctx.device, non_blocking=True))
        total += run.model.loss_fn(outputs, _to_device(labels, run.ctx.device)).float()
    run.engine.train()
    dist.all_reduce(total, group=run.ctx.dp_group)
    return total.item() / (len(loader) * run.ctx.dp)


def _to_device(labels: Any, device: torch.device) -> Any:
    """Labels, or (labels, scale) under train.mask_eos_loss, on `device`."""
    if isinstance(labels, tuple):
        return tuple(part.to(device, non_blocking=True) for part in labels)
    return labels.to(device, non_blocking=True)
