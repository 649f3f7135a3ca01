"""Straggler check: which rank is slower than its peers (faults.straggler_*; docs/operations.md "Stragglers").

In synchronous training every rank waits for the slowest at each collective, so one throttled or failing GPU sets
the pace of the whole job while its own step time looks like everyone else's: step times cannot name it. A fixed
workload can. Every faults.straggler_check_interval_steps (at the next logged step) each rank times the same matmuls
on its own device, with no communication in between (best of 5, so a passing hiccup on a healthy rank does not
count), and the ranks compare: a rank that takes more than faults.straggler_ratio × the median rank's time is
reported, with its node, in the log (a warning on the logging rank and on the slow rank), in
<run_dir>/stragglers.jsonl and in the train line (`device_slowdown_max`, `device_slowdown_rank`). The same check
gathers each rank's share of step time spent waiting for its data loader (`data_wait_share_max` and its rank): the
logged `data_wait_s` is the logging rank's alone, and a rank whose shards sit on a slow file system stalls the rest.

Not seen: a slow network link (the probe sends nothing) and a slow host CPU on a GPU rank (the probe mostly times
device kernels). The probe keeps three 2048 × 2048 bf16 matrices (24 MiB) on each GPU and runs ~1 ms there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STRAGGLERS_FILE = "stragglers.jsonl"
PROBE_REPEATS = 5


@dataclass(frozen=True)
class ProbeShape:
    size: int  # square matrices
    matmuls: int  # per timed run
    dtype: torch.dtype


# ~0.55 TFLOP: about 1 ms on an H100/H200 (unmeasured there), long enough for the timer, short beside a step.
CUDA_PROBE = ProbeShape(2048, 32, torch.bfloat16)
# ~1.3 GFLOP: ~30 ms on one core of the CI machine; a CPU rank is slowed by what shares its core.
CPU_PROBE = ProbeShape(256, 40, torch.float32)


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


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


class StragglerMonitor:
    """Owned by MetricsHook: `due(step)` at a logged step, then `check(...)` on every rank (it is collective)."""

    def __init__(self, interval_steps: int, ratio: float, world_size: int, run_dir: Path) -> None:
        self.interval_steps = interval_steps if world_size > 1 else 0  # one process has no peers to compare with
        self.ratio = ratio
        self.path = run_dir / STRAGGLERS_FILE
        self._next_step = self.interval_steps
        self._probe: DeviceProbe | None = None
        self._nodes: list[str] | None = None

    def due(self, step: int) -> bool:
        return self.interval_steps > 0 and step >= self._next_step

    def check(self, ctx: Any, step: int, data_wait_share: float) -> dict[str, Any]:
        """Time the probe here, gather every rank's time and data-wait share; report the slow ranks. Returns the
        train line's keys."""
        self._next_step = (step // self.interval_steps + 1) * self.interval_steps
        if self._probe is None:
            self._probe = DeviceProbe(ctx.device)
            self._nodes = [""] * ctx.world_size
            dist.all_gather_object(self._nodes, node_name())
        mine = torch.tensor([self._probe.time_s(), data_wait_share], dtype=torch.float64, device=ctx.device)
        gathered = [torch.empty_like(mine) for _ in range(ctx.world_size)]
        dist.all_gather(gathered, mine)
        probe_s, shares = zip(*(t.tolist() for t in gathered), strict=True)
        self._report(ctx, step, probe_s)
        median_s = statistics.median_low(probe_s)
        slowest = max(range(len(probe_s)), key=probe_s.__getitem__)
        waits_most = max(range(len(shares)), key=shares.__getitem__)
        return {"device_slowdown_max": probe_s[slowest] / median_s, "device_slowdown_rank": slowest,
                "data_wait_share_max": shares[waits_most], "data_wait_share_rank": waits_most}

    def _report(self, ctx: Any, step: int, probe_s: Sequence[float]) -> None:
        assert self._nodes is not None
        median_s = statistics.median_low(probe_s)
        for rank, slowdown in slow_ranks(probe_s, self.ratio):
            if not (ctx.is_logging_rank or ctx.rank == rank):
                continue
            log.warning("straggler at step %d: rank %d on node %s runs the device probe %.2f× slower than the median "
                        "rank (%.1f ms vs %.1f ms; faults.straggler_ratio=%g), and every rank waits for it. Check that "
                        "node's GPU (nvidia-smi -q -d PERFORMANCE: clock throttle reasons) or leave it out of the next "
                        "job: launch.extra_sbatch='[\"#SBATCH --exclude=%s\"]'", step, rank, self._nodes[rank], slowdown, 1000 * probe_s[rank],
                        1000 * median_s, self.ratio, self._nodes[rank])
            if ctx.is_logging_rank:
                record = {"step": step, "unix_s": round(time.time(), 3), "rank": rank, "node": self._nodes[rank],
                          "slowdown": round(slowdown, 4), "probe_s": probe_s[rank], "median_probe_s": median_s}
                with self.path.open("a", encoding="utf-8") as stream:
                    stream.write(json.dumps(record) + "\n")
