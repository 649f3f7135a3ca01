"""`prepare`: raw text → tokens → fixed-length samples → webdataset shards + manifest (docs/data_pipeline.md).

Pipeline (memory stays bounded: input streams through, at most 2 × num_proc tasks are in the air):
  main process: read raw blocks of records (sources.read_blocks: I/O and decompression only) → tasks ──┐
  worker processes (num_proc): parse + validate records (JSON, UTF-8), tokenize, append eos, pick   ◄──┘
      the split; return per-split token arrays, per-source counts and the task's bad records
  main process, results in submission order: bad records → report; tokens → pack into samples of seq_len + 1
      → ShardSetWriter → manifest LAST
The main process does no per-record work (a task is ~1 MiB of input): what it still does per token (copying,
shard layout, sha256, write) bounds throughput far above one worker; bench/bench_prepare.py reports that ceiling.

Output does not depend on `num_proc`: tasks are cut in the main process and results are consumed in order, so
`num_proc=1` and `num_proc=8` give byte-identical shards and reports; strict mode stops at the first bad record in
input order. Re-running on the same input gives identical files.
With `num_proc=1` everything runs inline in one process (no pickling).

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
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from data_pipeline.errors import DataPipelineError
from data_pipeline.manifest import MANIFEST_FILENAME, Manifest, SplitInfo, TokenizerInfo
from data_pipeline.shards import (
    TOKEN_DTYPES,
    ShardEntry,
    ShardSetWriter,
    token_dtype_name,
)
from data_pipeline.sources import (
    DEFAULT_INCLUDE_GLOBS,
    BadInputReport,
    BadRecord,
    Document,
    RecordBlock,
    SourceFile,
    expand_inputs,
    parse_block,
    read_blocks,
)
from data_pipeline.tokenizer import (
    METADATA_FILENAME,
    Tokenizer,
    copy_tokenizer,
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
    tokenizer: str  # directory from `tokenizer train`, or a .model file
    output_dir: str
    val_inputs: tuple[str, ...] = ()  # separate validation files; then val_fraction must be 0
    val_fraction: float = 0.0  # share of --input documents sent to val by a seeded hash of their text
    seq_len: int = 2048
    samples_per_shard: int = 1000
    num_proc: int | None = None  # tokenizer processes; None = os.cpu_count()
    seed: int = 1234
    text_key: str = "text"
    include_globs: tuple[str, ...] = DEFAULT_INCLUDE_GLOBS
    strict: bool = False
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

    @property
    def resolved_num_proc(self) -> int:
        return self.num_proc or os.cpu_count() or 1

    def recorded_args(self) -> dict[str, Any]:
        """prepare_args in the manifest: what decides the output. No paths (host-specific), no num_proc (the
        output does not depend on it)."""
        return {
            "seq_len": self.seq_len, "samples_per_shard": self.samples_per_shard, "seed": self.seed,
            "val_fraction": self.val_fraction, "val_split": "files" if self.val_inputs else "fraction",
            "text_key": self.text_key, "include_globs": list(self.include_globs),
        }


@dataclass
class SplitStats:
    num_documents: int = 0


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
    tokenizer = _load_checked_tokenizer(config.tokenizer)
    train_files, val_files = _input_files(config)
    out_dir = Path(config.output_dir)
    _prepare_output_dir(out_dir, config.overwrite)
    dtype = token_dtype_name(tokenizer.vocab_size)
    splits = [TRAIN, VAL] if (val_files or config.val_fraction > 0) else [TRAIN]
    packers = {s: SamplePacker(ShardSetWriter(out_dir, s, config.samples_per_shard, dtype, config.seq_len + 1),
                               config.seq_len + 1, dtype) for s in splits}
    report = BadInputReport(strict=config.strict)
    source_stats: dict[tuple[str, str], SourceStats] = {}
    try:
        split_stats = _tokenize_and_pack(config, tokenizer, dtype, train_files, val_files, report, packers,
                                         source_stats)
        entries = {s: packers[s].close() for s in splits}
    except BaseException:
        for packer in packers.values():
            packer.abort()
        raise
    report_path = report.write_tsv(out_dir / REPORT_FILENAME)
    copy_tokenizer(config.tokenizer, out_dir / TOKENIZER_DIRNAME, tokenizer)
    split_infos = {s: SplitInfo.from_shards(entries[s], num_tokens=packers[s].num_samples * (config.seq_len + 1),
                                            num_documents=split_stats[s].num_documents,
                                            dropped_tail_tokens=packers[s].dropped_tail_tokens) for s in splits}
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


def _load_checked_tokenizer(path: str) -> Tokenizer:
    tokenizer = Tokenizer.load(path)
    if tokenizer.eos_id < 0:
        raise DataPipelineError(f"tokenizer {path} has no eos id; prepare puts eos between documents, so train "
                                "the tokenizer with `pretrain tokenizer train` (eos_id=2)")
    if tokenizer.vocab_size > 2**32:
        raise DataPipelineError(f"vocab size {tokenizer.vocab_size} does not fit uint32 token ids")
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
    val_files = expand_inputs(config.val_inputs, config.include_globs) if config.val_inputs else []
    train_real = {os.path.realpath(f.path) for f in train_files}
    overlap = [f.name for f in val_files if os.path.realpath(f.path) in train_real]
    if overlap:
        raise DataPipelineError(f"{len(overlap)} file(s) are both --input and --val-input (e.g. {overlap[0]}); "
                                "validation data must not also be trained on")
    return train_files, val_files


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


def _tokenizer_info(tokenizer: Tokenizer) -> TokenizerInfo:
    return TokenizerInfo(fingerprint=tokenizer.fingerprint, vocab_size=tokenizer.vocab_size,
                         model_type=tokenizer.model_type, unk_id=tokenizer.unk_id, bos_id=tokenizer.bos_id,
                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                         model_file=f"{TOKENIZER_DIRNAME}/tokenizer.model")


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


class EncodedTask(NamedTuple):
    tokens: tuple[np.ndarray, np.ndarray]  # per split code (train, val): each document's tokens + eos, in order
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


class TaskEncoder:
    """Parses, validates and tokenizes one task. Runs in worker processes (or inline)."""

    def __init__(self, tokenizer: Tokenizer, settings: EncodeSettings) -> None:
        self.tokenizer = tokenizer
        self.text_key = settings.text_key
        self.dtype = TOKEN_DTYPES[settings.dtype]
        self.eos = np.array([settings.eos_id], dtype=self.dtype)
        self.val_threshold = settings.val_fraction * 2**64
        # The split hash is keyed by the seed, so another seed gives another (equally deterministic) split.
        self.hash_key = settings.seed.to_bytes(8, "little", signed=True)

    def __call__(self, task: Task) -> EncodedTask:
        docs, codes, bad_records = self._parse(task)
        ids = self.tokenizer.encode([doc.text for doc in docs], num_threads=1)
        parts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        sources: dict[tuple[str, int], tuple[int, int]] = {}
        for doc, doc_ids, code in zip(docs, ids, codes, strict=True):
            split_code, num_bytes = self._split_and_size(doc.text, code)
            parts[split_code].extend((doc_ids, self.eos))
            num_docs, total_bytes = sources.get((doc.source, split_code), (0, 0))
            sources[(doc.source, split_code)] = (num_docs + 1, total_bytes + num_bytes)
        tokens = (self._concatenate(parts[0]), self._concatenate(parts[1]))
        return EncodedTask(tokens, sources, bad_records, len(docs))

    def _parse(self, task: Task) -> tuple[list[Document], list[int], list[BadRecord]]:
        docs: list[Document] = []
        codes: list[int] = []
        bad_records: list[BadRecord] = []
        for item, code in task:
            entries = parse_block(item, self.text_key) if isinstance(item, RecordBlock) else (item,)
            for entry in entries:
                if isinstance(entry, Document):
                    docs.append(entry)
                    codes.append(code)
                else:
                    bad_records.append(entry)
        return docs, codes, bad_records

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


_WORKER_ENCODER: TaskEncoder | None = None
_WORKER_DIED = ("a tokenizer worker process died (out of memory? killed?); lower --num-proc or free memory and "
                "re-run")


def _init_worker(model_proto: bytes, settings: EncodeSettings) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = TaskEncoder(Tokenizer(model_proto), settings)


def _encode_in_worker(task: Task) -> EncodedTask:
    assert _WORKER_ENCODER is not None, "worker started without _init_worker"
    return _WORKER_ENCODER(task)


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
        for item in read_blocks(files, config.text_key, config.batch_max_docs, config.batch_max_bytes):
            yield item, code


def _tokenize_and_pack(config: PrepareConfig, tokenizer: Tokenizer, dtype: str, train_files: list[SourceFile],
                       val_files: list[SourceFile], report: BadInputReport, packers: dict[str, SamplePacker],
                       source_stats: dict[tuple[str, str], SourceStats]) -> dict[str, SplitStats]:
    settings = EncodeSettings(dtype, tokenizer.eos_id, config.val_fraction, config.seed, config.text_key)
    split_stats = {s: SplitStats() for s in packers}
    num_proc = config.resolved_num_proc
    with _worker_pool(num_proc, tokenizer, settings) as pool, _progress_bar(config.progress) as bar:
        encoder = TaskEncoder(tokenizer, settings) if pool is None else _encode_in_worker
        tasks = _tasks(config, train_files, val_files)
        for encoded in ordered_map(encoder, tasks, pool, max_in_flight=2 * num_proc):
            _absorb(encoded, report, packers, split_stats, source_stats)
            bar.update(encoded.num_documents)
            bar.set_postfix_str(f"{sum(p.num_tokens_in for p in packers.values()) / 1e6:.1f}M tokens", refresh=False)
    return split_stats


@contextlib.contextmanager
def _worker_pool(num_proc: int, tokenizer: Tokenizer, settings: EncodeSettings) -> Iterator[Executor | None]:
    if num_proc == 1:
        yield None  # inline: no pickling, and the per-process benchmark measures this path
        return
    # fork on Linux: workers start in milliseconds and need no re-import of __main__ (spawn fails for `python -`
    # scripts). Safe because the workers are forked before this process starts any thread (see _start_workers)
    # and the data layer holds no CUDA state. Elsewhere fork is unsafe (macOS) and spawn is used.
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker,
                             initargs=(tokenizer.model_proto, settings)) as pool:
        _start_workers(pool)
        yield pool


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


def _absorb(encoded: EncodedTask, report: BadInputReport, packers: dict[str, SamplePacker],
            split_stats: dict[str, SplitStats], source_stats: dict[tuple[str, str], SourceStats]) -> None:
    """Apply one task's result. Results arrive in input order, so report rows keep input order and strict mode
    raises at the first bad record of the input, as a sequential reader would."""
    for record in encoded.bad_records:
        report.add_record(record)
    for code, tokens in enumerate(encoded.tokens):
        if len(tokens):
            packers[SPLIT_NAMES[code]].add(tokens)
    for (source, code), (num_docs, num_bytes) in encoded.sources.items():
        split = SPLIT_NAMES[code]
        split_stats[split].num_documents += num_docs
        stats = source_stats.setdefault((source, split), SourceStats())
        stats.num_documents += num_docs
        stats.num_bytes += num_bytes


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


# ---------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------


class SamplePacker:
    """Concatenates a split's token stream and cuts it into samples of `sample_len_tokens` (no overlap); the
    remainder carries over to the next call, and what is left at the end is counted as the dropped tail."""

    def __init__(self, writer: ShardSetWriter, sample_len_tokens: int, dtype: str) -> None:
        self.writer = writer
        self.sample_len_tokens = sample_len_tokens
        self._carry = np.empty(0, dtype=TOKEN_DTYPES[dtype])
        self.num_tokens_in = 0
        self.num_samples = 0
        self.dropped_tail_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.num_tokens_in += len(tokens)
        stream = np.concatenate([self._carry, tokens]) if len(self._carry) else tokens
        num_full = len(stream) // self.sample_len_tokens
        if num_full:
            cut = num_full * self.sample_len_tokens
            self.writer.write_batch(stream[:cut].reshape(num_full, self.sample_len_tokens))
            self.num_samples += num_full
        self._carry = stream[num_full * self.sample_len_tokens :].copy()

    def close(self) -> list[ShardEntry]:
        self.dropped_tail_tokens = len(self._carry)
        return self.writer.close()

    def abort(self) -> None:
        self.writer.abort()
