"""Ours → a Hugging Face directory that AutoModelForCausalLM / AutoTokenizer.from_pretrained(dir) load offline.

    export_hf(state_dict, model_cfg, "runs/x/hf", tokenizer_model="tokenizers/bpe32k", dtype="bf16")

writes config.json (LlamaConfig), model.safetensors (or shards + model.safetensors.index.json above
`max_shard_bytes`), generation_config.json and, with a tokenizer, tokenizer.json + tokenizer_config.json +
tokenizer.model. Everything is written into a temp directory that is renamed into place at the end, so an
interrupted export never leaves a half directory that transformers would load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.hf_tokenizer import HFTokenizer
from data_pipeline.tokenizer import Tokenizer, load_tokenizer
from trainer.config import ModelConfig
from trainer.hf.errors import HFConversionError
from trainer.hf.llama_config import SpecialTokenIds, to_llama_config
from trainer.hf.staging import check_output_dir, staged_dir
from trainer.hf.tokenizer import AnyTokenizer, export_tokenizer, probe_mismatches
from trainer.hf.transforms import (
    DTYPES,
    HF_DTYPE_NAMES,
    DTypeName,
    StateDict,
    cast_dtype,
    check_state_dict,
    drop_tied_lm_head,
    drop_vocab_padding,
    rename_to_hf,
)
from trainer.hf.weights_io import DEFAULT_MAX_SHARD_BYTES, tensor_bytes, write_hf_weights


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    files: list[str]  # every file written, relative to out_dir
    num_parameters: int  # as exported (vocab padding dropped, tied lm_head counted once)
    weights_bytes: int
    dtype: str
    special_tokens: SpecialTokenIds
    # Probe texts (trainer.hf.tokenizer.PROBE_TEXTS) the exported tokenizer encodes or decodes unlike sentencepiece.
    tokenizer_mismatches: list[str] = field(default_factory=list)


def hf_state_dict(state_dict: StateDict, model_cfg: ModelConfig, dtype: DTypeName) -> StateDict:
    """The named export transforms, in order (trainer.hf.transforms): our full state dict → HF's, ready to save."""
    source = "state dict"
    state = drop_tied_lm_head(state_dict, model_cfg, source, hf_names=False)
    check_state_dict(state, model_cfg, source, hf_names=False)
    state = drop_vocab_padding(state, model_cfg)
    state = cast_dtype(state, dtype)
    return rename_to_hf(state)


def export_hf(
    state_dict: StateDict,
    model_cfg: ModelConfig,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer_model: str | os.PathLike[str] | AnyTokenizer | None = None,
    dtype: DTypeName = "fp32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> ExportResult:
    """Write an HF Llama directory from our full state dict. Every inconsistency is refused before anything is
    written. tokenizer_model: our tokenizer directory, a .model file, an HF tokenizer (a directory with tokenizer.json,
    e.g. a dataset's tokenizer/ after continued pretraining), or a loaded one (None: weights only)."""
    target = Path(out_dir)
    check_output_dir(target, overwrite, marker="config.json")
    if dtype not in DTYPES:
        raise HFConversionError(f"dtype {dtype!r} is not supported: choose one of {', '.join(DTYPES)}")
    tokenizer = _as_tokenizer(tokenizer_model)
    if tokenizer is not None:
        _check_vocab(tokenizer, model_cfg)
    state = hf_state_dict(state_dict, model_cfg, dtype)
    hf_dtype_name = HF_DTYPE_NAMES[DTYPES[dtype]]
    to_llama_config(model_cfg, SpecialTokenIds(), hf_dtype_name)  # fail on a shape HF rejects before writing
    with staged_dir(target) as staging:
        write_hf_weights(state, staging, max_shard_bytes)
        token_ids = (SpecialTokenIds() if tokenizer is None
                     else export_tokenizer(tokenizer, staging, model_cfg.max_seq_len))
        _write_configs(model_cfg, token_ids, hf_dtype_name, staging)
        written = sorted(path.name for path in staging.iterdir())
    mismatches = probe_mismatches(tokenizer, target) if tokenizer is not None else []
    return ExportResult(
        out_dir=target, files=written, num_parameters=sum(t.numel() for t in state.values()),
        weights_bytes=sum(tensor_bytes(t) for t in state.values()), dtype=dtype, special_tokens=token_ids,
        tokenizer_mismatches=mismatches,
    )


def _as_tokenizer(tokenizer_model: str | os.PathLike[str] | AnyTokenizer | None) -> AnyTokenizer | None:
    if tokenizer_model is None or isinstance(tokenizer_model, (Tokenizer, HFTokenizer)):
        return tokenizer_model
    return load_tokenizer(tokenizer_model)  # DataPipelineError (a user error) names the missing file


def _check_vocab(tokenizer: AnyTokenizer, cfg: ModelConfig) -> None:
    """HF's vocab_size is both the embedding rows and what the tokenizer may emit: they must be the same number."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise HFConversionError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size is {cfg.vocab_size}: it would "
            f"emit ids the model has no row for; pass the tokenizer the model was trained with"
        )
    if tokenizer.vocab_size < cfg.vocab_size:
        raise HFConversionError(
            f"model.vocab_size ({cfg.vocab_size}) is larger than the tokenizer ({tokenizer.vocab_size} pieces): "
            f"generation could pick ids the tokenizer cannot decode; pass the tokenizer the model was trained with"
        )


def _write_configs(cfg: ModelConfig, token_ids: SpecialTokenIds, hf_dtype_name: str, out_dir: Path) -> None:
    from transformers import GenerationConfig

    to_llama_config(cfg, token_ids, hf_dtype_name).save_pretrained(str(out_dir))
    GenerationConfig(bos_token_id=token_ids.bos, eos_token_id=token_ids.eos, pad_token_id=token_ids.pad
                     ).save_pretrained(str(out_dir))
