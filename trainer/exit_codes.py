"""Exit codes of `pretrain train` that launchers and batch scripts act on (docs/checkpointing.md).

REQUEUE is sysexits.h's EX_TEMPFAIL ("temporary failure; the user is invited to retry"): the run stopped on a
signal (Slurm time limit or preemption) after writing a complete checkpoint, and starting it again resumes from
there. The sbatch script rendered by `pretrain submit` requeues the job on exactly this code.

HANG: the step watchdog saw no progress for faults.hang_timeout_s; every rank dumped its Python stacks to its log.
Restarting resumes from the newest complete checkpoint (a node or network problem usually clears on another node).

DIVERGED: the loss or gradients stayed NaN/inf (or spiking) after faults.max_rollbacks rollbacks, or there was no
checkpoint to roll back to. Restarting would repeat it: a person has to look (lower the LR, inspect the data window
named in the log). Slurm scripts must not requeue on it.

DATA_CORRUPT is sysexits.h's EX_IOERR (an input/output error): a shard is missing, truncated or fails its sha256 (at
start, or when a rank opens it during training). Restarting would hit the same shard: copy the dataset again or
re-run `pretrain prepare`. Distinct from CONFIG_ERROR so a scheduler or a person can tell the two apart.

STRAGGLER: with faults.straggler_action=leave_node, the straggler check named the same slow rank(s) at
faults.straggler_patience_checks checks in a row; a checkpoint was written, then every rank exited. The sbatch script
submits the job again without the node(s) named in the task records (launch/hung_nodes.py), where it resumes.

Which codes are terminal (a chained follow-up job trains nothing after them) and which are retried: see
docs/operations.md.
"""

OK = 0
CONFIG_ERROR = 2  # a user-fixable problem (bad flag, config or path): the message says what to do
DATA_CORRUPT = 74
REQUEUE = 75
HANG = 76
DIVERGED = 77
STRAGGLER = 79

# When ranks end differently (one hangs, the others are then stopped), the job stands for the first of these that
# occurs: a code that needs a person before a retryable one. The sbatch script (launch/slurm.py) and `launch local`
# (launch/torchrun_agent.py) both report a job by this order.
PRIORITY = (DIVERGED, CONFIG_ERROR, DATA_CORRUPT, HANG, STRAGGLER)

# Where a rank's watchdog writes `task<rank>.hang` when it fires (trainer.faults.Watchdog): the sbatch script sets it
# to its per-job task records, and launch/hung_nodes.py reads them to tell a rank that hung from its waiting peers.
HANG_RECORD_DIR_ENV = "PRETRAIN_HANG_RECORD_DIR"
# In the same directory, before exiting with STRAGGLER, the logging rank writes the straggler nodes, one per line.
STRAGGLER_RECORD = "stragglers"
