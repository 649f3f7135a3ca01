"""Where a training step's time goes: torch.profiler over a window of optimizer steps (`profiling.*` in the config).

Per profiled rank it writes a Chrome/Perfetto trace (`<run_dir>/profile/steps_<a>-<b>/rank<r>_trace.json.gz`, open it
in https://ui.perfetto.dev) and a summary JSON next to it, and logs one line: the window's wall time, on a GPU the
fraction of it the GPU was busy (the union of kernel and copy intervals: what is missing is launch overhead, host
syncs, data waits), and the device time by category (GEMM, attention, inductor's fused kernels, optimizer, loss,
communication, copies, other). On CPU the categories are over the ops' own CPU time instead.

Megatron-LM (--profile, --profile-step-start/end, --profile-ranks) and torchtitan ([profiling]) have the same switch;
the summary line is ours: the first question about a slow step is what share GEMMs get, and it needs no trace viewer.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from trainer.config import ProfilingConfig
from trainer.hooks import Hook, RunContext, StepOutput, TrainState
from trainer.profile_summary import ProfileSummary, TimedOp, summarize

log = logging.getLogger(__name__)


def timed_ops(events: Any, on_gpu: bool) -> list[TimedOp]:
    """torch.profiler's events → what the summary counts. GPU: kernels, copies and memsets as the GPU ran them, not
    the GPU mirrors of record_function ranges (`gpu_user_annotation`: a step-long range would count the whole step as
    busy; torch's own key_averages table leaves them out too). CPU: each op's own time; a step range's own time is the
    host work between ops."""
    from torch.autograd import DeviceType

    if on_gpu:
        return [TimedOp(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in events
                if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    return [TimedOp(e.name, e.time_range.start, e.self_cpu_time_total) for e in events
            if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0]


class StepProfiler:
    """torch.profiler around some steps: start(), the steps, stop() → summary (and the trace written)."""

    def __init__(self, device: torch.device, record_shapes: bool = False, with_stack: bool = False) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.device = device
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self._profile = profile(activities=activities, record_shapes=record_shapes, with_stack=with_stack)
        self._start_s = 0.0

    def start(self) -> None:
        self._sync()  # the window holds only its own steps' work, not what was queued before
        self._start_s = time.perf_counter()
        self._profile.start()

    def stop(self, first_step: int, last_step: int, rank: int, trace: Path | None) -> ProfileSummary:
        self._sync()
        self._profile.stop()
        wall_s = time.perf_counter() - self._start_s
        summary = summarize(self._timed_ops(), wall_s, self.device.type == "cuda", first_step, last_step, rank)
        if trace is not None:
            try:
                trace.parent.mkdir(parents=True, exist_ok=True)
                self._profile.export_chrome_trace(str(trace))  # .gz: torch writes it compressed
                summary.trace = str(trace)
                trace.with_name(trace.name.replace("_trace.json.gz", "_summary.json")).write_text(
                    json.dumps(summary.as_dict(), indent=2) + "\n")
            except OSError as err:  # a full disk must not end a training run over an observation
                log.error("profile trace not written to %s (%s: %s): the run goes on; the summary line follows",
                          trace.parent, type(err).__name__, err.strerror or err)
                summary.trace = None
        return summary

    def _timed_ops(self) -> list[TimedOp]:
        return timed_ops(self._profile.events(), self.device.type == "cuda")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


MEMORY_HISTORY_MAX_ENTRIES = 100_000  # allocation events kept (a ring buffer): tens of steps of a 1B model


class MemorySnapshot:
    """torch.cuda's allocation history (what torch.cuda.memory._dump_snapshot writes, for pytorch.org/memory_viz),
    recorded from start() to save(); an out-of-memory error in between writes `oom_path` before it propagates."""

    def __init__(self, oom_path: Path) -> None:
        self.oom_path = oom_path
        self.recording = False

    def start(self) -> None:
        """Start recording; if this torch cannot (the API is private), say so and let the run go on without it."""
        try:
            # Python stacks only: C++ frames make the dump symbolize for minutes.
            torch.cuda.memory._record_memory_history(stacks="python", max_entries=MEMORY_HISTORY_MAX_ENTRIES)
        except (RuntimeError, TypeError, AttributeError) as err:
            log.error("profiling.memory_snapshot: this torch (%s) cannot record CUDA allocations (%s: %s); the run "
                      "goes on without a snapshot", torch.__version__, type(err).__name__, err)
            return
        attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)  # private, CUDA builds only
        if attach is not None:
            attach(self._on_out_of_memory)
        self.recording = True

    def save(self, path: Path) -> None:
        """Write the snapshot and stop recording (a failed write is logged: the run goes on)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(path))
            log.info("memory snapshot %s (open it in https://pytorch.org/memory_viz)", path)
        except (OSError, RuntimeError) as err:
            log.error("memory snapshot not written to %s (%s: %s): the run goes on", path, type(err).__name__,
                      getattr(err, "strerror", None) or err)
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False

    def _on_out_of_memory(self, device: int, alloc_bytes: int, device_alloc_bytes: int, device_free_bytes: int) -> None:
        if self.recording:
            log.error("out of memory on cuda:%d asking for %.2f GiB (%.2f GiB allocated, %.2f GiB free): saving the "
                      "allocation history", device, alloc_bytes / 2**30, device_alloc_bytes / 2**30,
                      device_free_bytes / 2**30)
            self.save(self.oom_path)


class ProfilerHook(Hook):
    """Profiles optimizer steps profiling.start_step .. start_step + num_steps - 1 once, on this rank; each step is a
    named range (`train_step_<n>`) in the trace. A run that resumes past the window says so and profiles nothing."""

    def __init__(self, cfg: ProfilingConfig, rank: int, device: torch.device, out_dir: Path) -> None:
        self.cfg, self.rank, self.device = cfg, rank, device
        self.trace = out_dir / f"steps_{cfg.start_step}-{cfg.last_step}" / f"rank{rank}_trace.json.gz"
        self.memory = (MemorySnapshot(self.trace.with_name(f"rank{rank}_memory_snapshot_oom.pickle"))
                       if cfg.memory_snapshot and device.type == "cuda" else None)
        self.summary: ProfileSummary | None = None
        self._profiler: StepProfiler | None = None
        self._step_range: Any = None
        self._done = False

    def on_train_start(self, run: RunContext, state: TrainState) -> None:
        if not self._done and state.step >= self.cfg.start_step:
            log.warning("profiling.start_step %d is not after the resumed step %d: nothing is profiled in this run "
                        "(set profiling.start_step > %d)", self.cfg.start_step, state.step, state.step)
            self._done = True
        if not self._done and self.memory is not None:
            self.memory.start()  # from the first step: it allocates the optimizer state, often the peak

    def on_step_start(self, run: RunContext, state: TrainState) -> None:
        step = state.step + 1
        if self._done or not self.cfg.start_step <= step <= self.cfg.last_step:
            return
        if self._profiler is None:
            self._profiler = StepProfiler(self.device, self.cfg.record_shapes, self.cfg.with_stack)
            self._profiler.start()
        self._step_range = torch.profiler.record_function(f"train_step_{step}")
        self._step_range.__enter__()

    def on_step_end(self, run: RunContext, state: TrainState, out: StepOutput) -> None:
        if self._profiler is None:
            return
        self._step_range.__exit__(None, None, None)
        if out.step >= self.cfg.last_step:
            self._finish(out.step)

    def on_train_end(self, run: RunContext, state: TrainState) -> None:
        if self._profiler is not None:  # the run stopped inside the window (preemption, a stop signal)
            self._finish(state.step)
        elif self.memory is not None and self.memory.recording:  # it stopped before the window: what it recorded
            self.memory.save(self.trace.with_name(f"rank{self.rank}_memory_snapshot.pickle"))

    def _finish(self, last_step: int) -> None:
        assert self._profiler is not None
        self.summary = self._profiler.stop(self.cfg.start_step, last_step, self.rank, self.trace)
        self._profiler, self._done = None, True
        log.info(self.summary.line())
        if self.memory is not None and self.memory.recording:
            self.memory.save(self.trace.with_name(f"rank{self.rank}_memory_snapshot.pickle"))
