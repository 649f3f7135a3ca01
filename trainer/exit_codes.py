"""Exit codes of `pretrain train` that launchers and batch scripts act on.

REQUEUE is sysexits.h's EX_TEMPFAIL ("temporary failure; the user is invited to retry"): the run stopped on a
signal (Slurm time limit or preemption) after writing a complete checkpoint, and starting it again resumes from
there. The sbatch script rendered by `pretrain submit` requeues the job on exactly this code.
"""

OK = 0
REQUEUE = 75
