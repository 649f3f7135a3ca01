"""`pretrain launch local` passes the training processes' exit codes through (75, 76, 77, 74, 2) and keeps planned
exits quiet: a one-line summary instead of torchrun's ChildFailedError traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.torchrun_agent import job_exit_code

REPO = Path(__file__).resolve().parents[2]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID")
BASE = ["--config", "configs/tiny.yaml", "train.log_interval_steps=1", "train.eval_interval_steps=0",
        "logging.tensorboard=false", "optim.warmup_steps=1", "checkpoint.save_interval_steps=0"]


def test_the_job_code_prefers_what_needs_a_person_then_the_hang_then_a_crash_then_requeue() -> None:
    assert job_exit_code({0: 75, 1: 75}) == 75
    assert job_exit_code({0: 75, 1: -15}) == 75  # rank 1 was stopped by torchrun's teardown after rank 0's 75
    assert job_exit_code({1: 76, 0: -15}) == 76  # the hung rank was stopped by torchrun after its peer exited 76
    assert job_exit_code({0: 77, 1: 77}) == 77
    assert job_exit_code({0: 2}) == 2
    assert job_exit_code({0: 1, 1: 75}) == 1
    assert job_exit_code({0: -9}) == 137


def _launch(run_dir: Path, *overrides: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return subprocess.Popen([sys.executable, "-m", "launch", "launch", "local", "--nproc", "2", *BASE,
                             f"logging.run_dir={run_dir}", *overrides], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _launch_until_three_logged_steps(run_dir: Path) -> subprocess.Popen[str]:
    proc = _launch(run_dir, "train.max_steps=100000")
    deadline_s = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 3):
        assert time.monotonic() < deadline_s and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    return proc


def _assert_quiet(stderr: str) -> None:
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr and "FAILED" not in stderr, stderr[-3000:]


@pytest.mark.slow
def test_sigterm_exits_75_after_a_checkpoint_without_a_traceback(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _launch_until_three_logged_steps(run_dir)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    _assert_quiet(stderr)
    assert "launch local: exit 75 (checkpointed on a signal: run the same command again to resume)" in stderr
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run_dir / "checkpoints" / latest / "metadata.json").read_text())
    assert meta["save_reason"] == "signal"


@pytest.mark.slow
def test_killing_launch_local_with_sigkill_stops_torchrun_and_the_ranks(tmp_path: Path) -> None:
    """No orphans: a SIGKILLed launcher cannot forward a signal, so torchrun gets SIGTERM from the kernel instead
    (PR_SET_PDEATHSIG) and stops its ranks, which checkpoint on the way out."""
    import psutil

    run_dir = tmp_path / "run"
    proc = _launch_until_three_logged_steps(run_dir)
    family = psutil.Process(proc.pid).children(recursive=True)  # torchrun's agent and the two ranks
    assert len(family) >= 3, family
    proc.kill()
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(family, timeout=120)
    for orphan in alive:  # clean up before failing: orphans would slow every later test
        orphan.kill()
    assert not alive, "still running after the launcher was killed: " + ", ".join(map(str, alive))
    proc.communicate(timeout=30)
    assert (run_dir / "checkpoints" / "latest").exists()  # the ranks stopped as on any SIGTERM: with a checkpoint


@pytest.mark.slow
def test_a_diverged_run_exits_77_without_a_traceback(tmp_path: Path) -> None:
    proc = _launch(tmp_path / "run", "train.max_steps=20", "optim.lr=1e12", "optim.grad_clip=0",
                   "faults.rollback_after_bad_steps=2", "faults.max_rollbacks=0")
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 77, stderr[-3000:]
    _assert_quiet(stderr)
    assert "launch local: exit 77 (diverged)" in stderr and "lower optim.lr" in stderr


@pytest.mark.slow
def test_a_data_error_in_every_rank_is_printed_whole_once(tmp_path: Path) -> None:
    """Both ranks stop on the same missing dataset: rank 0 prints the whole message, rank 1 one line naming its log,
    which holds the whole message too (nothing lost)."""
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, "data.synthetic=false", f"data.datasets=[{{path: {tmp_path / 'nowhere'}}}]")
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 2, stderr[-3000:]
    _assert_quiet(stderr)
    assert stderr.count("no manifest at") == 1 and stderr.count("data.datasets names data that is not there") == 2
    assert f"pretrain train (rank 1): error: data.datasets names data that is not there: (whole message: " \
           f"{run_dir / 'logs' / 'rank1.log'})" in stderr
    assert "no manifest at" in (run_dir / "logs" / "rank1.log").read_text()


@pytest.mark.slow
def test_a_hung_rank_ends_the_launch_with_76_within_the_bound(tmp_path: Path) -> None:
    import psutil

    run_dir, hang_timeout_s = tmp_path / "run", 5
    proc = _launch(run_dir, "train.max_steps=100000", f"faults.hang_timeout_s={hang_timeout_s}")
    deadline_s = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 3):
        assert time.monotonic() < deadline_s and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.environ().get("RANK") == "1"]
    os.kill(ranks[0].pid, signal.SIGSTOP)  # neither works nor dies
    stopped_s = time.monotonic()
    _, stderr = proc.communicate(timeout=hang_timeout_s + 90)
    ended_s = time.monotonic() - stopped_s
    assert proc.returncode == 76, stderr[-3000:]
    assert "launch local: exit 76 (hang (watchdog)); rank 0: exit 76, rank 1: killed by signal 9" in stderr
    assert ended_s < hang_timeout_s + 60, ended_s  # the watchdog, then torchrun's 30 s grace before SIGKILL
