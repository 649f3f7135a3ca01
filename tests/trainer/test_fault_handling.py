"""Faults a cluster user meets before or around training (issue 14 and 15.5), on the tiny config:
a run directory another job owns, every checkpoint damaged, a finished run started again, missing or damaged data.
Each stops before the model is built, names what is wrong and says what to do; exit codes: docs/operations.md."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Imported once here so the forked ranks start in ~0.3 s instead of re-importing (notes/megatron-core-cpu.md).
import deepspeed  # noqa: F401
import megatron.core.parallel_state  # noqa: F401
import pytest

from trainer.config import load_config
from trainer.hooks import Hook, RunContext, StepOutput, TrainState
from trainer.testing import DistributedRunError, run_distributed

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
BASE = ["train.log_interval_steps=1", "train.eval_interval_steps=0", "logging.tensorboard=false", "optim.warmup_steps=1",
        "checkpoint.save_interval_steps=2", "checkpoint.keep_last=5"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")
BUILT = "parameters here"  # logged by build_run once the model is built: absent when a run stops before that


def _train(rank: int, world_size: int, overrides: list[str]) -> int:
    from trainer.train import train

    return train(load_config(TINY, [*BASE, *overrides])).step


def train_run(overrides: list[str], world_size: int = 1) -> list[int]:
    return run_distributed(_train, world_size, overrides, timeout_s=180)


def pretrain(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}  # as from a fresh shell
    return subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout_s)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------------
# 3. One owner per run directory


def test_a_second_job_refuses_a_run_directory_another_live_job_owns(tmp_path: Path) -> None:
    from trainer.run_lock import OWNER_FILE, Owner, _start_time_s

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(["sleep", "120"])  # stands in for the first job's rank 0 on this host
    try:
        owner = Owner("slurm job 4242", os.uname().nodename, holder.pid, _start_time_s(holder.pid), "4242", time.time())
        (run_dir / OWNER_FILE).write_text(json.dumps(owner.__dict__))
        with pytest.raises(DistributedRunError) as refused:
            train_run([f"logging.run_dir={run_dir}", "train.max_steps=2"])
        message = str(refused.value)
        assert f"is in use by slurm job 4242 (host {os.uname().nodename}, pid {holder.pid}" in message
        assert "scancel 4242" in message and "logging.run_dir=" in message
        assert sorted(p.name for p in run_dir.iterdir()) == [OWNER_FILE]  # nothing written: no config, no logs
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale, the next job takes the directory, trains, and leaves no lock behind.
    assert train_run([f"logging.run_dir={run_dir}", "train.max_steps=2"]) == [2]
    assert not (run_dir / OWNER_FILE).exists()


def test_submit_refuses_to_overwrite_the_config_of_a_run_a_live_job_owns(tmp_path: Path) -> None:
    from trainer.run_lock import RunDirLock

    run_dir = tmp_path / "run"
    lock = RunDirLock.acquire(run_dir)  # this test process plays the running job
    try:
        out = pretrain("submit", "--config", str(TINY), f"logging.run_dir={run_dir}", "--dry-run")
    finally:
        lock.release()
    assert out.returncode == 2, out.stderr
    assert "is in use by process" in out.stderr and not (run_dir / "config.yaml").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 4. resume=auto with every checkpoint damaged


def test_every_checkpoint_damaged_stops_with_a_list_and_touches_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_run([f"logging.run_dir={run_dir}", "train.max_steps=4"])
    ckpts = run_dir / "checkpoints"
    shard = ckpts / "step_4" / "shards" / "rank-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    (ckpts / "step_2" / "metadata.json").unlink()  # an incomplete save
    before = tree_digest(ckpts)
    with pytest.raises(DistributedRunError) as stopped:
        train_run([f"logging.run_dir={run_dir}", "train.max_steps=6"])
    message = str(stopped.value)
    assert "2 checkpoint(s)" in message and "none complete and intact" in message
    assert "step_4: shards/rank-00000.safetensors has 1000 bytes" in message
    assert "step_2: step_2 has no metadata.json" in message
    assert "Nothing was deleted or changed" in message and "checkpoint.resume=none" in message
    assert tree_digest(ckpts) == before
    # Told to start fresh, it does.
    assert train_run([f"logging.run_dir={run_dir}", "train.max_steps=1", "checkpoint.resume=none"]) == [1]


# ---------------------------------------------------------------------------------------------------------------------
# 15.5 A finished run started again


def test_a_finished_run_says_nothing_to_do_and_builds_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = ["--config", str(TINY), *BASE, f"logging.run_dir={run_dir}", "train.max_steps=2"]
    first = pretrain("train", *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    start_s = time.monotonic()
    again = pretrain("train", *overrides)
    elapsed_s = time.monotonic() - start_s
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already at train.max_steps=2 (checkpoint step_2" in again.stderr
    assert "nothing to do" in again.stderr and "train.max_steps=4" in again.stderr
    assert BUILT not in again.stderr + (run_dir / "logs" / "rank0.log").read_text().split("nothing to do")[-1]
    print(f"re-run of a finished run: {elapsed_s:.1f} s")


# ---------------------------------------------------------------------------------------------------------------------
# 6. Data checked at start; a checksum failure mid-run has its own exit code


def _dataset(path: Path, samples: int = 96) -> Path:
    import numpy as np

    from data_pipeline.manifest import write_dataset_from_arrays

    rng = np.random.default_rng(0)
    write_dataset_from_arrays(path, {"train": rng.integers(0, 256, (samples, 65))}, samples_per_shard=16)
    return path


def _data_overrides(data: Path, run_dir: Path) -> list[str]:
    return ["--config", str(TINY), *BASE, f"logging.run_dir={run_dir}", "data.synthetic=false",
            f"data.datasets=[{{path: {data}, weight: 1.0}}]", "train.max_steps=4"]


def test_a_truncated_or_missing_shard_stops_the_run_at_step_0(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    shards = sorted(data.rglob("*.tar"))
    shards[-1].write_bytes(shards[-1].read_bytes()[:512])  # the last shard: the loader would reach it late
    shards[-2].unlink()
    out = pretrain("train", *_data_overrides(data, tmp_path / "run"))
    assert out.returncode == 74, out.stderr[-3000:]
    assert f"2 of {len(shards)} shards are missing or do not have the size their manifest records" in out.stderr
    assert f"{shards[-2]} is missing" in out.stderr and f"{shards[-1]} has 512 bytes" in out.stderr
    assert "re-run `pretrain prepare`" in out.stderr
    assert BUILT not in out.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert "shards are missing" in (tmp_path / "run" / "logs" / "rank0.log").read_text()


def test_a_missing_dataset_is_a_config_error_before_the_build_and_dry_run_warns(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-data"
    out = pretrain("train", *_data_overrides(missing, tmp_path / "run"))
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"no manifest at {missing}/manifest.json" in out.stderr and "data.datasets.0.path" in out.stderr
    assert BUILT not in out.stderr
    dry = pretrain("train", *_data_overrides(missing, tmp_path / "run"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "warning: data.datasets names data that is not there" in dry.stderr


def test_an_unwritable_profiling_dir_is_a_config_error_before_the_build(tmp_path: Path) -> None:
    """Else the run would train up to its profiling window and die there, with nothing saved since the last
    checkpoint. A file where a directory must be: unwritable for root too."""
    (tmp_path / "a_file").write_text("")
    out = pretrain("train", "--config", str(TINY), *BASE, f"logging.run_dir={tmp_path / 'run'}", "train.max_steps=4",
                   "profiling.start_step=2", f"profiling.dir={tmp_path / 'a_file' / 'profile'}")
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"profiling directory {tmp_path / 'a_file' / 'profile'} cannot be written (NotADirectoryError" in out.stderr
    assert "set profiling.dir to a writable directory" in out.stderr and BUILT not in out.stderr


def test_a_checksum_failure_while_training_exits_74_and_is_in_the_rank_log(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    shard = sorted(data.rglob("*.tar"))[1]
    damaged = bytearray(shard.read_bytes())
    damaged[-2000] ^= 0x01  # same size, wrong sha256: only opening the shard finds it
    shard.write_bytes(bytes(damaged))
    out = pretrain("train", *_data_overrides(data, tmp_path / "run"))
    assert out.returncode == 74, out.stderr[-3000:]
    assert "sha256" in out.stderr and "Training stopped" in out.stderr
    assert "DataCorruptError" in (tmp_path / "run" / "logs" / "rank0.log").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# 7. A rank's Python error goes to its rank log too


class _Boom(Hook):
    """Fails at step 2 on rank 1 only, the way a bug would."""

    def on_step_end(self, run: RunContext, state: TrainState, out: StepOutput) -> None:
        if state.step == 2 and run.ctx.rank == 1:
            raise RuntimeError("a bug on rank 1")


def _train_with_boom(rank: int, world_size: int, run_dir: str) -> None:
    from trainer.train import train

    train(load_config(TINY, [*BASE, f"logging.run_dir={run_dir}", "train.max_steps=4", "faults.collective_timeout_s=20"]),
          extra_hooks=[_Boom()])


def test_a_rank_error_is_in_that_ranks_log_with_its_traceback(tmp_path: Path) -> None:
    with pytest.raises(DistributedRunError):
        run_distributed(_train_with_boom, 2, str(tmp_path), timeout_s=120)
    log = (tmp_path / "logs" / "rank1.log").read_text()
    assert "RuntimeError: a bug on rank 1" in log and "Traceback (most recent call last)" in log
    assert "in on_step_end" in log
