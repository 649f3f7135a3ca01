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
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.config import ProfilingConfig
from trainer.hooks import Hook, RunContext, StepOutput, TrainState

log = logging.getLogger(__name__)

STEP_RANGE = r"^train_step_\d+$"  # the record_function range around each profiled step

# Kernel / op name → category, the first pattern that matches (lower case). Attention before GEMM: cutlass' fused
# attention kernels say "cutlass" too; inductor's matmul templates (triton_tem_*) before its fused pointwise kernels.
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((name, re.compile(pattern)) for name, pattern in (
    ("communication", r"nccl|gloo|c10d|all_?reduce|reduce_?scatter|all_?gather"),
    ("attention", r"flash|fmha|attention|attn|sdpa|scaled_dot_product"),
    ("gemm", r"gem[mv]|cutlass|cublas|nvjet|xmma|triton_tem_|aten::(mm|addmm|bmm|baddbmm|_scaled_mm)$"),
    ("optimizer", r"adam|multi_tensor_apply|_foreach_"),
    ("loss", r"cross_entropy|softmax|nll_loss"),
    ("fused (inductor)", r"^triton_"),
    ("copies", r"^memcpy|^memset|aten::(copy_|_to_copy|fill_|zero_|clone|cat)$"),
    ("host (outside ops)", STEP_RANGE),  # CPU only: Python, hooks, DeepSpeed bookkeeping between the ops of a step
))
OTHER = "other"
TOP_KERNELS = 12


def category(name: str) -> str:
    lowered = name.lower()
    return next((label for label, pattern in CATEGORIES if pattern.search(lowered)), OTHER)


@dataclass(frozen=True)
class TimedOp:
    """One kernel, copy or (on CPU) op: its name, start and own duration in microseconds."""

    name: str
    start_us: float
    duration_us: float


@dataclass
class ProfileSummary:
    first_step: int
    last_step: int
    rank: int
    device: str
    wall_s: float
    busy_fraction: float | None  # GPU: union of kernel/copy intervals ÷ wall; CPU: None (ops run on many threads)
    category_s: dict[str, float]  # device time per category (CPU: ops' own CPU time), largest first
    top: list[dict[str, Any]] = field(default_factory=list)  # the largest kernels: name, calls, time_s
    trace: str | None = None

    def line(self) -> str:
        total_s = sum(self.category_s.values()) or 1.0
        shares = ", ".join(f"{name} {100 * t / total_s:.1f} %" for name, t in self.category_s.items()
                           if t / total_s >= 0.005)
        basis = "CPU op time" if self.busy_fraction is None else f"GPU busy {100 * self.busy_fraction:.1f} %"
        steps = (f"steps {self.first_step}-{self.last_step}" if self.last_step != self.first_step
                 else f"step {self.first_step}")
        where = f" | trace {self.trace}" if self.trace else ""
        return f"profile {steps} rank {self.rank}: {self.wall_s:.3f} s, {basis} | {shares}{where}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def comparison_table(summaries: dict[str, ProfileSummary]) -> str:
    """Several loops' (or runs') profiles side by side, per optimizer step: wall time, GPU busy share and milliseconds
    per category, so a gap between two loops reads off as the categories it sits in."""
    labels = list(summaries)
    steps = {label: s.last_step - s.first_step + 1 for label, s in summaries.items()}
    categories = sorted({c for s in summaries.values() for c in s.category_s},
                        key=lambda c: (-max(s.category_s.get(c, 0.0) / steps[label] for label, s in summaries.items()),
                                       c))
    width = max([24, *(len(label) + 2 for label in labels)])
    lines = ["ms per step".ljust(24) + "".join(label.rjust(width) for label in labels)]

    def row(name: str, values: list[str]) -> None:
        lines.append(name.ljust(24) + "".join(value.rjust(width) for value in values))

    row("wall", [f"{1e3 * s.wall_s / steps[label]:.1f}" for label, s in summaries.items()])
    if any(s.busy_fraction is not None for s in summaries.values()):
        row("GPU busy %", ["-" if s.busy_fraction is None else f"{100 * s.busy_fraction:.1f}"
                           for s in summaries.values()])
    for name in categories:
        row(name, [f"{1e3 * s.category_s.get(name, 0.0) / steps[label]:.1f}" for label, s in summaries.items()])
    return "\n".join(lines)


def summarize(ops: list[TimedOp], wall_s: float, on_gpu: bool, first_step: int, last_step: int,
              rank: int) -> ProfileSummary:
    """The window's time by category and its largest kernels; on a GPU also how much of the window it was busy."""
    by_category: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for op in ops:
        by_category[category(op.name)] = by_category.get(category(op.name), 0.0) + op.duration_us / 1e6
        calls_time = by_name.setdefault(op.name, [0, 0.0])
        calls_time[0] += 1
        calls_time[1] += op.duration_us / 1e6
    top = sorted(by_name.items(), key=lambda item: -item[1][1])[:TOP_KERNELS]
    busy = busy_s(ops) / wall_s if on_gpu and wall_s > 0 else None
    return ProfileSummary(first_step, last_step, rank, "cuda" if on_gpu else "cpu", wall_s,
                          None if busy is None else min(busy, 1.0),
                          dict(sorted(by_category.items(), key=lambda item: -item[1])),
                          [{"name": name[:160], "category": category(name), "calls": int(calls), "time_s": time_s}
                           for name, (calls, time_s) in top])


def busy_s(ops: list[TimedOp]) -> float:
    """Seconds covered by at least one op: overlapping kernels (several streams) count once."""
    covered_us, end_us = 0.0, float("-inf")
    for op in sorted(ops, key=lambda o: o.start_us):
        start_us, stop_us = max(op.start_us, end_us), op.start_us + op.duration_us
        if stop_us > start_us:
            covered_us += stop_us - start_us
        end_us = max(end_us, stop_us)
    return covered_us / 1e6


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


class ProfilerHook(Hook):
    """Profiles optimizer steps profiling.start_step .. start_step + num_steps - 1 once, on this rank; each step is a
    named range (`train_step_<n>`) in the trace. A run that resumes past the window says so and profiles nothing."""

    def __init__(self, cfg: ProfilingConfig, rank: int, device: torch.device, out_dir: Path) -> None:
        self.cfg, self.rank, self.device = cfg, rank, device
        self.trace = out_dir / f"steps_{cfg.start_step}-{cfg.last_step}" / f"rank{rank}_trace.json.gz"
        self.summary: ProfileSummary | None = None
        self._profiler: StepProfiler | None = None
        self._step_range: Any = None
        self._done = False

    def on_train_start(self, run: RunContext, state: TrainState) -> None:
        if not self._done and state.step >= self.cfg.start_step:
            log.warning("profiling.start_step %d is not after the resumed step %d: nothing is profiled in this run "
                        "(set profiling.start_step > %d)", self.cfg.start_step, state.step, state.step)
            self._done = True

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

    def _finish(self, last_step: int) -> None:
        assert self._profiler is not None
        self.summary = self._profiler.stop(self.cfg.start_step, last_step, self.rank, self.trace)
        self._profiler, self._done = None, True
        log.info(self.summary.line())
