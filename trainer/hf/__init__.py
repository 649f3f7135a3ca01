"""Checkpoint ⇄ Hugging Face conversion, proven by numbers (tests/trainer/test_hf.py), and sampling through
transformers. Design and measured results: docs/hf_conversion.md.

    from trainer.hf import export_hf, import_hf, load_full_state_dict, generate_text

    export_hf(load_full_state_dict("w.safetensors"), model_cfg, "out/hf", tokenizer_model="tok/", dtype="bf16")
    model_cfg, state_dict = import_hf("out/hf", tp=2)        # our names, vocab padded for tp=2

Modules: keys (explicit key map and shapes), transforms (named transforms), llama_config (ModelConfig ⇄
config.json), weights_io (sharded safetensors), tokenizer (sentencepiece → HF tokenizer), full_state (the seam
where checkpoints plug in), export, from_hf, generate. Importing this package loads torch, never transformers:
that happens inside the functions that need it.
"""

from trainer.hf.errors import HFConversionError
from trainer.hf.export import ExportResult, export_hf, hf_state_dict
from trainer.hf.from_hf import ImportedModel, ImportWritten, import_hf, import_hf_to_dir
from trainer.hf.full_state import (
    load_full_state_dict,
    load_into,
    load_model_config,
    save_full_state_dict,
    state_dict_of,
)
from trainer.hf.generate import Generation, generate_text, load_hf_model
from trainer.hf.keys import key_map
from trainer.hf.llama_config import SpecialTokenIds
from trainer.hf.weights_io import DEFAULT_MAX_SHARD_BYTES

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "ExportResult",
    "Generation",
    "HFConversionError",
    "ImportWritten",
    "ImportedModel",
    "SpecialTokenIds",
    "export_hf",
    "generate_text",
    "hf_state_dict",
    "import_hf",
    "import_hf_to_dir",
    "key_map",
    "load_full_state_dict",
    "load_hf_model",
    "load_into",
    "load_model_config",
    "save_full_state_dict",
    "state_dict_of",
]
