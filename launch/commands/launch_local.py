"""`pretrain launch local`: train on this machine with N processes. Renders and runs

    torchrun --standalone --nproc_per_node N -m launch train --config X [key=value ...]

so every process runs `pretrain train` with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set by torchrun
(a free port on localhost; no rendezvous server needed). The config is checked for a world of N processes here,
once, before any process starts. With launch.device=cpu the processes talk over gloo and each gets
OMP_NUM_THREADS = usable cores // N; with launch.device=cuda each process takes one GPU (NCCL). SIGUSR1/SIGTERM sent
to this command reach the training processes: they checkpoint and the command exits 75. The command exits with the
training processes' own code (75 requeue, 76 hang, 77 diverged, 74 corrupt data, 2 config error; docs/operations.md)
and a one-line summary, not torchrun's traceback."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
from typing import Any

from launch.commands import add_run_config_arguments

EXAMPLES = """\
examples:
  pretrain launch local --nproc 2 --config configs/tiny.yaml
      2 CPU processes (tiny.yaml sets launch.device=cpu): DP=2, fp32, writes runs/tiny/{config.yaml,metrics.jsonl,...}
  pretrain launch local --nproc 2 --config configs/tiny.yaml parallel.tp=2 train.max_steps=20
      the same model split over 2 processes with tensor parallelism
  pretrain launch local --nproc 8 --config configs/125m.yaml
      one 8-GPU node (125m.yaml: launch.device=cuda)
  pretrain launch local --nproc 2 --config configs/tiny.yaml --dry-run
      print the torchrun command and environment, start nothing

--nproc defaults to launch.gpus_per_node. Overrides are the same dotted key=value pairs as `pretrain train` takes.
"""


def register(subparsers: Any) -> None:
    launch = subparsers.add_parser(
        "launch",
        help="start training processes (local: torchrun on this machine)",
        description="Start `pretrain train` in several processes. `launch local` runs them on this machine.",
        epilog="examples:\n  pretrain launch local --nproc 2 --config configs/tiny.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = launch.add_subparsers(dest="launch_target", metavar="<where>", required=True)
    local = where.add_parser(
        "local",
        help="torchrun on this machine, one process per GPU (or CPU slot)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    local.add_argument("--nproc", type=int, metavar="N", help="processes to start (default: launch.gpus_per_node)")
    add_run_config_arguments(local, overrides_example="parallel.tp=2")
    local.add_argument("--dry-run", action="store_true", help="print the command and environment; start nothing")
    local.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trainer.config import ConfigError, load_config

    cfg = load_config(args.config, args.overrides)
    nproc = cfg.launch.gpus_per_node if args.nproc is None else args.nproc
    if nproc < 1:
        raise ConfigError(f"--nproc ({nproc}) must be >= 1")
    cfg.validate_for_world(nproc)  # one clear error now instead of the same one from N processes
    env = process_environment(cfg.launch.device, nproc)
    command = torchrun_command(nproc, args.config, args.overrides)
    print(" ".join(f"{name}={value}" for name, value in env.items()), shlex.join(command), file=sys.stderr)
    if args.dry_run:
        return 0
    sys.stderr.flush()
    return run_forwarding_stop_signals(command, {**os.environ, **env})


def run_forwarding_stop_signals(command: list[str], env: dict[str, str]) -> int:
    """Run torchrun as a child and pass SIGUSR1/SIGTERM to the training processes themselves: torchrun has no USR1
    handler (it would die and orphan them) and answers TERM by killing its workers after a grace period. Each
    training process then finishes its step, the run checkpoints and exits with the requeue code (75), which
    launch.torchrun_agent passes through (as it does 74, 76, 77 and 2)."""
    proc = subprocess.Popen(command, env=env, preexec_fn=_terminate_with_parent)

    def forward(signum: int, frame: Any) -> None:
        for child in _children(proc.pid):
            with contextlib.suppress(OSError):
                os.kill(child, signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _terminate_with_parent() -> None:
    """In the torchrun child, before exec: SIGTERM it when this process dies, however it dies. Killed with SIGKILL
    (a test's timeout, `kill -9`), this process cannot forward anything, and torchrun with its training processes
    would run on as orphans; SIGTERM makes torchrun stop them (each checkpoints first, as on any SIGTERM)."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _children(pid: int) -> list[int]:
    import psutil  # a dependency (megatron-core needs it)

    with contextlib.suppress(psutil.Error):
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    return []


def torchrun_command(nproc: int, config: str, overrides: list[str]) -> list[str]:
    """torchrun from this interpreter, so the processes use the same environment as this command. Through
    launch.torchrun_agent (torchrun's own `run()`): the workers' exit codes come back as they are (75, 76, 77, 74,
    2), not as torchrun's 1 with a ChildFailedError traceback."""
    return [sys.executable, "-m", "launch.torchrun_agent", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "launch", "train", "--config", config, *overrides]


def process_environment(device: str, nproc: int) -> dict[str, str]:
    """Variables set for every process. Checks that CUDA is there when the config asks for GPUs."""
    from trainer.config import ConfigError

    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("launch.device is cuda but no CUDA GPU is visible here: add launch.device=cpu to run "
                              "on CPU processes (gloo), or run on a GPU node")
        if nproc > torch.cuda.device_count():
            raise ConfigError(f"--nproc ({nproc}) is more than the {torch.cuda.device_count()} visible GPUs: lower "
                              "--nproc (one process per GPU)")
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {
        # Split the cores between the processes (torchrun would otherwise force 1 thread, with a warning); a value
        # the user exported wins.
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cores // nproc))),
        "DS_ACCELERATOR": "cpu",  # DeepSpeed's CPU accelerator (gloo) without its auto-detect warning
    }
