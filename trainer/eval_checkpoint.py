"""`pretrain eval`: a checkpoint's validation loss, without training, in whatever layout this launch has.

    results = evaluate_checkpoints(cfg, [Path("runs/x/checkpoints")])   # collective under a launcher; else one process

The same pieces as training (trainer.train.build_run's order: model, parallelize, DeepSpeed engine, then the
validation loader), the same checkpoint loader (any TP/PP/DP/ZeRO layout reads any other's checkpoint), and the same
`evaluate` as the training loop's eval lines: a checkpoint evaluated here gives the number its run logged at that step
when the data and `train.eval_steps` are the same. Nothing is written into a run directory (no lock is taken: a live
run's checkpoints can be evaluated while it trains); the caller prints or saves the result.

Used for what the training loop cannot do: evaluating on other data (`data.datasets`, `data.eval_split`), on more
batches (`train.eval_steps`), or comparing checkpoints, e.g. the cooldowns branched from one warmup-stable-decay run.

`evaluate_weights` does the same for weights without a training state, whatever `checkpoint.init_from` reads (an HF
model directory, a full state dict, one of our checkpoints): e.g. the base model's loss on the data a continued
pretraining will train on, the baseline its eval lines are read against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from trainer.bootstrap import ParallelContext, destroy_parallel
from trainer.checkpoint.layout import CheckpointError
from trainer.checkpoint.load import choose_valid, load_checkpoint, shared_candidates
from trainer.config import Config, ConfigError, Derived
from trainer.data import validation_passes
from trainer.downstream import load_tasks
from trainer.estimate import flops_per_token
from trainer.fit import evaluate
from trainer.hooks import EvalOutput, RunContext
from trainer.train import build_model_and_engine, join_process_groups, plan_this_world, release_run


@dataclass(frozen=True)
class CheckpointEval:
    checkpoint: Path  # the checkpoint evaluated
    step: int
    result: EvalOutput  # with the train.eval_tasks accuracies in result.tasks


def evaluate_checkpoints(cfg: Config, paths: Sequence[Path], every: bool = False) -> list[CheckpointEval]:
    """Each of `paths` (a checkpoint, or the newest intact one of a directory of them; with `every`, each intact one
    of it, oldest first), evaluated in turn by one model and engine built once. Collective under a launcher (every
    rank calls it); a world of one without."""
    with _evaluation_world(cfg) as (derived, ctx):
        checkpoints = _choose(paths, every, ctx, cfg.checkpoint.verify_on_load)
        run = _build(cfg, derived, ctx)
        try:
            evaluations = []
            for ckpt in checkpoints:
                step = load_checkpoint(run, ckpt, restore_data=False).step
                evaluations.append(CheckpointEval(ckpt, step, evaluate(run, step)))
            return evaluations
        finally:
            release_run(run)


def evaluate_weights(cfg: Config, paths: Sequence[Path]) -> list[CheckpointEval]:
    """Each of `paths` (any checkpoint.init_from source) loaded into the config's model and evaluated (step 0: no
    training state). The weights go in before the engine is built, as init_from's do (ZeRO-3 partitions them), so
    each source gets its own build. Collective under a launcher; a world of one without."""
    from trainer.checkpoint.init_from import init_weights_from

    with _evaluation_world(cfg) as (derived, ctx):
        evaluations = []
        for path in paths:
            run = _build(cfg, derived, ctx, lambda pmodel, source=path: init_weights_from(pmodel, cfg, ctx, source))
            try:
                evaluations.append(CheckpointEval(path, 0, evaluate(run, 0)))
            finally:
                release_run(run)
        return evaluations


@contextlib.contextmanager
def _evaluation_world(cfg: Config) -> Iterator[tuple[Derived, ParallelContext]]:
    """This world's plan and process groups for an evaluation (the groups torn down after, unless a caller owns
    them)."""
    if cfg.train.eval_steps == 0:
        raise ConfigError("train.eval_steps is 0, so there is nothing to evaluate: set train.eval_steps=N (global "
                          "batches of each validation dataset)")
    derived = plan_this_world(cfg)
    owns_group = not dist.is_initialized()
    ctx = join_process_groups(cfg, derived)
    try:
        yield derived, ctx
    finally:
        if owns_group:
            destroy_parallel()


def _choose(paths: Sequence[Path], every: bool, ctx: ParallelContext, verify: bool) -> list[Path]:
    """The checkpoints to evaluate, the same on every rank: each rank hashes its share of the files (collective)."""
    chosen: list[Path] = []
    for path in paths:
        found = shared_candidates(path, ctx)  # newest first
        if every:
            picks = [c for c in reversed(found) if choose_valid([c], ctx, verify) is not None]
        else:
            newest = choose_valid(found, ctx, verify)
            picks = [] if newest is None else [newest]
        if not picks:
            raise CheckpointError(f"no complete, intact checkpoint at {path}: pass a step_N directory or a "
                                  f"directory of them (e.g. runs/<name>/checkpoints)")
        chosen += [c for c in picks if c not in chosen]
    return chosen


def _build(cfg: Config, derived: Derived, ctx: ParallelContext,
           load_weights: Callable[[Any], object] | None = None) -> RunContext:
    """build_run without the training loader (the data evaluated on may have no training split); `load_weights`
    fills the parallel model before the engine is built (evaluate_weights)."""
    pmodel, engine, eos_id, _ = build_model_and_engine(cfg, derived, ctx, before_engine=load_weights)
    passes = validation_passes(cfg, derived, ctx)
    if passes is None:
        raise ConfigError(f"no dataset of data.datasets has a {cfg.data.eval_split!r} split: name the split to "
                          f"evaluate with data.eval_split, or datasets that have it with data.datasets")
    flops = flops_per_token(cfg.model, derived.padded_vocab_size, cfg.train.seq_len).total
    return RunContext(cfg, derived, ctx, pmodel, engine, None, passes, Path(derived.run_dir), flops,
                      tasks=load_tasks(cfg), eos_loss_masked=eos_id if cfg.train.mask_eos_loss else None)
