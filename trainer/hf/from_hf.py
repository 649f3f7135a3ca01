"""A Hugging Face Llama directory → our ModelConfig + full state dict, vocab padded for a requested TP degree.

    model_cfg, state_dict = import_hf("path/to/hf", tp=2)

Refuses (naming the config.json field) anything our model would compute differently; reads safetensors weights
(single file or sharded with an index); keeps the stored dtype unless asked, so HF → ours → HF is bit-identical.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from trainer.config import ModelConfig, padded_vocab_size
from trainer.hf.errors import HFConversionError
from trainer.hf.full_state import save_full_state_dict
from trainer.hf.llama_config import model_config_fragment, model_config_from_hf, read_config_json
from trainer.hf.staging import check_output_dir, staged_dir
from trainer.hf.tokenizer import tokenizer_problems, write_spm_model
from trainer.hf.transforms import (
    DTypeName,
    StateDict,
    cast_dtype,
    check_state_dict,
    drop_tied_lm_head,
    pad_vocab,
    rename_from_hf,
)
from trainer.hf.weights_io import read_hf_weights


class ImportedModel(NamedTuple):
    model_cfg: ModelConfig
    state_dict: StateDict  # our names, canonical form (trainer.hf.full_state), vocab rows = padded_vocab_size


def import_hf(hf_dir: str | os.PathLike[str], *, tp: int = 1, dtype: DTypeName | None = None) -> ImportedModel:
    """tp: the tensor-parallel degree the weights will be trained with (decides the vocab padding).
    dtype: None keeps the stored dtype; "fp32" / "bf16" / "fp16" casts."""
    source_dir = Path(hf_dir)
    if not source_dir.is_dir():
        raise HFConversionError(f"HF model directory {source_dir} not found: pass a directory with config.json "
                                f"and *.safetensors")
    model_cfg = model_config_from_hf(read_config_json(source_dir), source=str(source_dir))
    _check_tp(model_cfg, tp)
    source = f"HF weights in {source_dir}"
    state = drop_tied_lm_head(read_hf_weights(source_dir), model_cfg, source, hf_names=True)
    if not model_cfg.tie_embeddings and "lm_head.weight" not in state:
        # transformers would load this with a *random* lm_head and only log it; we refuse.
        raise HFConversionError(
            f"{source}: lm_head.weight is missing and config.json has tie_word_embeddings false: transformers would "
            f"silently use a random output layer. If the model is tied, set tie_word_embeddings true in config.json"
        )
    check_state_dict(state, model_cfg, source, hf_names=True)
    state = rename_from_hf(state)
    state = pad_vocab(state, model_cfg, padded_vocab_size(model_cfg.vocab_size, tp))
    return ImportedModel(model_cfg, cast_dtype(state, dtype))


def _check_tp(cfg: ModelConfig, tp: int) -> None:
    if tp < 1:
        raise HFConversionError(f"tp ({tp}) must be >= 1")
    for field, count in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads)):
        if count % tp:
            raise HFConversionError(f"tp ({tp}) must divide model.{field} ({count}) (num_attention_heads / "
                                    f"num_key_value_heads in config.json): choose a tp that divides both")


STATE_DICT_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model.yaml"
TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class ImportWritten:
    out_dir: Path
    model_cfg: ModelConfig
    padded_vocab_rows: int
    num_tensors: int
    tokenizer_copied: str | None  # "sentencepiece", "hf" (tokenizer.json), or None: the HF directory has neither


def import_hf_to_dir(
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    tp: int = 1,
    dtype: DTypeName | None = None,
    overwrite: bool = False,
) -> ImportWritten:
    """`convert from-hf`: write model.safetensors (our full state dict), model.yaml (a `model:` fragment) and
    tokenizer/, which `pretrain prepare --tokenizer` takes: the HF directory's sentencepiece tokenizer.model in our
    layout, else its tokenizer.json and config files (data_pipeline.hf_tokenizer). Written whole or not at all."""
    target = Path(out_dir)
    check_output_dir(target, overwrite, marker=MODEL_CONFIG_FILE)
    model_cfg, state_dict = import_hf(hf_dir, tp=tp, dtype=dtype)
    header = (f"model: section imported from {hf_dir} by `pretrain convert from-hf` (the vocabulary padding for "
              f"tp={tp} is in the weights, not here).\nPaste it into a run config, or pass this file to "
              f"`pretrain convert to-hf --config`.")
    with staged_dir(target) as staging:
        save_full_state_dict(state_dict, staging / STATE_DICT_FILE, metadata={"source": str(hf_dir), "tp": str(tp)})
        (staging / MODEL_CONFIG_FILE).write_text(model_config_fragment(model_cfg, header), encoding="utf-8")
        tokenizer = _copy_tokenizer(Path(hf_dir), staging / TOKENIZER_DIR)
    return ImportWritten(target, model_cfg, state_dict["embed_tokens.weight"].shape[0], len(state_dict), tokenizer)


def _copy_tokenizer(hf_dir: Path, dest_dir: Path) -> str | None:
    """The HF directory's tokenizer for our data pipeline: which kind was copied (None: it has none). Its
    sentencepiece tokenizer.model when export can write it back exactly (trainer.hf.tokenizer.tokenizer_problems),
    else its tokenizer.json (Llama 2's folders hold both, and its spm normalizer is not one export reproduces: data
    encoded by the tokenizer.json HF users run is then written back as it is)."""
    from data_pipeline.hf_tokenizer import HF_TOKENIZER_FILE, HFTokenizer, hf_tokenizer_file
    from data_pipeline.tokenizer import MODEL_FILENAME, Tokenizer, copy_tokenizer

    hf_json = hf_tokenizer_file(hf_dir / HF_TOKENIZER_FILE)  # the file itself: beside a tokenizer.model too
    spm = Tokenizer.load(hf_dir / MODEL_FILENAME) if (hf_dir / MODEL_FILENAME).is_file() else None
    if spm is not None and (hf_json is None or not tokenizer_problems(spm)):
        write_spm_model(spm, dest_dir)
        return "sentencepiece"
    if hf_json is None:
        return None
    copy_tokenizer(hf_json, dest_dir, HFTokenizer.load(hf_json))
    return "hf"
