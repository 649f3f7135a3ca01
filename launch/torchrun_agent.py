"""torchrun for `pretrain launch local`, with the training processes' exit codes passed through.

Plain torchrun reports any failed worker as exit 1 and prints a ~30-line ChildFailedError traceback, also when the
run stopped as planned: 75 (checkpointed on a signal, requeue), 77 (diverged), 2 (config error), 74 (corrupt data),
76 (hang), 79 (checkpointed to leave a straggler's node). This runs torchrun's own `run()` in this process, catches
the ChildFailedError and exits with the code the job stands for (trainer.exit_codes.PRIORITY, the sbatch script's
order too: a code that needs a person first), printing one line instead of a traceback. The workers' own messages
and tracebacks are untouched (they are the workers' stderr).

    python -m launch.torchrun_agent --standalone --nproc_per_node=2 -m launch train --config ...
"""

from __future__ import annotations

import logging
import sys

from trainer.exit_codes import PRIORITY, REQUEUE

EXPLAINED = {0: "finished", 2: "config or usage error", 74: "a data shard is missing, truncated or corrupt",
             75: "checkpointed on a signal: run the same command again to resume", 76: "hang (watchdog)",
             77: "diverged", 79: "checkpointed to leave a straggler's node out: run it again without that node"}


def job_exit_code(rank_codes: dict[int, int]) -> int:
    """One code for the job from the failed ranks' codes (negative: killed by that signal)."""
    codes = set(rank_codes.values())
    for code in PRIORITY:
        if code in codes:
            return code
    crashed = sorted(code for code in codes if code > 0 and code != REQUEUE)
    if crashed:
        return crashed[-1]
    if REQUEUE in codes:
        return REQUEUE  # ranks killed by a signal here were stopped by torchrun after a peer exited 75
    killed = [code for code in codes if code < 0]
    return 128 - killed[0] if killed else 1  # -9 → 137, as a shell reports it


def summary(rank_codes: dict[int, int], code: int) -> str:
    ranks = ", ".join(f"rank {rank}: {_describe(c)}" for rank, c in sorted(rank_codes.items()))
    return f"launch local: exit {code} ({EXPLAINED.get(code, 'a rank failed: see its traceback above')}); {ranks}"


def _describe(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit {code}"


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's agent logs every failed worker at ERROR with a banner; the one-line summary below replaces it.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        rank_codes = {rank: int(failure.exitcode) for rank, failure in err.failures.items()}
        code = job_exit_code(rank_codes)
        print(summary(rank_codes, code), file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
