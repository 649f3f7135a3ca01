"""After a hang (exit 76) or a straggler stop (exit 79): submit the job again without the nodes that hung or were
slow, instead of requeueing it onto them.

The batch script runs `python -m launch.hung_nodes` when a hang is within launch.max_hang_requeues and
launch.exclude_hung_nodes is on. It prints the new job id and exits 0, or says why not on stderr and exits 3, and the
script then requeues the job in place as before.

Which nodes hung: `run_task` writes `<code> <node>` for every task whose rank exited, and a rank's watchdog writes
`task<rank>.hang` (`<unix time> <poll_s> <grace_s> <node>`) when it fires. The ranks that were running saw no
progress and their watchdogs fired within a poll interval of each other; the first waits a grace period (five poll
intervals) before it exits, and then the step is ended, so every running rank has fired by then, whatever code it
ends with (76, or 1 or 143 when the step's end reaches it first). A hung rank did not take part: one stuck in the
driver, or unable to run anything, is killed after KillWait and records nothing; one that was stopped or frozen is
woken by Slurm's SIGCONT when the step ends, and fails on its vanished peers or fires a grace period late. So a task
is a *victim* when its watchdog fired within half a grace period of the first one (without records at all: when it
exited 76), and a node with a task that is not a victim is a suspect. When every rank is a victim (a deadlock in the
program, or a stuck rank whose own watchdog still fired in time) no node can be told apart and the job is requeued
in place.

Why a new job: Slurm refuses `scontrol update ExcNodeList` on a running job ("Job is no longer pending execution"),
and a requeued job keeps the exclusions it had. So the script submits its own `sbatch.sh` again with --exclude (the
suspects plus the nodes this job excluded already) and --dependency=afterany on itself, carries the hang count over
to the new id, points the chain's pending follow-ups at the new job, and exits. The new job resumes from the newest
checkpoint like a requeued one would.

Not when the partition would keep fewer usable nodes than the job needs (every node counts as usable unless sinfo
calls it down, drained, failing, ...): the job would wait forever. Then the job is requeued in place.

With --stragglers the suspects are the nodes the trainer named before it exited 79 (faults.straggler_action=
leave_node, trainer/stragglers.py: the task records' `stragglers` file), and the hang count moves to the new job
unchanged. When they cannot be left out the script does not requeue: the same nodes would slow the run again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from trainer.exit_codes import HANG, STRAGGLER_RECORD

NOT_RESUBMITTED = 3  # exit code: requeue in place instead (the reason is on stderr)

# sinfo's short states (%t) of nodes no new job can get; a suffix (*, ~, #, !, %, $, @, ^, -) is stripped first.
_UNUSABLE_STATES = {"down", "drain", "drng", "fail", "failg", "maint", "inval", "futr", "pow_dn", "npc",
                    "unk"}


@dataclass(frozen=True)
class TaskRecord:
    """What one task left behind: its exit code (None: killed with its wrapper) and when its watchdog fired (None:
    it did not)."""

    node: str
    code: int | None = None
    fired_unix_s: float | None = None
    poll_s: float = 0.0
    grace_s: float = 0.0


def suspect_nodes(records: list[TaskRecord], job_nodes: list[str], tasks_per_node: int) -> list[str]:
    """The job's nodes, in job order, where fewer tasks than ran there were victims of the hang (see above)."""
    fired = [r for r in records if r.fired_unix_s is not None]
    if fired:
        first = min(fired, key=lambda r: r.fired_unix_s or 0.0)
        late_s = (first.poll_s + first.grace_s) / 2
        victims = [r for r in fired if (r.fired_unix_s or 0.0) - (first.fired_unix_s or 0.0) <= late_s]
    else:  # no watchdog records (a script from before them): the exit codes alone
        victims = [r for r in records if r.code == HANG]
    count = Counter(r.node for r in victims)
    return [node for node in job_nodes if count[node] < tasks_per_node]


def usable_nodes(sinfo_rows: list[str]) -> set[str]:
    """Nodes a new job can be given, from `sinfo -h -N -o "%N %t"` rows ("n1 idle", "n3 down*")."""
    usable = set()
    for row in sinfo_rows:
        node, state = row.split()
        if state.rstrip("*~#!%$@^-") not in _UNUSABLE_STATES:
            usable.add(node)
    return usable


def exclusion(suspects: list[str], excluded_before: list[str], usable: set[str], nodes_needed: int,
              none_because: str) -> list[str]:
    """The --exclude list for the new job; ValueError (with the reason) when there is nothing to exclude or too few
    nodes would be left."""
    if not suspects:
        raise ValueError(none_because)
    excluded = sorted(set(excluded_before) | set(suspects))
    left = len(usable - set(excluded))
    if left < nodes_needed:
        raise ValueError(f"without {','.join(excluded)} the partition keeps {left} usable node(s) for a "
                         f"{nodes_needed}-node job, which would never start")
    return excluded


# ---------------------------------------------------------------------------------------------------------------------
# What Slurm says (each a small command, run from inside the batch script)


def _run(command: list[str], env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _hostnames(nodelist: str) -> list[str]:
    return _run(["scontrol", "show", "hostnames", nodelist]).split() if nodelist else []


def _excluded_before(job_id: str) -> list[str]:
    fields = _run(["scontrol", "show", "job", job_id]).split()
    value = next((f.split("=", 1)[1] for f in fields if f.startswith("ExcNodeList=")), "(null)")
    return [] if value == "(null)" else _hostnames(value)


def _task_records(exit_dir: Path) -> list[TaskRecord]:
    """Each task's exit (task<rank>.rc: `<code> <node>`) and watchdog record (task<rank>.hang: `<unix time> <poll_s>
    <grace_s> <node>`), whichever it left."""
    records = []
    tasks = {path.stem for pattern in ("task*.rc", "task*.hang") for path in exit_dir.glob(pattern)}
    for task in sorted(tasks):
        exit_row, hang_row = _fields(exit_dir / f"{task}.rc", 2), _fields(exit_dir / f"{task}.hang", 4)
        node = (exit_row or hang_row or ["", "?"])[-1]
        code = int(exit_row[0]) if exit_row and exit_row[0].isdigit() else None
        timing = [float(value) for value in hang_row[:3]] if hang_row else []
        records.append(TaskRecord(node, code, *timing))
    return records


def _fields(path: Path, count: int) -> list[str] | None:
    fields = path.read_text().split() if path.is_file() else []
    return fields if len(fields) == count else None


def _submission_env() -> dict[str, str]:
    """The batch shell's environment without what belongs to this job: its SLURM_* variables and the rendezvous
    (the new job gets its own), and the chain marker (the new job follows this one, which did train)."""
    own = {"MASTER_ADDR", "MASTER_PORT", "PRETRAIN_CHAIN_AFTER"}
    return {key: value for key, value in os.environ.items()
            if not (key.startswith("SLURM_") and key != "SLURM_CONF") and key not in own}


def _repoint_followers(old_id: str, new_id: str, job_name: str) -> list[str]:
    """Pending follow-ups of the chain (same job name, afterany on the old job) wait for the new job instead."""
    moved = []
    for row in _run(["squeue", "--me", "-h", "-t", "PD", "-o", "%i|%j|%E"]).splitlines():
        job_id, name, dependency = row.split("|", 2)
        if job_id != new_id and name == job_name and dependency.split("(")[0] == f"afterany:{old_id}":
            _run(["scontrol", "update", f"jobid={job_id}", f"Dependency=afterany:{new_id}"])
            moved.append(job_id)
    return moved


def straggler_nodes(exit_dir: Path) -> list[str]:
    """The nodes the trainer named before exiting with the straggler code (none: no record)."""
    path = exit_dir / STRAGGLER_RECORD
    return path.read_text().split() if path.is_file() else []


@dataclass(frozen=True)
class Suspects:
    nodes: list[str]
    why: str  # what happened there, for the job log
    none_because: str  # why no node is named, when none is
    hangs: int  # the hang count the new job carries on with


def _suspects(outcomes: Path, job_id: str, job_nodes: list[str], hangs: int | None) -> Suspects:
    exit_dir = outcomes / f"tasks-{job_id}"
    if hangs is not None:
        return Suspects(suspect_nodes(_task_records(exit_dir), job_nodes, int(os.environ["SLURM_NTASKS_PER_NODE"])),
                        "a rank there hung while its peers waited",
                        "every rank's watchdog fired in time (exit 76), so no node can be told apart", hangs)
    count = outcomes / f"hang-requeues-{job_id}"
    return Suspects(straggler_nodes(exit_dir), "a straggler there slowed every rank",
                    f"the trainer left no {STRAGGLER_RECORD} record in {exit_dir}",
                    int(count.read_text()) if count.is_file() else 0)


def resubmit(script: Path, outcomes: Path, hangs: int | None) -> str:
    """Submit `script` again without the suspect nodes; return the new job id (ValueError: why not). hangs: the hang
    count with this one; None after a straggler stop (the suspects are the stragglers' nodes)."""
    job_id, env = os.environ["SLURM_JOB_ID"], os.environ
    job_nodes = _hostnames(env["SLURM_JOB_NODELIST"])
    suspects = _suspects(outcomes, job_id, job_nodes, hangs)
    partition = env["SLURM_JOB_PARTITION"]
    usable = usable_nodes(_run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N %t"]).splitlines())
    excluded = exclusion(suspects.nodes, _excluded_before(job_id), usable, len(job_nodes), suspects.none_because)
    new_id = _run(["sbatch", "--parsable", f"--exclude={','.join(excluded)}", f"--partition={partition}",
                   f"--dependency=afterany:{job_id}", str(script)], env=_submission_env()).strip().split(";")[0]
    print(f"job {job_id}: suspect node(s) {','.join(suspects.nodes)} ({suspects.why}); submitted job {new_id} "
          f"without {','.join(excluded)}", file=sys.stderr)
    # From here on the new job exists: a failure below is reported, never a reason to requeue this one as well.
    try:
        (outcomes / f"hang-requeues-{new_id}").write_text(f"{suspects.hangs}\n")  # the budget goes on with it
        (outcomes / f"replaced-{job_id}").write_text(f"{new_id}\n")  # a follow-up's chain gate reads the new job
        moved = _repoint_followers(job_id, new_id, env.get("SLURM_JOB_NAME", ""))
        if moved:
            print(f"job {job_id}: follow-up(s) {','.join(moved)} now wait for job {new_id}", file=sys.stderr)
    except (OSError, RuntimeError) as err:
        print(f"job {job_id}: warning: job {new_id} was submitted, but {err}", file=sys.stderr)
    return new_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.hung_nodes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", type=Path, required=True, help="the run's sbatch.sh")
    parser.add_argument("--outcomes", type=Path, required=True, help="<run_dir>/logs/outcomes")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--hangs", type=int, help="after a hang: hangs so far, this one included")
    which.add_argument("--stragglers", action="store_true", help="after a straggler stop (exit 79)")
    args = parser.parse_args(argv)
    try:
        print(resubmit(args.script, args.outcomes, None if args.stragglers else args.hangs))
    except (ValueError, RuntimeError, KeyError) as err:
        what = f"{err} is not set" if isinstance(err, KeyError) else str(err)
        print(f"job {os.environ.get('SLURM_JOB_ID', '?')}: not excluding any node: {what}", file=sys.stderr)
        return NOT_RESUBMITTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
