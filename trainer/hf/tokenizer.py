"""Our sentencepiece model → an HF tokenizer directory that AutoTokenizer.from_pretrained(dir) loads offline and that
encodes and decodes exactly as sentencepiece does.

The recipe is the one measured in notes/data-and-hf.md §5 (0 mismatches on BPE 8k/32k; every other recipe tried
there disagreed with spm on thousands of indented lines):
1. a temp dir with tokenizer.model and `{"tokenizer_class": "TokenizersBackend"}` → AutoTokenizer builds the right
   vocabulary, merges and byte fallback;
2. edit its tokenizer.json: normalizer Prepend('▁') + Replace(' ', '▁') (spm always adds the dummy prefix, even
   before a leading space; HF's Metaspace skips it), no pre-tokenizer, decoder Replace/ByteFallback/Fuse/Strip;
   unigram only: control, unknown and byte pieces get the lowest scores (spm never matches them in text);
3. save through TokenizersBackend with split_special_tokens=True (a literal "<s>" in text is text, as in spm) and
   add_bos_token=True (HF then prepends BOS like our training data does).
tokenizer.model itself is copied too: tools such as llama.cpp read it, and `convert from-hf` takes it back.

An HF tokenizer (data_pipeline.hf_tokenizer: continued pretraining of a released model on data its own
tokenizer.json encoded) is written back as it came: tokenizer.json and its config files, unchanged.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from data_pipeline.hf_tokenizer import HFTokenizer
from data_pipeline.tokenizer import MODEL_FILENAME, Tokenizer
from trainer.hf.errors import HFConversionError
from trainer.hf.llama_config import SpecialTokenIds

# sentencepiece piece types (sentencepiece_model.proto): 1 normal, 2 unknown, 3 control, 4 user defined, 6 byte.
_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6
# Below the lowest normal score by this much, a control/byte piece loses to any segmentation made of normal pieces.
_SPECIAL_SCORE_MARGIN = 1000.0
# Short strings that catch each known way an HF tokenizer drifts from spm (leading spaces, whitespace runs, literal
# special-token strings, byte fallback, digits). `probe_mismatches` runs them after every export.
PROBE_TEXTS: tuple[str, ...] = (
    "", " ", "  ", "hello world", " leading space", "trailing space ", "a  b   c\t\td",
    "def f(x):\n    return x  # comment\n", "\tif a < b and c > d:\n\t\tpass\n", "0 12 345 6789 3.14159",
    "<s> </s> <pad> <unk> literal specials", "<0x41> looks like a byte piece", "café ﬁ ① Ω 中文 \U0001F600",
    "line one\nline two\n\n", "\n", "▁",
)


def tokenizer_problems(tokenizer: Tokenizer) -> list[str]:
    """Why the recipe above would not reproduce this model (it is verified for our training settings only)."""
    problems = []
    norm, settings = tokenizer.spec.normalizer, tokenizer.spec.encode_settings
    if norm.get("name") != "identity" or norm.get("normalization_rule_tsv"):
        problems.append(f"normalization rule {norm.get('name')!r}: only 'identity' is supported")
    for field, wanted in (("add_dummy_prefix", True), ("remove_extra_whitespaces", False),
                          ("escape_whitespaces", True)):
        if bool(norm.get(field)) != wanted:
            problems.append(f"normalizer {field}={bool(norm.get(field))}: must be {wanted}")
    if settings.get("treat_whitespace_as_suffix"):
        problems.append("treat_whitespace_as_suffix=true is not supported")
    if tokenizer.model_type not in ("bpe", "unigram"):
        problems.append(f"model type {tokenizer.model_type!r}: only bpe and unigram are supported")
    if any(kind == _USER_DEFINED for _, _, kind in tokenizer.spec.pieces):
        problems.append("user-defined symbols are not supported (spm matches them before segmentation)")
    return problems


AnyTokenizer = Tokenizer | HFTokenizer


def special_token_ids(tokenizer: AnyTokenizer) -> SpecialTokenIds:
    """spm reports a disabled special as -1; HF wants None."""

    def present(token_id: int) -> int | None:
        return token_id if token_id >= 0 else None

    return SpecialTokenIds(bos=present(tokenizer.bos_id), eos=present(tokenizer.eos_id), pad=present(tokenizer.pad_id))


def export_tokenizer(tokenizer: AnyTokenizer, out_dir: Path, model_max_length: int) -> SpecialTokenIds:
    """Write tokenizer.json, tokenizer_config.json and tokenizer.model into `out_dir`. model_max_length (the model's
    context, model.max_seq_len) goes into tokenizer_config.json: without it transformers assumes 1e30 and never
    warns that a text is longer than the model can attend to, nor truncates it with truncation=True. An HF
    tokenizer's files are written unchanged (its tokenizer_config.json keeps its own model_max_length)."""
    if isinstance(tokenizer, HFTokenizer):
        for name, text in tokenizer.files.items():
            (out_dir / name).write_text(text, encoding="utf-8")
        return special_token_ids(tokenizer)
    problems = tokenizer_problems(tokenizer)
    if problems:
        raise HFConversionError(
            "this sentencepiece model cannot be converted exactly: " + "; ".join(problems)
            + ". Train one with `pretrain tokenizer train`, or export without a tokenizer"
        )
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import TokenizersBackend

    spec = _edited_backend_json(tokenizer)
    ids = special_token_ids(tokenizer)
    names = {role: (tokenizer.id_to_piece(i) if i is not None else None) for role, i in vars(ids).items()}
    hf = TokenizersBackend(
        tokenizer_object=RustTokenizer.from_str(json.dumps(spec)),
        bos_token=names["bos"], eos_token=names["eos"], pad_token=names["pad"],
        unk_token=tokenizer.id_to_piece(tokenizer.unk_id),
        split_special_tokens=True, add_bos_token=ids.bos is not None, model_max_length=model_max_length,
    )
    hf.save_pretrained(str(out_dir))
    (out_dir / MODEL_FILENAME).write_bytes(tokenizer.model_proto)
    return ids


def _edited_backend_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """Steps 1 and 2 of the recipe: transformers' own spm import, then the fixed normalizer/decoder/scores."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="spm-to-hf-") as tmp:
        (Path(tmp) / MODEL_FILENAME).write_bytes(tokenizer.model_proto)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
        spec = json.loads(AutoTokenizer.from_pretrained(tmp, local_files_only=True).backend_tokenizer.to_str())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ]}
    spec["pre_tokenizer"] = None
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]}
    if spec["model"]["type"] == "Unigram":
        _lower_special_scores(spec["model"]["vocab"], tokenizer)
    return spec


def _lower_special_scores(vocab: list[list[Any]], tokenizer: Tokenizer) -> None:
    pieces = tokenizer.spec.pieces
    if len(vocab) != len(pieces):
        raise HFConversionError(f"transformers imported {len(vocab)} pieces from a {len(pieces)}-piece model")
    lowest = min(score for _, score, kind in pieces if kind not in (_UNKNOWN, _CONTROL, _BYTE))
    for entry, (piece, _, kind) in zip(vocab, pieces, strict=True):
        if entry[0] != piece:
            raise HFConversionError(f"transformers reordered the vocabulary ({entry[0]!r} where spm has {piece!r})")
        if kind in (_UNKNOWN, _CONTROL, _BYTE):
            entry[1] = lowest - _SPECIAL_SCORE_MARGIN


def probe_mismatches(tokenizer: AnyTokenizer, hf_dir: Path, texts: tuple[str, ...] = PROBE_TEXTS) -> list[str]:
    """Load the exported tokenizer as a user would and list every text it encodes or decodes unlike the tokenizer
    the data was prepared with."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    mismatches = []
    for text, ids in zip(texts, tokenizer.encode(texts), strict=True):
        expected = ids.tolist()
        got = hf(text, add_special_tokens=False).input_ids
        if got != expected:
            mismatches.append(f"encode {text!r}: exported {got} vs the data's tokenizer {expected}")
        elif hf.decode(got) != tokenizer.decode(expected):
            mismatches.append(f"decode {text!r}: exported {hf.decode(got)!r} vs the data's tokenizer "
                              f"{tokenizer.decode(expected)!r}")
    return mismatches


def write_spm_model(tokenizer: Tokenizer, dest_dir: Path) -> Path:
    """For import: an HF directory's sentencepiece model (loaded from its tokenizer.model), written with our tokenizer
    metadata. Not data_pipeline's copy_tokenizer: that would take the HF tokenizer.json next to it for our metadata
    file."""
    from data_pipeline.tokenizer import METADATA_FILENAME, write_metadata

    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / MODEL_FILENAME).write_bytes(tokenizer.model_proto)
    write_metadata(tokenizer.describe(), dest_dir / METADATA_FILENAME)
    return dest_dir / MODEL_FILENAME

