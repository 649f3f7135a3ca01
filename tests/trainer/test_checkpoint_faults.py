"""Faults on real training runs (forked ranks, CPU/gloo, tiny config): corrupt or half-written checkpoints, a full
disk, NaN and loss-spike steps, rollback, a hang, and a config that does not fit the checkpoint."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

# Imported once here so the forked ranks start in ~0.3 s instead of re-importing (notes/megatron-core-cpu.md).
import deepspeed  # noqa: F401
import megatron.core.parallel_state  # noqa: F401
import megatron.core.tensor_parallel  # noqa: F401
import pytest
import torch
import torch._dynamo  # noqa: F401

from trainer.checkpoint.layout import LATEST, read_metadata, verify_checkpoint
from trainer.config import load_config
from trainer.hooks import Hook, RunContext, StepOutput, TrainState
from trainer.testing import DistributedRunError, run_distributed

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
BASE = ["train.log_interval_steps=1", "train.eval_interval_steps=0", "optim.warmup_steps=2", "optim.grad_clip=0.5",
        "logging.tensorboard=false", "checkpoint.save_interval_steps=2", "checkpoint.keep_last=5"]


def _train(rank: int, world_size: int, overrides: list[str], run_dir: str, hooks: list[Hook],
           setup: Any = None) -> Any:
    from trainer.train import train

    if setup is not None:
        setup(rank)
    state = train(load_config(TINY, [*BASE, f"logging.run_dir={run_dir}", *overrides]), extra_hooks=hooks)
    return [getattr(hook, "result", None) for hook in hooks], state.step


def train_run(world_size: int, overrides: list[str], run_dir: Path, hooks: list[Hook] = (),
              setup: Any = None) -> list[Any]:
    return run_distributed(_train, world_size, overrides, str(run_dir), list(hooks), setup, timeout_s=180)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def rank_log(run_dir: Path, rank: int = 0) -> str:
    return (run_dir / "logs" / f"rank{rank}.log").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# Damaged checkpoints


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    train_run(1, ["train.max_steps=6"], tmp_path / "a")
    ckpts = tmp_path / "a" / "checkpoints"
    shard = ckpts / "step_6" / "shards" / "rank-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of the tensors
    shard.write_bytes(bytes(data))
    train_run(1, ["train.max_steps=6", f"checkpoint.dir={ckpts}"], tmp_path / "b")
    log = rank_log(tmp_path / "b")
    assert "step_6 is incomplete or corrupt, skipping it" in log and "sha256" in log
    assert f"resumed from {ckpts / 'step_4'}: step 4" in log
    original = dict(losses(tmp_path / "a"))
    resumed = dict(losses(tmp_path / "b"))
    assert [resumed[s] for s in (5, 6)] == [original[s] for s in (5, 6)]  # the previous checkpoint is exact
    assert verify_checkpoint(ckpts / "step_6") == []  # the corrupt one was replaced by the new save of step 6
    assert (ckpts / LATEST).read_text().strip() == "step_6"


class _KillDuringSave(Hook):
    """From the save at `step` on, this rank SIGKILLs itself after writing `after_bytes` bytes of checkpoint data."""

    def __init__(self, step: int, rank: int, after_bytes: int) -> None:
        self.step, self.rank, self.after_bytes = step, rank, after_bytes

    def on_step_start(self, run: RunContext, state: TrainState) -> None:
        if state.step + 1 == self.step and run.ctx.rank == self.rank:
            import trainer.checkpoint.io as ckpt_io

            real_write, written = os.write, [0]

            def write(fd: int, data: Any) -> int:
                if written[0] >= self.after_bytes:
                    os.kill(os.getpid(), signal.SIGKILL)
                count = real_write(fd, data[:4096])
                written[0] += count
                return count

            ckpt_io.os = _OsWith(write)


class _OsWith:
    """The os module with another `write` (trainer.checkpoint.io writes through `os.write` only)."""

    def __init__(self, write: Any) -> None:
        self.write = write

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_a_save_killed_halfway_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    train_run(2, ["train.max_steps=6"], reference)
    run_dir = tmp_path / "run"
    with pytest.raises(DistributedRunError, match="exit code -9"):
        train_run(2, ["train.max_steps=6"], run_dir, [_KillDuringSave(step=4, rank=1, after_bytes=20_000)])
    ckpts = run_dir / "checkpoints"
    assert (ckpts / LATEST).read_text().strip() == "step_2"
    assert verify_checkpoint(ckpts / "step_2") == []
    assert not (ckpts / "step_4").exists() and (ckpts / ".step_4.tmp").is_dir()  # the partial save, never read
    train_run(2, ["train.max_steps=6"], run_dir)  # resume: auto
    assert f"resumed from {ckpts / 'step_2'}: step 2" in rank_log(run_dir)
    assert not (ckpts / ".step_4.tmp").exists()  # cleaned by the next save
    assert losses(run_dir)[-4:] == losses(reference)[2:]  # steps 3-6, exactly the uninterrupted run's


class _FullDisk(Hook):
    """From the save at `step` on, writes of checkpoint files on `rank` fail with ENOSPC."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_step_start(self, run: RunContext, state: TrainState) -> None:
        if state.step + 1 == self.step and run.ctx.rank == self.rank:
            import trainer.checkpoint.io as ckpt_io

            def write(fd: int, data: Any) -> int:
                raise OSError(errno.ENOSPC, "No space left on device")

            ckpt_io.os = _OsWith(write)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_disk_full_during_save_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path: Path,
                                                                                   async_save: bool) -> None:
    overrides = ["train.max_steps=6", f"checkpoint.async_save={str(async_save).lower()}"]
    with pytest.raises(DistributedRunError) as failure:
        train_run(2, overrides, tmp_path, [_FullDisk(step=4, rank=1)])
    message = str(failure.value)
    assert "checkpoint step_4" in message and "was not saved" in message
    assert "No space left on device" in message  # the failing rank names the cause ...
    assert "rank(s) [1]" in message  # ... and the other rank names the failing rank
    assert "the previous checkpoint step_2 is intact and still `latest`" in message
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / LATEST).read_text().strip() == "step_2" and verify_checkpoint(ckpts / "step_2") == []
    assert not (ckpts / "step_4").exists() and not (ckpts / ".step_4.tmp").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Numerical faults


class _Poison(Hook):
    """Attempts (on_step_start calls, 1-based) in `nan_at` get NaN final-norm weights, those in `spike_at` 50×
    weights (a finite loss spike); the weights are put back after the step. Also records, after every step, each
    rank's full local training state (weights, moments, Adam step, LR), to check that a skipped step changed
    nothing."""

    def __init__(self, nan_at: set[int] = frozenset(), spike_at: set[int] = frozenset()) -> None:
        self.nan_at, self.spike_at = nan_at, spike_at
        self.attempt = 0
        self._saved: torch.Tensor | None = None
        self._states: dict[int, tuple] = {}
        self.result: dict[str, Any] = {}

    def on_step_start(self, run: RunContext, state: TrainState) -> None:
        self.attempt += 1
        factor = math_nan() if self.attempt in self.nan_at else 50.0 if self.attempt in self.spike_at else None
        for name, param in run.model.canonical_named_parameters():
            if factor is not None and name == "norm.weight":
                self._saved = param.detach().clone()
                with torch.no_grad():
                    param.mul_(factor)

    def on_step_end(self, run: RunContext, state: TrainState, out: StepOutput) -> None:
        if self._saved is not None:
            with torch.no_grad():
                dict(run.model.canonical_named_parameters())["norm.weight"].copy_(self._saved)
            self._saved = None
        from trainer.checkpoint.state import optimizer_access

        access = optimizer_access(run.engine)
        access.prepare_read()
        tensors = [t.clone() for _, p in run.model.canonical_named_parameters() for t in access.read(p)]
        self._states[self.attempt] = (tensors, access.adam_step(), run.engine.get_lr()[0])

    def on_train_end(self, run: RunContext, state: TrainState) -> None:
        def same(a: int, b: int) -> bool:
            (ta, step_a, lr_a), (tb, step_b, lr_b) = self._states[a], self._states[b]
            return all(torch.equal(x, y) for x, y in zip(ta, tb)) and step_a == step_b and lr_a == lr_b

        bad = sorted(self.nan_at | self.spike_at)
        self.result = {"unchanged_by_bad_step": [same(a - 1, a) for a in bad if a - 1 in self._states],
                       "changed_by_good_step": same(1, 2) is False}


def math_nan() -> float:
    return float("nan")


@pytest.mark.parametrize(("world_size", "overrides"), [(1, []), (2, ["zero.stage=1"]), (2, ["parallel.pp=2"])],
                         ids=["plain", "zero1-dp2", "pp2"])
def test_nan_steps_are_skipped_counted_and_rolled_back(world_size: int, overrides: list[str], tmp_path: Path) -> None:
    """Attempt 3 is NaN: skipped. Attempts 5-7 are NaN: skipped, then (rollback_after_bad_steps=3) the run reloads
    step_4 and continues on the data after the bad window. The checkpoint of step 6 is postponed while the streak
    lasts, so the rollback goes behind the streak."""
    poison = _Poison(nan_at={3, 5, 6, 7})
    results = train_run(world_size, ["train.max_steps=8", "faults.rollback_after_bad_steps=3", *overrides],
                        tmp_path, [poison])
    for (result,), final_step in results:
        assert final_step == 8
        assert result["unchanged_by_bad_step"] == [True, True, True, True]  # weights, moments, Adam step, LR
        assert result["changed_by_good_step"]
    log = rank_log(tmp_path)
    assert "step 3 skipped: non-finite loss (nan) (1 in a row, 1 skipped in this run)" in log
    assert "step 7 skipped: non-finite loss (nan) (3 in a row, 4 skipped in this run)" in log
    assert ("rolled back from step 7 to the checkpoint of step 4 (rollback 1 of at most 3); skipping the data "
            "window of global samples [64, 112)") in log
    meta = read_metadata(tmp_path / "checkpoints" / "step_8")
    faults = meta["trainer_state"]["faults"]
    assert faults["skipped_steps_total"] == 4 and faults["rollbacks"] == 1
    assert faults["skipped_windows"] == [{"from_step": 4, "to_step": 7, "first_sample": 64, "end_sample": 112}]
    assert meta["trainer_state"]["adam_step"] == 7.0  # steps 1, 2, 4 before the rollback; 5-8 after
    assert meta["consumed_samples"] == 11 * 16  # 11 attempts, the window included: that data is skipped
    # ... but the weights were trained on 8 steps: the undone steps 5-7 count no tokens, in the log or checkpoint.
    assert meta["consumed_tokens"] == 8 * 16 * 64
    train_lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["consumed_tokens"] for r in train_lines if r["kind"] == "train" and r["step"] == 8] == [8 * 16 * 64]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_2", "step_4", "step_6",
                                                                             "step_8"]


@pytest.mark.parametrize(("world_size", "overrides"), [(1, []), (2, ["zero.stage=1"])], ids=["plain", "zero1-dp2"])
def test_a_loss_spike_is_skipped_like_a_nan_step(world_size: int, overrides: list[str], tmp_path: Path) -> None:
    poison = _Poison(spike_at={5})
    results = train_run(world_size, ["train.max_steps=6", "faults.loss_spike_zscore=4",
                                     "faults.loss_spike_window_steps=3", *overrides], tmp_path, [poison])
    for (result,), _ in results:
        assert result["unchanged_by_bad_step"] == [True]
    assert "step 5 skipped: loss spike (loss " in rank_log(tmp_path)
    meta = read_metadata(tmp_path / "checkpoints" / "step_6")
    assert meta["trainer_state"]["adam_step"] == 5.0 and meta["trainer_state"]["lr_scheduler"]["last_epoch"] == 5


def test_nan_streak_without_a_checkpoint_stops_as_diverged(tmp_path: Path) -> None:
    from trainer import exit_codes

    with pytest.raises(DistributedRunError, match="no checkpoint to roll back to") as failure:
        train_run(1, ["train.max_steps=6", "checkpoint.save_interval_steps=0", "faults.rollback_after_bad_steps=2"],
                  tmp_path, [_Poison(nan_at={1, 2})])
    assert "TrainingDiverged" in str(failure.value)
    from trainer.faults import TrainingDiverged

    assert TrainingDiverged.exit_code == exit_codes.DIVERGED == 77


# ---------------------------------------------------------------------------------------------------------------------
# Hangs


class _HangAt(Hook):
    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_step_end(self, run: RunContext, state: TrainState, out: StepOutput) -> None:
        if state.step == self.step and run.ctx.rank == self.rank:
            time.sleep(60)  # a rank stuck outside any collective; its peer waits in the next one


def test_watchdog_dumps_every_ranks_stacks_and_exits_with_the_hang_code(tmp_path: Path) -> None:
    start_s = time.monotonic()
    with pytest.raises(DistributedRunError) as failure:
        train_run(2, ["train.max_steps=6", "faults.hang_timeout_s=2"], tmp_path, [_HangAt(step=3, rank=0)])
    assert time.monotonic() - start_s < 40  # not the 60 s sleep, not run_distributed's timeout
    report = str(failure.value)
    assert report.count("died (exit code 76)") == 2, report
    for rank in (0, 1):
        log = rank_log(tmp_path, rank)
        assert "watchdog: no training progress for" in log and "Python stacks of every thread follow" in log
        assert 'Current thread' in log or 'Thread 0x' in log
    assert "in on_step_end" in rank_log(tmp_path, 0)  # rank 0's dump shows where it is stuck


# ---------------------------------------------------------------------------------------------------------------------
# Config that does not fit


def test_resume_refuses_another_model_shape_and_data_unless_allowed(tmp_path: Path) -> None:
    train_run(1, ["train.max_steps=4"], tmp_path / "a")
    ckpts = f"checkpoint.dir={tmp_path / 'a' / 'checkpoints'}"
    with pytest.raises(DistributedRunError, match=r"model\.intermediate_size=176 but this config has "
                                                  r"model\.intermediate_size=192"):
        train_run(1, ["train.max_steps=6", ckpts, "model.intermediate_size=192"], tmp_path / "b")
    with pytest.raises(DistributedRunError, match=r"train\.seed=1234 but this config has train\.seed=7.*"
                                                  r"checkpoint\.allow_data_change=true"):
        train_run(1, ["train.max_steps=6", ckpts, "train.seed=7"], tmp_path / "c")
    train_run(1, ["train.max_steps=6", ckpts, "train.seed=7", "checkpoint.allow_data_change=true"], tmp_path / "d")
    log = rank_log(tmp_path / "d")
    assert "resumed from" in log and "the new data stream starts at its first sample" in log
