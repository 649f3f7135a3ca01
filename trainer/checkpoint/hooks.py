"""Where checkpointing attaches to the fit loop: resume at the start, save triggers after each step, a final save.

    signals = StopSignals.install()                  # first thing in train(): a signal during start-up is kept
    checkpointer = Checkpointer(run, signals, progress=watchdog.beat)
    hooks = [ResumeHook(checkpointer), MetricsHook(...), CheckpointHook(checkpointer)]

Triggers (checked after every step, agreed by all ranks with one small all-reduce so they save and stop at the
same step): every checkpoint.save_interval_steps; every checkpoint.save_interval_minutes (rank 0's clock); SIGUSR1
or SIGTERM (finish the step, save, stop with state.stop_reason = "preempted" → exit code 75, trainer.exit_codes);
and after the last step (checkpoint.save_at_end).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.checkpoint.layout import CheckpointCompatibilityError, step_dir_name
from trainer.checkpoint.load import (
    Loaded,
    check_compatible,
    choose_valid,
    find_resume_checkpoint,
    load_checkpoint,
    load_data_state,
    saved_config,
    shared_candidates,
)
from trainer.checkpoint.save import CheckpointSaver
from trainer.hooks import Hook, RunContext, StepOutput, TrainState
from trainer.stragglers import STOP_REASON as STRAGGLER_STOP

log = logging.getLogger(__name__)
PREEMPTED = "preempted"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignals:
    """SIGUSR1 / SIGTERM set a flag (the handler does nothing else: it may interrupt any Python code); the
    checkpoint hook acts on it after the current step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @classmethod
    def install(cls) -> StopSignals:
        signals = cls()
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for signum in STOP_SIGNALS:
                signals._previous[signum] = signal.signal(signum, signals._handle)
        else:
            log.warning("training runs outside the main thread: SIGUSR1/SIGTERM will not trigger a checkpoint")
        return signals

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


@dataclass
class SaveSchedule:
    interval_steps: int  # 0: off
    interval_minutes: float  # 0: off
    last_save_s: float = 0.0

    def step_due(self, step: int) -> bool:
        return self.interval_steps > 0 and step % self.interval_steps == 0

    def time_due(self, now_s: float) -> bool:
        return self.interval_minutes > 0 and now_s - self.last_save_s >= 60.0 * self.interval_minutes


@dataclass(frozen=True)
class Rollback:
    step: int  # the step training continues from
    consumed_samples_at_checkpoint: int  # the skipped data window is [this, the loader's position now)
    consumed_tokens: int  # trained tokens at the checkpoint: the steps after it are undone


class Checkpointer:
    """Saves and loads checkpoints of one run; every method is collective (every rank, same order)."""

    def __init__(self, run: RunContext, signals: StopSignals, progress: Callable[[], None] = lambda: None) -> None:
        cfg = run.cfg.checkpoint
        self.cfg = cfg
        self.root = Path(run.derived.checkpoint_dir)
        self.signals = signals
        self.progress = progress
        self.saver = CheckpointSaver(self.root, run.ctx, cfg.commit_timeout_s, cfg.keep_last, progress)
        self.schedule = SaveSchedule(cfg.save_interval_steps, cfg.save_interval_minutes, time.monotonic())
        self.last_saved_step: int | None = None
        self._state_providers: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {}
        self._healthy: Callable[[], bool] = lambda: True
        self._postponed = False

    def register_state(self, name: str, get: Callable[[], Any], set_: Callable[[Any], None]) -> None:
        """JSON state of another hook (e.g. fault counters) to save in metadata.json and restore on resume."""
        self._state_providers[name] = (get, set_)

    def postpone_saves_while(self, unhealthy: Callable[[], bool]) -> None:
        """Interval saves wait while `unhealthy()` (e.g. inside a streak of skipped NaN steps), so the newest
        checkpoint, which a rollback returns to, is one from before the trouble. Signal and final saves do not wait."""
        self._healthy = lambda: not unhealthy()

    # -- resume ----------------------------------------------------------------------------------------------------
    def resume(self, run: RunContext, state: TrainState) -> Loaded | None:
        # The build chose already when checkpoint.init_from is set (nothing writes checkpoints in between).
        ckpt = run.resume_choice.checkpoint if run.resume_choice else find_resume_checkpoint(run.cfg, run.ctx)
        if ckpt is None:
            log.info("no checkpoint to resume from (checkpoint.resume=%s): starting at step 0", self.cfg.resume)
            return None
        data_changed, notes = check_compatible(saved_config(ckpt), run.cfg)
        loaded = load_checkpoint(run, ckpt, restore_data=False, progress=self.progress)
        self._restore_data(run, loaded, data_changed)
        for name, (_, set_) in self._state_providers.items():
            if name in loaded.metadata["trainer_state"]:
                set_(loaded.metadata["trainer_state"][name])
        state.step = self.last_saved_step = loaded.step
        state.consumed_tokens = loaded.consumed_tokens
        topology = loaded.metadata["topology"]
        log.info("resumed from %s: step %d, %d tokens trained, data position %d samples; saved with tp %d pp %d "
                 "dp %d zero %d, now tp %d pp %d dp %d zero %d", ckpt, loaded.step, loaded.consumed_tokens,
                 loaded.consumed_samples, topology["tp"], topology["pp"], topology["dp"], topology["zero_stage"],
                 run.ctx.tp, run.ctx.pp, run.ctx.dp, run.cfg.zero.stage)
        if notes:
            log.info("config changes since the checkpoint: %s", "; ".join(notes))
        return loaded

    def _restore_data(self, run: RunContext, loaded: Loaded, data_changed: bool) -> None:
        try:
            if not data_changed:
                load_data_state(run, loaded.metadata)
                return
        except CheckpointCompatibilityError:
            if not self.cfg.allow_data_change:
                raise
        log.warning("checkpoint.allow_data_change: the data differs from the checkpoint's (fingerprint %s); the new "
                    "data stream starts at its first sample", loaded.metadata["data"]["fingerprint"])

    # -- save ------------------------------------------------------------------------------------------------------
    def save(self, run: RunContext, state: TrainState, reason: str, *, blocking: bool) -> None:
        """reason: interval | time | signal | straggler | end (recorded as metadata.json "save_reason")."""
        extra = {name: get() for name, (get, _) in self._state_providers.items()}
        background = self.cfg.async_save and not blocking
        self.saver.save(run, state, extra, reason, background=background)
        self.last_saved_step = state.step
        self.schedule.last_save_s = time.monotonic()

    def step_end(self, run: RunContext, state: TrainState) -> None:
        if self.last_saved_step == state.step:
            return  # e.g. just rolled back to this very checkpoint
        if state.stop_reason == STRAGGLER_STOP:  # set on every rank alike (trainer/stragglers.py)
            self.save(run, state, "straggler", blocking=True)
            self.saver.wait()
            return
        flags = torch.tensor([self.signals.received is not None,
                              run.ctx.rank == 0 and self.schedule.time_due(time.monotonic())],
                             dtype=torch.int32, device=run.ctx.device)
        # Before deciding: a signal reaches the ranks at different moments and only rank 0's clock counts, so every
        # rank must save (and stop) after the same step.
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        preempted, time_due = (bool(v) for v in flags.tolist())
        if preempted:
            log.warning("stop signal received: saving a checkpoint after step %d, then exiting to be requeued",
                        state.step)
            self.save(run, state, "signal", blocking=True)
            self.saver.wait()
            state.stop_reason = PREEMPTED
        elif self.schedule.step_due(state.step) or time_due or self._postponed:
            if not self._healthy():
                self._postponed = True  # the flags above are identical on every rank, and so is health
                return
            self._postponed = False
            self.save(run, state, "interval" if self.schedule.step_due(state.step) else "time", blocking=False)

    def train_end(self, run: RunContext, state: TrainState) -> None:
        if self.cfg.save_at_end and self.last_saved_step != state.step:
            self.save(run, state, "end", blocking=True)
        self.saver.wait()  # an async save must be complete before the process exits

    # -- rollback (used by the NaN guard) --------------------------------------------------------------------------
    def rollback(self, run: RunContext, state: TrainState) -> Rollback | None:
        """Reload the newest intact checkpoint (weights, optimizer, LR schedule) but keep the data position, so the
        window since that checkpoint is skipped. None if there is no checkpoint."""
        self.saver.wait()
        ckpt = choose_valid(shared_candidates(self.root, run.ctx), run.ctx, self.cfg.verify_on_load)
        if ckpt is None:
            return None
        loaded = load_checkpoint(run, ckpt, restore_data=False, progress=self.progress)
        self.last_saved_step = loaded.step
        self._postponed = False  # the save that waited for the streak to end is behind us now
        return Rollback(loaded.step, loaded.consumed_samples, loaded.consumed_tokens)


class ResumeHook(Hook):
    """First in the hook list: restores state before any other hook (metrics, progress bar) reads `state.step`."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer

    def on_train_start(self, run: RunContext, state: TrainState) -> None:
        self.checkpointer.resume(run, state)


class CheckpointHook(Hook):
    """After MetricsHook: a step is logged before it is saved."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer

    def on_step_end(self, run: RunContext, state: TrainState, out: StepOutput) -> None:
        self.checkpointer.step_end(run, state)

    def on_train_end(self, run: RunContext, state: TrainState) -> None:
        self.checkpointer.train_end(run, state)
        if state.stop_reason == PREEMPTED:
            log.warning("stopped after step %d on a signal; checkpoint %s is complete: exiting with the requeue code",
                        state.step, step_dir_name(state.step))
        elif state.stop_reason == STRAGGLER_STOP:
            log.warning("stopped after step %d to leave a straggler's node out; checkpoint %s is complete: exiting "
                        "with the straggler code", state.step, step_dir_name(state.step))
