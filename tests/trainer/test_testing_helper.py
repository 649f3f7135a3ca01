"""The shared multi-process helper must fail loudly: on a raising rank, a dead rank and a hung rank."""

from __future__ import annotations

import os
import signal
import time

import pytest

from trainer.testing import DistributedRunError, run_distributed

pytestmark = pytest.mark.slow


def _all_reduce_rank(rank: int, world_size: int, scale: float) -> float:
    import torch
    import torch.distributed as dist

    value = torch.tensor([float(rank + 1) * scale])
    dist.all_reduce(value)
    return value.item()


def _raise_on_rank_1(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()


def _kill_rank_1(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def _hang(rank: int, world_size: int) -> None:
    time.sleep(60)


def test_all_reduce_over_gloo() -> None:
    assert run_distributed(_all_reduce_rank, 2, 0.5) == [1.5, 1.5]


def test_a_raising_rank_fails_with_its_traceback() -> None:
    with pytest.raises(DistributedRunError, match="boom on rank 1"):
        run_distributed(_raise_on_rank_1, 2, timeout_s=60)


def test_a_killed_rank_fails_fast() -> None:
    start_s = time.monotonic()
    with pytest.raises(DistributedRunError, match=r"rank 1\] no result"):
        run_distributed(_kill_rank_1, 2, timeout_s=60)
    assert time.monotonic() - start_s < 30, "a dead rank must be noticed before the timeout"


def test_a_hung_rank_fails_at_the_timeout() -> None:
    with pytest.raises(DistributedRunError, match="hung past the timeout"):
        run_distributed(_hang, 2, timeout_s=3)
