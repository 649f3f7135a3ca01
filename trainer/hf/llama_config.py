"""ModelConfig ⇄ HF LlamaConfig (config.json), field by field.

    ours (trainer.config.ModelConfig)   HF config.json
    vocab_size                          vocab_size (the tokenizer's; our padded rows are never exported)
    hidden_size / intermediate_size     hidden_size / intermediate_size
    num_layers                          num_hidden_layers
    num_heads / num_kv_heads            num_attention_heads / num_key_value_heads
    head_dim (None: hidden/heads)       head_dim (always written)
    rope_theta                          rope_parameters.rope_theta
    rope_scaling (None: plain RoPE)     rope_parameters.rope_type (default | linear | llama3), factor,
      {type, factor, low_freq_factor,     low_freq_factor, high_freq_factor, original_max_position_embeddings
       high_freq_factor, original_max_seq_len}   (legacy config.json: rope_scaling, read the same way)
    rms_norm_eps                        rms_norm_eps
    tie_embeddings                      tie_word_embeddings
    max_seq_len                         max_position_embeddings
    init_std                            initializer_range
    (fixed by our model)                hidden_act silu, attention_bias false, mlp_bias false, attention_dropout 0
    (from the tokenizer)                bos_token_id, eos_token_id, pad_token_id
    (export dtype)                      dtype

Import refuses, naming the field, anything our model would compute differently: another architecture, biases,
another activation, RoPE scaling other than linear and llama3 (YaRN, dynamic NTK, LongRoPE), attention dropout,
quantization.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import ModelConfig, RopeScalingConfig
from trainer.hf.errors import HFConversionError

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"
# Required in config.json: LlamaConfig has defaults for these (a 7B shape), and a silently defaulted width
# would only surface later as a shape mismatch far from its cause.
_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class SpecialTokenIds:
    """Written to config.json and generation_config.json; None leaves the field null."""

    bos: int | None = None
    eos: int | None = None
    pad: int | None = None


def to_llama_config(cfg: ModelConfig, token_ids: SpecialTokenIds, hf_dtype_name: str) -> Any:
    """A transformers LlamaConfig for `cfg` (its own validation runs too)."""
    from transformers import LlamaConfig

    try:
        return LlamaConfig(
            architectures=[ARCHITECTURE],
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.resolved_head_dim(),
            rope_parameters=rope_parameters(cfg),
            rms_norm_eps=cfg.rms_norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            max_position_embeddings=cfg.max_seq_len,
            initializer_range=cfg.init_std,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=0.0,
            bos_token_id=token_ids.bos,
            eos_token_id=token_ids.eos,
            pad_token_id=token_ids.pad,
            dtype=hf_dtype_name,
        )
    except Exception as err:  # huggingface_hub's StrictDataclass errors do not share a narrower base
        raise HFConversionError(
            f"transformers rejects this model shape as a LlamaConfig: {err}. (LlamaConfig requires hidden_size to be "
            f"a multiple of num_attention_heads even when head_dim is set.)"
        ) from err


# HF's keys of each RoPE type we implement, besides rope_type and rope_theta.
_ROPE_TYPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """HF's rope_parameters for our model.rope_theta and model.rope_scaling."""
    scaling = cfg.rope_scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    ours = {"factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_seq_len}
    return {"rope_type": scaling.type, "rope_theta": cfg.rope_theta,
            **{key: ours[key] for key in _ROPE_TYPE_KEYS[scaling.type]}}


def _rope_scaling_from_hf(rope: dict[str, Any], max_position_embeddings: int) -> RopeScalingConfig | None:
    """model.rope_scaling for HF's resolved rope_parameters (checked by `_rope_problems` first)."""
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return None
    fields: dict[str, Any] = {"type": kind, "factor": float(rope["factor"])}
    if kind == "llama3":
        fields.update(low_freq_factor=float(rope["low_freq_factor"]), high_freq_factor=float(rope["high_freq_factor"]),
                      # HF's fallback when config.json leaves it out
                      original_max_seq_len=int(rope.get("original_max_position_embeddings", max_position_embeddings)))
    return RopeScalingConfig(**fields)


def read_config_json(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFConversionError(f"{hf_dir} has no config.json: pass a directory written by save_pretrained "
                                f"or `pretrain convert to-hf`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFConversionError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise HFConversionError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def model_config_from_hf(raw: dict[str, Any], source: str) -> ModelConfig:
    """Our ModelConfig for an HF config.json, after refusing every feature our model lacks."""
    check_supported(raw, source)
    from transformers import LlamaConfig

    # LlamaConfig fills the defaults and moves legacy keys (top-level rope_theta) into rope_parameters, exactly as
    # transformers does when it loads this directory; we then read the resolved values.
    hf = LlamaConfig.from_dict(raw)
    rope = hf.rope_parameters or {}
    fields = dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads,
        head_dim=None if hf.head_dim == hf.hidden_size // hf.num_attention_heads else hf.head_dim,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_scaling=_rope_scaling_from_hf(rope, hf.max_position_embeddings),
        rms_norm_eps=float(hf.rms_norm_eps),
        tie_embeddings=bool(hf.tie_word_embeddings),
        max_seq_len=hf.max_position_embeddings,
        init_std=float(hf.initializer_range),
    )
    try:
        return ModelConfig(**fields)
    except Exception as err:  # pydantic ValidationError: report it against config.json
        raise HFConversionError(f"{source}: config.json does not make a valid model config: {err}") from None


def check_supported(raw: dict[str, Any], source: str) -> None:
    problems = _architecture_problems(raw) + _feature_problems(raw) + _rope_problems(raw)
    missing = [name for name in _REQUIRED_FIELDS if name not in raw]
    if missing:
        problems.append(f"{', '.join(missing)}: required, missing from config.json")
    if problems:
        raise HFConversionError(
            f"{source} cannot be imported into our Llama:\n" + "\n".join(f"  - {line}" for line in problems)
        )


def _architecture_problems(raw: dict[str, Any]) -> list[str]:
    problems = []
    if raw.get("model_type") != MODEL_TYPE:
        problems.append(f"model_type ({raw.get('model_type')!r}) must be 'llama': only the Llama architecture is "
                        f"supported (Mistral, Qwen, Gemma, ... differ in ways our model does not implement)")
    architectures = raw.get("architectures")
    if architectures is not None and architectures != [ARCHITECTURE]:
        problems.append(f"architectures ({architectures}) must be ['{ARCHITECTURE}']: a causal LM head is needed")
    if raw.get("quantization_config") is not None:
        problems.append("quantization_config: quantized weights are not supported; import the unquantized model")
    return problems


def _feature_problems(raw: dict[str, Any]) -> list[str]:
    problems = []
    for field in ("attention_bias", "mlp_bias"):
        if raw.get(field, False):
            problems.append(f"{field} (true): our projections have no bias")
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act ({raw['hidden_act']!r}) must be 'silu': our MLP is SwiGLU")
    if raw.get("attention_dropout", 0.0) not in (0, 0.0, None):
        problems.append(f"attention_dropout ({raw['attention_dropout']}) must be 0: our attention has no dropout "
                        f"(set it to 0.0 in config.json to import without it)")
    return problems


def _rope_problems(raw: dict[str, Any]) -> list[str]:
    """RoPE as config.json writes it: `rope_parameters` (transformers 5) or the legacy `rope_scaling` object."""
    problems = []
    for key in ("rope_scaling", "rope_parameters"):
        params = raw.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            problems.append(f"{key} ({params!r}) must be an object with rope_type and its parameters")
            continue
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in _ROPE_TYPE_KEYS:
            problems.append(f"{key}.rope_type ({kind!r}): our model implements plain RoPE and linear or llama3 "
                            f"scaling ({', '.join(_ROPE_TYPE_KEYS)}), not {kind}")
            continue
        allowed = {"rope_type", "type", "rope_theta", *_ROPE_TYPE_KEYS[kind]}
        extra = sorted(set(params) - allowed)
        if extra:
            problems.append(f"{key} has {', '.join(extra)}: not part of {kind} RoPE as our model computes it")
        # original_max_position_embeddings may be left out (HF then uses max_position_embeddings)
        missing = [name for name in _ROPE_TYPE_KEYS[kind] if name not in params
                   and name != "original_max_position_embeddings"]
        if missing:
            problems.append(f"{key} ({kind}) lacks {', '.join(missing)}")
    return problems


def model_config_fragment(cfg: ModelConfig, header: str) -> str:
    """A `model:` YAML section to paste into a run config (defaults included, so nothing depends on them)."""
    import yaml

    body = yaml.safe_dump({"model": cfg.model_dump(mode="json")}, sort_keys=False, default_flow_style=False)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body
