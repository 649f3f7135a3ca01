"""`prepare`: raw text → tokens → fixed-length samples → webdataset shards + manifest (docs/data_pipeline.md).

Pipeline (memory and spool stay bounded: input streams through, at most 2 × num_proc tasks and num_proc shard
writes are in the air):
  main process: read raw blocks of records (sources.read_blocks: I/O and decompression only) → tasks ──┐
  workers: parse + validate records (JSON, UTF-8), tokenize, append eos, pick the split; leave the    ◄──┘
      tokens in a spool file; return their counts, per-source counts and the task's bad records ──────┐
  main process, results in input order: bad records → report; token counts → ShardPlanner (packing.py) ◄┘
      → a ShardJob per complete shard: "shard j = these token ranges of these spool files" ───────────┐
  workers: assemble shard j, write the tar, sha256, fsync, rename; spool files go once consumed     ◄──┘
  main process, at the end: manifest LAST
No token passes through the main process: per token it does nothing, per ~1 MiB task and per shard a little
bookkeeping, so it does not cap scaling with many workers (bench/bench_prepare.py reports its CPU per token).

Output does not depend on `num_proc`: tasks are cut in the main process and results are consumed in order, so
`num_proc=1` and `num_proc=8` give byte-identical shards and reports; strict mode stops at the first bad record in
input order. Re-running on the same input gives identical files.
With `num_proc=1` everything runs inline in one process (no pickling, no spool: tokens wait in memory).

Validation split: with `val_inputs`, those files are val and `inputs` are train. With `val_fraction`, a document is
val iff `blake2b(text as UTF-8, digest_size=8, key=seed as 8-byte little-endian signed int)`, read as a
little-endian uint64, is < `val_fraction * 2**64`: a pure function of the text, so duplicates share a split.

Counting conventions (all in manifest.json):
- `num_documents`: documents tokenized into the split (skipped records are in `bad_input`, not here).
- `num_tokens`: tokens stored in the split's samples (`num_samples * (seq_len + 1)`), eos tokens included.
- `dropped_tail_tokens`: tokens after the last full sample (< seq_len + 1); `num_tokens + dropped_tail_tokens` is
  every token the split's documents produced.
- `sources`: one entry per (input file, split) it fed. Skipped records count toward the file's own role
  (--input → train, --val-input → val), so the `num_skipped` values add up to `bad_input.total`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from data_pipeline.errors import DataPipelineError
from data_pipeline.manifest import MANIFEST_FILENAME, Manifest, SplitInfo, TokenizerInfo
from data_pipeline.packing import (
    Chunk,
    ShardJob,
    ShardLayout,
    ShardPlanner,
    TokenRef,
    SpoolWriter,
    write_shard,
)
from data_pipeline.shards import TOKEN_DTYPES, ShardEntry, token_dtype_name
from data_pipeline.sources import (
    DEFAULT_INCLUDE_GLOBS,
    BadInputReport,
    BadRecord,
    Document,
    LineNumberer,
    RecordBlock,
    SourceFile,
    arrow_batches,
    expand_inputs,
    file_format,
    open_arrow,
    parse_block,
    read_blocks,
)
from data_pipeline.hf_tokenizer import HF_TOKENIZER_FILE, HFTokenizer
from data_pipeline.tokenizer import (
    METADATA_FILENAME,
    MODEL_FILENAME,
    Tokenizer,
    copy_tokenizer,
    load_tokenizer,
    model_file_of,
)

TRAIN, VAL = "train", "val"
SPLIT_NAMES = (TRAIN, VAL)
# What a worker is told about each document's split: fixed by the file it came from, or decided by hash.
_CODE_TRAIN, _CODE_VAL, _CODE_BY_HASH = 0, 1, 2
REPORT_FILENAME = "bad_input_report.tsv"
TOKENIZER_DIRNAME = "tokenizer"


@dataclass(frozen=True)
class PrepareConfig:
    inputs: tuple[str, ...]
    tokenizer: str  # directory from `tokenizer train`, a .model file, or an HF model directory with tokenizer.json
    output_dir: str
    val_inputs: tuple[str, ...] = ()  # separate validation files; then val_fraction must be 0
    val_fraction: float = 0.0  # share of --input documents sent to val by a seeded hash of their text
    seq_len: int = 2048
    samples_per_shard: int = 1000
    num_proc: int | None = None  # tokenizer processes; None = os.cpu_count()
    spool_dir: str | None = None  # where workers leave tokens until their shard is written; None = $TMPDIR
    seed: int = 1234
    text_key: str = "text"
    # Each document as bos + tokens + eos (Llama 3's format, `<|begin_of_text|> ... <|end_of_text|>`), not tokens +
    # eos: continued pretraining then sees documents as the model first did. Needs a tokenizer with a bos.
    add_bos: bool = False
    include_globs: tuple[str, ...] = DEFAULT_INCLUDE_GLOBS
    strict: bool = False
    # A parquet file without the text_key column is a config error (wrong --text-key, or a file that does not
    # belong); with this set it is skipped instead, and counted in the report with its row count.
    skip_files_without_text_key: bool = False
    overwrite: bool = False
    progress: bool = True
    # A task (what one worker call gets) ends at this many records or input bytes, whichever comes first. ~1 MiB
    # amortises the per-task cost (pickling, one pipe round trip) to well under 1 % and keeps the last straggling
    # task short; memory in flight is about 2 × num_proc × batch_max_bytes.
    batch_max_docs: int = 4096
    batch_max_bytes: int = 1 << 20

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataPipelineError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_inputs and self.val_fraction > 0:
            raise DataPipelineError("use either --val-input (separate validation files) or --val-fraction "
                                    "(split --input by hash), not both; pass --val-fraction 0 with --val-input")
        if self.seq_len < 1 or self.samples_per_shard < 1:
            raise DataPipelineError("--seq-len and --samples-per-shard must be >= 1")
        if self.num_proc is not None and self.num_proc < 1:
            raise DataPipelineError(f"--num-proc must be >= 1, got {self.num_proc}")
        if self.batch_max_docs < 1 or self.batch_max_bytes < 1:
            raise DataPipelineError("batch_max_docs and batch_max_bytes must be >= 1")
        if self.spool_dir is not None and not os.path.isdir(self.spool_dir):
            raise DataPipelineError(f"--spool-dir {self.spool_dir} is not a directory; create it or pass another one")

    @property
    def resolved_num_proc(self) -> int:
        return self.num_proc or os.cpu_count() or 1

    def recorded_args(self) -> dict[str, Any]:
        """prepare_args in the manifest: what decides the output. No paths (host-specific), no num_proc (the
        output does not depend on it)."""
        return {
            "seq_len": self.seq_len, "samples_per_shard": self.samples_per_shard, "seed": self.seed,
            "val_fraction": self.val_fraction, "val_split": "files" if self.val_inputs else "fraction",
            "text_key": self.text_key, "include_globs": list(self.include_globs), "add_bos": self.add_bos,
        }


@dataclass
class SourceStats:
    num_documents: int = 0
    num_bytes: int = 0  # UTF-8 bytes of the documents kept


@dataclass(frozen=True)
class PrepareResult:
    output_dir: Path
    manifest: Manifest
    report: BadInputReport
    report_path: Path
    elapsed_s: float
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"dataset written to {self.output_dir} (manifest {self.manifest.fingerprint[:12]})"]
        for name, split in self.manifest.splits.items():
            lines.append(f"  {name}: {split.num_documents} documents → {split.num_samples} samples of "
                         f"{self.manifest.sample_len_tokens} tokens ({split.num_tokens} tokens) in "
                         f"{len(split.shards)} shards; {split.dropped_tail_tokens} tail tokens dropped")
        lines.append(f"  bad input: {self.report.summary()}; see {self.report_path}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        lines.append(f"  took {self.elapsed_s:.1f} s")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def prepare(config: PrepareConfig) -> PrepareResult:
    start_s = time.monotonic()
    config.validate()
    tokenizer = _load_checked_tokenizer(config.tokenizer, config.add_bos)
    train_files, val_files = _input_files(config)
    # Before any work or output: a column missing from a parquet file is a wrong --text-key, not a bad record.
    report = BadInputReport(strict=config.strict)
    train_files, val_files = (_files_with_text_column(files, config, report) for files in (train_files, val_files))
    out_dir = Path(config.output_dir)
    _prepare_output_dir(out_dir, config.overwrite)
    dtype = token_dtype_name(tokenizer.vocab_size)
    splits = [TRAIN, VAL] if (val_files or config.val_fraction > 0) else [TRAIN]
    layout = ShardLayout(str(out_dir), dtype, config.seq_len + 1, config.samples_per_shard)
    source_stats: dict[tuple[str, str], SourceStats] = {}
    try:
        packed = _tokenize_and_pack(config, tokenizer, layout, splits, train_files, val_files, report, source_stats)
    except BaseException:
        _remove_temp_shards(out_dir)
        raise
    report_path = report.write_tsv(out_dir / REPORT_FILENAME)
    copy_tokenizer(config.tokenizer, out_dir / TOKENIZER_DIRNAME, tokenizer)
    split_infos = {s: SplitInfo.from_shards(packed.entries[s],
                                            num_tokens=packed.planners[s].num_samples * (config.seq_len + 1),
                                            num_documents=sum(stats.num_documents for (_, split), stats
                                                              in source_stats.items() if split == s),
                                            dropped_tail_tokens=packed.planners[s].dropped_tail_tokens) for s in splits}
    warnings = _check_split_sizes(split_infos, config)
    manifest = Manifest.create(
        seq_len=config.seq_len, dtype=dtype, samples_per_shard=config.samples_per_shard,
        tokenizer=_tokenizer_info(tokenizer), splits=split_infos,
        sources=_source_entries(train_files, val_files, source_stats, report),
        bad_input={"total": report.total, "by_reason": report.by_reason, "report_file": REPORT_FILENAME},
        prepare_args=config.recorded_args(),
    )
    manifest.save(out_dir)  # last: its presence marks the dataset complete
    return PrepareResult(out_dir, manifest, report, report_path, time.monotonic() - start_s, warnings)


def _load_checked_tokenizer(path: str, add_bos: bool = False) -> Tokenizer | HFTokenizer:
    tokenizer = load_tokenizer(path)
    if tokenizer.eos_id < 0:
        if isinstance(tokenizer, HFTokenizer):
            raise DataPipelineError(f"the HF tokenizer {path} names no eos_token (tokenizer_config.json or "
                                    "special_tokens_map.json); prepare puts eos after each document: add "
                                    "\"eos_token\": \"<the model's end-of-text token>\" to tokenizer_config.json")
        raise DataPipelineError(f"tokenizer {path} has no eos id; prepare puts eos between documents, so train "
                                "the tokenizer with `pretrain tokenizer train` (eos_id=2)")
    if tokenizer.vocab_size > 2**32:
        raise DataPipelineError(f"vocab size {tokenizer.vocab_size} does not fit uint32 token ids")
    if add_bos and tokenizer.bos_id < 0:
        raise DataPipelineError(f"--add-bos puts the tokenizer's bos before each document, but {path} has none: "
                                f"drop --add-bos, or name a bos_token (HF: in tokenizer_config.json)")
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer
    metadata_path = model_file_of(path).parent / METADATA_FILENAME
    if metadata_path.is_file():
        try:
            recorded = json.loads(metadata_path.read_text(encoding="utf-8")).get("fingerprint")
        except (ValueError, AttributeError) as err:
            raise DataPipelineError(f"{metadata_path} is not the JSON object `tokenizer train` writes ({err}); "
                                    "re-train the tokenizer or delete that file") from err
        if recorded is not None and recorded != tokenizer.fingerprint:
            raise DataPipelineError(f"{metadata_path} records fingerprint {recorded} but the model next to it has "
                                    f"{tokenizer.fingerprint}; the files come from different trainings: re-train "
                                    "or copy both files together")
    return tokenizer


def _input_files(config: PrepareConfig) -> tuple[list[SourceFile], list[SourceFile]]:
    train_files = expand_inputs(config.inputs, config.include_globs)
    # Names unique across both lists: reports, manifest sources and bad-record line numbers are keyed by name.
    train_names = [f.name for f in train_files]
    val_files = expand_inputs(config.val_inputs, config.include_globs, train_names) if config.val_inputs else []
    train_real = {os.path.realpath(f.path) for f in train_files}
    overlap = [f.name for f in val_files if os.path.realpath(f.path) in train_real]
    if overlap:
        raise DataPipelineError(f"{len(overlap)} file(s) are both --input and --val-input (e.g. {overlap[0]}); "
                                "validation data must not also be trained on")
    return train_files, val_files


def _files_with_text_column(files: list[SourceFile], config: PrepareConfig,
                            report: BadInputReport) -> list[SourceFile]:
    """`files` without the parquet and arrow files that lack the text_key column (reads each footer or schema only).
    Such a file stops prepare with its name, its columns and the --text-key fix, unless
    skip_files_without_text_key: then it is reported as one missing_text_column entry that names its row count."""
    lacking: list[tuple[SourceFile, list[str], int]] = []
    for src in files:
        try:
            names = _column_names(src)
            if names is not None and config.text_key not in names:
                lacking.append((src, names, _row_count(src)))
        except Exception:  # noqa: BLE001 - a corrupt file is reported (corrupt_parquet/arrow) when it is read
            continue
    if lacking and not config.skip_files_without_text_key:
        listed = "\n".join(f"  - {src.name}: columns {', '.join(names[:12]) or '(none)'}" for src, names, _ in lacking)
        raise DataPipelineError(
            f"{len(lacking)} parquet/arrow file(s) have no column {config.text_key!r} (--text-key):\n{listed}\n"
            f"pass --text-key <column> naming the column that holds the text, remove these files from --input, or "
            f"pass --skip-files-without-text-key to skip them (they are then counted in {REPORT_FILENAME})")
    for src, names, rows in lacking:
        report.add(src.name, 0, "missing_text_column", f"file skipped: {rows} rows, no column {config.text_key!r} "
                                                       f"(columns: {', '.join(names[:8])})")
    skipped = {id(src) for src, _, _ in lacking}
    return [src for src in files if id(src) not in skipped]


def _column_names(src: SourceFile) -> list[str] | None:
    """A parquet or arrow file's column names (its footer / its schema message only); None for other formats."""
    kind = file_format(src.path)[0]
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.read_schema(src.path).names
    if kind == "arrow":
        import pyarrow as pa

        with pa.OSFile(str(src.path)) as source:
            return open_arrow(source).schema.names
    return None


def _row_count(src: SourceFile) -> int:
    """Rows of a parquet (its footer) or arrow file (every batch: read only for a file that is skipped)."""
    if file_format(src.path)[0] == "parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(src.path).num_rows
    import pyarrow as pa

    with pa.OSFile(str(src.path)) as source:
        return sum(batch.num_rows for batch in arrow_batches(open_arrow(source)))


def _prepare_output_dir(out_dir: Path, overwrite: bool) -> None:
    manifest_path = out_dir / MANIFEST_FILENAME
    if manifest_path.exists():
        if not overwrite:
            raise DataPipelineError(f"{out_dir} already holds a prepared dataset ({MANIFEST_FILENAME}); pass "
                                    "--overwrite to replace it, or choose another --output")
        # First, so that a crash from here on cannot leave a manifest vouching for half-rewritten shards.
        manifest_path.unlink()
    # Shards of an earlier (or crashed) run with higher numbers than this run writes would linger and confuse.
    for split in SPLIT_NAMES:
        split_dir = out_dir / split
        if split_dir.is_dir():
            for stale in list(split_dir.glob(f"{split}-*.tar")) + list(split_dir.glob(f"{split}-*.tar.tmp")):
                stale.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _tokenizer_info(tokenizer: Tokenizer | HFTokenizer) -> TokenizerInfo:
    model_file = MODEL_FILENAME if isinstance(tokenizer, Tokenizer) else HF_TOKENIZER_FILE
    return TokenizerInfo(fingerprint=tokenizer.fingerprint, vocab_size=tokenizer.vocab_size,
                         model_type=tokenizer.model_type, unk_id=tokenizer.unk_id, bos_id=tokenizer.bos_id,
                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                         model_file=f"{TOKENIZER_DIRNAME}/{model_file}")


def _check_split_sizes(split_infos: dict[str, SplitInfo], config: PrepareConfig) -> list[str]:
    if split_infos[TRAIN].num_samples == 0:
        raise DataPipelineError(f"the training inputs gave fewer tokens than one sample of {config.seq_len + 1}; "
                                "lower --seq-len or add text (see bad_input_report.tsv for skipped records)")
    warnings = []
    if VAL in split_infos and split_infos[VAL].num_samples == 0:
        warnings.append(f"the val split has no full sample of {config.seq_len + 1} tokens; raise --val-fraction "
                        "or give more --val-input text")
    return warnings


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing in parallel, in order
# ---------------------------------------------------------------------------------------------------------------


# A task is a slice of the input stream: blocks and file-level bad records, each with its file's split code.
Task = list[tuple[RecordBlock | BadRecord, int]]


# A task's documents are tokenized in batches of about this many characters: one sentencepiece call amortised,
# and a task that is a whole compressed file (sources.CompressedFile) streams through in bounded memory.
ENCODE_BATCH_CHARS = 1 << 20


class TokenSink:
    """Where a task's tokens go while it is encoded: `add(train, val)` per batch, `finish()` → the two chunks."""

    def add(self, train: np.ndarray, val: np.ndarray) -> None:
        raise NotImplementedError

    def finish(self) -> tuple[Chunk, Chunk]:
        raise NotImplementedError


class MemorySink(TokenSink):
    """Tokens kept in memory (prepare with one process)."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.parts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])

    def add(self, train: np.ndarray, val: np.ndarray) -> None:
        self.parts[0].append(train)
        self.parts[1].append(val)

    def finish(self) -> tuple[Chunk, Chunk]:
        # A task of only skipped records has no batch at all.
        train, val = (np.concatenate(parts) if parts else np.empty(0, self.dtype) for parts in self.parts)
        return Chunk(train, 0, len(train)), Chunk(val, 0, len(val))


class SpoolSink(TokenSink):
    """Tokens appended to one spool file per split (workers): only their counts go back to the main process."""

    def __init__(self, path_prefix: str) -> None:
        self.writers = (SpoolWriter(path_prefix + ".train"), SpoolWriter(path_prefix + ".val"))

    def add(self, train: np.ndarray, val: np.ndarray) -> None:
        for writer, tokens in zip(self.writers, (train, val)):
            writer.append(tokens)

    def finish(self) -> tuple[Chunk, Chunk]:
        train, val = (Chunk(writer.path, 0, writer.close()) for writer in self.writers)
        return train, val


class EncodedTask(NamedTuple):
    tokens: tuple[Chunk, Chunk]  # per split code (train, val): each document's tokens + eos, in order
    sources: dict[tuple[str, int], tuple[int, int]]  # (source, split code) → (documents, their UTF-8 bytes)
    bad_records: list[BadRecord]  # the task's skipped records, in input order
    num_documents: int


@dataclass(frozen=True)
class EncodeSettings:
    dtype: str
    eos_id: int
    val_fraction: float
    seed: int
    text_key: str
    bos_id: int | None = None  # prepended to each document (PrepareConfig.add_bos)


class TaskEncoder:
    """Parses, validates and tokenizes one task. Runs in worker processes (or inline)."""

    def __init__(self, tokenizer: Tokenizer | HFTokenizer, settings: EncodeSettings) -> None:
        self.tokenizer = tokenizer
        self.text_key = settings.text_key
        self.dtype = TOKEN_DTYPES[settings.dtype]
        self.eos = np.array([settings.eos_id], dtype=self.dtype)
        # Around each document: nothing before it (or bos), eos after.
        self.before = np.array([] if settings.bos_id is None else [settings.bos_id], dtype=self.dtype)
        self.val_threshold = settings.val_fraction * 2**64
        # The split hash is keyed by the seed, so another seed gives another (equally deterministic) split.
        self.hash_key = settings.seed.to_bytes(8, "little", signed=True)

    def __call__(self, task: Task, sink: TokenSink | None = None) -> EncodedTask:
        """Encode `task`, handing its tokens to `sink` batch by batch (default: kept in memory). A task that is one
        whole compressed file streams through in batches of ~ENCODE_BATCH_CHARS: memory does not grow with it."""
        sink = sink or MemorySink(self.dtype)
        sources: dict[tuple[str, int], tuple[int, int]] = {}
        bad_records: list[BadRecord] = []
        num_documents = 0
        for docs, codes in self._batches(task, bad_records):
            ids = self.tokenizer.encode([doc.text for doc in docs], num_threads=1)
            parts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
            for doc, doc_ids, code in zip(docs, ids, codes, strict=True):
                split_code, num_bytes = self._split_and_size(doc.text, code)
                parts[split_code].extend((self.before, doc_ids, self.eos))
                num_docs, total_bytes = sources.get((doc.source, split_code), (0, 0))
                sources[(doc.source, split_code)] = (num_docs + 1, total_bytes + num_bytes)
            sink.add(self._concatenate(parts[0]), self._concatenate(parts[1]))
            num_documents += len(docs)
        return EncodedTask(sink.finish(), sources, bad_records, num_documents)

    def _batches(self, task: Task, bad_records: list[BadRecord]) -> Iterator[tuple[list[Document], list[int]]]:
        """The task's documents (and their split codes) in order, in batches of about ENCODE_BATCH_CHARS; skipped
        records go to `bad_records`."""
        docs: list[Document] = []
        codes: list[int] = []
        num_chars = 0
        for item, code in task:
            entries = parse_block(item, self.text_key) if isinstance(item, RecordBlock) else (item,)
            for entry in entries:
                if not isinstance(entry, Document):
                    bad_records.append(entry)
                    continue
                docs.append(entry)
                codes.append(code)
                num_chars += len(entry.text)
                if num_chars >= ENCODE_BATCH_CHARS:
                    yield docs, codes
                    docs, codes, num_chars = [], [], 0
        if docs:
            yield docs, codes

    def _split_and_size(self, text: str, code: int) -> tuple[int, int]:
        """(split code, UTF-8 bytes of the text)."""
        if code != _CODE_BY_HASH:
            # isascii() is O(1) for CPython strings; encoding only to count bytes would copy the document.
            return code, len(text) if text.isascii() else len(text.encode("utf-8"))
        data = text.encode("utf-8")
        # Content hash (not position): the same text always lands in the same split, whatever file it is in.
        digest = hashlib.blake2b(data, digest_size=8, key=self.hash_key).digest()
        return (_CODE_VAL if int.from_bytes(digest, "little") < self.val_threshold else _CODE_TRAIN), len(data)

    def _concatenate(self, parts: list[np.ndarray]) -> np.ndarray:
        if not parts:
            return np.empty(0, dtype=self.dtype)
        # Straight into the shard dtype: ids are < vocab_size, which the dtype was chosen to hold, so the
        # "unsafe" int32 → uint16 cast loses nothing and saves a second pass.
        return np.concatenate(parts, dtype=self.dtype, casting="unsafe")


_WORKER_DIED = ("a prepare worker process died (out of memory? killed?); lower --num-proc or free memory and "
                "re-run")


@dataclass
class _WorkerState:
    encoder: TaskEncoder
    layout: ShardLayout
    spool_dir: str
    num_spooled: int = 0


_WORKER: _WorkerState | None = None


def _init_worker(tokenizer: Tokenizer | HFTokenizer, settings: EncodeSettings, layout: ShardLayout, spool_dir: str,
                 main_pid: int) -> None:
    global _WORKER
    _die_with(main_pid)
    _WORKER = _WorkerState(TaskEncoder(tokenizer, settings), layout, spool_dir)


def _die_with(main_pid: int) -> None:
    """Linux: this worker is killed when the main process dies, even by SIGKILL (OOM killer, Slurm after a time
    limit's grace period): an orphaned worker would otherwise wait on the task queue forever, holding its memory."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != main_pid:  # the main process died before the prctl took effect
        os._exit(1)


def _encode_in_worker(task: Task) -> EncodedTask:
    """Encode a task and leave its tokens in spool files, so only their counts travel back to the main process."""
    assert _WORKER is not None, "worker started without _init_worker"
    _WORKER.num_spooled += 1
    prefix = os.path.join(_WORKER.spool_dir, f"{os.getpid()}-{_WORKER.num_spooled}")
    return _WORKER.encoder(task, SpoolSink(prefix))


def _write_in_worker(job: ShardJob) -> ShardEntry:
    assert _WORKER is not None, "worker started without _init_worker"
    return write_shard(job, _WORKER.layout)


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], pool: Executor | None,
                max_in_flight: int) -> Iterator[Any]:
    """Like `pool.imap(fn, items)`: results in input order. Unlike imap, it reads `items` only as results are
    consumed (imap's feeder thread would read the whole corpus ahead into memory when workers are slower), and a
    worker that dies (e.g. out of memory) raises instead of hanging. With `pool=None` it runs inline."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque[Future[Any]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max_in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as err:
        raise DataPipelineError(_WORKER_DIED) from err
    finally:
        for future in pending:
            future.cancel()


def _tasks(config: PrepareConfig, train_files: list[SourceFile], val_files: list[SourceFile]) -> Iterator[Task]:
    """The input in order, as tasks of at most `batch_max_docs` records and `batch_max_bytes` bytes (a larger
    block, i.e. one long record, is a task of its own)."""
    task: Task = []
    num_records = num_bytes = 0
    for item, code in _coded_blocks(config, train_files, val_files):
        item_records, item_bytes = (item.num_records, item.num_bytes) if isinstance(item, RecordBlock) else (0, 0)
        if task and (num_records + item_records > config.batch_max_docs
                     or num_bytes + item_bytes > config.batch_max_bytes):
            yield task
            task, num_records, num_bytes = [], 0, 0
        task.append((item, code))
        num_records += item_records
        num_bytes += item_bytes
    if task:
        yield task


def _coded_blocks(config: PrepareConfig, train_files: list[SourceFile],
                  val_files: list[SourceFile]) -> Iterator[tuple[RecordBlock | BadRecord, int]]:
    train_code = _CODE_BY_HASH if config.val_fraction > 0 else _CODE_TRAIN
    for files, code in ((train_files, train_code), (val_files, _CODE_VAL)):
        # byte_ranges: workers read uncompressed files by range, parquet by row group and small compressed files
        # whole, so the main process does no I/O for them (sources.read_blocks).
        for item in read_blocks(files, config.text_key, config.batch_max_docs, config.batch_max_bytes,
                                byte_ranges=True):
            yield item, code


@dataclass
class Packed:
    """What `_tokenize_and_pack` leaves: per split its planner (counts) and its shard entries in order."""

    planners: dict[str, ShardPlanner]
    entries: dict[str, list[ShardEntry]]


def _tokenize_and_pack(config: PrepareConfig, tokenizer: Tokenizer | HFTokenizer, layout: ShardLayout,
                       splits: list[str],
                       train_files: list[SourceFile], val_files: list[SourceFile], report: BadInputReport,
                       source_stats: dict[tuple[str, str], SourceStats]) -> Packed:
    settings = EncodeSettings(layout.dtype_name, tokenizer.eos_id, config.val_fraction, config.seed, config.text_key,
                              tokenizer.bos_id if config.add_bos else None)
    num_proc = config.resolved_num_proc
    with (_worker_pool(num_proc, tokenizer, settings, layout, config.spool_dir) as pool,
          _progress_bar(config.progress) as bar):
        packing = _Packing(pool, layout, splits, max_writes_in_flight=num_proc,
                           line_numberer=LineNumberer([*train_files, *val_files]))
        encoder = TaskEncoder(tokenizer, settings) if pool is None else _encode_in_worker
        tasks = _tasks(config, train_files, val_files)
        try:
            for encoded in ordered_map(encoder, tasks, pool, max_in_flight=2 * num_proc):
                packing.absorb(encoded, report, source_stats)
                bar.update(encoded.num_documents)
                bar.set_postfix_str(f"{packing.num_tokens / 1e6:.1f}M tokens", refresh=False)
            return packing.finish()
        except BaseException:
            packing.cancel_writes()  # the pool's shutdown would otherwise run every queued write first
            raise


class _Packing:
    """The main process's side of packing: results in input order → bad-record report, per-source counts, shard
    jobs. Jobs run on the pool (or inline) and may finish in any order; a spool file goes once nothing needs it."""

    def __init__(self, pool: Executor | None, layout: ShardLayout, splits: list[str], max_writes_in_flight: int,
                 line_numberer: LineNumberer) -> None:
        self.pool = pool
        self.line_numberer = line_numberer
        self.layout = layout
        self.max_writes_in_flight = max_writes_in_flight
        self.spool_refs: Counter[str] = Counter()
        self.planners = {s: ShardPlanner(s, layout.sample_len_tokens, layout.samples_per_shard) for s in splits}
        self.entries: dict[str, dict[int, ShardEntry]] = {s: {} for s in splits}
        self.writes: deque[tuple[Future[ShardEntry], ShardJob]] = deque()

    @property
    def num_tokens(self) -> int:
        return sum(planner.num_tokens_in for planner in self.planners.values())

    def absorb(self, encoded: EncodedTask, report: BadInputReport,
               source_stats: dict[tuple[str, str], SourceStats]) -> None:
        """Apply one task's result. Results arrive in input order, so report rows keep input order and strict mode
        raises at the first bad record of the input, as a sequential reader would."""
        for record in encoded.bad_records:
            report.add_record(self.line_numberer.number(record))
        for code, chunk in enumerate(encoded.tokens):
            if chunk.count:
                self._hold(chunk.ref)  # the planner's, until take_consumed() hands it back
                planner = self.planners[SPLIT_NAMES[code]]
                self._plan(planner.add(chunk), planner)
        for (source, code), (num_docs, num_bytes) in encoded.sources.items():
            stats = source_stats.setdefault((source, SPLIT_NAMES[code]), SourceStats())
            stats.num_documents += num_docs
            stats.num_bytes += num_bytes

    def finish(self) -> Packed:
        for planner in self.planners.values():
            self._plan(planner.finish(), planner)
        while self.writes:
            self._complete_oldest_write()
        entries = {s: [by_index[i] for i in range(len(by_index))] for s, by_index in self.entries.items()}
        return Packed(self.planners, entries)

    def cancel_writes(self) -> None:
        for future, _ in self.writes:
            future.cancel()

    def _plan(self, jobs: list[ShardJob], planner: ShardPlanner) -> None:
        for job in jobs:
            self._submit(job)  # holds the spool files the job reads first ...
        for ref in planner.take_consumed():
            self._release(ref)  # ... so that releasing the planner's hold cannot delete them under the job

    def _submit(self, job: ShardJob) -> None:
        if self.pool is None:
            self.entries[job.split][job.shard_index] = write_shard(job, self.layout)
            return
        for piece in job.pieces:
            self._hold(piece.ref)
        try:
            self.writes.append((self.pool.submit(_write_in_worker, job), job))
        except BrokenProcessPool as err:
            raise DataPipelineError(_WORKER_DIED) from err
        while self.writes and (self.writes[0][0].done() or len(self.writes) > self.max_writes_in_flight):
            self._complete_oldest_write()

    def _complete_oldest_write(self) -> None:
        future, job = self.writes.popleft()
        try:
            self.entries[job.split][job.shard_index] = future.result()
        except BrokenProcessPool as err:
            raise DataPipelineError(_WORKER_DIED) from err
        for piece in job.pieces:
            self._release(piece.ref)

    def _hold(self, ref: TokenRef) -> None:
        if isinstance(ref, str):
            self.spool_refs[ref] += 1

    def _release(self, ref: TokenRef) -> None:
        if isinstance(ref, str):
            self.spool_refs[ref] -= 1
            if not self.spool_refs[ref]:
                del self.spool_refs[ref]
                os.remove(ref)


@contextlib.contextmanager
def _worker_pool(num_proc: int, tokenizer: Tokenizer | HFTokenizer, settings: EncodeSettings, layout: ShardLayout,
                 spool_parent: str | None) -> Iterator[Executor | None]:
    if num_proc == 1:
        yield None  # inline: no pickling, no spool, and the per-process benchmark measures this path
        return
    # fork on Linux: workers start in milliseconds and need no re-import of __main__ (spawn fails for `python -`
    # scripts). Safe because the workers are forked before this process starts any thread (see _start_workers)
    # and the data layer holds no CUDA state. Elsewhere fork is unsafe (macOS) and spawn is used.
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with _spool_dir(spool_parent) as spool_dir, ProcessPoolExecutor(
            num_proc, mp_context=ctx, initializer=_init_worker,
            initargs=(tokenizer, settings, layout, spool_dir, os.getpid())) as pool:
        _start_workers(pool)
        yield pool


@contextlib.contextmanager
def _spool_dir(parent: str | None) -> Iterator[str]:
    """A fresh folder for the workers' token spool files, removed afterwards whatever happens. Its size stays
    bounded: files go as soon as their shards are written (about 2 × num_proc tasks and num_proc + 1 shards of
    tokens at a time)."""
    try:
        path = tempfile.mkdtemp(prefix="pretrain-prepare-spool-", dir=parent)
    except OSError as err:
        raise DataPipelineError(f"cannot create a spool folder in {parent or tempfile.gettempdir()} ({err}); pass "
                                "--spool-dir with a writable local disk") from err
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start_workers(pool: ProcessPoolExecutor) -> None:
    """With fork, the pool forks all its workers at the first submit: do it now, before the readers (pyarrow) and
    the progress bar may start threads, which a forked child would inherit in whatever state they were."""
    try:
        pool.submit(int).result()
    except BrokenProcessPool as err:
        raise DataPipelineError(_WORKER_DIED) from err


def _progress_bar(enabled: bool) -> Any:
    from tqdm import tqdm

    # Only on a terminal: in logs and CI a progress bar is noise.
    return tqdm(unit="doc", desc="prepare", file=sys.stderr, disable=not enabled or not sys.stderr.isatty(),
                dynamic_ncols=True)


def _source_entries(train_files: list[SourceFile], val_files: list[SourceFile],
                    source_stats: dict[tuple[str, str], SourceStats], report: BadInputReport) -> list[dict[str, Any]]:
    entries = []
    for files, role in ((train_files, TRAIN), (val_files, VAL)):
        for src in files:
            for split in SPLIT_NAMES:
                stats = source_stats.get((src.name, split))
                if split != role and stats is None:
                    continue
                stats = stats or SourceStats()
                entries.append({"path": src.name, "split": split, "num_documents": stats.num_documents,
                                "num_bytes": stats.num_bytes,
                                "num_skipped": report.count_for_file(src.name) if split == role else 0})
    return entries


def _remove_temp_shards(out_dir: Path) -> None:
    """After a failure: drop shards being written (their temp files); completed shards stay, but no manifest
    vouches for them."""
    for split in SPLIT_NAMES:
        for tmp in (out_dir / split).glob(f"{split}-*.tar.tmp"):
            tmp.unlink(missing_ok=True)
