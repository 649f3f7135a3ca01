"""Run one function on N ranks of a real process group, for tests and benchmarks.

Every parallel path in this project is proven against a single-process reference by running the same body on
`world_size` ranks through `run_distributed`. On a machine without a CUDA device the ranks are forked after the
parent imported torch once, which starts a process group in ~0.3 s instead of 5-30 s with spawn (measured in
notes/megatron-core-cpu.md). Where a CUDA device is visible the ranks are always spawned: a forked child can use CUDA
only if its parent never touched the driver, and the parent cannot know that. Even `torch.cuda.is_available()`
(cudaGetDeviceCount) marks the process so that a forked child fails at its first CUDA call with "Cannot
re-initialize CUDA in forked subprocess", while `torch.cuda.is_initialized()` still says False; that is how the
suite failed on a GPU host when this helper forked unless CUDA was "initialised".

The body runs as `fn(rank, world_size, *args)` with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set (DeepSpeed
reads them; without them it tries MPI discovery) and a default process group already initialised. `fn` must be a
module-level function (spawned ranks import it by name). Its return value comes back to the parent by value (it
must be picklable; tensors are copied, not shared). A rank that raises, dies or hangs past `timeout_s` fails the call
with every rank's error: a distributed test can never pass by hanging or by a silently crashed rank.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class DistributedRunError(AssertionError):
    """One or more ranks failed, died or timed out. The message holds each failing rank's traceback."""


@dataclass
class _RankOutcome:
    rank: int
    ok: bool
    value: Any = None
    error: str = ""


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, backend: str,
               args: tuple[Any, ...], results: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(rank_env(rank, world_size, port))
    # One intra-op thread per rank: on a 2-core box more threads only contend with the other ranks.
    torch.set_num_threads(1)
    try:
        device_id = None
        if backend == "nccl":
            device_id = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device_id)
        # device_id binds the NCCL group to this rank's GPU (no "using the device under current context" guess).
        dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=device_id)
        # Pickled here, by value: the queue would pass a tensor through shared memory that dies with this process.
        value = pickle.dumps(fn(rank, world_size, *args))
        results.put(_RankOutcome(rank, True, value))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit from the body
        results.put(_RankOutcome(rank, False, error=traceback.format_exc()))
    finally:
        # Without an explicit destroy, gloo ranks abort at exit in 20-60 % of runs ("terminate called without
        # an active exception"), which would turn a passing test into a flaky one.
        if dist.is_initialized():
            dist.destroy_process_group()


def cuda_device_visible() -> bool:
    """Whether this machine has a CUDA device, asked without initialising the CUDA driver in this process:
    `device_count()` asks NVML first, unlike `is_available()` (see the module docstring)."""
    import torch

    return torch.backends.cuda.is_built() and torch.cuda.device_count() > 0


def start_method() -> str:
    """fork where no CUDA device is visible (fast, and nothing to inherit); spawn (a fresh interpreter) otherwise.
    $PRETRAIN_TEST_START_METHOD=spawn runs a CPU box the way a GPU host runs (to check that every test body still
    works in a fresh interpreter)."""
    forced = os.environ.get("PRETRAIN_TEST_START_METHOD")
    if forced is not None:
        if forced not in ("fork", "spawn"):
            raise ValueError(f"PRETRAIN_TEST_START_METHOD={forced!r}: use fork or spawn (or unset it)")
        return forced
    return "spawn" if cuda_device_visible() else "fork"


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0,
                    backend: str = "gloo") -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` ranks; return the per-rank results, ordered by rank."""
    ctx = mp.get_context(start_method())
    results = ctx.Queue()
    port = free_port()
    # Not daemonic: a rank may start processes of its own (DataLoader workers), which a daemonic process cannot. So
    # nothing kills the ranks at exit: every one is joined or killed here, whatever happens.
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, backend, args, results))
             for rank in range(world_size)]
    try:
        for proc in procs:
            proc.start()
        outcomes = _collect(procs, results, world_size, timeout_s)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    failed = [o for o in outcomes.values() if not o.ok]
    if failed or len(outcomes) < world_size:
        raise DistributedRunError(_failure_report(outcomes, procs, world_size, timeout_s))
    return [pickle.loads(outcomes[rank].value) for rank in range(world_size)]


def _collect(procs: list[Any], results: Any, world_size: int, timeout_s: float) -> dict[int, _RankOutcome]:
    """Gather one outcome per rank; stop early when a rank fails or dies (its peers would wait forever)."""
    import queue

    outcomes: dict[int, _RankOutcome] = {}
    deadline_s = time.monotonic() + timeout_s
    while len(outcomes) < world_size and time.monotonic() < deadline_s:
        try:
            outcome = results.get(timeout=0.2)
        except queue.Empty:
            # A rank killed by a signal never reports: notice it instead of waiting for the timeout.
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            continue
        outcomes[outcome.rank] = outcome
        if not outcome.ok:
            # Give the other ranks a moment to report their side of the failure, then stop.
            time.sleep(1.0)
            while not results.empty():
                other = results.get()
                outcomes[other.rank] = other
            break
    for proc in procs:
        proc.join(timeout=max(0.0, min(10.0, deadline_s - time.monotonic())))
        if proc.is_alive():
            proc.kill()
            proc.join()
    return outcomes


def _failure_report(outcomes: dict[int, _RankOutcome], procs: list[Any], world_size: int, timeout_s: float) -> str:
    lines = [f"distributed run failed (world_size={world_size}, timeout {timeout_s:.0f} s):"]
    for rank in range(world_size):
        outcome = outcomes.get(rank)
        if outcome is None:
            lines.append(f"[rank {rank}] no result: hung past the timeout or died (exit code {procs[rank].exitcode})")
        elif not outcome.ok:
            lines.append(f"[rank {rank}] raised:\n{outcome.error}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# A straggler, for real: a process slowed from outside


_THROTTLE = """
import os, signal, sys, time
pid, stop_s, run_s = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
running = True
def end(*_):
    global running
    running = False
signal.signal(signal.SIGTERM, end)
try:  # wake on time even when every core is busy (needs root; without it the slowdown is less even)
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
except OSError:
    pass
try:
    while running:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(stop_s)
        os.kill(pid, signal.SIGCONT)
        time.sleep(run_s)
except ProcessLookupError:
    pass
finally:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
"""


def throttle(pid: int, stop_s: float = 0.010, run_s: float = 0.005) -> subprocess.Popen:
    """Run process `pid` at a fraction of its speed (a third by default), as a throttled GPU would: a child process
    stops it for `stop_s`, lets it run for `run_s`, and again, until the child is terminated (then `pid` is left
    running) or `pid` is gone."""
    return subprocess.Popen([sys.executable, "-c", _THROTTLE, str(pid), str(stop_s), str(run_s)])
