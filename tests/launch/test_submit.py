"""`pretrain submit`: sbatch rendering for real GPU clusters, refusal of bad configs, and real jobs on localhost Slurm."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.slurm import SbatchRequest, render_sbatch, wait_for_job
from trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _request(tmp_path: Path) -> SbatchRequest:
    return SbatchRequest(config_path=tmp_path / "run" / "config.yaml", run_dir=tmp_path / "run", workdir=tmp_path,
                         python="/opt/venv/bin/python", requeue_exit_code=75)


def _directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_gpu_cluster_script_has_what_a_gpu_cluster_needs(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/7b.yaml", [
        "launch.partition=gpu", "launch.account=proj", "launch.qos=high", "launch.constraint=h100",
        "launch.cpus_per_task=12", "launch.signal_lead_s=300",
        "launch.extra_sbatch=['#SBATCH --mail-type=END']", "launch.env_setup=['module load cuda/12.4', 'source /opt/venv/bin/activate']",
    ])
    script = render_sbatch(cfg, _request(tmp_path))
    directives = _directives(script)
    for expected in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--partition=gpu",
                     "--account=proj", "--qos=high", "--constraint=h100", "--exclusive", "--time=2-00:00:00",
                     "--signal=USR1@300", "--requeue", "--mail-type=END", "--open-mode=append"):
        assert expected in directives, f"{expected} missing from {directives}"
    assert script.index("module load cuda/12.4") < script.index("srun ")
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}" in script
    assert "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}" in script
    # Counts come from Slurm's environment at run time, never restated.
    assert "RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS" in script
    assert "/opt/venv/bin/python -m launch train --config " + str(tmp_path / "run" / "config.yaml") in script
    # The first failing rank ends the step; run_task maps the planned 0 and 75 to 0 so that ranks exiting 75 one by
    # one after a signal are never cut off.
    assert "srun --kill-on-bad-exit=1 " in script and "case $rc in 0|75) exit 0 ;;" in script
    assert "    75)\n" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    bash = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert bash.returncode == 0, bash.stderr


def test_cpu_script_uses_no_gpus_and_container_options(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/tiny.yaml", ["launch.container=nvcr.io/nvidia/pytorch:24.05-py3",
                                                   "launch.container_mounts=['/data:/data']", "launch.requeue=false",
                                                   "launch.exclusive=false"])
    script = render_sbatch(cfg, _request(tmp_path))
    directives = _directives(script)
    assert not any(d.startswith("--gpus") for d in directives)
    assert "--no-requeue" in directives and "--exclusive" not in directives
    assert not any(d.startswith("--signal") for d in directives)
    assert "--container-image=nvcr.io/nvidia/pytorch:24.05-py3" in script
    assert f"--container-mounts=/data:/data,{tmp_path}:{tmp_path}" in script
    assert "NCCL_DEBUG" not in script and "DS_ACCELERATOR" in script


def test_defaults_give_each_rank_its_cpus_and_a_bare_minutes_time_limit_is_accepted(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/tiny.yaml", ["launch.time_limit=30", "data.num_workers=3",
                                                   "launch.max_hang_requeues=4"])
    script = render_sbatch(cfg, _request(tmp_path))
    directives = _directives(script)
    assert "--cpus-per-task=4" in directives  # the rank plus its 3 loader workers
    assert "--time=30" in directives  # minutes, as Slurm reads it (YAML gives an int)
    assert 'if still_running && [ "$hangs" -le 4 ]; then' in script
    assert 'if [ "${SLURM_NTASKS:-0}" -ne 2 ]; then' in script  # tiny.yaml: 1 node x 2 processes
    no_requeue = render_sbatch(load_config(REPO / "configs/tiny.yaml", ["launch.requeue=false"]), _request(tmp_path))
    assert "scontrol requeue" not in no_requeue and "record_outcome stopped_on_signal 75" in no_requeue
    for text in (script, no_requeue):
        bash = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        assert bash.returncode == 0, bash.stderr


def test_rendering_is_deterministic(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/70b.yaml")
    assert render_sbatch(cfg, _request(tmp_path)) == render_sbatch(cfg, _request(tmp_path))


def _pretrain(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, cwd=cwd)


def test_bad_config_is_rejected_before_anything_is_submitted(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _pretrain("submit", "--config", str(REPO / "configs/tiny.yaml"), f"logging.run_dir={run_dir}",
                       "launch.nodes=2", "launch.gpus_per_node=1", "parallel.tp=3", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "parallel.tp (3)" in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists(), "nothing may be written or submitted for a config that cannot run"


def test_dry_run_writes_the_script_next_to_the_resolved_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _pretrain("submit", "--config", str(REPO / "configs/tiny.yaml"), f"logging.run_dir={run_dir}",
                       "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (run_dir / "sbatch.sh").read_text() == result.stdout
    assert load_config(run_dir / "config.yaml").name == "tiny"


# ---------------------------------------------------------------------------------------------------------------
# Real jobs on the localhost cluster (cluster/start.sh): two slurmd "nodes", one task each, gloo over TCP.
# ---------------------------------------------------------------------------------------------------------------
def _losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss; a resumed run appends, so the last line of a step wins."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.endswith("}")]  # a line being written may be partial
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_job_trains_the_tiny_model_and_a_chained_job_resumes_after_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = [f"logging.run_dir={run_dir}", "train.max_steps=6", "train.log_interval_steps=1",
              "train.eval_interval_steps=0", "checkpoint.save_interval_steps=0", "logging.tensorboard=false"]
    result = _pretrain("submit", "--config", str(REPO / "configs/tiny.yaml"), "launch.nodes=2",
                       "launch.gpus_per_node=1", "launch.time_limit=00:10:00", "launch.chain_jobs=1", *common,
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()  # "submitted job <first> -> <second> for run 'tiny'"
    first_job, second_job = words[2], words[4]
    dependency = subprocess.run(["scontrol", "show", "job", second_job], capture_output=True, text=True).stdout
    assert f"Dependency=afterany:{first_job}" in dependency
    assert wait_for_job(first_job, timeout_s=300) == "COMPLETED", (run_dir / "logs" / f"slurm-{first_job}.out").read_text()
    log = (run_dir / "logs" / f"slurm-{first_job}.out").read_text()
    assert "2 nodes x 1 tasks" in log
    losses = _losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1], f"loss did not fall: {losses}"
    assert (run_dir / "logs" / "rank1.log").exists()
    # The follow-up job finds the finished run's final checkpoint (resume: auto) and has nothing left to train.
    assert wait_for_job(second_job, timeout_s=300) == "COMPLETED", (run_dir / "logs" / f"slurm-{second_job}.out").read_text()
    assert _losses(run_dir) == losses


def _submit_tiny_two_node_job(run_dir: Path, tmp_path: Path, max_steps: int) -> str:
    overrides = [f"logging.run_dir={run_dir}", f"train.max_steps={max_steps}", "train.log_interval_steps=1",
                 "train.eval_interval_steps=0", "checkpoint.save_interval_steps=0", "logging.tensorboard=false",
                 "launch.nodes=2", "launch.gpus_per_node=1", "launch.time_limit=00:10:00"]
    result = _pretrain("submit", "--config", str(REPO / "configs/tiny.yaml"), *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[2]


def _wait_for_logged_step(run_dir: Path, step: int, timeout_s: float) -> None:
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        if (run_dir / "metrics.jsonl").exists() and max(_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.1)
    pytest.fail(f"the job did not log step {step} within {timeout_s} s")


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """SIGUSR1 (what --signal=USR1@N sends before the time limit) mid-run: every rank finishes its step, the run
    checkpoints and exits 75, the batch script requeues the job, and the restart resumes from that checkpoint."""
    max_steps = 300
    reference_dir, preempted_dir = tmp_path / "reference", tmp_path / "preempted"
    reference_job = _submit_tiny_two_node_job(reference_dir, tmp_path, max_steps)
    assert wait_for_job(reference_job, timeout_s=300) == "COMPLETED"

    job_id = _submit_tiny_two_node_job(preempted_dir, tmp_path, max_steps)
    _wait_for_logged_step(preempted_dir, 20, timeout_s=240)
    subprocess.run(["scancel", "-s", "USR1", job_id], check=True)  # to every task of the running step
    state = wait_for_job(job_id, timeout_s=300)
    log = (preempted_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", log
    assert "checkpointed on signal, requeueing" in log and "restart 1:" in log, log
    assert f"job {job_id} restart 0:" in log
    reference, preempted = _losses(reference_dir), _losses(preempted_dir)
    assert sorted(preempted) == list(range(1, max_steps + 1))
    assert preempted == reference, "the resumed run must reproduce the uninterrupted per-step losses exactly"
