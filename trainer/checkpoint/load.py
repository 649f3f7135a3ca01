"""Reading a checkpoint back: choose a valid one, check it fits the run, and load it into any layout.

Resharding needs no conversion step: the files hold full tensors (global shapes) as slices, and each rank reads the
block its parameter covers under the *current* TP rank, PP stage and ZeRO stage, then hands the full TP-local tensor
to the optimizer accessor (trainer.checkpoint.state). Reading is safetensors (memory-mapped raw bytes), JSON and
YAML only: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.checkpoint.io import read_json, tensor_files
from trainer.checkpoint.layout import (
    CONFIG,
    INDEX,
    TENSOR_KINDS,
    CheckpointCompatibilityError,
    CheckpointError,
    TensorEntry,
    checkpoint_files,
    is_checkpoint_dir,
    list_step_dirs,
    parse_index,
    read_metadata,
    read_region,
    rng_file,
    shallow_problems,
    step_of,
    tensor_key,
    verify_files,
)
from trainer.checkpoint.state import (
    load_engine_counters,
    load_loss_scaler_state,
    load_rng_state,
    load_scheduler_state,
    local_shape,
    optimizer_access,
)
from trainer.config import Config, load_config
from trainer.parallelize import tp_partition_dim

log = logging.getLogger(__name__)
Progress = Callable[[], None]

# Tensors whose dim 0 is the (padded) vocabulary: their row count follows tp (Derived.padded_vocab_size).
VOCAB_ROW_TENSORS = ("embed_tokens.weight", "lm_head.weight")
# Changing these changes the tensors' shapes: such a checkpoint cannot be loaded.
MODEL_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                      "tie_embeddings")
# Same tensors, another function: the weights fit, but a model trained with other values computes something else.
MODEL_NUMERICS_FIELDS = ("rope_theta", "rope_scaling", "rms_norm_eps")
# Changing these changes which samples come next: refused unless checkpoint.allow_data_change.
DATA_FIELDS = ("data.synthetic", "data.datasets", "data.train_split", "train.seed", "train.seq_len")


# ---------------------------------------------------------------------------------------------------------------------
# Choosing a checkpoint (collective)


def candidates(target: Path) -> list[Path]:
    """A checkpoint dir (step_N, complete or not) → [it]; a directory of checkpoints → its step_* dirs, newest
    first."""
    if is_checkpoint_dir(target) or (target.is_dir() and step_of(target) is not None):
        return [target]
    return list_step_dirs(target)


def choose_valid(paths: list[Path], ctx: Any, verify: bool,
                 rejected: list[tuple[Path, list[str]]] | None = None) -> Path | None:
    """The first of `paths` that is complete and intact, checked by all ranks together: each rank hashes every
    world_size-th file, and the verdict is agreed, so every rank picks the same checkpoint. Collective.
    `rejected` (if given) receives each skipped checkpoint with its problems."""
    for path in paths:
        meta, problems = shallow_problems(path)
        if meta is not None and not problems and verify:
            names = checkpoint_files(meta)
            problems = verify_files(path, meta, names[ctx.rank::ctx.world_size])
        everything = sorted({p for rank_problems in _all_gather_json(problems, ctx) for p in rank_problems})
        if not everything:
            return path
        log.warning("checkpoint %s is incomplete or corrupt, skipping it: %s", path, "; ".join(everything[:5]))
        if rejected is not None:
            rejected.append((path, everything))
    return None


def broadcast_json(obj: Any, ctx: Any) -> Any:
    """rank 0's `obj` on every rank, as JSON bytes (torch's *_object collectives would unpickle)."""
    data = json.dumps(obj).encode("utf-8") if ctx.rank == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=ctx.device)
    dist.broadcast(size, src=0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=ctx.device)
    if ctx.rank == 0 and data:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(buffer.cpu().numpy().tobytes().decode("utf-8"))


def _all_gather_json(obj: Any, ctx: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, as JSON bytes padded to the longest."""
    data = json.dumps(obj).encode("utf-8")
    sizes = torch.zeros(ctx.world_size, dtype=torch.int64, device=ctx.device)
    sizes[ctx.rank] = len(data)
    dist.all_reduce(sizes)
    buffer = torch.zeros((ctx.world_size, int(sizes.max().item())), dtype=torch.uint8, device=ctx.device)
    buffer[ctx.rank, :len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dist.all_reduce(buffer)  # each row is written by one rank only: the sum is a gather
    rows = buffer.cpu().numpy()
    return [json.loads(rows[r, :int(sizes[r])].tobytes().decode("utf-8")) for r in range(ctx.world_size)]


def shared_candidates(target: Path, ctx: Any) -> list[Path]:
    """`candidates(target)` as rank 0 sees them, on every rank: all ranks then walk the same list in the same order
    (a save finishing between two ranks' directory listings cannot split them). Collective."""
    listing = [str(p) for p in candidates(target)] if ctx.rank == 0 else []
    return [Path(p) for p in broadcast_json(listing, ctx)]


def find_resume_checkpoint(cfg: Config, ctx: Any) -> Path | None:
    """checkpoint.resume → the directory to resume from, or None for a fresh start. Collective."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        return None
    explicit = mode != "auto"
    target = Path(mode if explicit else cfg.checkpoint_dir)
    paths = shared_candidates(target, ctx)
    if explicit and not paths:
        raise CheckpointError(f"checkpoint.resume={mode}: no checkpoint there (a step_N directory with metadata.json, "
                              f"or a directory of them); fix the path or use checkpoint.resume=auto|none")
    rejected: list[tuple[Path, list[str]]] = []
    chosen = choose_valid(paths, ctx, cfg.checkpoint.verify_on_load, rejected)
    if chosen is None and paths:
        # Not a silent fresh start: it would train from step 0 and, saving the same step numbers, replace the
        # damaged checkpoints that a person may still want to repair or inspect.
        listing = "\n".join(f"  - {path}: {'; '.join(problems[:3])}" for path, problems in rejected)
        raise CheckpointError(
            f"checkpoint.resume={mode}: {len(rejected)} checkpoint(s) in {target}, none complete and intact:\n"
            f"{listing}\nNothing was deleted or changed. Repair or restore one of them, or move them away "
            f"(mv {target} {target}.damaged) to start over, or set checkpoint.resume=none to start fresh here "
            f"(new saves then replace damaged directories of the same step)")
    return chosen


# ---------------------------------------------------------------------------------------------------------------------
# Compatibility of a checkpoint with this run's config


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def model_shape_changes(saved: Any, model: Any) -> list[tuple[str, Any, Any]]:
    """("model.<field>", saved, now) for every ModelConfig field that changes the tensors' shapes."""
    changes = [(f"model.{field}", getattr(saved, field), getattr(model, field))
               for field in MODEL_SHAPE_FIELDS if getattr(saved, field) != getattr(model, field)]
    if saved.resolved_head_dim() != model.resolved_head_dim():
        changes.append(("model.head_dim", saved.resolved_head_dim(), model.resolved_head_dim()))
    return changes


def model_numerics_changes(saved: Any, model: Any) -> list[tuple[str, Any, Any]]:
    """("model.<field>", saved, now) for every ModelConfig field that changes what the same weights compute."""
    return [(f"model.{field}", getattr(saved, field), getattr(model, field))
            for field in MODEL_NUMERICS_FIELDS if getattr(saved, field) != getattr(model, field)]


def check_compatible(saved: Config, cfg: Config) -> tuple[bool, list[str]]:
    """(data changed, the other changed fields as "key: old -> new"). Raises CheckpointCompatibilityError naming the
    field when the model shape differs, or the data does while checkpoint.allow_data_change is off."""
    shape_changes = model_shape_changes(saved.model, cfg.model)
    if shape_changes:
        key, old, new = shape_changes[0]
        raise CheckpointCompatibilityError(
            f"the checkpoint was trained with {key}={old!r} but this config has {key}={new!r}: its tensors do not "
            f"fit this model. Resume with the checkpoint's model section (its config.yaml), or start a new run "
            f"(checkpoint.resume=none or another checkpoint.dir)")
    before, after = _flatten(saved.model_dump(mode="json")), _flatten(cfg.model_dump(mode="json"))
    changed = {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
               if before.get(key) != after.get(key)}
    data_changes = [key for key in changed if any(key == f or key.startswith(f + ".") for f in DATA_FIELDS)]
    if data_changes and not cfg.checkpoint.allow_data_change:
        key = data_changes[0]
        old, new = changed[key]
        raise CheckpointCompatibilityError(
            f"the checkpoint was trained with {key}={old!r} but this config has {key}={new!r}: resuming would not "
            f"continue the same sample stream. Resume with the checkpoint's data settings, or set "
            f"checkpoint.allow_data_change=true to continue training on the new data from its first sample")
    notes = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items()
             if key not in data_changes and not key.startswith(("checkpoint.", "logging.", "launch."))]
    return bool(data_changes), notes


# ---------------------------------------------------------------------------------------------------------------------
# Loading into the engine (every rank)


@dataclass(frozen=True)
class Loaded:
    path: Path
    step: int
    consumed_samples: int  # the loader's position
    consumed_tokens: int  # tokens the weights were trained on (TrainState.consumed_tokens)
    metadata: dict[str, Any]


def load_checkpoint(run: Any, ckpt: Path, *, restore_data: bool, progress: Progress = lambda: None) -> Loaded:
    """Weights, Adam state, LR schedule, loss scaler and engine counters from `ckpt` into this rank's engine, in
    whatever layout it has; RNG when the world is the same; the data-loader position when `restore_data`."""
    meta = read_metadata(ckpt)
    index = parse_index(read_json(ckpt / INDEX))
    trainer_state = meta["trainer_state"]
    _load_tensors(run, ckpt, index, float(trainer_state["adam_step"]), progress)
    load_scheduler_state(run.engine, trainer_state["lr_scheduler"])
    load_loss_scaler_state(run.engine, trainer_state.get("loss_scaler"))
    load_engine_counters(run.engine, trainer_state["engine"])
    _load_rng(run.ctx, ckpt, meta)
    if restore_data:
        load_data_state(run, meta)
    return Loaded(ckpt, int(meta["step"]), int(meta["consumed_samples"]), int(meta["consumed_tokens"]), meta)


def _load_tensors(run: Any, ckpt: Path, index: dict[str, TensorEntry], adam_step: float, progress: Progress) -> None:
    access = optimizer_access(run.engine)
    access.begin_load(adam_step)
    warned: set[str] = set()
    with tensor_files(ckpt) as files:
        for name, param in run.model.canonical_named_parameters():
            values = []
            for kind in TENSOR_KINDS:
                key = tensor_key(kind, name)
                if key not in index:
                    raise CheckpointCompatibilityError(f"{ckpt} has no tensor {key}: it was saved from a different "
                                                       f"model (compare its config.yaml with this run's model section)")
                values.append(read_param_block(files, index[key], key, name, param, run.ctx, warned))
            access.write(param, *values, step=adam_step)
            progress()
    access.finish_load()  # collective under ZeRO-1/2: after every rank has written its fragments


def read_param_block(files: Any, entry: TensorEntry, key: str, name: str, param: torch.Tensor, ctx: Any,
                     warned: set[str], hint: str = "resume with the checkpoint's model section") -> torch.Tensor:
    """This rank's block (fp32) of the global tensor `key` for its parameter `name` (a TP shard where
    `tp_partition_dim`), under the current TP rank. The stored global shape must be the model's, except for the
    padded vocabulary rows: shared rows are read, rows the stored tensor lacks are zero, extra stored rows are
    dropped. Shared by resume (`_load_tensors`) and `init_from` (`init_weights_from`)."""
    _check_global_shape(name, entry.shape, param, ctx, warned, hint)
    start, shape = _target_block(param, ctx)
    return read_region(files, entry, key, start, shape)


def _target_block(param: torch.Tensor, ctx: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where this rank's (TP-local) parameter sits in the global tensor: (start, shape)."""
    shape = local_shape(param)
    start = [0] * len(shape)
    dim = tp_partition_dim(param)
    if dim is not None:
        start[dim] = ctx.tp_rank * shape[dim]
    return tuple(start), shape


def _check_global_shape(name: str, stored: tuple[int, ...], param: torch.Tensor, ctx: Any, warned: set[str],
                        hint: str = "resume with the checkpoint's model section") -> None:
    shape = list(local_shape(param))
    dim = tp_partition_dim(param)
    if dim is not None:
        shape[dim] *= ctx.tp
    if tuple(shape) == tuple(stored):
        return
    if name in VOCAB_ROW_TENSORS and tuple(shape[1:]) == tuple(stored[1:]):
        if name not in warned:
            warned.add(name)
            log.warning("%s: the padded vocabulary changes from %d rows (saved) to %d (this tp): shared rows are "
                        "loaded, extra rows are zero", name, stored[0], shape[0])
        return
    raise CheckpointCompatibilityError(f"{name}: the checkpoint holds shape {list(stored)} but this model needs "
                                       f"{shape}: {hint}")


def _load_rng(ctx: Any, ckpt: Path, meta: dict[str, Any]) -> None:
    """Each rank's own RNG streams, when the world size is unchanged (the model draws nothing random while training;
    this keeps future dropout or sampling exact)."""
    name = rng_file(ctx.rank)
    if meta["topology"]["world_size"] == ctx.world_size and name in meta["files"]:
        load_rng_state(read_json(ckpt / name))


def load_data_state(run: Any, meta: dict[str, Any]) -> None:
    """Continue the sample stream where the checkpoint left it (loader state from the first pipeline stage)."""
    from data_pipeline.errors import DataPipelineError

    try:
        run.train_loader.load_state_dict(meta["data"]["loader_state"])
    except (ValueError, DataPipelineError) as err:
        raise CheckpointCompatibilityError(
            f"the checkpoint's data-loader state does not fit this run's data.datasets: {err}. Set "
            f"checkpoint.allow_data_change=true to continue training on this data from its first sample") from None


def saved_config(ckpt: Path) -> Config:
    return load_config(ckpt / CONFIG)


# ---------------------------------------------------------------------------------------------------------------------
# Offline: one process, no engine (HF conversion, tools)


def resolve_offline(path: str | Path) -> Path:
    """A checkpoint dir, or the newest intact checkpoint of a directory of them (corrupt ones are skipped, with a
    warning). One process, no process group."""
    from trainer.checkpoint.layout import verify_checkpoint

    path = Path(path)
    found = candidates(path)
    if not found:
        raise CheckpointError(f"{path} is neither a checkpoint (a step_N directory with metadata.json) nor a directory "
                              f"of checkpoints: pass e.g. runs/<name>/checkpoints or runs/<name>/checkpoints/step_N")
    for ckpt in found:
        problems = verify_checkpoint(ckpt)
        if not problems:
            return ckpt
        if found == [path]:
            raise CheckpointError(f"checkpoint {ckpt} is incomplete or corrupt: {'; '.join(problems[:5])}; use an "
                                  f"earlier step_N")
        log.warning("checkpoint %s is incomplete or corrupt, skipping it: %s", ckpt, "; ".join(problems[:5]))
    raise CheckpointError(f"no intact checkpoint under {path}: every step_N failed its checks (see the warnings)")


def read_full_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """(canonical full fp32 state dict, the checkpoint it came from): names as `Llama.named_parameters()`, TP slices
    joined, PP stages merged, ZeRO gathered (the format stores global tensors), vocabulary rows as trained, no
    lm_head when tied. Checksums are verified first."""
    from trainer.checkpoint.layout import iter_full_tensors

    ckpt = resolve_offline(path)
    return dict(iter_full_tensors(ckpt, "param")), ckpt
