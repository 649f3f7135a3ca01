"""The train entry. Build order: config → stop-signal handlers → process groups → run-directory lock and preflight
checks (trainer/preflight.py: nothing to do? data there?) → seed → model → parallelize →
init_from (weights only, fresh runs) → deepspeed.initialize → data loaders sharded by DP rank → hooks (watchdog, resume, metrics, NaN guard, checkpointer)
→ fit. Runs under torchrun, srun or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
without them it runs as one process (world size 1). Exit codes: trainer/exit_codes.py.

    pretrain train --config configs/tiny.yaml train.max_steps=20
    pretrain launch local --nproc 2 --config configs/tiny.yaml
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer import exit_codes
from trainer.bootstrap import ParallelContext, destroy_parallel, init_parallel, single_process_defaults
from trainer.checkpoint import PREEMPTED, Checkpointer, CheckpointHook, ResumeHook, StopSignals
from trainer.checkpoint.init_from import init_unless_resuming
from trainer.config import DOCUMENT_KERNEL_NAMES, Config, ConfigError, Derived, save_resolved
from trainer.data import build_eval_loader, build_train_loader
from trainer.data_check import document_eos_id
from trainer.downstream import load_tasks
from trainer.engine import build_engine
from trainer.estimate import flops_per_token
from trainer.faults import StepGuard, Watchdog
from trainer.fit import fit
from trainer.hooks import Hook, HookList, RunContext, TrainState, default_hooks, setup_rank_logging
from trainer.parallelize import ParallelModel, build_model_on_meta, parallelize
from trainer.preflight import check_before_build, errors_in_rank_log, nothing_to_do_message, owned_run_dir
from trainer.stragglers import STOP_REASON as STRAGGLER_STOP

log = logging.getLogger(__name__)


def train(cfg: Config, extra_hooks: Sequence[Hook] = ()) -> TrainState:
    derived = plan_this_world(cfg)
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb is true but the wandb package is not installed here: pip install wandb "
                          "(or pip install -e '.[wandb]'), or set logging.wandb=false")
    # Before anything slow: a SIGUSR1/SIGTERM during start-up is kept and honoured after the first step, instead of
    # killing the process (Python's default for SIGUSR1) with no checkpoint and no requeue code.
    signals = StopSignals.install()
    owns_group = not dist.is_initialized()  # a test harness may have created it; then it also destroys it
    ctx = join_process_groups(cfg, derived)
    try:
        run_dir = Path(derived.run_dir)
        # Before anything is written into the run directory: a second job on it must leave its files alone.
        with owned_run_dir(run_dir, ctx):
            setup_rank_logging(run_dir, ctx)
            with errors_in_rank_log():
                return _train_in_run_dir(cfg, derived, ctx, run_dir, signals, extra_hooks)
    finally:
        signals.uninstall()
        if owns_group:
            destroy_parallel()  # before exit: gloo ranks abort at exit without it (notes/deepspeed-cpu.md)


def plan_this_world(cfg: Config) -> Derived:
    """The derived plan for this process's world (WORLD_SIZE; one process without a launcher), on every rank before
    any process group: a plan that does not fit the world fails on every rank with its fix, not in a hang."""
    single_process_defaults()  # no launcher: a world of one
    if cfg.launch.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("launch.device is cuda but this process sees no CUDA device: run on a GPU node or set "
                          "launch.device=cpu (gloo)")
    # The GPU generation decides the document mask's kernel (trainer.config.flex_suits_gpu). The first visible GPU
    # answers for all: a job's GPUs are of one kind (one partition), and its index exists however they are mapped.
    capability = torch.cuda.get_device_capability(0) if cfg.launch.device == "cuda" else None
    return cfg.validate_for_world(int(os.environ["WORLD_SIZE"]), gpu_capability=capability)


def join_process_groups(cfg: Config, derived: Derived) -> ParallelContext:
    return init_parallel(cfg.parallel.tp, cfg.parallel.pp, backend="gloo" if derived.device == "cpu" else "nccl",
                         timeout_s=cfg.faults.collective_timeout_s)


def _train_in_run_dir(cfg: Config, derived: Derived, ctx: ParallelContext, run_dir: Path, signals: StopSignals,
                      extra_hooks: Sequence[Hook]) -> TrainState:
    # Before the model and the engine: a finished run, a missing dataset or a truncated shard is told in seconds.
    finished_step = check_before_build(cfg, ctx)
    if finished_step is not None:
        if ctx.is_logging_rank:
            log.info(nothing_to_do_message(cfg, finished_step))
        return TrainState(step=finished_step)
    if ctx.rank == 0:
        save_resolved(cfg, run_dir / "config.yaml", derived)
    run = build_run(cfg, derived, ctx, run_dir)
    hooks = training_hooks(run, signals, extra_hooks)
    try:
        state = fit(run, HookList(hooks))
    except BaseException:
        _stop_watchdog(hooks)
        try:
            release_run(run)
        except Exception:  # the training error is the one to report (its exit code, 74/76/77, drives the scheduler)
            log.warning("could not free the engine after the error below", exc_info=True)
        raise
    _stop_watchdog(hooks)
    release_run(run)
    return state


def _stop_watchdog(hooks: Sequence[Hook]) -> None:
    for hook in hooks:
        if isinstance(hook, Watchdog):
            hook.stop()  # after the final save (on_train_end) and on errors: nothing left to watch


def release_run(run: RunContext) -> None:
    """Free the engine, model and optimizer state for a caller that goes on after training (the quickstart exports in
    the same process; a sweep, notebook or bench trains again; on a GPU what stays behind stays in its memory).
    Python's GC alone cannot: some are cycles through C++ that it does not see, the rest DeepSpeed's module-level
    references (deepspeed 0.19.8; tests/trainer/test_train_release.py fails if an upgrade brings another one)."""
    engine = run.engine
    # ZeRO-1/2/3 gradient hooks live on autograd nodes and point back at the optimizer: destroy() removes them.
    engine.destroy()
    # Pipeline last stage: the last micro-batch's loss and outputs keep their autograd graph, whose C++ nodes hold
    # the parameters, whose DeepSpeed attributes hold the engine.
    if hasattr(engine, "pipe_buffers"):
        engine.loss = engine.total_loss = None
        for buffers in engine.pipe_buffers.values():
            buffers.clear()
    if run.cfg.zero.stage == 3:
        _release_zero3_globals(engine.module)


def _release_zero3_globals(module: torch.nn.Module) -> None:
    """ZeRO-3 keeps its model in two module-level places: a stack of modules in forward that init pushes the top
    module onto and never pops, and an unbounded functools.lru_cache on a coordinator method, keyed by (coordinator,
    submodule, step). Clearing the cache is safe: it is recomputed from the trace on the next use."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not module]
    method = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    # The cache sits under DeepSpeed's nvtx decorator, in the wrapper's closure. Another DeepSpeed version may not have
    # it: then nothing is cleared here and the release test says so.
    for cell in getattr(method, "__closure__", None) or ():
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def training_hooks(run: RunContext, signals: StopSignals, extra_hooks: Sequence[Hook] = ()) -> list[Hook]:
    """The hook list, in calling order: the watchdog first (it also covers resume), resume before anything reads
    state.step, metrics before the guard and the checkpointer (a step is logged before it is judged or saved)."""
    records = os.environ.get(exit_codes.HANG_RECORD_DIR_ENV)  # set by the sbatch script (launch/hung_nodes.py reads them)
    watchdog = Watchdog(run.cfg.faults.hang_timeout_s, run.run_dir / "logs" / f"rank{run.ctx.rank}.log",
                        Path(records) / f"task{run.ctx.rank}.hang" if records else None)
    checkpointer = Checkpointer(run, signals, progress=watchdog.beat)
    guard = StepGuard(run.cfg.faults, rollback=checkpointer.rollback)
    checkpointer.register_state("faults", guard.state, guard.load_state)
    checkpointer.postpone_saves_while(guard.in_bad_streak)
    return [watchdog, ResumeHook(checkpointer), *default_hooks(run), guard, CheckpointHook(checkpointer),
            *extra_hooks]


def exit_code(state: TrainState) -> int:
    """The process exit code for a finished `train` (trainer.exit_codes): REQUEUE after a checkpoint on a signal,
    STRAGGLER after one to leave a straggler's node out."""
    codes = {PREEMPTED: exit_codes.REQUEUE, STRAGGLER_STOP: exit_codes.STRAGGLER}
    return codes.get(state.stop_reason, exit_codes.OK)


def build_run(cfg: Config, derived: Derived, ctx: ParallelContext, run_dir: Path) -> RunContext:
    """Everything `fit` needs, built in the fixed order (also used by bench/bench_trainer_overhead.py)."""
    # Weights only, and only when there is no checkpoint to resume from.
    pmodel, engine, eos_id, resume_choice = build_model_and_engine(
        cfg, derived, ctx, before_engine=lambda pmodel: init_unless_resuming(pmodel, cfg, ctx))
    # After the groups: each loader reads its DP rank's slice of every global batch.
    train_loader, eval_loader = build_train_loader(cfg, ctx), build_eval_loader(cfg, derived, ctx)
    flops = flops_per_token(cfg.model, derived.padded_vocab_size, cfg.train.seq_len).total
    return RunContext(cfg, derived, ctx, pmodel, engine, train_loader, eval_loader, run_dir, flops, resume_choice,
                      tasks=load_tasks(cfg), eos_loss_masked=eos_id if cfg.train.mask_eos_loss else None)


def build_model_and_engine(cfg: Config, derived: Derived, ctx: ParallelContext,
                           before_engine: Callable[[ParallelModel], Any] | None = None
                           ) -> tuple[ParallelModel, Any, int | None, Any]:
    """(parallel model, DeepSpeed engine, the data's eos id, what `before_engine` returned). `before_engine(pmodel)`
    runs after parallelize (each rank has its shards) and before deepspeed.initialize (which builds the fp32 master
    and ZeRO partitions from these weights): the place to load weights (init_from, `pretrain eval --weights`)."""
    # Before the model: weights and synthetic data use their own seeded generators, but anything else random
    # (library code, future dropout) must not depend on what ran before.
    seed_everything(cfg.train.seed)
    eos_id = document_eos_id(cfg)  # the data's, where the model or the loss looks for document ends
    model = build_model_on_meta(cfg.model, derived.padded_vocab_size, eos_id)  # shapes only
    pmodel = parallelize(model, cfg, derived, ctx)  # after the groups: shards depend on tp/pp rank
    log.info("rank %d/%d: tp %d/%d pp %d/%d dp %d/%d, %d parameters here", ctx.rank, ctx.world_size,
             ctx.tp_rank, ctx.tp, ctx.pp_rank, ctx.pp, ctx.dp_rank, ctx.dp,
             sum(p.numel() for p in pmodel.module.parameters()))
    if pmodel.fp8_linears:
        log.info("fp8 (%s): %d decoder-layer linears run FP8 matmuls; embedding, lm_head and the rest stay %s",
                 cfg.precision.fp8, pmodel.fp8_linears, cfg.precision.dtype)
    if cfg.model.attention_mask == "document":
        log.info("document mask: %s", DOCUMENT_KERNEL_NAMES[derived.attention_kernel])
    loaded = before_engine(pmodel) if before_engine is not None else None
    # After parallelize: DeepSpeed builds the optimizer, fp32 master and ZeRO partitions from the final shards.
    engine = build_engine(pmodel, cfg, derived, ctx)
    return pmodel, engine, eos_id, loaded


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every device's default generator
