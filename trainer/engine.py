"""The DeepSpeed engine for a ParallelModel: parameter groups, LR schedule, precision, gradient-norm reporting.

    engine = build_engine(pmodel, cfg, derived, ctx)

The optimizer (AdamW, torch implementation) and precision (fp32 / bf16 / fp16 with dynamic loss scaling) come from
the generated DeepSpeed config (trainer.deepspeed_config); this module adds what that JSON cannot say:
- parameter groups: weight decay off for norms / biases / embeddings as `optim.no_decay_on` says;
- the LR schedule: linear warmup, then cosine, linear or 1-sqrt decay to `lr * min_lr_ratio` at `train.max_steps`,
  over every step after warmup or, with `optim.decay_steps`, the last ones only (warmup-stable-decay); a LambdaLR
  that DeepSpeed steps after every applied optimizer step (fp16 overflow steps are skipped and do not advance it);
- the process groups: `DeepSpeedMPU(ctx)` (pp == 1) or the PipelineModule's own grid (pp > 1).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from trainer.bootstrap import DeepSpeedMPU, ParallelContext
from trainer.config import Config, Derived, NoDecayConfig, OptimConfig
from trainer.deepspeed_config import build_deepspeed_config
from trainer.parallelize import ParallelModel, tp_partition_dim

log = logging.getLogger(__name__)


def lr_multiplier(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Factor on `optim.lr` for optimizer step `step` (0-based: the number of steps already taken).

    Warmup reaches the peak at its last step ((step + 1) / warmup, so step 0 already learns); the LR then holds at
    the peak until the decay starts (at `warmup_steps`, or `max_steps - decay_steps` for warmup-stable-decay) and
    decays towards `min_lr_ratio` at step `max_steps` (the step after the last).
    """
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return 1.0
    decay_start = optim.warmup_steps if optim.decay_steps is None else max_steps - optim.decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * _DECAY_SHAPES[optim.decay](progress)


# Each decay's share of the way from the peak (1 at progress 0) to the floor (0 at progress 1).
_DECAY_SHAPES = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "1-sqrt": lambda progress: 1.0 - math.sqrt(progress),
}


def exempt_from_weight_decay(name: str, rules: NoDecayConfig) -> bool:
    """`name` is a plain-model (canonical) parameter name."""
    if rules.norms and (name.endswith("layernorm.weight") or name == "norm.weight"):
        return True
    if rules.biases and name.endswith(".bias"):
        return True
    # With tied embeddings the one shared tensor is named embed_tokens.weight, so this covers lm_head too.
    return rules.embeddings and name.startswith("embed_tokens.")


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], optim: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups: {params, weight_decay}. Empty groups are left out (ZeRO flattens each group; an empty one
    fails there)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in named_params:
        if param.requires_grad:
            (no_decay if exempt_from_weight_decay(name, optim.no_decay_on) else decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def lr_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int) -> Any:
    """The LambdaLR DeepSpeed steps after every applied optimizer step (factor: `lr_multiplier`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_multiplier, optim=optim, max_steps=max_steps)
    )


def build_engine(pmodel: ParallelModel, cfg: Config, derived: Derived, ctx: ParallelContext) -> Any:
    """`deepspeed.initialize` → a DeepSpeedEngine (pp == 1) or PipelineEngine (pp > 1) on this rank."""
    import deepspeed
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)  # it logs its whole config at INFO on rank 0; ours is in config.yaml
    # torch's LR scheduler checks that optimizer.step is the method it wrapped; DeepSpeed's optimizer wrappers replace
    # it, so torch warns at the first step although the engine does step the optimizer before the schedule.
    warnings.filterwarnings("ignore", message=r"Seems like `optimizer\.step\(\)` has been overridden",
                            category=UserWarning)
    kwargs: dict[str, Any] = {}
    if not pmodel.is_pipeline:
        # A PipelineModule carries its own grid, built from deepspeed_topology(ctx); DeepSpeed refuses mpu= with it.
        kwargs["mpu"] = DeepSpeedMPU(ctx)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # some DeepSpeed optimizers print memory reports: keep them in the log
        engine, _, _, _ = deepspeed.initialize(
            model=pmodel.module,
            model_parameters=param_groups(pmodel.canonical_named_parameters(), cfg.optim),
            config=build_deepspeed_config(cfg, derived),
            # A callable: DeepSpeed builds the optimizer from the config, then hands it to us for the schedule.
            lr_scheduler=functools.partial(lr_schedule, optim=cfg.optim, max_steps=cfg.train.max_steps),
            **kwargs,
        )
    if printed.getvalue():
        log.debug("deepspeed.initialize printed:\n%s", printed.getvalue())
    log.info("engine: %s with %s, %s", type(engine).__name__, type(engine.optimizer).__name__, cfg.precision.dtype)
    if cfg.zero.stage == 0 and ctx.dp == 1 and not pmodel.is_pipeline:
        # ZeRO-0 all-reduces every gradient over the DP group at each optimizer step, even a group of one (a bucket
        # copy through the backend and back: ~5 % of a tiny-model step on CPU). With dp == 1 it is the identity.
        engine.enable_backward_allreduce = False
    if cfg.precision.dtype == "fp32" and cfg.zero.stage == 0 and cfg.optim.grad_clip > 0:
        params = list(engine.module.parameters())  # fixed from here on: no module walk per step
        counted = [p for p in params if (ctx.tp_rank == 0 or tp_partition_dim(p) is not None)
                   and p is not pmodel.tied_replica]  # a tied embedding's copy on the last stage
        engine.clip_fp32_gradients = functools.partial(_clip_fp32_gradients, engine, params, counted, ctx,
                                                       cfg.optim.grad_clip)
    return engine


@torch.no_grad()
def _clip_fp32_gradients(engine: Any, params: list[torch.nn.Parameter], counted: list[torch.nn.Parameter],
                         ctx: ParallelContext, max_norm: float) -> None:
    """Replaces DeepSpeedEngine.clip_fp32_gradients (used only for fp32 without ZeRO). DeepSpeed's version discards
    the norm it computes (so get_global_grad_norm() stays None) and, under a pipeline, skips every replicated
    parameter outside stage 0 (it filters on the grid's tp×pp rank). Here: TP-split gradients count on every TP
    rank (`counted`), replicated ones on TP rank 0, a tied embedding's pipeline copy nowhere (the first stage counts
    it), summed over the tp×pp group. Gradients are already averaged over DP."""
    grads = [p.grad for p in params if p.grad is not None]
    counted_grads = [p.grad for p in counted if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float32, device=ctx.device)
    if counted_grads:
        squares = torch.stack([norm.float() for norm in torch._foreach_norm(counted_grads)]).pow(2).sum()
    if ctx.tp * ctx.pp > 1:
        dist.all_reduce(squares, group=ctx.model_parallel_group)
    total_norm = squares.sqrt()
    torch._foreach_mul_(grads, (max_norm / (total_norm + 1e-6)).clamp(max=1.0))
    engine._global_grad_norm = total_norm  # a tensor: the logging hook turns it into a float only when it logs


def loss_scale(engine: Any) -> float | None:
    """The current fp16 loss scale, or None for fp32 / bf16 (no scaling)."""
    if not engine.fp16_enabled():
        return None
    return float(engine._get_optimizer_loss_scale())


def skipped_steps(engine: Any) -> int | None:
    """Optimizer steps this process skipped because fp16 gradients overflowed (the loss scale was lowered instead);
    None for fp32 / bf16, which never skip."""
    return int(engine.skipped_steps) if engine.fp16_enabled() else None


def global_grad_norm(engine: Any) -> float | None:
    """The pre-clipping global gradient norm of the last optimizer step, or None where nothing computed one."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
