"""The seam between checkpoints and conversion: a *full* state dict (our parameter names → whole tensors, vocab rows
padded as in training) plus the ModelConfig it belongs to.

Conversion never sees a TP/PP/ZeRO layout. A full state dict comes from a `.safetensors` file (written by
`convert from-hf`, or by `save_full_state_dict` from a model in memory) or from one of our checkpoint directories
(trainer.checkpoint: its files already hold full tensors as slices of every TP/PP/DP/ZeRO rank; the reader joins
them), and the checkpoint's config.yaml gives the ModelConfig.

Canonical form: one entry per parameter, as `Llama.named_parameters()` lists them, so a tied model has no
lm_head.weight (safetensors cannot store the alias). An lm_head equal to embed_tokens is also accepted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError, ModelConfig, apply_overrides, load_config, parse_config, parse_yaml_value
from trainer.hf.errors import HFConversionError
from trainer.hf.keys import LM_HEAD
from trainer.hf.weights_io import save_safetensors

StateDict = dict[str, torch.Tensor]
STATE_DICT_SUFFIX = ".safetensors"
# A `model:`-only YAML (what `convert from-hf` writes) is validated inside a minimal run config, so it gets the
# same checks and dotted-path messages as a full one; these stub sections cannot fail.
_FRAGMENT_STUB: dict[str, Any] = {
    "train": {"seq_len": 1, "micro_batch_size_per_gpu": 1, "global_batch_size": 1, "max_steps": 1},
    "data": {"synthetic": True},
}


def load_full_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """Our full (unsharded) state dict from `path`: a *.safetensors file, a checkpoint directory (step_N), or a
    directory of checkpoints (its newest intact one). Checkpoints are checksum-verified; nothing is unpickled."""
    source = Path(path)
    if source.is_dir():
        from trainer.checkpoint import CheckpointError, read_full_state_dict

        try:
            state, _ = read_full_state_dict(source)
        except CheckpointError as err:
            raise HFConversionError(str(err)) from None
        return state
    if not source.is_file():
        raise HFConversionError(f"state dict {source} not found: pass an existing *.safetensors file")
    if source.suffix != STATE_DICT_SUFFIX:
        raise HFConversionError(f"state dict {source} must be a *.safetensors file (torch .pt/.bin pickles can run "
                                f"code on load and are not read here)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(source))
    except (SafetensorError, OSError) as err:
        raise HFConversionError(f"cannot read {source}: {err}; the file is truncated or not safetensors") from None


def save_full_state_dict(
    state: StateDict, path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """Write a full state dict as one safetensors file (temp file + rename: never half a file under the name)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    save_safetensors(tensors, tmp, metadata)
    os.replace(tmp, target)
    return target


def state_dict_of(model: torch.nn.Module) -> StateDict:
    """A model's full state dict in canonical form (tied lm_head listed once, as embed_tokens.weight)."""
    return {name: param.detach() for name, param in model.named_parameters()}


def load_into(model: torch.nn.Module, state: StateDict) -> None:
    """Copy a canonical full state dict into a trainer.model.Llama of the same shape (strict, tied-aware)."""
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = [LM_HEAD] if tied and LM_HEAD not in state else []
    if sorted(missing) != allowed_missing or unexpected:
        raise HFConversionError(f"state dict does not fit the model: missing {missing}, unexpected {unexpected}")


def checkpoint_model_config(checkpoint: str | os.PathLike[str], overrides: Sequence[str] = ()) -> ModelConfig:
    """The `model:` section of the config.yaml inside a checkpoint (the one `load_full_state_dict` would read)."""
    from trainer.checkpoint import CheckpointError, resolve_offline

    try:
        ckpt = resolve_offline(Path(checkpoint))
    except CheckpointError as err:
        raise HFConversionError(str(err)) from None
    return load_model_config(ckpt / "config.yaml", overrides)


def load_model_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> ModelConfig:
    """The `model:` section of a run config YAML, or of a `model:`-only fragment, with dotted overrides applied."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"config file {source} not found: pass --config with a run config YAML or the "
                          f"model.yaml written by `pretrain convert from-hf`")
    try:
        tree = parse_yaml_value(source.read_text(encoding="utf-8"))
    except ConfigError:
        tree = None  # not valid YAML: load_config below reports it with the file name
    if isinstance(tree, dict) and set(tree) == {"model"}:
        full = apply_overrides({**_FRAGMENT_STUB, "model": tree["model"]}, overrides)
        return parse_config(full, source=str(source)).model
    return load_config(source, overrides).model
