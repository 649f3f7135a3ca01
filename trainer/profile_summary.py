"""Where a profiled step's time went, without torch: the categories kernel and op names fall into, the summary of a
window (trainer/profiling.py makes it from torch.profiler's events), and several summaries side by side.

Torch-free so that `pretrain report` reads the summaries a run wrote (`<run_dir>/profile/steps_<a>-<b>/rank<r>_
summary.json`) wherever a run directory was copied to.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    # Kernels (CPU: ops) in the window: per step, with the busy fraction, how much launching there is to hide.
    num_ops: int = 0

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
    row("kernels / ops (count)", [f"{s.num_ops / steps[label]:.0f}" for label, s in summaries.items()])
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
                           for name, (calls, time_s) in top], num_ops=len(ops))


def busy_s(ops: list[TimedOp]) -> float:
    """Seconds covered by at least one op: overlapping kernels (several streams) count once."""
    covered_us, end_us = 0.0, float("-inf")
    for op in sorted(ops, key=lambda o: o.start_us):
        start_us, stop_us = max(op.start_us, end_us), op.start_us + op.duration_us
        if stop_us > start_us:
            covered_us += stop_us - start_us
        end_us = max(end_us, stop_us)
    return covered_us / 1e6


def read_summary(path: Path) -> ProfileSummary:
    return ProfileSummary(**json.loads(path.read_text()))


def newest_summary(profile_dir: Path) -> ProfileSummary | None:
    """The run's last profiled window (newest file), lowest profiled rank in it; None when nothing was profiled."""
    files = list(profile_dir.glob("steps_*/rank*_summary.json"))
    if not files:
        return None
    newest = max(files, key=lambda f: f.stat().st_mtime).parent
    in_newest = [f for f in files if f.parent == newest]
    return read_summary(min(in_newest, key=lambda f: int(re.sub(r"\D", "", f.name) or 0)))
