"""Run one function on N ranks of a real process group, for tests and benchmarks.

Every parallel path in this project is proven against a single-process reference by running the same body on
`world_size` ranks through `run_distributed`. On CPU the ranks are forked after the parent imported torch once, which
starts a process group in ~0.3 s instead of 5-30 s with spawn (measured in notes/megatron-core-cpu.md); where CUDA is
initialised the ranks are spawned instead (forking a CUDA context is unsafe) and the backend is NCCL.

The body runs as `fn(rank, world_size, *args)` with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set (DeepSpeed
reads them; without them it tries MPI discovery) and a default process group already initialised. Its return value
comes back to the parent (it must be picklable). A rank that raises, dies or hangs past `timeout_s` fails the call
with every rank's error: a distributed test can never pass by hanging or by a silently crashed rank.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
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
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        results.put(_RankOutcome(rank, True, value))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit from the body
        results.put(_RankOutcome(rank, False, error=traceback.format_exc()))
    finally:
        # Without an explicit destroy, gloo ranks abort at exit in 20-60 % of runs ("terminate called without
        # an active exception"), which would turn a passing test into a flaky one.
        if dist.is_initialized():
            dist.destroy_process_group()


def _start_method() -> str:
    import torch

    return "spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "fork"


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0,
                    backend: str = "gloo") -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` ranks; return the per-rank results, ordered by rank."""
    ctx = mp.get_context(_start_method())
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, backend, args, results), daemon=True)
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    outcomes = _collect(procs, results, world_size, timeout_s)
    failed = [o for o in outcomes.values() if not o.ok]
    if failed or len(outcomes) < world_size:
        raise DistributedRunError(_failure_report(outcomes, procs, world_size, timeout_s))
    return [outcomes[rank].value for rank in range(world_size)]


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
