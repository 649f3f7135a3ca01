"""`pretrain submit`: render the run's sbatch script from its config and submit it with sbatch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from launch.commands import add_run_config_arguments

EXAMPLES = """\
examples:
  pretrain submit --config configs/7b.yaml launch.partition=gpu launch.account=myproj --dry-run
      validate the config for 4 nodes x 8 GPUs, write runs/llama-7b/sbatch.sh and print it; submit nothing
  pretrain submit --config configs/7b.yaml launch.partition=gpu launch.time_limit=04:00:00 launch.chain_jobs=3
      submit the job plus 3 follow-ups (--dependency=afterany), each resuming from the newest checkpoint;
      a follow-up exits at once when the run before it finished, diverged or failed on config or data
  pretrain submit --config configs/tiny.yaml launch.nodes=2 launch.gpus_per_node=1 train.max_steps=20
      a 2-node CPU job (gloo) on a test cluster, e.g. the localhost Slurm from cluster/start.sh

The script is written to <run_dir>/sbatch.sh next to the resolved <run_dir>/config.yaml it trains from: keep it,
edit it and `sbatch` it by hand if you like. squeue/sacct stay the source of truth about the job.

How the job runs: one Slurm task per GPU (launch.gpus_per_node tasks per node), each task one training rank that
reads its place from $SLURM_PROCID / $SLURM_LOCALID / $SLURM_NTASKS. launch.signal_lead_s before the time limit
Slurm sends SIGUSR1: every rank finishes its step, the run checkpoints and exits 75, and the script requeues the job,
which resumes from the newest checkpoint (checkpoint.resume=auto). Exit codes and faults: docs/operations.md.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="render the sbatch script of a run and submit it to Slurm",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_config_arguments(parser, config_example="configs/7b.yaml", overrides_example="launch.nodes=4")
    parser.add_argument("--dry-run", action="store_true", help="write and print the script; do not submit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from launch.slurm import default_request, render_sbatch, sbatch_submit
    from trainer import exit_codes
    from trainer.config import load_config, save_resolved

    cfg = load_config(args.config, args.overrides)
    launch = cfg.launch
    # Before anything is written or submitted: a plan that cannot run fails here, not after hours in the queue.
    derived = cfg.validate_for_world(launch.nodes * launch.gpus_per_node)
    run_dir = Path(derived.run_dir).resolve()
    _refuse_if_owned(run_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    config_path = save_resolved(cfg, run_dir / "config.yaml", derived)
    request = default_request(config_path, run_dir, exit_codes.REQUEUE)
    script = run_dir / "sbatch.sh"
    script.write_text(render_sbatch(cfg, request), encoding="utf-8")
    if args.dry_run:
        print(script.read_text(encoding="utf-8"), end="")
        print(f"# wrote {script} (not submitted: --dry-run)", file=sys.stderr)
        return 0
    job_ids = [sbatch_submit(script)]
    for _ in range(launch.chain_jobs):
        job_ids.append(sbatch_submit(script, dependency_job_id=job_ids[-1]))
    print(f"submitted job {' -> '.join(job_ids)} for run {cfg.name!r}")
    print(f"  script  {script}\n  logs    {run_dir / 'logs'}/slurm-<jobid>.out\n  watch   squeue -j {','.join(job_ids)}")
    return 0


def _refuse_if_owned(run_dir: Path) -> None:
    """Before config.yaml is rewritten: a job training in run_dir re-reads it when it is requeued."""
    from trainer.run_lock import RunDirBusy, busy_message, live_holder

    holder = live_holder(run_dir)
    if holder is not None:
        raise RunDirBusy(busy_message(run_dir, holder))
