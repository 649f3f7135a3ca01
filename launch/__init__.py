"""The top floor: the one console command (`pretrain`) and the launchers (torchrun, sbatch).

Nothing heavy is imported at module level anywhere under `launch`, so `pretrain --help` answers at once;
each subcommand imports what it needs inside its handler.
"""
