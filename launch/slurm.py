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

Faults (docs/operations.md): the first rank that fails ends the whole step (--kill-on-bad-exit=1; planned exits 0
and 75 are mapped to 0 per task so they never trigger it); a hang (76) restarts the job at most
launch.max_hang_requeues times, as a new job without the suspect nodes where it can (launch/hung_nodes.py); each
job records its outcome in <run_dir>/logs/outcomes/job-<id>, and a chained follow-up exits at once after a terminal
one (finished, diverged, config error, corrupt data).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.exit_codes import HANG_RECORD_DIR_ENV, PRIORITY

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


def sbatch_directives(launch: Any, name: str, logs_dir: Path, loader_workers: int = 0) -> list[str]:
    """`#SBATCH` lines from the `launch` config section, in the order a reader expects. Without
    launch.cpus_per_task, each task asks for one CPU for the rank plus one per data-loader worker."""
    lines = [
        f"--job-name={name}",
        f"--nodes={launch.nodes}",
        f"--ntasks-per-node={launch.gpus_per_node}",
    ]
    if launch.device == "cuda":
        lines.append(f"--gpus-per-node={launch.gpus_per_node}")
    cpus_per_task = launch.cpus_per_task or loader_workers + 1
    optional = {"cpus-per-task": cpus_per_task, "partition": launch.partition, "account": launch.account,
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


# Bash functions the script defines. `wait_for` waits for a background child through trapped signals: a trapped
# signal makes `wait` return early (status > 128) while the child runs on, so it waits again until the status is real.
WAIT_FOR = """\
wait_for() {  # wait_for PID: the child's exit status, also when a trapped signal interrupts the wait
    local status
    while :; do
        trapped=""
        wait "$1"; status=$?
        if [ -z "$trapped" ] || [ "$status" -le 128 ]; then return "$status"; fi
    done
}"""

# run_task: one per task (srun runs it on every node). It records the rank's real exit code, because srun's own code is lost
# when the step is killed, and maps the planned codes 0 and 75 to 0 so that --kill-on-bad-exit=1 ends the step at
# the first *failure* (a hang's 76, a crash) but never cuts off ranks that exit 75 one by one while checkpointing.
def _run_task_function(train: list[str]) -> str:
    return f"""\
run_task() {{
    {shlex.join(train)} &
    local child=$! rc
    trap 'trapped=1; kill -s USR1 "$child" 2>/dev/null' USR1  # bash would die of USR1 and orphan the rank
    trap 'trapped=1; kill -s TERM "$child" 2>/dev/null' TERM
    wait_for "$child"; rc=$?
    echo "$rc ${{SLURMD_NODENAME:-$(hostname)}}" > "$EXIT_DIR/task$SLURM_PROCID.rc"
    case $rc in 0|75) exit 0 ;; *) exit "$rc" ;; esac
}}"""


# The job's outcome from the tasks' recorded codes. Order (trainer.exit_codes.PRIORITY): a code that needs a person
# wins over a retryable one, and a hang (76) over the killed peers' codes (143, 137) that --kill-on-bad-exit causes.
JOB_EXIT_CODE = """\
job_exit_code() {  # job_exit_code SRUN_STATUS: the code this job stands for
    local codes=" $(cut -d' ' -f1 "$EXIT_DIR"/task*.rc 2>/dev/null | sort -un | tr '\\n' ' ')" code
    for code in %s; do
        case "$codes" in *" $code "*) echo "$code"; return ;; esac
    done
    for code in $codes; do
        case $code in 0|75) ;; *) echo "$code"; return ;; esac
    done
    case "$codes" in *" 75 "*) echo 75; return ;; esac
    case "$codes" in " 0 ") echo 0; return ;; esac
    echo "$1"  # no task recorded a code (srun failed to start them): srun's own status
}""" % " ".join(map(str, PRIORITY))


def _srun_command(launch: Any, request: SbatchRequest) -> str:
    # --kill-on-bad-exit=1 with run_task's mapping (0 and 75 → 0): the first rank that fails (a hang's 76, a crash)
    # ends the whole step within seconds, also a rank stuck in SIGSTOP or a dead collective; ranks that exit 75 after
    # a signal, at slightly different moments, are never cut off mid-commit.
    srun = ["srun", "--kill-on-bad-exit=1", f"--output={request.run_dir}/logs/slurm-%j-task%t.out"]
    if launch.container:
        srun.append(f"--container-image={launch.container}")
        mounts = [*launch.container_mounts, f"{request.workdir}:{request.workdir}"]
        srun.append(f"--container-mounts={','.join(mounts)}")
    # Each task becomes one rank: map Slurm's ids to the variables torch.distributed and DeepSpeed read.
    rank_env = ("RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS "
                "LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE")
    return f"{shlex.join(srun)} bash -c {shlex.quote(f'export {rank_env}; run_task')}"


def _chain_gate(run_dir: Path) -> list[str]:
    """A follow-up job (launch.chain_jobs) trains nothing after a terminal outcome of the job it waited for."""
    return [
        "# A follow-up of a chain (launch.chain_jobs, --dependency=afterany): after a terminal outcome of the job it",
        "# waited for (finished, diverged, config error, corrupt data) there is nothing to do: release the nodes now.",
        "# A job resubmitted without hung nodes (launch/hung_nodes.py) left replaced-<id>: the new job's outcome",
        "# counts.",
        'chain_after=${PRETRAIN_CHAIN_AFTER:-}',
        'while [ -n "$chain_after" ] && [ -f "$OUTCOMES/replaced-$chain_after" ]; do',
        '    chain_after=$(cat "$OUTCOMES/replaced-$chain_after")',
        "done",
        'if [ -n "$chain_after" ] && [ -f "$OUTCOMES/job-$chain_after" ]; then',
        '    read -r before_outcome before_code < "$OUTCOMES/job-$chain_after"',
        '    case "$before_outcome" in',
        "        finished|diverged|config_error|data_corrupt|hang_gave_up)",
        '            echo "job $SLURM_JOB_ID: job $chain_after ended $before_outcome (exit $before_code): '
        'nothing to train, releasing the nodes"',
        '            record_outcome "$before_outcome" "$before_code"  # so the next follow-up stops too',
        "            exit 0 ;;",
        "    esac",
        "fi",
    ]


def _allocation_check(launch: Any) -> list[str]:
    expected = launch.nodes * launch.gpus_per_node
    return [
        "# The plan (global batch, parallel layout) was checked for this many ranks: a smaller allocation",
        "# (sbatch --nodes=1 on this script) would train a different world without a word.",
        f'if [ "${{SLURM_NTASKS:-0}}" -ne {expected} ]; then',
        f'    echo "job $SLURM_JOB_ID: this allocation runs ${{SLURM_NTASKS:-0}} tasks ($SLURM_NNODES nodes) but the '
        f"run is planned for {expected} (launch.nodes={launch.nodes} x launch.gpus_per_node={launch.gpus_per_node}):"
        ' refusing. Submit without --nodes/--ntasks overrides, or re-render the script for the new size with'
        ' pretrain submit ... launch.nodes=N" >&2',
        "    record_outcome config_error 2",
        "    exit 2",
        "fi",
    ]


def _outcome_block(launch: Any, request: SbatchRequest) -> list[str]:
    """After srun: requeue what a restart can fix (a signal's checkpoint, a hang up to N times), record the rest."""
    code = request.requeue_exit_code
    if launch.requeue:
        on_signal = ["        # The run checkpointed on SIGUSR1/SIGTERM (time limit or preemption): queue this job again; it",
                     "        # resumes from the newest complete checkpoint (checkpoint.resume=auto). Not after scancel or",
                     "        # the hard time limit (the job is no longer RUNNING): Slurm would requeue even a cancelled job.",
                     "        if still_running; then",
                     f"            record_outcome requeued {code}",
                     '            echo "job $SLURM_JOB_ID: checkpointed on signal, requeueing"',
                     '            scontrol requeue "$SLURM_JOB_ID"',
                     "        else",
                     f"            record_outcome stopped_on_signal {code}",
                     '            echo "job $SLURM_JOB_ID: checkpointed on signal; cancelled or past its time limit: not '
                     'requeued (resubmit to resume)"',
                     "        fi ;;"]
        on_hang = [
            "        # A rank hung (its peers' watchdogs fired, the step was ended): retry a bounded number of times.",
            '        hangs=$(( $(cat "$OUTCOMES/hang-requeues-$SLURM_JOB_ID" 2>/dev/null || echo 0) + 1 ))',
            f'        if still_running && [ "$hangs" -le {launch.max_hang_requeues} ]; then',
            '            echo "$hangs" > "$OUTCOMES/hang-requeues-$SLURM_JOB_ID"',
            f'            echo "job $SLURM_JOB_ID: a rank hung (exit 76; stacks in {request.run_dir}/logs/rank*.log): '
            f'hang $hangs of at most launch.max_hang_requeues={launch.max_hang_requeues}"',
            *_hang_restart(launch, request),
            "        elif ! still_running; then",
            "            record_outcome hang 76  # cancelled or past its time limit: not a reason to give up the run",
            "        else",
            "            record_outcome hang_gave_up 76",
            f'            echo "job $SLURM_JOB_ID: a rank hung (exit 76) after {launch.max_hang_requeues} hang '
            f'requeue(s): giving up. Read the stacks in {request.run_dir}/logs/rank*.log, then resubmit" >&2',
            "        fi ;;"]
        on_straggler = _straggler_restart(request)
    else:  # launch.requeue=false: a follow-up of the chain (if any) continues the run
        on_signal = [f"        record_outcome stopped_on_signal {code} ;;"]
        on_hang = ["        record_outcome hang 76 ;;"]
        on_straggler = ["        record_outcome straggler_stopped 79 ;;"]
    return [
        'rc=$(job_exit_code "$srun_status")',
        "case $rc in",
        "    0) record_outcome finished 0 ;;",
        f"    {code})", *on_signal,
        "    76)", *on_hang,
        "    77) record_outcome diverged 77 ;;",
        "    79)", *on_straggler,
        "    2) record_outcome config_error 2 ;;",
        "    74) record_outcome data_corrupt 74 ;;",
        '    *) record_outcome crashed "$rc" ;;',
        "esac",
        *_failure_summary(request),
        'exit "$rc"',
    ]


def _hang_restart(launch: Any, request: SbatchRequest) -> list[str]:
    """Within the hang budget: a new job without the nodes that hung (launch/hung_nodes.py), else a requeue."""
    requeue = ["record_outcome hang_requeued 76",
               'echo "job $SLURM_JOB_ID: requeueing"',
               'scontrol requeue "$SLURM_JOB_ID"']
    if not launch.exclude_hung_nodes:
        return [f"            {line}" for line in requeue]
    resubmit = [request.python, "-m", "launch.hung_nodes", "--script", str(request.run_dir / "sbatch.sh"),
                "--outcomes", str(request.run_dir / "logs" / "outcomes")]
    return [
        "            # A rank that hung while its peers waited names a suspect node: a new job without it.",
        f'            if new_job=$({shlex.join(resubmit)} --hangs "$hangs"); then',
        "                record_outcome hang_resubmitted 76",
        '                echo "job $SLURM_JOB_ID: resubmitted as job $new_job (it resumes from the newest checkpoint)"',
        "            else",
        *[f"                {line}" for line in requeue],
        "            fi",
    ]


def _straggler_restart(request: SbatchRequest) -> list[str]:
    """faults.straggler_action=leave_node checkpointed and named the slow node(s): a new job without them. Never a
    requeue in place: the same nodes would slow the run again."""
    resubmit = [request.python, "-m", "launch.hung_nodes", "--script", str(request.run_dir / "sbatch.sh"),
                "--outcomes", str(request.run_dir / "logs" / "outcomes"), "--stragglers"]
    return [
        "        # The straggler check named a slow node, and the run checkpointed",
        "        # (faults.straggler_action=leave_node).",
        f"        if still_running && new_job=$({shlex.join(resubmit)}); then",
        "            record_outcome straggler_resubmitted 79",
        '            echo "job $SLURM_JOB_ID: resubmitted as job $new_job without the straggler\'s node (it resumes '
        'from the newest checkpoint)"',
        "        else",
        "            record_outcome straggler_stopped 79",
        '            echo "job $SLURM_JOB_ID: stopped to leave a straggler\'s node out, but no new job was submitted: '
        f'resubmit to resume (the node is named in {request.run_dir}/stragglers.jsonl)" >&2',
        "        fi ;;",
    ]


def _failure_summary(request: SbatchRequest) -> list[str]:
    """The ranks' own error message in the job's log too (it is in the per-task files, which people open last)."""
    tasks = f"{request.run_dir}/logs/slurm-$SLURM_JOB_ID-task*.out"
    return [
        'if [ "$rc" -ne 0 ] && [ "$rc" -ne 75 ]; then',
        f'    echo "job $SLURM_JOB_ID: exit $rc ($(cut -d" " -f1 "$OUTCOMES/job-$SLURM_JOB_ID")); ranks\' output: {tasks}"',
        f'    grep -h -A 12 -m 1 "error:" {tasks} 2>/dev/null | head -n 15',
        "fi",
    ]


def render_sbatch(cfg: Any, request: SbatchRequest) -> str:
    """The whole batch script. Deterministic text: rendering the same config twice gives the same script."""
    launch = cfg.launch
    train = [request.python, "-m", "launch", "train", "--config", str(request.config_path)]
    body = [
        "#!/bin/bash",
        f"# Rendered by `pretrain submit` for run {cfg.name!r}. Edit freely and resubmit with: sbatch {request.run_dir}/sbatch.sh",
        "# Outcomes and exit codes: docs/operations.md.",
        *sbatch_directives(launch, cfg.name, request.run_dir / "logs", cfg.data.num_workers),
        f"#SBATCH --chdir={request.workdir}",
        "",
        "set -uo pipefail",
        *launch.env_setup,
        "",
        *_environment_block(launch),
        f"OUTCOMES={shlex.quote(str(request.run_dir / 'logs' / 'outcomes'))}  # job-<id>: the outcome of each job",
        'EXIT_DIR="$OUTCOMES/tasks-$SLURM_JOB_ID"  # task<rank>.rc: each rank\'s exit code and node (this start)',
        'mkdir -p "$OUTCOMES" && rm -rf "$EXIT_DIR" && mkdir -p "$EXIT_DIR"',
        'record_outcome() { echo "$1 $2" > "$OUTCOMES/job-$SLURM_JOB_ID"; }',
        'still_running() { [ "$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null)" = RUNNING ]; }  # not cancelled',
        WAIT_FOR,
        _run_task_function(train),
        "export -f wait_for run_task && export EXIT_DIR  # srun's tasks inherit the environment (--export=ALL)",
        f'export {HANG_RECORD_DIR_ENV}="$EXIT_DIR"  # a rank\'s watchdog writes task<rank>.hang there when it fires',
        JOB_EXIT_CODE,
        "",
        'echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NNODES nodes x $SLURM_NTASKS_PER_NODE tasks, '
        'master $MASTER_ADDR:$MASTER_PORT"',
        *_chain_gate(request.run_dir),
        *_allocation_check(launch),
        "",
        "# srun in the background: a signal to this shell (scancel --batch -s USR1, --signal=B:USR1@N) runs its trap",
        "# at once instead of after srun ends, and the trap passes it on to every rank (which checkpoint and exit 75).",
        """trap 'trapped=1; echo "job $SLURM_JOB_ID: batch shell got USR1, passing it to the ranks"; \\
scancel --signal=USR1 "$SLURM_JOB_ID"' USR1""",
        "trap 'trapped=1' TERM  # the ranks get the time limit's SIGTERM from Slurm itself; stay to requeue",
        _srun_command(launch, request) + " &",
        'wait_for $!; srun_status=$?',
        *_outcome_block(launch, request),
    ]
    return "\n".join(body) + "\n"


def sbatch_submit(script: Path, dependency_job_id: str | None = None) -> str:
    """Submit with `sbatch --parsable`; return the job id. Fails with sbatch's own message."""
    command = ["sbatch", "--parsable"]
    if dependency_job_id is not None:
        # afterany: a follow-up also starts after a time limit or a crash. PRETRAIN_CHAIN_AFTER lets its batch
        # script read the outcome of the job it waited for, and stop at once after a terminal one.
        command += [f"--dependency=afterany:{dependency_job_id}", f"--export=ALL,PRETRAIN_CHAIN_AFTER={dependency_job_id}"]
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
