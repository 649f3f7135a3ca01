"""The shared multi-process helper must fail loudly: on a raising rank, a dead rank and a hung rank."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from trainer.testing import DistributedRunError, run_distributed, start_method

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


# Set to True by a test in the parent at run time: a forked rank inherits that, a spawned (fresh) rank does not.
_PARENT_STATE = {"changed_at_run_time": False}


def _sees_parent_state(rank: int, world_size: int) -> bool:
    return _PARENT_STATE["changed_at_run_time"]


def _a_tensor(rank: int, world_size: int) -> torch.Tensor:
    return torch.full((3,), float(rank))


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


def test_tensors_come_back_by_value() -> None:
    """A returned tensor must not travel through shared memory that dies with its rank."""
    first, second = run_distributed(_a_tensor, 2)
    assert first.tolist() == [0.0] * 3 and second.tolist() == [1.0] * 3


def test_ranks_are_fresh_interpreters_where_a_cuda_device_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU host the parent may already have touched the CUDA driver without `is_initialized()` saying so
    (`is_available()` alone does it), and a forked rank then fails at its first CUDA call. This machine has no GPU,
    so the host is described to torch: a device is visible, CUDA "not initialised". The helper must spawn, and must
    not ask `is_available()`, the question that poisons forking."""
    asked: list[str] = []
    monkeypatch.delenv("PRETRAIN_TEST_START_METHOD", raising=False)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: asked.append("is_available") or True)
    monkeypatch.setitem(_PARENT_STATE, "changed_at_run_time", True)
    assert start_method() == "spawn"
    assert run_distributed(_sees_parent_state, 2, timeout_s=120) == [False, False]  # fresh: nothing inherited
    assert asked == []


def test_ranks_are_forked_where_no_cuda_device_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast start stays where it is safe (measured: ~0.3 s per group vs 5-30 s spawned on 2 cores)."""
    monkeypatch.delenv("PRETRAIN_TEST_START_METHOD", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setitem(_PARENT_STATE, "changed_at_run_time", True)
    assert start_method() == "fork"
    assert run_distributed(_sees_parent_state, 2) == [True, True]
