"""`pretrain train`: train a model from a run config, in this process. Under a launcher (torchrun, srun,
`pretrain launch local`) every process runs this command and reads its place from RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; without them it trains as a single process. `--dry-run` resolves and checks the config
for its world size, prints parameter count, FLOPs per token, memory per GPU and the generated DeepSpeed config, and
exits (no torch)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from launch.commands import add_run_config_arguments

EXAMPLES = """\
examples:
  pretrain train --config configs/tiny.yaml train.max_steps=20           # train as one process (CPU ok)
  pretrain launch local --nproc 2 --config configs/tiny.yaml             # the same on 2 processes (torchrun)
  pretrain train --config configs/tiny.yaml --dry-run
  pretrain train --config configs/7b.yaml --dry-run optim.lr=1.5e-4 train.max_steps=1000
  pretrain train --config configs/70b.yaml --world-size 512 --dry-run parallel.pp=8

A run writes <run_dir>/config.yaml, metrics.jsonl, tb/ and logs/rank<N>.log (run_dir: logging.run_dir or runs/<name>)
and checkpoints/step_<N>/ (checkpoint.dir); it resumes from the newest complete checkpoint (checkpoint.resume=auto).
Exit codes: 0 done (also: already at train.max_steps, nothing to do); 2 config error (also: the run directory is in
use by another job); 74 a data shard missing, truncated or corrupt; 75 stopped on SIGUSR1/SIGTERM after a checkpoint
(requeue); 76 hang (watchdog); 77 diverged (NaN/inf after rollbacks). See docs/operations.md.
World size for --dry-run: --world-size, else $WORLD_SIZE, else launch.nodes × launch.gpus_per_node.
Overrides are dotted keys with YAML values (optim.betas=[0.9,0.95], data.datasets.0.weight=2); put them together.
Every key with its type, default and meaning: docs/config.md.
"""

# A tied model over pipeline stages (trainer/parallelize.py): what the dry run's pipeline line adds.
_TIED_OVER_STAGES = ("; tied: lm_head is a copy of the embedding, its gradient summed with the embedding's over the "
                     "first and last stage each step")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from a config (--dry-run: resolve, validate, estimate)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_config_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="resolve, validate and estimate; do not train")
    parser.add_argument("--world-size", type=int, metavar="N", help="number of processes to validate against (dry run)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trainer.config import ConfigError, load_config

    cfg = load_config(args.config, args.overrides)
    if not args.dry_run:
        if args.world_size is not None:
            raise ConfigError("--world-size only applies with --dry-run: a real run takes its world size from the "
                              "launcher (WORLD_SIZE), e.g. `pretrain launch local --nproc N ...`")
        _refuse_if_run_dir_busy(cfg)
        from trainer.train import exit_code, train  # heavy (torch, deepspeed, megatron): only for a real run

        return exit_code(train(cfg))  # 75 after a checkpoint on SIGUSR1/SIGTERM: requeue (trainer/exit_codes.py)
    world_size, world_source = _world_size(args.world_size, cfg.launch.nodes, cfg.launch.gpus_per_node)
    derived = cfg.validate_for_world(world_size)
    print(_dry_run_report(cfg, derived, args, world_source))
    _warn_missing_data(cfg)
    return 0


def _warn_missing_data(cfg: Any) -> None:
    """A dry run may be made before the data is prepared (or on a login node without it): warn, do not fail."""
    import sys

    from trainer.data_check import check_datasets

    check = check_datasets(cfg.data, eval_enabled=False, check_shards=False)
    if check.missing_datasets:
        print(f"warning: {check.message()}", file=sys.stderr)


def _refuse_if_run_dir_busy(cfg: Any) -> None:
    """Before the heavy imports: another live job owns the run directory (train() takes the lock itself)."""
    from pathlib import Path

    from trainer.run_lock import RunDirBusy, busy_message, foreign_live_holder

    holder = foreign_live_holder(Path(cfg.run_dir))
    if holder is not None:
        raise RunDirBusy(busy_message(Path(cfg.run_dir), holder))


def _world_size(flag: int | None, nodes: int, gpus_per_node: int) -> tuple[int, str]:
    if flag is not None:
        return flag, "--world-size"
    env = os.environ.get("WORLD_SIZE")
    if env:
        if not env.isdigit():
            from trainer.config import ConfigError

            raise ConfigError(f"WORLD_SIZE={env!r} is not a whole number: unset it or pass --world-size N")
        return int(env), "$WORLD_SIZE"
    return nodes * gpus_per_node, f"launch: {nodes} nodes × {gpus_per_node} gpus_per_node"


def _dry_run_report(cfg: Any, derived: Any, args: argparse.Namespace, world_source: str) -> str:
    from trainer.deepspeed_config import build_deepspeed_config
    from trainer.estimate import count_parameters, estimate_memory, flops_per_token

    params = count_parameters(cfg.model, derived.padded_vocab_size)
    flops = flops_per_token(cfg.model, derived.padded_vocab_size, cfg.train.seq_len)
    memory = estimate_memory(cfg, derived)
    overrides = f" (+{len(args.overrides)} overrides)" if args.overrides else ""
    lines = [
        f"config       {args.config}{overrides}: {cfg.name}",
        f"world        {derived.world_size} processes ({world_source}) on {derived.device} = "
        f"tp {derived.tp} × pp {derived.pp} × dp {derived.dp}",
        *([f"pipeline     decoder layers per stage {list(derived.stage_layers)} (first to last; embedding on the "
           f"first, lm_head on the last{_TIED_OVER_STAGES if cfg.model.tie_embeddings else ''})"]
          if derived.pp > 1 else []),
        f"batch        {derived.global_batch_size} samples × {cfg.train.seq_len} tokens = "
        f"{derived.global_batch_size_tokens:,} tokens/step = micro {derived.micro_batch_size_per_gpu} × "
        f"grad_accum {derived.grad_accum_steps} × dp {derived.dp}",
        *_rampup_lines(cfg),
        *_document_lines(cfg, derived),
        f"parameters   {params.total:,} ({_si(params.total)}; non-embedding {_si(params.non_embedding)}; "
        f"vocab {cfg.model.vocab_size:,} padded to {derived.padded_vocab_size:,})",
        f"FLOPs/token  {flops.total:.3e} training (matmul {flops.matmul:.3e} + attention {flops.attention:.3e}); "
        f"{flops.total * derived.global_batch_size_tokens:.3e} per step",
        *_memory_lines(cfg, derived, memory),
        "DeepSpeed config:",
        json.dumps(build_deepspeed_config(cfg, derived), indent=2),
    ]
    return "\n".join(lines)


def _rampup_lines(cfg: Any) -> list[str]:
    ramp, sizes = cfg.train.batch_size_rampup, cfg.train.ramp_batch_sizes()
    if ramp is None:
        return []
    return [f"rampup       global batch {ramp.start} → {cfg.train.global_batch_size} samples by {ramp.increment}: "
            f"{len(sizes):,} steps, {sum(sizes):,} samples before the full batch (LR schedule in steps as always)"]


def _checkpointing_text(cfg: Any, derived: Any) -> str:
    """The mode, and on how many layers of each stage when not on all of every stage's."""
    par = cfg.parallel
    if par.activation_checkpointing == "none" or all(
            par.checkpointed_layers(layers) == layers for layers in derived.stage_layers):
        return par.activation_checkpointing
    return f"{par.activation_checkpointing} on the first {par.activation_checkpointing_layers} layer(s) of each stage"


def _document_lines(cfg: Any, derived: Any) -> list[str]:
    """model.attention_mask / reset_position_ids (and the mask's kernel), train.mask_eos_loss, and the eos id the
    documents end at (read from the data)."""
    from data_pipeline.errors import DataPipelineError
    from trainer.config import DOCUMENT_KERNEL_NAMES
    from trainer.data_check import document_eos_id

    if not (cfg.model.uses_documents or cfg.train.mask_eos_loss):
        return []
    try:
        eos = f"eos id {document_eos_id(cfg)}"
    except DataPipelineError:  # a missing dataset: said by _warn_missing_data
        eos = "the data's eos id (unreadable now)"
    kernel = DOCUMENT_KERNEL_NAMES[derived.attention_kernel]
    attention = (f"a token attends to earlier tokens of its own document only ({kernel})"
                 if cfg.model.attention_mask == "document" else "attention crosses document ends")
    positions = "positions restart at each document" if cfg.model.reset_position_ids else "positions run on"
    loss = "; no loss where the input is the eos" if cfg.train.mask_eos_loss else ""
    return [f"documents    {attention}; {positions}{loss}; a document ends at {eos}"]


def _memory_lines(cfg: Any, derived: Any, memory: Any) -> list[str]:
    from trainer.estimate import loss_bytes

    gib = 2**30
    tokens = cfg.train.seq_len * derived.micro_batch_size_per_gpu
    other = "fused_linear" if cfg.parallel.lm_loss == "chunked" else "chunked"
    loss_gib, other_gib = (loss_bytes(cfg, derived, tokens, kind) / gib for kind in (cfg.parallel.lm_loss, other))
    lines = [
        f"memory/GPU   {memory.total_bytes / gib:.1f} GiB on the busiest stage "
        f"(stage {memory.stage}: {memory.params_per_gpu:,} params there): "
        f"weights {memory.weights_bytes / gib:.1f} + grads {memory.grads_bytes / gib:.1f} + optimizer "
        f"{memory.optimizer_bytes / gib:.1f} + activations {memory.activations_bytes / gib:.1f} + DeepSpeed buffers "
        f"{memory.buffers_bytes / gib:.1f} GiB",
        f"             ({cfg.precision.dtype}, ZeRO-{cfg.zero.stage}, activation checkpointing "
        f"{_checkpointing_text(cfg, derived)}, {memory.in_flight_micro_batches} micro-batch(es) in flight; "
        f"add CUDA context, NCCL buffers, fragmentation)",
        f"             lm_head + loss on the last stage: {loss_gib:.2f} GiB of the activations "
        f"(parallel.lm_loss={cfg.parallel.lm_loss}; with {other}: {other_gib:.2f} GiB)",
    ]
    if cfg.precision.fp8 != "off":
        lines.append(f"             precision.fp8={cfg.precision.fp8}: counted as {cfg.precision.dtype} (torchao keeps "
                     f"each FP8 linear's {cfg.precision.dtype} input for backward; its FP8 copies are transient)")
    if memory.cpu_offload_bytes:
        lines.append(f"             offloaded to host memory: {memory.cpu_offload_bytes / gib:.1f} GiB per GPU")
    return lines


def _si(count: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f} {suffix}"
    return str(count)
