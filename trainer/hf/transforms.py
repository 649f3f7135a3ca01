"""Named transforms between our full state dict and HF's LlamaForCausalLM state dict, one small function each.

Export (ours → HF), in this order:
  drop_tied_lm_head   tied embeddings: lm_head *is* embed_tokens; HF re-ties it on load, so it is not written
  check_state_dict    every key present, none extra, every shape right (vocab rows may be padded), all finite
  drop_vocab_padding  our embed_tokens / lm_head carry rows up to a multiple of tp × 128 that no token id
                      selects; HF's vocab_size is the tokenizer's, so rows [vocab_size:] are dropped
  cast_dtype          fp32 / bf16 / fp16, refusing values that overflow the target (fp16 tops out at 65504)
  rename_to_hf        prefix `model.` (explicit map: trainer.hf.keys)
Import (HF → ours) runs the mirror images: drop_tied_lm_head, check_state_dict, rename_from_hf, pad_vocab,
cast_dtype (only if asked: by default the source dtype is kept, which makes the round trip bit-exact).

What needs no transform, and why (each is a test in tests/trainer/test_hf.py):
- rotary layout: our rotary is HF's half-split `rotate_half`, so q/k rows are already in HF order (no permute);
- QKV: q, k and v are separate tensors on both sides, and query head i reads kv head i // (nh / nkv) on both sides;
- gate/up: separate tensors with the same roles (`down(silu(gate(x)) * up(x))`) on both sides.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from trainer.config import ModelConfig
from trainer.hf.errors import HFConversionError
from trainer.hf.keys import EMBED, LM_HEAD, VOCAB_PARAMS, expected_shapes, hf_key, our_key, our_keys

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
DTypeName = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"
}
_MAX_NAMES_SHOWN = 6


def drop_tied_lm_head(state: StateDict, cfg: ModelConfig, source: str, *, hf_names: bool) -> StateDict:
    """Tied: remove lm_head if present, after proving it equals embed_tokens (else the config is wrong)."""
    if not cfg.tie_embeddings or LM_HEAD not in state:
        return state
    embed, head = state.get(_name(EMBED, hf_names)), state[LM_HEAD]
    if embed is not None and (embed.shape != head.shape or not torch.equal(embed, head)):
        raise HFConversionError(
            f"{source}: the config ties embeddings but lm_head.weight differs from embed_tokens.weight, so these "
            f"weights are untied: set tie_embeddings false (ours: model.tie_embeddings, HF: tie_word_embeddings)"
        )
    return {key: value for key, value in state.items() if key != LM_HEAD}


def check_state_dict(state: StateDict, cfg: ModelConfig, source: str, *, hf_names: bool) -> int:
    """Refuse missing/extra keys, wrong shapes, non-float or non-finite tensors. Returns the vocab row count.

    Ours (hf_names=False) may carry any number of vocab rows >= vocab_size (padding); HF's carry exactly vocab_size.
    """
    _check_key_sets(state, [_name(key, hf_names) for key in our_keys(cfg)], source)
    vocab_rows = _vocab_rows(state, cfg, source, hf_names)
    for key, shape in expected_shapes(cfg, vocab_rows).items():
        name = _name(key, hf_names)
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise HFConversionError(
                f"{source}: {name} has shape {tuple(tensor.shape)} but the model config expects {shape}: the "
                f"config (layers, hidden/intermediate size, heads, kv heads, head_dim) does not match these weights"
            )
        if not tensor.is_floating_point():
            raise HFConversionError(f"{source}: {name} has dtype {tensor.dtype}; weights must be floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise HFConversionError(
                f"{source}: {name} holds NaN or inf values: these weights are corrupt; use an earlier checkpoint"
            )
    return vocab_rows


def _name(key: str, hf_names: bool) -> str:
    return hf_key(key) if hf_names else key


def _check_key_sets(state: StateDict, names: list[str], source: str) -> None:
    missing = [key for key in names if key not in state]
    unexpected = sorted(set(state) - set(names))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_some(unexpected)}")
    if problems:
        raise HFConversionError(
            f"{source}: {'; '.join(problems)}. The model config (num_layers, tie_embeddings) does not match these "
            f"weights, or the file is not a full Llama state dict"
        )


def _vocab_rows(state: StateDict, cfg: ModelConfig, source: str, hf_names: bool) -> int:
    embed_name = _name(EMBED, hf_names)
    embed_rows = state[embed_name].shape[0] if state[embed_name].dim() else 0
    if hf_names:
        return cfg.vocab_size  # HF: exactly the vocabulary; the shape check names any other row count
    if embed_rows < cfg.vocab_size:
        raise HFConversionError(
            f"{source}: embed_tokens.weight has {embed_rows} rows but model.vocab_size is {cfg.vocab_size}: the "
            f"weights cannot hold that vocabulary; set model.vocab_size to the vocabulary these weights were trained on"
        )
    return embed_rows  # lm_head must match it: the shape check compares it against this count


def drop_vocab_padding(state: StateDict, cfg: ModelConfig) -> StateDict:
    """Keep rows [:vocab_size] of embed_tokens and lm_head (a view: no copy).

    Lossless for our runs: the padding rows never enter the loss, start at zero and stay zero. A checkpoint written
    before that was so (its padding columns took part in the softmax) gets a warning: the exported model then
    differs from the trained one by the probability those columns held.
    """
    for key in VOCAB_PARAMS:
        if key in state and state[key].shape[0] > cfg.vocab_size and state[key][cfg.vocab_size:].any():
            log.warning("%s: the vocabulary padding rows (%d..%d) are not zero: this checkpoint was trained with them "
                        "in the softmax (before the padded-vocabulary fix), so the export, which drops them, is not "
                        "exactly the trained model; retrain or fine-tune a few steps with the current version",
                        key, cfg.vocab_size, state[key].shape[0] - 1)
    return {key: (value[: cfg.vocab_size] if key in VOCAB_PARAMS else value) for key, value in state.items()}


def pad_vocab(state: StateDict, cfg: ModelConfig, padded_rows: int) -> StateDict:
    """Append zero rows to embed_tokens and lm_head up to `padded_rows` (padded_vocab_size for the requested tp).

    Zeros, not random: the rows are never an input id nor a label, so they only need to be deterministic; the
    sampling code slices logits to [:vocab_size] before choosing a token.
    """
    out = {}
    for key, value in state.items():
        if key in VOCAB_PARAMS and value.shape[0] < padded_rows:
            padding = value.new_zeros((padded_rows - value.shape[0], *value.shape[1:]))
            value = torch.cat([value, padding], dim=0)
        out[key] = value
    return out


def cast_dtype(state: StateDict, dtype: DTypeName | None) -> StateDict:
    """Cast every tensor to `dtype` (None: keep), refusing any value the target cannot hold."""
    if dtype is None:
        return state
    if dtype not in DTYPES:
        raise HFConversionError(f"dtype {dtype!r} is not supported: choose one of {', '.join(DTYPES)}")
    target = DTYPES[dtype]
    out = {}
    for key, value in state.items():
        cast = value.to(target)
        if cast.dtype != value.dtype and not bool(torch.isfinite(cast).all()):
            biggest = value.abs().max().item()
            raise HFConversionError(
                f"{key}: values up to {biggest:.4g} overflow {dtype} (max {torch.finfo(target).max:.4g}): "
                f"export as bf16 or fp32 instead"
            )
        out[key] = cast
    return out


def rename_to_hf(state: StateDict) -> StateDict:
    return {hf_key(key): value for key, value in state.items()}


def rename_from_hf(state: StateDict) -> StateDict:
    """HF names → ours (run after check_state_dict, which proved every key is a known one)."""
    return {our_key(key): value for key, value in state.items()}


def _some(names: list[str]) -> str:
    head = ", ".join(names[:_MAX_NAMES_SHOWN])
    return head + (f", ... ({len(names) - _MAX_NAMES_SHOWN} more)" if len(names) > _MAX_NAMES_SHOWN else "")
