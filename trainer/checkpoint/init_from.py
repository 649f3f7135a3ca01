"""`checkpoint.init_from`: start a fresh run from imported weights, in any TP/PP/DP/ZeRO layout.

    checkpoint:
      init_from: imported/model.safetensors   # `convert from-hf` output, a save_full_state_dict file,
                                              # one of our checkpoint dirs, or an HF Llama directory

Weights only: no optimizer moments, LR schedule, step or data position (the run starts at step 0). Resume always
wins: when `checkpoint.resume` finds a checkpoint, init_from is ignored (and the log says which one was used), so a
requeued run continues from its own checkpoints instead of restarting from the imported weights.

It runs after `parallelize` and before `deepspeed.initialize`, which builds the fp32 master (and ZeRO partitions)
from the module weights: under fp32 the master is the source values exactly; under bf16/fp16 it is their rounding,
as for a fresh random init. Each rank reads only the block of each global tensor its (TP-local) parameter covers,
with the same reader as resume (`load.read_param_block`, `layout.read_region`): vocabulary rows are shared rows
copied, padding rows the source lacks zero (as `convert from-hf` and checkpoint resharding pad them), extra source
padding rows dropped. Collective (every rank calls it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.checkpoint.io import read_json, tensor_files
from trainer.checkpoint.layout import (
    INDEX,
    CheckpointCompatibilityError,
    CheckpointError,
    Slice,
    TensorEntry,
    parse_index,
    tensor_key,
)
from trainer.checkpoint.load import (
    VOCAB_ROW_TENSORS,
    choose_valid,
    find_resume_checkpoint,
    model_numerics_changes,
    model_shape_changes,
    read_param_block,
    saved_config,
    shared_candidates,
)
from trainer.config import Config, ModelConfig

log = logging.getLogger(__name__)

EMBED, LM_HEAD = "embed_tokens.weight", "lm_head.weight"
_HINT = "checkpoint.init_from needs weights of this run's model shape (compare its model section with the source's)"


@dataclass
class _Source:
    """Global tensors by canonical name: `files.get_slice(file, key)` + a TensorEntry per name, as read_region
    expects (one slice covering the whole tensor for a full state dict)."""

    description: str
    files: Any
    entries: dict[str, TensorEntry]
    keys: dict[str, str]  # canonical name → key in `files`
    model_cfg: ModelConfig | None  # the source's model section, when it has one


class _InMemory:
    """read_region's file interface over an in-memory state dict (an imported HF directory)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def get_slice(self, file: str, key: str) -> torch.Tensor:
        return self.tensors[key]


class _SafetensorsFile:
    """read_region's file interface over one safetensors file (memory-mapped, only the needed rows are read)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def get_slice(self, file: str, key: str) -> Any:
        return self.handle.get_slice(key)


def _whole(shape: tuple[int, ...], dtype: str) -> TensorEntry:
    return TensorEntry(tuple(shape), dtype, (Slice("", (0,) * len(shape), tuple(shape)),))


@contextlib.contextmanager
def _open_source(path: Path, cfg: Config, ctx: Any) -> Iterator[_Source]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"checkpoint.init_from={path}: a file must be *.safetensors (as written by "
                                  f"`pretrain convert from-hf` or save_full_state_dict); .pt/.bin pickles are not read")
        from safetensors import safe_open

        model_cfg = None
        fragment = path.with_name("model.yaml")  # written next to it by `convert from-hf`
        if fragment.is_file():
            from trainer.hf.full_state import load_model_config

            model_cfg = load_model_config(fragment)
        with safe_open(str(path), framework="pt") as handle:
            entries = {key: _whole(tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                       for key in handle.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
            yield _Source(f"full state dict {path}", _SafetensorsFile(handle), entries, {k: k for k in entries},
                          model_cfg)
        return
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.init_from={path} not found: pass a *.safetensors full state dict, a "
                              f"checkpoint directory (or a directory of them), or an HF Llama directory")
    if (path / "config.json").is_file() and not (path / INDEX).is_file():
        from trainer.hf.from_hf import import_hf

        imported = import_hf(path, tp=ctx.tp, dtype="fp32")  # every rank reads it whole (CPU memory: one model)
        tensors = imported.state_dict
        entries = {key: _whole(tuple(t.shape), str(t.dtype)) for key, t in tensors.items()}
        yield _Source(f"HF model {path}", _InMemory(tensors), entries, {k: k for k in entries}, imported.model_cfg)
        return
    ckpt = choose_valid(shared_candidates(path, ctx), ctx, cfg.checkpoint.verify_on_load)
    if ckpt is None:
        raise CheckpointError(f"checkpoint.init_from={path}: no complete, intact checkpoint (step_N with "
                              f"metadata.json) there, no *.safetensors file and no HF config.json")
    index = parse_index(read_json(ckpt / INDEX))
    prefix = tensor_key("param", "")
    keys = {key[len(prefix):]: key for key in index if key.startswith(prefix)}
    with tensor_files(ckpt) as files:
        yield _Source(f"checkpoint {ckpt}", files, {name: index[key] for name, key in keys.items()}, keys,
                      saved_config(ckpt).model)


def init_weights_from(pmodel: Any, cfg: Config, ctx: Any, path: str | Path) -> str:
    """Copy this rank's slice of every parameter of its pipeline stage from `path` into `pmodel` (a ParallelModel,
    before deepspeed.initialize). Returns the source's description. Raises CheckpointCompatibilityError naming the
    tensor (and both shapes) or the model field when the source does not fit the model."""
    with _open_source(Path(path), cfg, ctx) as source:
        new_vocab_from = _check_fits(source, cfg, ctx)
        warned: set[str] = set()
        tied = cfg.model.tie_embeddings
        with torch.no_grad():
            for name, param in pmodel.canonical_named_parameters():
                stored = name if name in source.entries else (EMBED if tied and name == LM_HEAD else None)
                if stored is None:
                    raise CheckpointCompatibilityError(f"checkpoint.init_from: {source.description} has no tensor "
                                                       f"{name}: it is not this model's state dict")
                block = read_param_block(source.files, source.entries[stored], source.keys[stored], name, param, ctx,
                                         warned, hint=_HINT)
                param.copy_(block.to(param.device, param.dtype))
                if new_vocab_from is not None and name in VOCAB_ROW_TENSORS:
                    _fill_new_rows_with_mean(param, new_vocab_from, cfg.model.vocab_size, ctx)
        return source.description


def _check_fits(source: _Source, cfg: Config, ctx: Any) -> int | None:
    """Refuse a source that does not fit the model; warn where it fits but computes otherwise. Returns the source's
    vocabulary size when the model adds rows to it (checkpoint.init_from_new_vocab_rows=mean), else None."""
    from trainer.parallelize import build_model_on_meta

    new_vocab_from = _added_vocab_rows(source, cfg)
    if source.model_cfg is not None:
        changes = [change for change in model_shape_changes(source.model_cfg, cfg.model)
                   if not (new_vocab_from is not None and change[0] == "model.vocab_size")]
        if changes:
            key, old, new = changes[0]
            raise CheckpointCompatibilityError(
                f"checkpoint.init_from: {source.description} has {key}={old!r} but this config has "
                f"{key}={new!r}: set the run's model section to the source's (its model.yaml / config.yaml)"
                + (", or let checkpoint.init_from_new_vocab_rows=mean start the added tokens' rows"
                   if key == "model.vocab_size" and new > old else ""))
        for key, old, new in model_numerics_changes(source.model_cfg, cfg.model):
            if ctx.rank == 0:  # legitimate when extending the context (a new rope_theta or scaling), else a slip
                log.warning("checkpoint.init_from: %s was trained with %s=%r, this run uses %r: its weights "
                            "will compute something else than they did (intended when extending the context; "
                            "otherwise copy the source's model section)", source.description, key, old, new)
    names = set(source.entries)
    if cfg.model.tie_embeddings and LM_HEAD in names:
        names.discard(LM_HEAD)  # canonical form lists a tied lm_head once, as the embedding; an equal copy is ok
    expected = {name for name, _ in build_model_on_meta(cfg.model, cfg.model.vocab_size).named_parameters()}
    if names - expected:
        raise CheckpointCompatibilityError(
            f"checkpoint.init_from: {source.description} has tensors this model does not: "
            f"{sorted(names - expected)[:5]} (a different architecture or num_layers)")
    for name in VOCAB_ROW_TENSORS:
        entry = source.entries.get(name)
        if new_vocab_from is None and entry is not None and entry.shape[0] < cfg.model.vocab_size:
            raise CheckpointCompatibilityError(
                f"{name}: {source.description} holds shape {list(entry.shape)}, fewer rows than this model's "
                f"model.vocab_size={cfg.model.vocab_size}: set model.vocab_size to the source's")
    return new_vocab_from


def _added_vocab_rows(source: _Source, cfg: Config) -> int | None:
    """The source's vocabulary size when this model adds tokens to it and may start them at the mean; else None."""
    if cfg.checkpoint.init_from_new_vocab_rows != "mean":
        return None
    if source.model_cfg is None:
        raise CheckpointCompatibilityError(
            f"checkpoint.init_from_new_vocab_rows=mean: {source.description} does not say its vocabulary size (a "
            f"bare state dict: its rows may include padding): keep the model.yaml `convert from-hf` wrote beside it")
    source_vocab = source.model_cfg.vocab_size
    return source_vocab if source_vocab < cfg.model.vocab_size else None


@torch.no_grad()
def _fill_new_rows_with_mean(param: torch.Tensor, source_vocab: int, vocab_size: int, ctx: Any) -> None:
    """Rows [source_vocab, vocab_size) of a vocabulary tensor (this rank's shard of rows under TP) ← the mean of
    rows [0, source_vocab) over the whole tensor (a sum over the TP group); padding rows stay zero."""
    rows = torch.arange(param.shape[0], device=param.device) + ctx.tp_rank * param.shape[0]  # global row indices
    total = param[rows < source_vocab].double().sum(dim=0)
    if ctx.tp > 1:
        dist.all_reduce(total, group=ctx.tp_group)
    param[(rows >= source_vocab) & (rows < vocab_size)] = (total / source_vocab).to(param.dtype)


@dataclass(frozen=True)
class ResumeChoice:
    """The checkpoint `find_resume_checkpoint` chose (None: none to resume from), kept so the resume hook does not
    choose again: choosing verifies checksums, which costs a full read of a large checkpoint."""

    checkpoint: Path | None


def init_unless_resuming(pmodel: Any, cfg: Config, ctx: Any) -> ResumeChoice | None:
    """checkpoint.init_from for a fresh run; nothing (with a log line) when checkpoint.resume finds a checkpoint.
    Collective. Returns the resume choice it had to make (None when init_from is unset and nothing was chosen)."""
    target = cfg.checkpoint.init_from
    if target is None:
        return None
    choice = ResumeChoice(find_resume_checkpoint(cfg, ctx))
    if choice.checkpoint is not None:
        log.info("checkpoint.init_from=%s ignored: resuming from checkpoint %s (resume wins)", target,
                 choice.checkpoint)
        return choice
    description = init_weights_from(pmodel, cfg, ctx, target)
    log.info("fresh start: weights initialised from %s (checkpoint.init_from; optimizer, schedule and data start "
             "at step 0)", description)
    return choice
