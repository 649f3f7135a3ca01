"""`pretrain convert average`: the mean of several checkpoints' weights, as one full state dict.

Llama 3 produced its final pre-trained model as the average of the checkpoints taken during annealing (Polyak
averaging); with a warmup-stable-decay schedule, averaging the last checkpoints of the stable phase approximates a
cooldown (Sanyal et al. 2023, "LAWA"). The checkpoints may come from any layouts (each stores global tensors), are
checksum-verified, and must share the model shape. Weights only: Adam moments, schedule and data position are not
averaged (the result starts a run through `checkpoint.init_from`, or is evaluated with `pretrain eval --weights`, or
exported with `pretrain convert to-hf --state-dict`).

    out = average_checkpoints([Path("runs/x/checkpoints/step_900"), Path("runs/x/checkpoints/step_1000")],
                              Path("runs/x/avg"))        # runs/x/avg/model.safetensors + model.yaml

Memory: one fp32 model (the running sum) and one tensor of one checkpoint at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.checkpoint.layout import CheckpointError, is_checkpoint_dir, iter_full_tensors
from trainer.checkpoint.load import (
    VOCAB_ROW_TENSORS,
    candidates,
    model_numerics_changes,
    model_shape_changes,
    resolve_offline,
    saved_config,
)
from trainer.config import ModelConfig

log = logging.getLogger(__name__)

STATE_DICT_FILE = "model.safetensors"  # the names `convert from-hf` writes: init_from and to-hf read them alike
MODEL_CONFIG_FILE = "model.yaml"


@dataclass(frozen=True)
class Averaged:
    out_dir: Path
    checkpoints: list[Path]  # the checkpoints averaged, as resolved
    model_cfg: ModelConfig
    num_tensors: int


def newest_checkpoints(directory: Path, count: int) -> list[Path]:
    """The newest `count` checkpoints of a directory of them, oldest first (checksums are verified on reading)."""
    found = [path for path in candidates(directory) if is_checkpoint_dir(path)]  # newest first
    if count < 2 or len(found) < count:
        raise CheckpointError(f"--last {count}: {directory} holds {len(found)} complete checkpoints; averaging needs "
                              f"at least 2, and at most that many")
    return list(reversed(found[:count]))


def average_checkpoints(paths: Sequence[Path], out_dir: Path, overwrite: bool = False) -> Averaged:
    """Write out_dir/model.safetensors (the mean of the checkpoints' weights, fp32) and out_dir/model.yaml (the first
    checkpoint's model section). Refuses checkpoints of different model shapes, naming the field."""
    from trainer.hf.full_state import save_full_state_dict
    from trainer.hf.llama_config import model_config_fragment
    from trainer.hf.staging import check_output_dir, staged_dir

    checkpoints = [resolve_offline(path) for path in paths]  # verified; a directory gives its newest intact one
    if len(set(checkpoints)) < 2:
        raise CheckpointError(f"averaging needs at least 2 different checkpoints, got {[str(c) for c in checkpoints]}")
    model_cfg = _common_model(checkpoints)
    check_output_dir(out_dir, overwrite, marker=MODEL_CONFIG_FILE)
    total = _sum_of_weights(checkpoints, model_cfg.vocab_size)
    mean = {name: tensor / len(checkpoints) for name, tensor in total.items()}
    header = ("model: section of the checkpoints averaged by `pretrain convert average`:\n"
              + "\n".join(f"  {ckpt}" for ckpt in checkpoints))
    with staged_dir(out_dir) as staging:
        save_full_state_dict(mean, staging / STATE_DICT_FILE,
                             metadata={"averaged": ",".join(str(ckpt) for ckpt in checkpoints)})
        (staging / MODEL_CONFIG_FILE).write_text(model_config_fragment(model_cfg, header), encoding="utf-8")
    return Averaged(out_dir, checkpoints, model_cfg, len(mean))


def _common_model(checkpoints: list[Path]) -> ModelConfig:
    first = saved_config(checkpoints[0]).model
    for ckpt in checkpoints[1:]:
        model = saved_config(ckpt).model
        changes = model_shape_changes(first, model)
        if changes:
            key, old, new = changes[0]
            raise CheckpointError(f"{checkpoints[0]} has {key}={old!r} but {ckpt} has {new!r}: only checkpoints of "
                                  f"one model shape can be averaged")
        for key, old, new in model_numerics_changes(first, model):
            log.warning("%s has %s=%r but %s has %r: averaged anyway, the result is written with the first's",
                        checkpoints[0], key, old, ckpt, new)
    return first


def _sum_of_weights(checkpoints: list[Path], vocab_size: int) -> dict[str, torch.Tensor]:
    """Per tensor, the sum over the checkpoints. Vocabulary tensors without their padding rows (zero, and as many
    as each run's tp asked for): init_from and to-hf pad again as they need."""
    total: dict[str, torch.Tensor] = {}
    for index, ckpt in enumerate(checkpoints):
        seen = set()
        for name, tensor in iter_full_tensors(ckpt, "param"):
            seen.add(name)
            if name in VOCAB_ROW_TENSORS:
                tensor = tensor[:vocab_size]
            if index == 0:
                total[name] = tensor.float().clone()
            elif name not in total or total[name].shape != tensor.shape:
                raise CheckpointError(f"{ckpt} holds {name} {list(tensor.shape)}, which {checkpoints[0]} does not "
                                      f"hold in that shape: only checkpoints of one model can be averaged")
            else:
                total[name] += tensor.float()
        if seen != set(total):
            raise CheckpointError(f"{ckpt} lacks {sorted(set(total) - seen)[:5]}, which {checkpoints[0]} holds: only "
                                  f"checkpoints of one model can be averaged")
    return total
