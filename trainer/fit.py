"""The training loop: `fit` runs optimizer steps and calls the hooks; `train_step` is one optimizer step.

Everything that is not the step itself (logging, throughput, checkpoints, preemption) is a hook (trainer.hooks).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from trainer.hooks import EvalOutput, Hook, RunContext, StepOutput, TrainState


class TimedBatches:
    """The training iterator, timing how long each `next` waits for the data loader."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self._batches = batches
        self._wait_s = 0.0

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> Any:
        start_s = time.perf_counter()
        batch = next(self._batches)
        self._wait_s += time.perf_counter() - start_s
        return batch

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


def fit(run: RunContext, hooks: Hook) -> TrainState:
    """Train until train.max_steps (or until a hook sets state.stop_reason); return the final state."""
    state = TrainState()
    hooks.on_train_start(run, state)  # a checkpointer restores engine, loader and state.step here
    # After on_train_start: the iterator starts where the (possibly just restored) loader state says.
    batches = TimedBatches(iter(run.train_loader))
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
    if run.model.is_pipeline:
        # DeepSpeed's 1F1B schedule pulls grad_accum micro-batches (first and last stage), interleaves forward and
        # backward across stages, reduces gradients over DP and steps the optimizer. Its loss is the global mean.
        return engine.train_batch(batches)
    total = torch.zeros((), device=run.ctx.device)
    accumulation_steps = engine.gradient_accumulation_steps()
    for micro_step in range(accumulation_steps):
        if explicit_boundary:
            engine.set_gradient_accumulation_boundary(micro_step == accumulation_steps - 1)
        tokens, labels = next(batches)
        # The logits; under parallel.lm_loss=fused_linear the normed hidden states, which the loss turns into logits.
        outputs = engine(tokens.to(run.ctx.device, non_blocking=True))
        loss = run.model.loss_fn(outputs, labels.to(run.ctx.device, non_blocking=True))
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
    return EvalOutput(step, loss, num_microbatches, means if len(passes) > 1 else {})


def _eval_pass(run: RunContext, loader: Any) -> float:
    """Mean loss over one validation dataset's micro-batches on every DP rank."""
    if run.model.is_pipeline:
        # Runs the forward schedule over the stages, averages over micro-batches and DP, broadcasts to every stage.
        return float(run.engine.eval_batch(iter(loader), num_micro_batches=len(loader)))
    run.engine.eval()
    total = torch.zeros((), device=run.ctx.device)
    for tokens, labels in loader:
        outputs = run.engine(tokens.to(run.ctx.device, non_blocking=True))
        total += run.model.loss_fn(outputs, labels.to(run.ctx.device, non_blocking=True)).float()
    run.engine.train()
    dist.all_reduce(total, group=run.ctx.dp_group)
    return total.item() / (len(loader) * run.ctx.dp)
