"""Train and use a sentencepiece tokenizer (BPE or unigram) whose behaviour is pinned down and fingerprinted.

Settings and why (measured in notes/data-and-hf.md §1):
- `identity` normalization with `remove_extra_whitespaces=False`: the default NFKC + whitespace collapsing
  rewrites code (`'    x  =  1'` → `'x = 1'`), and a tokenizer must round-trip the text it is trained for.
- `byte_fallback=True`: characters outside the vocabulary become byte pieces instead of <unk>.
- Special ids are fixed and recorded: unk=0, bos=1, eos=2, pad=3.
- Reproducible: spm's own `input_sentence_size` sampling is not (two runs differed by ~850 of 8k pieces), so we
  sample lines ourselves with a seeded reservoir into a temp file and train spm on all of it.
- Bounded memory: at most `input_sentence_size` sentences are held (the reservoir), then spm loads them.
- Long lines: spm silently drops lines over `max_sentence_length` bytes from training; we split them at UTF-8
  character boundaries into chunks within the limit and count them instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_pipeline.errors import DataPipelineError
from data_pipeline.sources import (
    DEFAULT_INCLUDE_GLOBS,
    BadInputReport,
    expand_inputs,
    iter_documents,
)

if TYPE_CHECKING:
    from data_pipeline.hf_tokenizer import HFTokenizer

MODEL_FILENAME = "tokenizer.model"
METADATA_FILENAME = "tokenizer.json"
REPORT_FILENAME = "bad_input_report.tsv"
METADATA_FORMAT = "pretrain-tokenizer"
METADATA_FORMAT_VERSION = 1
SPECIAL_IDS: dict[str, int] = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
SPECIAL_PIECES: dict[str, str] = {"unk_piece": "<unk>", "bos_piece": "<s>", "eos_piece": "</s>", "pad_piece": "<pad>"}
MODEL_TYPES = ("bpe", "unigram")
# Below this a 4-byte UTF-8 character could not fit in a chunk next to anything else.
MIN_SENTENCE_LENGTH_BYTES = 16


@dataclass(frozen=True)
class TokenizerTrainConfig:
    inputs: tuple[str, ...]
    output_dir: str
    vocab_size: int = 32000
    model_type: str = "bpe"
    text_key: str = "text"
    include_globs: tuple[str, ...] = DEFAULT_INCLUDE_GLOBS
    input_sentence_size: int = 2_000_000  # max sentences (lines) sampled for training; 0 = use every line
    max_sentence_length_bytes: int = 4192  # spm's default; longer lines are split into chunks, not dropped
    seed: int = 1234
    character_coverage: float = 0.9995
    byte_fallback: bool = True
    split_digits: bool = True
    # Part of the recipe, not a machine setting: unigram's EM sums per-thread partial counts, so its scores (and,
    # with enough pruning rounds, its pieces) depend on the thread count. BPE does not. A fixed default keeps a
    # tokenizer reproducible on any machine; more threads than cores only costs some oversubscription.
    num_threads: int = 16
    strict: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise DataPipelineError(f"--model-type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}")
        min_vocab = len(SPECIAL_IDS) + (256 if self.byte_fallback else 0) + 1
        if self.vocab_size < min_vocab:
            raise DataPipelineError(f"--vocab-size {self.vocab_size} is too small: 4 special ids + 256 byte pieces "
                                    f"need at least {min_vocab}")
        if self.input_sentence_size < 0:
            raise DataPipelineError("--input-sentence-size must be >= 0 (0 = use every line)")
        if self.num_threads < 1:
            raise DataPipelineError(f"--num-threads must be >= 1, got {self.num_threads}")
        if self.max_sentence_length_bytes < MIN_SENTENCE_LENGTH_BYTES:
            raise DataPipelineError(f"--max-sentence-length must be >= {MIN_SENTENCE_LENGTH_BYTES} bytes")

    def settings(self) -> dict[str, Any]:
        """What decides the trained model, as recorded in tokenizer.json (no paths)."""
        return {
            "vocab_size": self.vocab_size, "model_type": self.model_type, "text_key": self.text_key,
            "include_globs": list(self.include_globs), "input_sentence_size": self.input_sentence_size,
            "max_sentence_length_bytes": self.max_sentence_length_bytes, "seed": self.seed,
            "character_coverage": self.character_coverage, "byte_fallback": self.byte_fallback,
            "split_digits": self.split_digits, "normalization_rule_name": "identity",
            "remove_extra_whitespaces": False, "allow_whitespace_only_pieces": True, "num_threads": self.num_threads,
        }


@dataclass
class SentenceStats:
    num_documents: int = 0
    num_lines: int = 0  # non-empty lines seen, before sampling
    num_long_lines_split: int = 0
    num_chunks_from_long_lines: int = 0


@dataclass(frozen=True)
class TrainResult:
    tokenizer: Tokenizer
    model_path: Path
    metadata_path: Path
    report_path: Path
    metadata: dict[str, Any]
    report: BadInputReport


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def train_tokenizer(config: TokenizerTrainConfig) -> TrainResult:
    """Sample sentences (seeded), train sentencepiece, write tokenizer.model + tokenizer.json + bad-input report."""
    config.validate()
    out_dir = Path(config.output_dir)
    if (out_dir / MODEL_FILENAME).exists() and not config.overwrite:
        raise DataPipelineError(f"{out_dir / MODEL_FILENAME} already exists; pass --overwrite to replace it or "
                                "choose another --output")
    files = expand_inputs(config.inputs, config.include_globs)
    report = BadInputReport(strict=config.strict)
    stats = SentenceStats()
    out_dir.mkdir(parents=True, exist_ok=True)
    # The sample file can be hundreds of MB: keep it on the output's disk, not in a possibly small /tmp.
    with tempfile.TemporaryDirectory(prefix=".tokenizer-train-", dir=out_dir) as tmp:
        sentence_file = Path(tmp) / "sentences.txt"
        docs = iter_documents(files, config.text_key, report)
        sentences = iter_sentences(docs, config.max_sentence_length_bytes, stats)
        num_sampled = write_sampled_sentences(sentences, sentence_file, config.input_sentence_size, config.seed)
        if num_sampled == 0:
            raise DataPipelineError(f"no usable text in the inputs (bad input: {report.summary()}); check --input, --include "
                                    "and --text-key")
        model_proto = _run_sentencepiece(sentence_file, config, Path(tmp) / "spm.log")
    tokenizer = Tokenizer(model_proto)
    metadata = tokenizer.describe() | {
        "num_documents": stats.num_documents, "num_lines": stats.num_lines, "num_sentences": num_sampled,
        "num_long_lines_split": stats.num_long_lines_split,
        "num_chunks_from_long_lines": stats.num_chunks_from_long_lines,
        "sources": [f.name for f in files],
        "bad_input": {"total": report.total, "by_reason": report.by_reason, "report_file": REPORT_FILENAME},
        "settings": config.settings(),
    }
    model_path = out_dir / MODEL_FILENAME
    model_path.write_bytes(model_proto)
    metadata_path = write_metadata(metadata, out_dir / METADATA_FILENAME)
    report_path = report.write_tsv(out_dir / REPORT_FILENAME)
    return TrainResult(tokenizer, model_path, metadata_path, report_path, metadata, report)


def iter_sentences(docs: Iterable[Any], max_sentence_bytes: int, stats: SentenceStats) -> Iterator[bytes]:
    """Non-empty lines of each document as UTF-8; lines over the limit come out as several chunks."""
    for doc in docs:
        stats.num_documents += 1
        for line in doc.text.split("\n"):
            if not line:
                continue
            stats.num_lines += 1
            data = line.encode("utf-8")
            if len(data) <= max_sentence_bytes:
                yield data
                continue
            stats.num_long_lines_split += 1
            for chunk in split_utf8(data, max_sentence_bytes):
                stats.num_chunks_from_long_lines += 1
                yield chunk


def split_utf8(data: bytes, max_bytes: int) -> Iterator[bytes]:
    """Cut UTF-8 bytes into pieces of at most `max_bytes`, never inside a character."""
    start = 0
    while start < len(data):
        end = min(start + max_bytes, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:  # 10xxxxxx = continuation byte
            end -= 1
        yield data[start:end]
        start = end


def write_sampled_sentences(sentences: Iterable[bytes], path: Path, max_sentences: int, seed: int) -> int:
    """Write a seeded uniform sample of at most `max_sentences` (0 = all) to `path`, in corpus order."""
    with open(path, "wb") as fh:
        if max_sentences == 0:
            count = 0
            for sentence in sentences:
                fh.write(sentence + b"\n")
                count += 1
            return count
        sample = reservoir_sample(sentences, max_sentences, random.Random(seed))
        for sentence in sample:
            fh.write(sentence + b"\n")
        return len(sample)


def reservoir_sample(items: Iterable[bytes], k: int, rng: random.Random) -> list[bytes]:
    """Algorithm R: a uniform sample of k items from a stream of unknown length, returned in stream order.

    Keeping corpus order makes the training file (and so spm's input) independent of how slots were replaced."""
    sample: list[bytes] = []
    positions: list[int] = []
    for index, item in enumerate(items):
        if index < k:
            sample.append(item)
            positions.append(index)
            continue
        slot = int(rng.random() * (index + 1))
        if slot < k:
            sample[slot] = item
            positions[slot] = index
    order = sorted(range(len(sample)), key=positions.__getitem__)
    return [sample[i] for i in order]


def _run_sentencepiece(sentence_file: Path, config: TokenizerTrainConfig, log_path: Path) -> bytes:
    """Train on every line of `sentence_file`; return the serialized model.

    Sentences are passed as an iterator and the model comes back through `model_writer`, so no temp paths end up
    inside the .model (spm stores `input` and `model_prefix` in it)."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        with _stderr_to(log_path):
            spm.SentencePieceTrainer.train(
                sentence_iterator=_read_sentences(sentence_file), model_writer=model, **_spm_options(config)
            )
    except RuntimeError as err:
        raise DataPipelineError(f"sentencepiece training failed: {err}\n  hint: lower --vocab-size or give more "
                                f"text\n  last log lines:\n{_log_tail(log_path)}") from err
    skipped = re.findall(r"Skipped (\d+) too long sentences", log_path.read_text(encoding="utf-8", errors="replace"))
    if skipped and int(skipped[-1]) > 0:  # our chunking should make this impossible; never let it pass silently
        raise DataPipelineError(f"sentencepiece skipped {skipped[-1]} over-long sentences despite chunking; "
                                "please report this with your --max-sentence-length")
    return model.getvalue()


@contextlib.contextmanager
def _stderr_to(log_path: Path) -> Iterator[None]:
    """Send file descriptor 2 (where spm's C++ logging goes: thousands of lines) to a file while training.

    Done on the descriptor, not via spm's `logstream=`: that one uses `sys.stderr.fileno()`, which is not fd 2
    when stderr is wrapped (pytest, some launchers), and the log would then escape to the console."""
    sys.stderr.flush()
    saved_fd = os.dup(2)
    try:
        with open(log_path, "wb") as log:
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved_fd, 2)
    finally:
        os.close(saved_fd)


def _spm_options(config: TokenizerTrainConfig) -> dict[str, Any]:
    return {
        "model_type": config.model_type, "vocab_size": config.vocab_size,
        "character_coverage": config.character_coverage, "byte_fallback": config.byte_fallback,
        "split_digits": config.split_digits, "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False, "allow_whitespace_only_pieces": True,
        "input_sentence_size": 0, "shuffle_input_sentence": False,  # we sampled already (reproducibly)
        "max_sentence_length": config.max_sentence_length_bytes, "num_threads": config.num_threads,
        # spm's log level is process-global and sticky: an earlier train(minloglevel=2) in this process would hide
        # the log we read for skipped long lines and for error context, so reset it on every call.
        "minloglevel": 0,
        **SPECIAL_IDS, **SPECIAL_PIECES,
    }


def _read_sentences(path: Path) -> Iterator[str]:
    # Binary read: text mode would also split on a lone "\r", which is part of a sentence here.
    with open(path, "rb") as fh:
        for raw in fh:
            yield raw[:-1].decode("utf-8")


def _log_tail(log_path: Path, num_lines: int = 8) -> str:
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in lines[-num_lines:])


def write_metadata(metadata: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(metadata, sort_keys=True, indent=2, ensure_ascii=True) + "\n", encoding="ascii")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Using a trained model
# ---------------------------------------------------------------------------------------------------------------


class Tokenizer:
    """A loaded sentencepiece model. Picklable (it ships its model bytes), so it can be sent to worker processes."""

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self._fingerprint: str | None = None
        self._model_type: str | None = None
        self._spec: ModelSpec | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `<dir>/tokenizer.model` or a `.model` file."""
        model_path = model_file_of(path)
        try:
            tokenizer = cls(model_path.read_bytes())
        except (RuntimeError, OSError) as err:
            raise DataPipelineError(f"cannot load tokenizer {model_path}: {err}; point --tokenizer at the "
                                    "directory written by `pretrain tokenizer train`") from err
        tokenizer._adopt_recorded_identity(model_path.parent / METADATA_FILENAME)
        return tokenizer

    def _adopt_recorded_identity(self, metadata_path: Path) -> None:
        """Take fingerprint and model type from our tokenizer.json instead of parsing the model proto (a fixed
        ~0.1 s per 8k pieces, seconds for large vocabularies), but only when that file records the sha256 of
        exactly these model bytes: values next to a replaced or re-trained model are never believed. The
        fingerprint recipe is part of METADATA_FORMAT_VERSION, so a new recipe ignores old records."""
        metadata = _read_json_object(metadata_path)
        if (metadata is None or metadata.get("format") != METADATA_FORMAT
                or metadata.get("format_version") != METADATA_FORMAT_VERSION
                or metadata.get("model_sha256") != self.model_sha256):
            return
        fingerprint, model_type = metadata.get("fingerprint"), metadata.get("model_type")
        if isinstance(fingerprint, str) and isinstance(model_type, str):
            self._fingerprint, self._model_type = fingerprint, model_type

    def __getstate__(self) -> dict[str, Any]:
        return {"model_proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_proto"])  # type: ignore[misc]

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def prepends_bos(self) -> bool:
        """Whether the HF export encodes with the bos first (AutoTokenizer's default, and so lm-evaluation-harness's):
        trainer/hf/tokenizer.py sets add_bos_token whenever the model has a bos."""
        return self.bos_id >= 0

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    @property
    def model_type(self) -> str:
        if self._model_type is None:
            self._model_type = self.spec.model_type
        return self._model_type

    @property
    def model_sha256(self) -> str:
        """sha256 of the .model bytes: identifies the file, where `fingerprint` identifies the encoding."""
        return hashlib.sha256(self._proto).hexdigest()

    @property
    def spec(self) -> ModelSpec:
        if self._spec is None:
            self._spec = parse_model_spec(self._proto)
        return self._spec

    @property
    def fingerprint(self) -> str:
        """sha256 of what decides encoding: pieces, scores, piece types, normalizer and split settings.

        Not the raw .model bytes: those also hold training inputs and paths that do not change any token."""
        if self._fingerprint is None:
            content = json.dumps(self.spec.fingerprint_content(), sort_keys=True, separators=(",", ":"),
                                 ensure_ascii=True)
            self._fingerprint = hashlib.sha256(content.encode("ascii")).hexdigest()
        return self._fingerprint

    def encode(self, texts: Sequence[str], num_threads: int = 1) -> list[np.ndarray]:
        """Token ids (int32) of each text, no bos/eos. `num_threads=1` by default: spm's default (-1) would use
        every core in each of our worker processes."""
        return self._sp.encode(list(texts), num_threads=num_threads, return_type="numpy")

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def describe(self) -> dict[str, Any]:
        """The tokenizer metadata every consumer needs (also the head of tokenizer.json)."""
        return {
            "format": METADATA_FORMAT, "format_version": METADATA_FORMAT_VERSION, "model_file": MODEL_FILENAME,
            "model_type": self.model_type, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint,
            "model_sha256": self.model_sha256,
            "unk_id": self.unk_id, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
        }


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None when the file is missing, unreadable or holds something else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def model_file_of(path: str | os.PathLike[str]) -> Path:
    candidate = Path(path)
    model_path = candidate / MODEL_FILENAME if candidate.is_dir() else candidate
    if not model_path.is_file():
        raise DataPipelineError(f"no tokenizer model at {model_path}; train one with `pretrain tokenizer train "
                                "--output DIR` and pass that DIR, or pass an HF model directory with tokenizer.json")
    return model_path


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer | HFTokenizer:
    """Our sentencepiece tokenizer (its directory or .model file), or an HF tokenizer.json (a model directory or the
    file; data_pipeline.hf_tokenizer) where `path` names one and no sentencepiece model."""
    from data_pipeline.hf_tokenizer import HFTokenizer, hf_tokenizer_file

    if hf_tokenizer_file(path) is not None:
        return HFTokenizer.load(path)
    return Tokenizer.load(path)


def copy_tokenizer(source: str | os.PathLike[str], dest_dir: Path, tokenizer: Tokenizer | HFTokenizer) -> None:
    """Copy tokenizer.model (+ tokenizer.json, or a generated one when the source has none) into `dest_dir`; an HF
    tokenizer as its tokenizer.json and the config files that name its special tokens."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    if not isinstance(tokenizer, Tokenizer):
        for name, text in tokenizer.files.items():
            (dest_dir / name).write_text(text, encoding="utf-8")
        return
    model_path = model_file_of(source)
    shutil.copyfile(model_path, dest_dir / MODEL_FILENAME)
    metadata_path = model_path.parent / METADATA_FILENAME
    if model_path.name == MODEL_FILENAME and metadata_path.is_file():
        shutil.copyfile(metadata_path, dest_dir / METADATA_FILENAME)
    else:
        write_metadata(tokenizer.describe(), dest_dir / METADATA_FILENAME)


# ---------------------------------------------------------------------------------------------------------------
# Reading the model proto (protobuf wire format; avoids a protobuf dependency)
# ---------------------------------------------------------------------------------------------------------------

# Field numbers from sentencepiece_model.proto.
_MODEL_PIECES, _MODEL_TRAINER_SPEC, _MODEL_NORMALIZER_SPEC, _MODEL_DENORMALIZER_SPEC = 1, 2, 3, 5
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_MODEL_TYPE_NAMES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
# TrainerSpec fields that the encoder reads (the rest only steer training), with proto defaults.
_ENCODE_TRAINER_FIELDS = {3: ("model_type", 1), 24: ("treat_whitespace_as_suffix", 0),
                          26: ("allow_whitespace_only_pieces", 0), 35: ("byte_fallback", 0)}
_NORMALIZER_DEFAULTS = {1: ("name", ""), 2: ("precompiled_charsmap", b""), 3: ("add_dummy_prefix", 1),
                        4: ("remove_extra_whitespaces", 1), 5: ("escape_whitespaces", 1),
                        6: ("normalization_rule_tsv", "")}


@dataclass(frozen=True)
class ModelSpec:
    pieces: list[tuple[str, float, int]]  # (piece, score, type) in id order
    encode_settings: dict[str, Any]
    normalizer: dict[str, Any]
    denormalizer: dict[str, Any] | None

    @property
    def model_type(self) -> str:
        return _MODEL_TYPE_NAMES.get(self.encode_settings["model_type"], "unknown")

    def fingerprint_content(self) -> dict[str, Any]:
        return {"pieces": [list(p) for p in self.pieces], "encode_settings": self.encode_settings,
                "normalizer": self.normalizer, "denormalizer": self.denormalizer}


def parse_model_spec(proto: bytes) -> ModelSpec:
    pieces: list[tuple[str, float, int]] = []
    encode_settings = {name: default for name, default in _ENCODE_TRAINER_FIELDS.values()}
    normalizer: dict[str, Any] = _normalizer_fields(b"")
    denormalizer: dict[str, Any] | None = None
    for number, value in _wire_fields(proto):
        if number == _MODEL_PIECES:
            pieces.append(_piece_fields(value))  # type: ignore[arg-type]
        elif number == _MODEL_TRAINER_SPEC:
            for sub_number, sub_value in _wire_fields(value):  # type: ignore[arg-type]
                if sub_number in _ENCODE_TRAINER_FIELDS:
                    encode_settings[_ENCODE_TRAINER_FIELDS[sub_number][0]] = sub_value
        elif number == _MODEL_NORMALIZER_SPEC:
            normalizer = _normalizer_fields(value)  # type: ignore[arg-type]
        elif number == _MODEL_DENORMALIZER_SPEC:
            denormalizer = _normalizer_fields(value)  # type: ignore[arg-type]
    return ModelSpec(pieces, encode_settings, normalizer, denormalizer)


def _piece_fields(buf: bytes) -> tuple[str, float, int]:
    text, score, piece_type = "", 0.0, 1  # proto defaults: score 0, type NORMAL
    for number, value in _wire_fields(buf):
        if number == _PIECE_TEXT:
            text = value.decode("utf-8")  # type: ignore[union-attr]
        elif number == _PIECE_SCORE:
            score = struct.unpack("<f", value)[0]  # type: ignore[arg-type]
        elif number == _PIECE_TYPE:
            piece_type = int(value)  # type: ignore[arg-type]
    return text, score, piece_type


def _normalizer_fields(buf: bytes) -> dict[str, Any]:
    values: dict[str, Any] = {name: default for name, default in _NORMALIZER_DEFAULTS.values()}
    for number, value in _wire_fields(buf):
        if number in _NORMALIZER_DEFAULTS:
            name = _NORMALIZER_DEFAULTS[number][0]
            values[name] = value.decode("utf-8") if name in ("name", "normalization_rule_tsv") else value  # type: ignore[union-attr]
    charsmap = values.pop("precompiled_charsmap")
    values["precompiled_charsmap_sha256"] = hashlib.sha256(charsmap).hexdigest()
    for flag in ("add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"):
        values[flag] = bool(values[flag])
    return values


def _wire_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of one protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
            yield number, value
        elif wire_type == 2:
            size, pos = _varint(buf, pos)
            yield number, buf[pos : pos + size]
            pos += size
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            yield number, buf[pos : pos + size]
            pos += size
        else:
            raise DataPipelineError(f"tokenizer model is corrupt (protobuf wire type {wire_type}); re-train it")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
