"""Fault-tolerant checkpoints in our own format: atomic, self-describing, layout-free (docs/checkpointing.md).

    from trainer.checkpoint import read_full_state_dict, verify_checkpoint
    state, ckpt = read_full_state_dict("runs/x/checkpoints")     # newest intact checkpoint, full fp32 tensors

Modules: io (durable, hashed file writes; pickle-free reads), layout (directory layout, index, integrity), state
(weights, Adam state, LR schedule, RNG of a DeepSpeed engine in any layout), save (snapshot, per-rank files, commit),
load (choose, compatibility, reshard-on-load), hooks (resume, save triggers, stop signals, rollback).
"""

from trainer.checkpoint.hooks import PREEMPTED, Checkpointer, CheckpointHook, ResumeHook, Rollback, StopSignals
from trainer.checkpoint.layout import CheckpointCompatibilityError, CheckpointError, verify_checkpoint
from trainer.checkpoint.load import load_checkpoint, read_full_state_dict, resolve_offline

__all__ = [
    "PREEMPTED",
    "CheckpointCompatibilityError",
    "CheckpointError",
    "CheckpointHook",
    "Checkpointer",
    "ResumeHook",
    "Rollback",
    "StopSignals",
    "load_checkpoint",
    "read_full_state_dict",
    "resolve_offline",
    "verify_checkpoint",
]
