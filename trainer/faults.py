"""Numerical faults and hangs, as hooks: `StepGuard` (skip NaN/inf and loss-spike steps, roll back after a streak)
and `Watchdog` (stack dumps and a distinct exit code when no step finishes for faults.hang_timeout_s).

How a step is skipped. DeepSpeed's ZeRO-1/2/3, BF16 and fp16 optimizers already refuse a step whose global gradient
norm is NaN/inf: they drop the gradients, leave weights, moments and Adam step alone, and the engine then does not
advance the LR schedule (`_take_model_step`: overflow → skipped_steps += 1). The plain torch optimizer (fp32 without
ZeRO) does not, and nothing refuses a finite loss spike. The guard closes both gaps at one point every layout passes:
it wraps `engine._take_model_step` (called by DeepSpeedEngine.step and by the pipeline's optimizer instruction, on
every rank) and decides there, before the update, from the step's global mean loss and (plain optimizer) the
gradients' finiteness, with one all-reduce. A skip decided by the guard turns the base optimizer's `step()` into a
no-op and raises the wrapper's `overflow` flag, so DeepSpeed's own skip bookkeeping runs unchanged.

The step's loss is recorded by wrapping the model's loss function (pass-through; reset at each step start, so
evaluation losses never count). After `faults.rollback_after_bad_steps` consecutive skipped steps the guard asks
the checkpointer to reload the newest checkpoint while the data loader keeps its position: the data window since
that checkpoint is skipped (and logged). After faults.max_rollbacks rollbacks, or without a checkpoint, training
stops with exit code trainer.exit_codes.DIVERGED.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import functools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer import exit_codes
from trainer.bootstrap import node_name
from trainer.config import FaultsConfig
from trainer.hooks import Hook, RunContext, StepOutput, TrainState

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Training cannot continue on finite numbers; the message says what was tried and what to look at."""

    exit_code = exit_codes.DIVERGED


class SpikeDetector:
    """z-score of a loss against the last `window` applied steps' losses (sample standard deviation)."""

    def __init__(self, window: int) -> None:
        self.losses: collections.deque[float] = collections.deque(maxlen=window)

    def zscore(self, loss: float) -> float | None:
        """None until the window is full (too little history to call anything a spike)."""
        if len(self.losses) < (self.losses.maxlen or 0):
            return None
        mean = sum(self.losses) / len(self.losses)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / (len(self.losses) - 1))
        return (loss - mean) / std if std > 0 else (0.0 if loss == mean else math.inf)

    def add(self, loss: float) -> None:
        self.losses.append(loss)


class StepGuard(Hook):
    """Skips bad updates, counts and logs them, rolls back after a streak (see the module docstring)."""

    def __init__(self, cfg: FaultsConfig, rollback: Callable[[RunContext, TrainState], Any] | None) -> None:
        self.cfg = cfg
        self.rollback = rollback
        self.spikes = SpikeDetector(cfg.loss_spike_window_steps)
        self.skipped_total = 0
        self.rollbacks = 0
        self.skipped_windows: list[dict[str, int]] = []  # data windows skipped by rollbacks (global samples)
        self._consecutive = 0
        self._losses: list[torch.Tensor] = []
        self._verdict: str | None = None  # this step's reason to skip (decided by the guard), or None
        self._skip = False
        self._step_loss = math.nan
        self._applied = True
        self._plain_optimizer = False

    # -- state saved with checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"skipped_steps_total": self.skipped_total, "rollbacks": self.rollbacks,
                "skipped_windows": list(self.skipped_windows)}

    def load_state(self, saved: dict[str, Any]) -> None:
        self.skipped_total = int(saved["skipped_steps_total"])
        self.rollbacks = int(saved["rollbacks"])
        self.skipped_windows = list(saved["skipped_windows"])

    def in_bad_streak(self) -> bool:
        """The last step was skipped (checkpoints wait for a good step; same answer on every rank)."""
        return self._consecutive > 0

    # -- installation ----------------------------------------------------------------------------------------------
    def on_train_start(self, run: RunContext, state: TrainState) -> None:
        engine = run.engine
        if getattr(engine, "_pretrain_step_guard", None) is self:
            return  # fit() called again on the same engine (benchmarks): the wrappers are in place
        engine._pretrain_step_guard = self
        holder = engine.module if run.model.is_pipeline else run.model  # who the loop calls loss_fn through
        holder.loss_fn = functools.partial(self._recording_loss, holder.loss_fn)
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)
        self._plain_optimizer = base is engine.optimizer
        base.step = functools.partial(self._gated_base_step, base.step, engine.optimizer)
        engine._take_model_step = functools.partial(self._guarded_take_model_step, engine._take_model_step, run)

    def _recording_loss(self, loss_fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = loss_fn(*args, **kwargs)
        self._losses.append(loss.detach().float())
        return loss

    def _gated_base_step(self, step: Callable[..., Any], wrapper: Any, *args: Any, **kwargs: Any) -> Any:
        if self._skip:
            wrapper.overflow = True  # read by DeepSpeed right after optimizer.step(): skip bookkeeping, no LR step
            return None
        return step(*args, **kwargs)

    def _guarded_take_model_step(self, take_model_step: Callable[..., Any], run: RunContext, *args: Any,
                                 **kwargs: Any) -> Any:
        self._verdict = self._decide(run)
        self._skip = self._verdict is not None
        engine = run.engine
        if self._plain_optimizer:
            engine.optimizer.overflow = False  # a torch optimizer has no flag of its own; ours is read after step()
        skipped_before = engine.skipped_steps
        try:
            return take_model_step(*args, **kwargs)
        finally:
            self._skip = False
            self._applied = engine.skipped_steps == skipped_before

    def _decide(self, run: RunContext) -> str | None:
        """Before the update, on every rank: the global mean loss of this step (loss-computing ranks only) and, for
        the plain optimizer, whether any gradient is NaN/inf. One all-reduce over the world."""
        ctx = run.ctx
        local = torch.stack(self._losses).sum() if self._losses else torch.zeros((), device=ctx.device)
        bad_grads = self._plain_optimizer and self.cfg.skip_nonfinite and _has_nonfinite_grad(run.engine)
        packed = torch.stack([local.double().to(ctx.device),
                              torch.tensor(float(len(self._losses)), dtype=torch.float64, device=ctx.device),
                              torch.tensor(float(bad_grads), dtype=torch.float64, device=ctx.device)])
        dist.all_reduce(packed)  # SUM: TP ranks repeat the same loss, which leaves the mean unchanged
        loss_sum, count, grads_bad = packed.tolist()
        self._step_loss = loss_sum / count if count else math.nan
        if count and self.cfg.skip_nonfinite and not math.isfinite(self._step_loss):  # count 0: no loss seen
            return f"non-finite loss ({self._step_loss})"
        if grads_bad:
            return "non-finite gradients"
        if self.cfg.loss_spike_zscore > 0:
            z = self.spikes.zscore(self._step_loss)
            if z is not None and z > self.cfg.loss_spike_zscore:
                return f"loss spike (loss {self._step_loss:.4f}, z-score {z:.1f} > {self.cfg.loss_spike_zscore})"
        return None

    # -- after the step --------------------------------------------------------------------------------------------
    def on_step_start(self, run: RunContext, state: TrainState) -> None:
        self._losses.clear()  # evaluation since the last step also called the loss function

    def on_step_end(self, run: RunContext, state: TrainState, out: StepOutput) -> None:
        reason = self._verdict
        if reason is None and not self._applied:
            if run.engine.fp16_enabled():
                return  # an fp16 loss-scale overflow: DeepSpeed's scaler handles it, not a fault
            reason = "non-finite gradient norm"
        self._verdict = None
        if reason is None:
            self._consecutive = 0
            if math.isfinite(self._step_loss):
                self.spikes.add(self._step_loss)
            return
        self.skipped_total += 1
        self._consecutive += 1
        log.warning("step %d skipped: %s (%d in a row, %d skipped in this run)", state.step, reason,
                    self._consecutive, self.skipped_total)
        if self.cfg.rollback_after_bad_steps and self._consecutive >= self.cfg.rollback_after_bad_steps:
            self._roll_back(run, state)

    def _roll_back(self, run: RunContext, state: TrainState) -> None:
        if self.rollbacks >= self.cfg.max_rollbacks or self.rollback is None:
            raise TrainingDiverged(
                f"{self._consecutive} consecutive steps were skipped (NaN/inf or loss spikes) after "
                f"{self.rollbacks} rollback(s) (faults.max_rollbacks={self.cfg.max_rollbacks}): training does not "
                f"recover. Look at the data windows in the log, lower optim.lr, then restart from a checkpoint")
        consumed_now = int(run.train_loader.state_dict()["consumed_samples"])
        back = self.rollback(run, state)
        if back is None:
            raise TrainingDiverged(
                f"{self._consecutive} consecutive steps were skipped (NaN/inf or loss spikes) and there is no "
                f"checkpoint to roll back to: lower optim.lr or check the data, and save more often "
                f"(checkpoint.save_interval_steps)")
        window = {"from_step": back.step, "to_step": state.step,
                  "first_sample": back.consumed_samples_at_checkpoint, "end_sample": consumed_now}
        self.skipped_windows.append(window)
        self.rollbacks += 1
        log.warning("rolled back from step %d to the checkpoint of step %d (rollback %d of at most %d); skipping "
                    "the data window of global samples [%d, %d)", state.step, back.step, self.rollbacks,
                    self.cfg.max_rollbacks, window["first_sample"], window["end_sample"])
        state.step, state.consumed_tokens = back.step, back.consumed_tokens
        self._consecutive = 0


def _has_nonfinite_grad(engine: Any) -> bool:
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return False
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])  # one fused pass; NaN/inf propagate
    return not bool(torch.isfinite(norms).all())


# ---------------------------------------------------------------------------------------------------------------------
# Watchdog


class Watchdog(Hook):
    """A daemon thread per rank: if no heartbeat arrives for `timeout_s` (steps beat at start and end, checkpoint
    saves and loads beat per tensor and file), dump every thread's Python stack to this rank's log and stderr, then
    exit with trainer.exit_codes.HANG. Every rank has its own: peers stuck in a collective with the hung rank time
    out too, so every rank's stacks end up in the logs.

    `record_path` (under Slurm: the batch script's task records, launch/hung_nodes.py) gets one line when it fires,
    `<unix time> <poll_s> <grace_s> <node>`: the ranks that were running fire within a poll interval of each other,
    so one that fires a grace period later was not running when its peers did (stopped, or frozen, then woken)."""

    def __init__(self, timeout_s: float, log_path: Path | None, record_path: Path | None = None) -> None:
        self.timeout_s = timeout_s
        self.log_path = log_path
        self.record_path = record_path
        self.poll_s = min(5.0, max(0.1, timeout_s / 10))
        # Before exiting: peers stuck in a collective with this rank would fail the moment it exits, with a
        # connection error instead of their own stack dump. Their watchdogs fire within a poll interval of ours.
        self.grace_s = min(10.0, max(1.0, timeout_s / 2))
        self._last_beat_s = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self._last_beat_s = time.monotonic()

    def on_train_start(self, run: RunContext, state: TrainState) -> None:
        if self.timeout_s <= 0:
            return
        self.beat()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
        self._thread.start()

    def on_step_start(self, run: RunContext, state: TrainState) -> None:
        self.beat()

    def on_step_end(self, run: RunContext, state: TrainState, out: StepOutput) -> None:
        self.beat()

    def on_train_end(self, run: RunContext, state: TrainState) -> None:
        self.beat()  # still watching: the final save comes after this hook (trainer.train stops the thread)

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            silent_s = time.monotonic() - self._last_beat_s
            if silent_s > self.timeout_s:
                self._fire(silent_s)

    def _fire(self, silent_s: float) -> None:
        if self.record_path is not None:
            with contextlib.suppress(OSError):  # the record helps choose nodes; the exit must happen regardless
                self.record_path.write_text(f"{time.time():.3f} {self.poll_s:g} {self.grace_s:g} {node_name()}\n")
        message = (f"watchdog: no training progress for {silent_s:.0f} s (faults.hang_timeout_s={self.timeout_s:g}); "
                   f"Python stacks of every thread follow; exiting with code {exit_codes.HANG}")
        log.error(message)
        for handler in logging.getLogger().handlers:
            handler.flush()
        if self.log_path is not None:
            with self.log_path.open("a", encoding="utf-8") as stream:
                stream.write(message + "\n")
                stream.flush()
                faulthandler.dump_traceback(file=stream, all_threads=True)
        print(message, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        time.sleep(self.grace_s)  # the peers' own dumps first (see __init__)
        # os._exit: the main thread is stuck (maybe inside a collective); normal exit would wait for it forever.
        os._exit(exit_codes.HANG)
