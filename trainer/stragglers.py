"""Straggler check: which rank is slower than its peers (faults.straggler_check_interval_steps and the rest;
docs/operations.md, "A slow rank").

In synchronous training every rank waits for the slowest at each collective, so one throttled or failing GPU sets
the pace of the whole job while its own step time looks like everyone else's: step times cannot name it. A fixed
workload can. Every faults.straggler_check_interval_steps (at the next logged step) each rank times the same matmuls
on its own device, with no communication in between (best of 5, so a passing hiccup on a healthy rank does not
count), and the ranks compare: a rank that takes more than faults.straggler_ratio × the median rank's time is
reported, with its node, in the log (a warning on the logging rank and on the slow rank), in
<run_dir>/stragglers.jsonl and in the train line (`device_slowdown_max`, `device_slowdown_rank`). The same check
gathers each rank's share of step time spent waiting for its data loader (`data_wait_share_max` and its rank): the
logged `data_wait_s` is the logging rank's alone, and a rank whose shards come slowly (its node's file system, too
few loader workers) stalls the rest. A rank that waited for DATA_WAIT_WARN_SHARE of its step time or more, and at
least twice what the median rank waited, is reported like a slow device (the record's "kind" says which); it does
not count towards leave_node: more workers or a cache may be the cure, not another node.

With faults.straggler_action=leave_node, a straggler named at faults.straggler_patience_checks checks in a row stops
the run: the checkpointer saves after that step, every rank exits with exit_codes.STRAGGLER, and under Slurm the
logging rank has written the nodes to leave out into the job's task records first (launch/hung_nodes.py submits the
job again without them).

Not seen: a slow network link (the probe sends nothing) and a slow host CPU on a GPU rank (the probe mostly times
device kernels). The probe keeps three 2048 × 2048 bf16 matrices (24 MiB) on each GPU; by its FLOPs it runs about
1 ms per timed run there (unmeasured).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer import exit_codes
from trainer.bootstrap import node_name

log = logging.getLogger(__name__)

STRAGGLERS_FILE = "stragglers.jsonl"
STOP_REASON = "straggler"  # TrainState.stop_reason with faults.straggler_action=leave_node
PROBE_REPEATS = 5
DATA_WAIT_WARN_SHARE = 0.25  # of a rank's step time since the last check: well past what prefetching leaves


@dataclass(frozen=True)
class ProbeShape:
    size: int  # square matrices
    matmuls: int  # per timed run
    dtype: torch.dtype


# ~0.55 TFLOP: about 1 ms on an H100/H200 (unmeasured there), long enough for the timer, short beside a step.
CUDA_PROBE = ProbeShape(2048, 32, torch.bfloat16)
# ~3.4 GFLOP: 31 ms on one core of the CI machine; a CPU rank is slowed by what shares its core.
CPU_PROBE = ProbeShape(256, 100, torch.float32)


class DeviceProbe:
    """The same matmuls on every rank's device, timed from the host around a device sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.shape = CUDA_PROBE if device.type == "cuda" else CPU_PROBE
        generator = torch.Generator().manual_seed(0)  # the same values everywhere: no rank gets easier numbers
        a, b = (torch.randn(self.shape.size, self.shape.size, generator=generator) for _ in range(2))
        self._a, self._b = (m.to(device=device, dtype=self.shape.dtype) for m in (a, b))
        self._out = torch.empty_like(self._a)

    def time_s(self) -> float:
        self._run()  # warm-up: kernel selection, caches, clocks coming out of idle
        return min(self._run() for _ in range(PROBE_REPEATS))

    def _run(self) -> float:
        self._sync()
        start_s = time.perf_counter()
        for _ in range(self.shape.matmuls):
            torch.mm(self._a, self._b, out=self._out)
        self._sync()
        return time.perf_counter() - start_s

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def slow_ranks(probe_s: Sequence[float], ratio: float) -> list[tuple[int, float]]:
    """(rank, slowdown) of each rank whose probe took more than `ratio` × the median rank's (the lower middle one
    for an even count, so that with 2 ranks the slow one is measured against the fast one)."""
    median_s = statistics.median_low(probe_s)
    return [(rank, t / median_s) for rank, t in enumerate(probe_s) if t > ratio * median_s]


def data_starved_ranks(shares: Sequence[float], min_share: float = DATA_WAIT_WARN_SHARE) -> list[tuple[int, float]]:
    """(rank, share) of each rank that waited for its data for at least `min_share` of its step time and at least
    twice the median rank's share."""
    median = statistics.median_low(shares)
    return [(rank, share) for rank, share in enumerate(shares) if share >= min_share and share >= 2 * median]


class StragglerMonitor:
    """Owned by MetricsHook: `due(step)` at a logged step, then `check(...)` on every rank (it is collective);
    `leave_nodes` is set, identically on every rank, when the run should stop and leave those nodes out."""

    def __init__(self, faults: Any, world_size: int, run_dir: Path) -> None:
        # One process has no peers to compare with.
        self.interval_steps = faults.straggler_check_interval_steps if world_size > 1 else 0
        self.ratio = faults.straggler_ratio
        self.patience = faults.straggler_patience_checks if faults.straggler_action == "leave_node" else None
        self.path = run_dir / STRAGGLERS_FILE
        self.leave_nodes: list[str] | None = None
        self._streak = 0  # checks in a row that named a straggler
        self._next_step = self.interval_steps
        self._probe: DeviceProbe | None = None
        self._nodes: list[str] | None = None
        self._data_wait_s = self._step_time_s = 0.0  # this rank's, since the last check

    def add_step(self, data_wait_s: float, step_time_s: float) -> None:
        self._data_wait_s += data_wait_s
        self._step_time_s += step_time_s

    def due(self, step: int) -> bool:
        return self.interval_steps > 0 and step >= self._next_step

    def check(self, ctx: Any, step: int) -> dict[str, Any]:
        """Time the probe here, gather every rank's time and data-wait share since the last check; report the slow
        ranks. Returns the train line's keys."""
        self._next_step = (step // self.interval_steps + 1) * self.interval_steps
        data_wait_share = self._data_wait_s / self._step_time_s if self._step_time_s > 0 else 0.0
        self._data_wait_s = self._step_time_s = 0.0
        if self._probe is None:
            self._probe = DeviceProbe(ctx.device)
            self._nodes = [""] * ctx.world_size
            dist.all_gather_object(self._nodes, node_name())
        mine = torch.tensor([self._probe.time_s(), data_wait_share], dtype=torch.float64, device=ctx.device)
        gathered = [torch.empty_like(mine) for _ in range(ctx.world_size)]
        dist.all_gather(gathered, mine)
        probe_s, shares = zip(*(t.tolist() for t in gathered), strict=True)
        median_s = statistics.median_low(probe_s)
        slow = slow_ranks(probe_s, self.ratio)
        self._report(ctx, step, probe_s, median_s, slow)
        self._report_data(ctx, step, shares)
        self._decide(ctx, step, slow)
        slowest = max(range(len(probe_s)), key=probe_s.__getitem__)
        waits_most = max(range(len(shares)), key=shares.__getitem__)
        return {"device_slowdown_max": probe_s[slowest] / median_s, "device_slowdown_rank": slowest,
                "data_wait_share_max": shares[waits_most], "data_wait_share_rank": waits_most}

    def _report(self, ctx: Any, step: int, probe_s: Sequence[float], median_s: float,
                slow: list[tuple[int, float]]) -> None:
        assert self._nodes is not None
        for rank, slowdown in slow:
            if not (ctx.is_logging_rank or ctx.rank == rank):
                continue
            log.warning("straggler at step %d: rank %d on node %s runs the device probe %.2f× slower than the median "
                        "rank (%.1f ms vs %.1f ms; faults.straggler_ratio=%g), and every rank waits for it. Check that "
                        "node's GPU (nvidia-smi -q -d PERFORMANCE: clock throttle reasons) or leave it out of the next "
                        "job: launch.extra_sbatch='[\"#SBATCH --exclude=%s\"]'", step, rank, self._nodes[rank],
                        slowdown, 1000 * probe_s[rank], 1000 * median_s, self.ratio, self._nodes[rank])
            if ctx.is_logging_rank:
                self._record(step, rank, "device", slowdown=round(slowdown, 4), probe_s=probe_s[rank],
                             median_probe_s=median_s)

    def _report_data(self, ctx: Any, step: int, shares: Sequence[float]) -> None:
        assert self._nodes is not None
        median = statistics.median_low(shares)
        for rank, share in data_starved_ranks(shares):
            if not (ctx.is_logging_rank or ctx.rank == rank):
                continue
            log.warning("straggler at step %d: rank %d on node %s waited for its data for %.0f%% of its step time "
                        "since the last check (the median rank %.0f%%), and every rank waits for it. Its loader does "
                        "not keep up there: check that node's access to the shards (file system, data.cache_dir) or "
                        "raise data.num_workers", step, rank, self._nodes[rank], 100 * share, 100 * median)
            if ctx.is_logging_rank:
                self._record(step, rank, "data", data_wait_share=round(share, 4),
                             median_data_wait_share=round(median, 4))

    def _record(self, step: int, rank: int, kind: str, **values: Any) -> None:
        assert self._nodes is not None
        record = {"step": step, "unix_s": round(time.time(), 3), "kind": kind, "rank": rank,
                  "node": self._nodes[rank], **values}
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")

    def _decide(self, ctx: Any, step: int, slow: list[tuple[int, float]]) -> None:
        """faults.straggler_action=leave_node: after `patience` checks in a row with a straggler, leave the nodes of
        this check's stragglers. Every rank gathered the same times, so every rank decides alike."""
        assert self._nodes is not None
        self._streak = self._streak + 1 if slow else 0
        if self.patience is None or self._streak < self.patience:
            return
        self.leave_nodes = sorted({self._nodes[rank] for rank, _ in slow})
        if not ctx.is_logging_rank:
            return
        log.error("straggler: %d check(s) in a row named a slow rank (faults.straggler_patience_checks=%d): saving a "
                  "checkpoint after step %d, then exiting with code %d to leave node(s) %s out "
                  "(faults.straggler_action=leave_node)", self._streak, self.patience, step, exit_codes.STRAGGLER,
                  ",".join(self.leave_nodes))
        records = os.environ.get(exit_codes.HANG_RECORD_DIR_ENV)  # set by the sbatch script
        if records:
            (Path(records) / exit_codes.STRAGGLER_RECORD).write_text("".join(f"{n}\n" for n in self.leave_nodes))
