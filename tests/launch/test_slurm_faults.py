"""Faults on the localhost Slurm (cluster/start.sh: two slurmd "nodes" n1, n2), with the tiny model on 2 ranks:
a hung rank, chained jobs after a terminal outcome, two jobs on one run directory, a signal to the batch shell,
and an allocation smaller than the plan. docs/operations.md says what each outcome does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.slurm import job_state as job_state_of
from launch.slurm import wait_for_job
from trainer.testing import throttle

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
COMMON = ["train.log_interval_steps=1", "train.eval_interval_steps=0", "logging.tensorboard=false",
          "launch.nodes=2", "launch.gpus_per_node=1", "launch.time_limit=10"]


def submit(run_dir: Path, *overrides: str) -> list[str]:
    """`pretrain submit` of the tiny model on both nodes; returns the job ids (first, then chained follow-ups)."""
    result = subprocess.run([sys.executable, "-m", "launch", "submit", "--config", str(REPO / "configs/tiny.yaml"),
                             f"logging.run_dir={run_dir}", *COMMON, *overrides],
                            capture_output=True, text=True, cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    return result.stdout.split(" for run ")[0].removeprefix("submitted job ").split(" -> ")


def job_log(run_dir: Path, job_id: str) -> str:
    path = run_dir / "logs" / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else ""


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss; a resumed run appends, so the last line of a step wins."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.endswith("}")]  # a line being written may be partial
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def train_lines(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.endswith("}") and '"train"' in line]


def wait_for_step(run_dir: Path, step: int, timeout_s: float = 240) -> None:
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.1)
    pytest.fail(f"no step {step} within {timeout_s} s")


def job_seconds(job_id: str) -> float:
    """RunTime of a finished job as scontrol reports it (seconds resolution)."""
    fields = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout.split()
    run_time = next(f.split("=", 1)[1] for f in fields if f.startswith("RunTime="))
    h, m, s = (int(x) for x in run_time.split("-")[-1].split(":"))
    return 3600 * h + 60 * m + s


def rank_pid(job_id: str, rank: int) -> int:
    """The pid of `pretrain train` for one rank of a job (both "nodes" are this host)."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in cmdline and f"SLURM_JOB_ID={job_id}".encode() in environ \
                and f"SLURM_PROCID={rank}".encode() in environ and cmdline[0].endswith(b"python"):
            return pid
    raise AssertionError(f"no rank {rank} process of job {job_id}")


# ---------------------------------------------------------------------------------------------------------------------
# 1. A hung rank


def test_a_hung_rank_ends_the_job_step_and_the_job_is_requeued_and_finishes(tmp_path: Path) -> None:
    run_dir, hang_timeout_s, max_steps = tmp_path / "run", 5, 200
    [job_id] = submit(run_dir, f"train.max_steps={max_steps}", "checkpoint.save_interval_steps=10",
                      f"faults.hang_timeout_s={hang_timeout_s}", "launch.max_hang_requeues=1")
    wait_for_step(run_dir, 25)
    stopped = rank_pid(job_id, 1)
    os.kill(stopped, signal.SIGSTOP)  # a rank that neither works nor dies: a hang
    stop_s = time.monotonic()
    while f"job {job_id}: requeueing" not in job_log(run_dir, job_id):
        assert time.monotonic() - stop_s < hang_timeout_s + 60, job_log(run_dir, job_id)
        time.sleep(0.2)
    step_ended_s = time.monotonic() - stop_s
    # Rank 1's node is the suspect, but a 2-node job on a 2-node cluster cannot leave it out: requeued in place.
    assert "hang 1 of at most launch.max_hang_requeues=1" in job_log(run_dir, job_id)
    assert "the partition keeps 1 usable node(s) for a 2-node job" in job_log(run_dir, job_id)
    assert not Path(f"/proc/{stopped}").exists() or Path(f"/proc/{stopped}/stat").read_text().split()[2] == "Z"
    assert wait_for_job(job_id, timeout_s=300) == "COMPLETED", job_log(run_dir, job_id)
    log = job_log(run_dir, job_id)
    assert f"job {job_id} restart 1:" in log
    assert sorted(losses(run_dir)) == list(range(1, max_steps + 1))
    assert "watchdog: no training progress" in (run_dir / "logs" / "rank0.log").read_text()
    print(f"SIGSTOP of rank 1 -> step ended and job requeued after {step_ended_s:.1f} s "
          f"(hang_timeout_s={hang_timeout_s}, bound {hang_timeout_s + 60} s)")


def job_field(job_id: str, name: str) -> str:
    fields = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout.split()
    return next(f.split("=", 1)[1] for f in fields if f.startswith(f"{name}="))


def test_a_hang_submits_the_job_again_without_the_hung_node_and_its_follow_up_waits_for_that_job(
        tmp_path: Path) -> None:
    """A 1-node job (2 ranks) on a 2-node cluster: the node where a rank never exited is left out of the new job,
    which resumes and finishes on the other node; the chain's follow-up waits for the new job and stops after it."""
    run_dir, hang_timeout_s, max_steps = tmp_path / "run", 5, 60
    first, follow_up = submit(run_dir, "launch.nodes=1", "launch.gpus_per_node=2", "launch.cpus_per_task=1",
                              f"train.max_steps={max_steps}", "checkpoint.save_interval_steps=10",
                              f"faults.hang_timeout_s={hang_timeout_s}", "launch.max_hang_requeues=2",
                              "launch.chain_jobs=1")
    wait_for_step(run_dir, 25)
    hung_node = job_field(first, "NodeList")
    os.kill(rank_pid(first, 1), signal.SIGSTOP)
    assert wait_for_job(first, timeout_s=hang_timeout_s + 60) == "FAILED", job_log(run_dir, first)
    outcomes = run_dir / "logs" / "outcomes"
    assert (outcomes / f"job-{first}").read_text().split() == ["hang_resubmitted", "76"]
    second = (outcomes / f"replaced-{first}").read_text().strip()
    assert f"submitted job {second} without {hung_node}" in job_log(run_dir, first)
    assert "but `scontrol update" not in job_log(run_dir, first)  # every pending follow-up was moved
    assert job_field(second, "ExcNodeList") == hung_node
    first_records = outcomes / f"tasks-{first}"
    assert (first_records / "task0.hang").read_text().split()[3] == hung_node  # rank 0's watchdog fired, in time
    assert job_field(follow_up, "Dependency").startswith(f"afterany:{second}")
    assert wait_for_job(second, timeout_s=300) == "COMPLETED", job_log(run_dir, second)
    assert job_field(second, "NodeList") not in ("", hung_node)
    assert (outcomes / f"hang-requeues-{second}").read_text().split() == ["1"]  # the budget went on with the job
    assert sorted(losses(run_dir)) == list(range(1, max_steps + 1))
    assert wait_for_job(follow_up, timeout_s=120) == "COMPLETED"
    assert f"job {second} ended finished (exit 0): nothing to train" in job_log(run_dir, follow_up)


def wait_for_rank_pid(job_id: str, rank: int, timeout_s: float = 120) -> int:
    deadline_s = time.monotonic() + timeout_s
    while True:
        try:
            return rank_pid(job_id, rank)
        except AssertionError:
            if time.monotonic() > deadline_s:
                raise
            time.sleep(0.05)


def test_a_straggler_stops_the_job_which_is_submitted_again_without_its_node(tmp_path: Path) -> None:
    """A 1-node job (2 ranks) on a 2-node cluster, rank 1 run at half speed from its start (trainer.testing.throttle):
    the checks at steps 4 and 8 name it, the run saves after step 8 and exits 79, and the batch script submits the
    job again without that node; the new job resumes from step 8 on the other node and finishes."""
    run_dir, max_steps = tmp_path / "run", 30
    [first] = submit(run_dir, "launch.nodes=1", "launch.gpus_per_node=2", "launch.cpus_per_task=1",
                     f"train.max_steps={max_steps}", "checkpoint.save_interval_steps=20",
                     "faults.straggler_check_interval_steps=4", "faults.straggler_ratio=1.3",
                     "faults.straggler_action=leave_node", "faults.straggler_patience_checks=2")
    slowed = throttle(wait_for_rank_pid(first, 1))
    try:
        assert wait_for_job(first, timeout_s=300) == "FAILED", job_log(run_dir, first)
    finally:
        slowed.terminate()
        slowed.wait(timeout=10)
    slow_node = job_field(first, "NodeList")
    outcomes = run_dir / "logs" / "outcomes"
    assert (outcomes / f"job-{first}").read_text().split() == ["straggler_resubmitted", "79"], job_log(run_dir, first)
    assert (outcomes / f"tasks-{first}" / "stragglers").read_text().split() == [slow_node]
    second = (outcomes / f"replaced-{first}").read_text().strip()
    assert f"suspect node(s) {slow_node} (a straggler there slowed every rank); submitted job {second}" \
        in job_log(run_dir, first)
    assert job_field(second, "ExcNodeList") == slow_node
    records = [json.loads(line) for line in (run_dir / "stragglers.jsonl").read_text().splitlines()]
    assert [(r["step"], r["rank"], r["node"]) for r in records] == [(4, 1, slow_node), (8, 1, slow_node)]
    assert wait_for_job(second, timeout_s=300) == "COMPLETED", job_log(run_dir, second)
    assert job_field(second, "NodeList") not in ("", slow_node)
    assert "resumed from" in (rank0 := (run_dir / "logs" / "rank0.log").read_text()) and "/step_8:" in rank0
    assert sorted(losses(run_dir)) == list(range(1, max_steps + 1))


# ---------------------------------------------------------------------------------------------------------------------
# 2. Chained jobs after a terminal outcome


def test_chained_jobs_after_a_diverged_run_train_nothing_and_exit_in_seconds(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first, *follow_ups = submit(run_dir, "train.max_steps=40", "checkpoint.save_interval_steps=0", "optim.lr=1e12",
                                "optim.warmup_steps=1", "optim.grad_clip=0", "faults.rollback_after_bad_steps=2",
                                "faults.max_rollbacks=0", "launch.chain_jobs=2")
    assert len(follow_ups) == 2
    for job_id in (first, *follow_ups):
        assert wait_for_job(job_id, timeout_s=300) in ("FAILED", "COMPLETED"), job_log(run_dir, job_id)
    assert (run_dir / "logs" / "outcomes" / f"job-{first}").read_text().split() == ["diverged", "77"]
    steps_trained = train_lines(run_dir)
    for job_id in follow_ups:
        log = job_log(run_dir, job_id)
        assert "ended diverged (exit 77): nothing to train, releasing the nodes" in log, log
        assert job_seconds(job_id) <= 5, f"follow-up {job_id} held the nodes {job_seconds(job_id)} s"
        assert not list((run_dir / "logs" / "outcomes" / f"tasks-{job_id}").glob("*.rc"))  # no rank started
    assert train_lines(run_dir) == steps_trained  # no follow-up logged a step


def test_chained_job_after_a_finished_run_exits_in_seconds(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first, follow_up = submit(run_dir, "train.max_steps=6", "checkpoint.save_interval_steps=0", "launch.chain_jobs=1")
    assert wait_for_job(first, timeout_s=300) == "COMPLETED", job_log(run_dir, first)
    assert wait_for_job(follow_up, timeout_s=300) == "COMPLETED", job_log(run_dir, follow_up)
    assert "ended finished (exit 0): nothing to train" in job_log(run_dir, follow_up)
    assert job_seconds(follow_up) <= 5
    assert sorted(train_lines(run_dir)) == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------------------------------
# 3. Two jobs on one run directory; 7. a smaller allocation than planned


def test_a_second_job_on_a_running_run_directory_refuses_and_the_first_trains_alone(tmp_path: Path) -> None:
    run_dir, max_steps = tmp_path / "run", 400
    shared_nodes = "launch.exclusive=false"  # both jobs fit on n1+n2 at once (1 CPU per task, 2 per node)
    [first] = submit(run_dir, f"train.max_steps={max_steps}", "checkpoint.save_interval_steps=0", shared_nodes)
    wait_for_step(run_dir, 5)
    again = subprocess.run([sys.executable, "-m", "launch", "submit", "--config", str(REPO / "configs/tiny.yaml"),
                            f"logging.run_dir={run_dir}", *COMMON, f"train.max_steps={max_steps}", shared_nodes],
                           capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 2 and f"is in use by slurm job {first}" in again.stderr, again.stderr
    # Past `pretrain submit` (the script by hand, while the first runs): the job itself refuses before building.
    second = subprocess.run(["sbatch", "--parsable", str(run_dir / "sbatch.sh")], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert wait_for_job(second, timeout_s=120) == "FAILED"
    assert job_state_of(first) == "RUNNING", "the refusal must come while the first job still trains"
    log = job_log(run_dir, second)
    assert f"job {second}: exit 2 (config_error)" in log, log
    assert f"is in use by slurm job {first} (host" in log and f"scancel {first}" in log, log
    assert wait_for_job(first, timeout_s=300) == "COMPLETED"
    assert sorted(train_lines(run_dir)) == list(range(1, max_steps + 1))  # every step logged once


def test_an_allocation_smaller_than_the_plan_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rendered = subprocess.run([sys.executable, "-m", "launch", "submit", "--config", str(REPO / "configs/tiny.yaml"),
                               f"logging.run_dir={run_dir}", *COMMON, "--dry-run"], capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    job = subprocess.run(["sbatch", "--parsable", "--nodes=1", str(run_dir / "sbatch.sh")], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert wait_for_job(job, timeout_s=120) == "FAILED"
    log = job_log(run_dir, job)
    assert "this allocation runs 1 tasks (1 nodes) but the run is planned for 2" in log, log


# ---------------------------------------------------------------------------------------------------------------------
# 7. A signal to the batch shell


def test_usr1_to_the_batch_shell_requeues_resumes_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    max_steps = 300
    reference_dir, signalled_dir = tmp_path / "reference", tmp_path / "signalled"
    [reference] = submit(reference_dir, f"train.max_steps={max_steps}", "checkpoint.save_interval_steps=0")
    assert wait_for_job(reference, timeout_s=300) == "COMPLETED"
    [job_id] = submit(signalled_dir, f"train.max_steps={max_steps}", "checkpoint.save_interval_steps=0")
    wait_for_step(signalled_dir, 20)
    subprocess.run(["scancel", "--batch", "-s", "USR1", job_id], check=True)  # the batch shell only
    assert wait_for_job(job_id, timeout_s=300) == "COMPLETED", job_log(signalled_dir, job_id)
    log = job_log(signalled_dir, job_id)
    assert "batch shell got USR1, passing it to the ranks" in log and "checkpointed on signal, requeueing" in log
    assert f"job {job_id} restart 1:" in log
    assert losses(signalled_dir) == losses(reference_dir)


def test_scancel_is_not_undone_by_a_requeue(tmp_path: Path) -> None:
    """scancel sends SIGTERM: the ranks checkpoint and exit 75, but a cancelled job must stay cancelled (Slurm would
    requeue even a finished job if the batch script asked)."""
    run_dir = tmp_path / "run"
    [job_id] = submit(run_dir, "train.max_steps=100000", "checkpoint.save_interval_steps=0")
    wait_for_step(run_dir, 5)
    subprocess.run(["scancel", job_id], check=True)
    assert wait_for_job(job_id, timeout_s=120) == "CANCELLED"
    time.sleep(3)  # a wrong requeue would show as a second start of the job
    log = job_log(run_dir, job_id)
    assert "restart 1:" not in log and "requeueing" not in log, log
