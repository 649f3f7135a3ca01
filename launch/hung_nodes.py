"""After a hang (exit 76): submit the job again without the nodes that hung, instead of requeueing it onto them.

The batch script runs `python -m launch.hung_nodes` when a hang is within launch.max_hang_requeues and
launch.exclude_hung_nodes is on. It prints the new job id and exits 0, or says why not on stderr and exits 3, and the
script then requeues the job in place as before.

Which nodes hung: `run_task` writes `<code> <node>` for every task whose rank exited. The ranks that were alive saw
no progress and their watchdogs exited 76, within one poll interval of each other (the first one waits longer than
that before it exits). A hung rank does not: --kill-on-bad-exit ends the step at the first 76, and a rank that is
stuck in the driver or cannot run its signal handler is killed after KillWait with its wrapper, which then records
nothing; a stopped rank is woken by Slurm's SIGCONT and fails (exit 1) on its vanished peers. So a node where fewer
tasks exited 76 than ran there is a suspect. When every rank exited 76 (a deadlock in the program, or a stuck rank
whose own watchdog still fired) no node can be told apart and the job is requeued in place.

Why a new job: Slurm refuses `scontrol update ExcNodeList` on a running job ("Job is no longer pending execution"),
and a requeued job keeps the exclusions it had. So the script submits its own `sbatch.sh` again with --exclude (the
suspects plus the nodes this job excluded already) and --dependency=afterany on itself, carries the hang count over
to the new id, points the chain's pending follow-ups at the new job, and exits. The new job resumes from the newest
checkpoint like a requeued one would.

Not when the partition would keep fewer usable nodes than the job needs (every node counts as usable unless sinfo
calls it down, drained, failing, ...): the job would wait forever. Then the job is requeued in place.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from trainer.exit_codes import HANG

NOT_RESUBMITTED = 3  # exit code: requeue in place instead (the reason is on stderr)

# sinfo's short states (%t) of nodes no new job can get; a suffix (*, ~, #, !, %, $, @, ^, -) is stripped first.
_UNUSABLE_STATES = {"down", "drain", "drng", "fail", "failg", "maint", "inval", "futr", "pow_dn", "npc",
                    "unk"}


def suspect_nodes(recorded: list[tuple[int, str]], job_nodes: list[str], tasks_per_node: int) -> list[str]:
    """The job's nodes, in job order, where fewer tasks exited with the watchdog's 76 than ran there. `recorded`:
    (exit code, node) of every task that recorded one."""
    watchdog_exits = Counter(node for code, node in recorded if code == HANG)
    return [node for node in job_nodes if watchdog_exits[node] < tasks_per_node]


def usable_nodes(sinfo_rows: list[str]) -> set[str]:
    """Nodes a new job can be given, from `sinfo -h -N -o "%N %t"` rows ("n1 idle", "n3 down*")."""
    usable = set()
    for row in sinfo_rows:
        node, state = row.split()
        if state.rstrip("*~#!%$@^-") not in _UNUSABLE_STATES:
            usable.add(node)
    return usable


def exclusion(suspects: list[str], excluded_before: list[str], usable: set[str], nodes_needed: int) -> list[str]:
    """The --exclude list for the new job; ValueError (with the reason) when there is nothing to exclude or too few
    nodes would be left."""
    if not suspects:
        raise ValueError("every rank exited by its watchdog (76), so no node can be told apart")
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


def _recorded(exit_dir: Path) -> list[tuple[int, str]]:
    """(exit code, node) of every task that recorded one (`<code> <node>` in task<rank>.rc)."""
    rows = (path.read_text().split() for path in sorted(exit_dir.glob("task*.rc")))
    return [(int(row[0]), row[1]) for row in rows if len(row) == 2 and row[0].isdigit()]


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


def resubmit(script: Path, outcomes: Path, hangs: int) -> str:
    """Submit `script` again without the suspect nodes; return the new job id (ValueError: why not)."""
    job_id, env = os.environ["SLURM_JOB_ID"], os.environ
    job_nodes = _hostnames(env["SLURM_JOB_NODELIST"])
    suspects = suspect_nodes(_recorded(outcomes / f"tasks-{job_id}"), job_nodes,
                             int(env["SLURM_NTASKS_PER_NODE"]))
    partition = env["SLURM_JOB_PARTITION"]
    usable = usable_nodes(_run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N %t"]).splitlines())
    excluded = exclusion(suspects, _excluded_before(job_id), usable, len(job_nodes))
    new_id = _run(["sbatch", "--parsable", f"--exclude={','.join(excluded)}", f"--partition={partition}",
                   f"--dependency=afterany:{job_id}", str(script)], env=_submission_env()).strip().split(";")[0]
    print(f"job {job_id}: suspect node(s) {','.join(suspects)} (a rank there did not exit by its watchdog); submitted job {new_id} "
          f"without {','.join(excluded)}", file=sys.stderr)
    # From here on the new job exists: a failure below is reported, never a reason to requeue this one as well.
    try:
        (outcomes / f"hang-requeues-{new_id}").write_text(f"{hangs}\n")  # the hang budget goes on with the new id
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
    parser.add_argument("--hangs", type=int, required=True, help="hangs so far, this one included")
    args = parser.parse_args(argv)
    try:
        print(resubmit(args.script, args.outcomes, args.hangs))
    except (ValueError, RuntimeError, KeyError) as err:
        what = f"{err} is not set" if isinstance(err, KeyError) else str(err)
        print(f"job {os.environ.get('SLURM_JOB_ID', '?')}: not excluding any node: {what}", file=sys.stderr)
        return NOT_RESUBMITTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
