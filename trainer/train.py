"""The train entry. Build order: config → process groups → seed → model → parallelize → deepspeed.initialize →
data loaders sharded by DP rank → hooks → fit. Runs under torchrun, srun or any launcher that sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT; without them it runs as one process (world size 1).

    pretrain train --config configs/tiny.yaml train.max_steps=20
    pretrain launch local --nproc 2 --config configs/tiny.yaml
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer.bootstrap import ParallelContext, destroy_parallel, init_parallel, single_process_defaults
from trainer.config import Config, ConfigError, Derived, save_resolved
from trainer.data import build_eval_loader, build_train_loader
from trainer.engine import build_engine
from trainer.estimate import flops_per_token
from trainer.fit import fit
from trainer.hooks import Hook, HookList, RunContext, TrainState, default_hooks, setup_rank_logging
from trainer.parallelize import build_model_on_meta, parallelize

log = logging.getLogger(__name__)


def train(cfg: Config, extra_hooks: Sequence[Hook] = ()) -> TrainState:
    single_process_defaults()  # no launcher: a world of one
    # Before the process groups: a plan that does not fit the world fails on every rank with its fix, not in a hang.
    derived = cfg.validate_for_world(int(os.environ["WORLD_SIZE"]))
    if derived.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("launch.device is cuda but this process sees no CUDA device: run on a GPU node or set "
                          "launch.device=cpu (gloo)")
    owns_group = not dist.is_initialized()  # a test harness may have created it; then it also destroys it
    ctx = init_parallel(cfg.parallel.tp, cfg.parallel.pp, backend="gloo" if derived.device == "cpu" else "nccl")
    try:
        run_dir = Path(derived.run_dir)
        setup_rank_logging(run_dir, ctx)
        if ctx.rank == 0:
            save_resolved(cfg, run_dir / "config.yaml", derived)
        run = build_run(cfg, derived, ctx, run_dir)
        return fit(run, HookList([*default_hooks(run), *extra_hooks]))
    finally:
        if owns_group:
            destroy_parallel()  # before exit: gloo ranks abort at exit without it (notes/deepspeed-cpu.md)


def build_run(cfg: Config, derived: Derived, ctx: ParallelContext, run_dir: Path) -> RunContext:
    """Everything `fit` needs, built in the fixed order (also used by bench/bench_trainer_overhead.py)."""
    # Before the model: weights and synthetic data use their own seeded generators, but anything else random
    # (library code, future dropout) must not depend on what ran before.
    _seed_everything(cfg.train.seed)
    model = build_model_on_meta(cfg.model, derived.padded_vocab_size)  # shapes only
    pmodel = parallelize(model, cfg, derived, ctx)  # after the groups: shards depend on tp/pp rank
    log.info("rank %d/%d: tp %d/%d pp %d/%d dp %d/%d, %d parameters here", ctx.rank, ctx.world_size,
             ctx.tp_rank, ctx.tp, ctx.pp_rank, ctx.pp, ctx.dp_rank, ctx.dp,
             sum(p.numel() for p in pmodel.module.parameters()))
    # After parallelize: DeepSpeed builds the optimizer, fp32 master and ZeRO partitions from the final shards.
    engine = build_engine(pmodel, cfg, derived, ctx)
    # After the groups: each loader reads its DP rank's slice of every global batch.
    train_loader, eval_loader = build_train_loader(cfg, ctx), build_eval_loader(cfg, derived, ctx)
    flops = flops_per_token(cfg.model, derived.padded_vocab_size, cfg.train.seq_len).total
    return RunContext(cfg, derived, ctx, pmodel, engine, train_loader, eval_loader, run_dir, flops)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every device's default generator
