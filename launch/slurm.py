"""Render and submit the sbatch script of a run.

Process model: **one Slurm task per GPU** (`srun --ntasks-per-node=<gpus_per_node>`), each task one training rank with
RANK=$SLURM_PROCID, LOCAL_RANK=$SLURM_LOCALID, WORLD_SIZE=$SLURM_NTASKS and the rendezvous on the first host of
$SLURM_JOB_NODELIST. We chose this over one torchrun agent per node because:
- `--signal=USR1@N` reaches every task of the step directly; with torchrun in between, the agent (which has no USR1
  handler) would die of the signal before its workers could checkpoint;
- Slurm already is the process manager: a failed job is restarted by requeue + `resume: auto`, so torchrun's elastic
  restarts would only add a second, competing restart policy;
- counts come from Slurm's environment at run time, never restated in the script.

Preemption and time limits: Slurm sends SIGUSR1 `signal_lead_s` before the limit; every rank finishes its step, the
run checkpoints and exits with `requeue_exit_code`; the batch script then calls `scontrol requeue` and the job comes
back under the same id (SLURM_RESTART_COUNT=1, ...) and resumes from the newest complete checkpoint. A real
preemption (PreemptMode=REQUEUE) requeues the job itself.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Environment defaults for GPU jobs; every one is `${VAR:-default}` so a user's exported value wins.
NCCL_DEFAULTS = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed collective aborts the job instead of hanging it
    "NCCL_DEBUG": "WARN",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # megatron's TP comm/compute overlap assumes in-order kernel launch
}


class SlurmError(RuntimeError):
    user_error = True


@dataclass(frozen=True)
class SbatchRequest:
    """What the script needs besides the run config: where things are on the submitting machine."""

    config_path: Path  # the resolved config the job trains from (absolute; written into the run dir)
    run_dir: Path  # absolute
    workdir: Path  # the job's working directory (absolute)
    python: str  # interpreter that has this package installed
    requeue_exit_code: int


def sbatch_directives(launch: Any, name: str, logs_dir: Path) -> list[str]:
    """`#SBATCH` lines from the `launch` config section, in the order a reader expects."""
    lines = [
        f"--job-name={name}",
        f"--nodes={launch.nodes}",
        f"--ntasks-per-node={launch.gpus_per_node}",
    ]
    if launch.device == "cuda":
        lines.append(f"--gpus-per-node={launch.gpus_per_node}")
    optional = {"cpus-per-task": launch.cpus_per_task, "partition": launch.partition, "account": launch.account,
                "qos": launch.qos, "time": launch.time_limit, "constraint": launch.constraint}
    lines += [f"--{flag}={value}" for flag, value in optional.items() if value is not None]
    if launch.exclusive:
        lines.append("--exclusive")
    # A requeued job appends to the same log, so one file tells the whole story of a job id.
    lines += [f"--output={logs_dir}/slurm-%j.out", "--open-mode=append"]
    if launch.requeue:
        lines += [f"--signal=USR1@{launch.signal_lead_s}", "--requeue"]
    else:
        lines.append("--no-requeue")
    return [f"#SBATCH {line}" for line in lines] + list(launch.extra_sbatch)


def _environment_block(launch: Any) -> list[str]:
    lines = [
        "# Rendezvous on the first host of the allocation; the port is derived from the job id so two jobs sharing",
        "# a node do not collide.",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}",
        "# One intra-op thread pool per rank sized to its CPUs (user value wins).",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}",
    ]
    if launch.device == "cuda":
        lines += [f"export {var}=${{{var}:-{value}}}" for var, value in NCCL_DEFAULTS.items()]
    else:
        lines.append("export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}")
    return lines


def _srun_command(launch: Any, request: SbatchRequest) -> str:
    # --kill-on-bad-exit=0: on SIGUSR1 every rank saves its part of the checkpoint and exits 75, at slightly
    # different moments; killing the step at the first non-zero exit could cut a rank off mid-commit and turn srun's
    # exit code into a kill instead of 75. A crashed rank is still caught: its peers fail their next collective within
    # faults.collective_timeout_s, or the step watchdog exits them.
    srun = ["srun", "--kill-on-bad-exit=0", f"--output={request.run_dir}/logs/slurm-%j-task%t.out"]
    if launch.container:
        srun.append(f"--container-image={launch.container}")
        mounts = [*launch.container_mounts, f"{request.workdir}:{request.workdir}"]
        srun.append(f"--container-mounts={','.join(mounts)}")
    train = [request.python, "-m", "launch", "train", "--config", str(request.config_path)]
    # Each task becomes one rank: map Slurm's ids to the variables torch.distributed and DeepSpeed read.
    rank_env = ("RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS "
                "LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE")
    inner = f"{rank_env} exec {shlex.join(train)}"
    return f"{shlex.join(srun)} bash -c {shlex.quote(inner)}"


def render_sbatch(cfg: Any, request: SbatchRequest) -> str:
    """The whole batch script. Deterministic text: rendering the same config twice gives the same script."""
    launch = cfg.launch
    body = [
        "#!/bin/bash",
        f"# Rendered by `pretrain submit` for run {cfg.name!r}. Edit freely and resubmit with: sbatch {request.run_dir}/sbatch.sh",
        *sbatch_directives(launch, cfg.name, request.run_dir / "logs"),
        f"#SBATCH --chdir={request.workdir}",
        "",
        "set -uo pipefail",
        *launch.env_setup,
        "",
        *_environment_block(launch),
        "",
        'echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NNODES nodes x $SLURM_NTASKS_PER_NODE tasks, '
        'master $MASTER_ADDR:$MASTER_PORT"',
        _srun_command(launch, request),
        "rc=$?",
        f"if [ $rc -eq {request.requeue_exit_code} ]; then",
        "    # The run checkpointed on SIGUSR1 (time limit or preemption): queue this job again; it resumes from",
        "    # the newest complete checkpoint (checkpoint.resume=auto).",
        '    echo "job $SLURM_JOB_ID: checkpointed on signal, requeueing"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        "exit $rc",
    ]
    return "\n".join(body) + "\n"


def sbatch_submit(script: Path, dependency_job_id: str | None = None) -> str:
    """Submit with `sbatch --parsable`; return the job id. Fails with sbatch's own message."""
    command = ["sbatch", "--parsable"]
    if dependency_job_id is not None:
        command.append(f"--dependency=afterany:{dependency_job_id}")
    command.append(str(script))
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise SlurmError("sbatch not found: run `pretrain submit` on a Slurm login node, or use --dry-run to only "
                         "render the script") from err
    if result.returncode != 0:
        raise SlurmError(f"sbatch refused the job (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def default_request(config_path: Path, run_dir: Path, requeue_exit_code: int) -> SbatchRequest:
    return SbatchRequest(config_path=config_path.resolve(), run_dir=run_dir.resolve(), workdir=Path(os.getcwd()),
                         python=sys.executable, requeue_exit_code=requeue_exit_code)


def job_state(job_id: str) -> str:
    """The job's state as squeue reports it, finished jobs included (kept for MinJobAge), e.g. COMPLETED."""
    result = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return result.stdout.strip()


def wait_for_job(job_id: str, timeout_s: float, poll_s: float = 0.5) -> str:
    """Block until the job has left the queue; return its final state (COMPLETED, FAILED, TIMEOUT, ...).

    Waits for the queue to empty rather than for COMPLETED, which would hang on a job that failed or was cancelled.
    A requeued job stays in the queue (PENDING, then RUNNING again), so this returns only at its real end.
    """
    import time

    deadline_s = time.monotonic() + timeout_s
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline_s:
            raise SlurmError(f"job {job_id} still queued or running after {timeout_s:.0f} s "
                             f"(state {job_state(job_id) or 'unknown'}); cancel it with `scancel {job_id}`")
        time.sleep(poll_s)
    return job_state(job_id)
