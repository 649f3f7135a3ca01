"""Raw text inputs → a stream of `Document`s, with every skipped record counted in a `BadInputReport`.

Formats (chosen by file suffix):
  .jsonl / .json / .ndjson (optionally .gz / .zst / .zstd)  one JSON object per line, text under `text_key`
  .parquet                                                   one document per row of the `text_key` column
  .arrow / .feather                                          the same, from Arrow IPC files or streams (what HF
                                                             `datasets` writes with `save_to_disk`)
  anything else (.txt, and whatever `--include` matches)     one document per file (optionally .gz / .zst)

Bad input never crashes a run and is never dropped silently: each problem becomes one row
(file, line, reason, detail) in the report, counted by reason; `strict=True` raises `BadInputError` on the
first one instead. Line numbers are 1-based; line 0 means "the whole file". For parquet and arrow, "line" is the
row.

Reading happens in two steps, so that one process can cut the work for many that parse: `read_blocks` does the
file-level checks and yields `RecordBlock`s of raw records (no per-record work), and `parse_block` parses and
validates a block's records. `iter_documents` chains the two in one process. With `byte_ranges=True` (prepare) the
blocks are mostly descriptions (byte range, row group, whole small compressed file) that `parse_block` reads
itself, so the I/O and decompression happen in the parsing processes too.

Trust: lines read before a truncation (.gz / .zst ending early) are intact and kept. A corrupt .gz is only
detected by its CRC check at the *end* of the file, after its lines have been yielded; those lines may be
garbled, which the report row says. Re-create such a file rather than trusting a dataset built from it.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import json
import os
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import zstandard

from data_pipeline.errors import BadInputError, DataPipelineError

DEFAULT_INCLUDE_GLOBS: tuple[str, ...] = ("*.txt",)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
ARROW_SUFFIXES = (".arrow", ".feather")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
PARQUET_BATCH_ROWS = 256
# Largest row group (uncompressed, all columns) a prepare worker reads whole; see _row_groups_fit_a_worker.
PARQUET_WORKER_MAX_GROUP_BYTES = 64 << 20
# Largest .gz/.zst file a prepare worker reads whole (a compressed stream cannot be split into ranges). The worker
# streams it in bounded memory, but its tokens wait in the spool until the file is done (~2-3x the compressed
# size; up to 2 x num_proc such tasks are in flight): bigger files are decompressed by the cutter instead.
WORKER_MAX_COMPRESSED_BYTES = 64 << 20
REPORT_HEADER = "file\tline\treason\tdetail\n"
# Details are for a human to find the problem; cap them so a pathological input cannot balloon the report.
MAX_DETAIL_CHARS = 200
# zstd --long=31 frames need a 2 GiB window; the library default (128 MiB) refuses them.
ZSTD_MAX_WINDOW_BYTES = 2**31
READ_CHUNK_BYTES = 1 << 20
_UTF8_BOM = b"\xef\xbb\xbf"

# Every reason a record or file can be skipped for, with the fix we suggest.
REASON_HINTS: dict[str, str] = {
    "malformed_json": "each line of a JSON Lines file must be one complete JSON object; fix or delete the line",
    "not_an_object": "each line must be a JSON object like {\"text\": \"...\"}, not an array, string or number",
    "missing_text_key": "add the text field to the record, or pass --text-key with the name your data uses",
    "text_not_string": "the text field must be a JSON string (or a parquet/arrow string column without nulls)",
    "invalid_utf8": "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
    "lone_surrogate": "the JSON has an unpaired \\ud800-\\udfff escape; fix the producer to emit valid UTF-16 pairs",
    "empty_document": "the text is empty or whitespace only; drop such records upstream to silence this",
    "empty_file": "the file has no records; remove it from the inputs",
    "missing_text_column": "pass --text-key with the name of the parquet/arrow column that holds the text",
    "truncated_gzip": "the .gz ends early (interrupted copy?); the lines before the cut were kept; re-create it",
    "corrupt_gzip": "the .gz failed its integrity check; its lines read so far may be garbled: re-create the file",
    "truncated_zstd": "the .zst ends inside a frame (interrupted copy?); lines before the cut were kept; re-create it",
    "corrupt_zstd": "the .zst cannot be decompressed; re-create the file",
    "corrupt_parquet": "the parquet file cannot be read; re-create it (the rows that could be read were kept)",
    "corrupt_arrow": "the arrow file cannot be read; re-create it (the rows that could be read were kept)",
    "unreadable_file": "check that the file exists and that you have permission to read it",
}


@dataclass(frozen=True)
class SourceFile:
    """One input file. `name` is what reports and manifests show: the path as given when it was relative,
    otherwise relative to the parent of the --input argument (no absolute host paths in outputs)."""

    path: Path
    name: str


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # SourceFile.name
    line: int  # 1-based line (jsonl), row (parquet), or 1 for a whole-file document; 0 for JSON Lines read by
    #            byte range (FileRange), where only bad records get numbered


@dataclass(frozen=True)
class BadRecord:
    file: str
    line: int  # 0 = the whole file
    reason: str
    detail: str
    # Set (and `line` still 0) when a worker read the record by byte range and could not know its line number:
    # the byte offset of the record in the file; `LineNumberer` turns it into the line.
    offset_bytes: int | None = None


class BadInputReport:
    """Collects skipped records. In strict mode the first problem raises `BadInputError` instead."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.records: list[BadRecord] = []
        self._by_reason: Counter[str] = Counter()
        self._by_file: Counter[str] = Counter()

    def add(self, file: str, line: int, reason: str, detail: str) -> None:
        if reason not in REASON_HINTS:
            raise ValueError(f"unknown bad-input reason {reason!r}; add it to REASON_HINTS")
        detail = _clean_detail(detail)
        if self.strict:
            raise BadInputError(
                f"{file}:{line}: {reason}: {detail}\n  hint: {REASON_HINTS[reason]}\n"
                "  (--strict stops at the first bad record; without it such records are skipped, counted and "
                "listed in bad_input_report.tsv)"
            )
        self.records.append(BadRecord(file, line, reason, detail))
        self._by_reason[reason] += 1
        self._by_file[file] += 1

    def add_record(self, record: BadRecord) -> None:
        self.add(record.file, record.line, record.reason, record.detail)

    @property
    def total(self) -> int:
        return len(self.records)

    @property
    def by_reason(self) -> dict[str, int]:
        return dict(sorted(self._by_reason.items()))

    def count_for_file(self, name: str) -> int:
        return self._by_file[name]

    def write_tsv(self, path: str | os.PathLike[str]) -> Path:
        """Write `file<TAB>line<TAB>reason<TAB>detail` rows (header first), in the order they were found."""
        out_path = Path(path)
        with open(out_path, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(REPORT_HEADER)
            fh.writelines(f"{rec.file}\t{rec.line}\t{rec.reason}\t{rec.detail}\n" for rec in self.records)
        return out_path

    def summary(self) -> str:
        if not self.records:
            return "none"  # printed as "bad input: none"
        parts = ", ".join(f"{reason}={count}" for reason, count in self.by_reason.items())
        return f"{self.total} skipped ({parts})"


def _clean_detail(detail: str) -> str:
    # Tabs/newlines would break the TSV; surrogates would break writing it as UTF-8.
    flat = " ".join(detail.split())
    flat = flat.encode("utf-8", "backslashreplace").decode("utf-8")
    return flat if len(flat) <= MAX_DETAIL_CHARS else flat[: MAX_DETAIL_CHARS - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Finding input files
# ---------------------------------------------------------------------------------------------------------------


def expand_inputs(
    paths: Iterable[str | os.PathLike[str]], include_globs: Sequence[str] = DEFAULT_INCLUDE_GLOBS,
    taken_names: Iterable[str] = (),
) -> list[SourceFile]:
    """Files as given, directories searched recursively for `include_globs` (matched against the file name, or
    the relative path when the pattern has a '/'). Order: arguments in the order given, each directory's files
    sorted by relative path, so the same command always reads the same sequence. Hidden files and directories
    (.git, .cache, ...) are skipped. A file reached twice is read once. Names are unique, also against
    `taken_names` (e.g. the training files' names when expanding the validation files)."""
    globs = tuple(include_globs) or DEFAULT_INCLUDE_GLOBS
    files: list[SourceFile] = []
    seen_real: set[str] = set()
    seen_names: set[str] = set(taken_names)
    for arg in paths:
        for src in _expand_one(Path(arg), globs):
            real = os.path.realpath(src.path)
            if real in seen_real:
                continue
            seen_real.add(real)
            if src.name in seen_names:
                src = SourceFile(src.path, _unique_name(src.path, seen_names))
            seen_names.add(src.name)
            files.append(src)
    if not files:
        raise DataPipelineError("no input files given; pass --input FILE_OR_DIR (repeatable)")
    return files


def _unique_name(path: Path, taken: set[str]) -> str:
    """Two different files with one display name would make report rows ambiguous: add parent directories."""
    parts = path.absolute().parts
    for depth in range(2, len(parts) + 1):
        name = "/".join(parts[-depth:])
        if name not in taken:
            return name
    return path.absolute().as_posix()


def _expand_one(arg: Path, globs: tuple[str, ...]) -> list[SourceFile]:
    if not arg.exists():
        raise DataPipelineError(f"input path does not exist: {arg} (check the --input value and the working directory)")
    base_name = arg.as_posix() if not arg.is_absolute() else arg.name
    if arg.is_file():
        return [SourceFile(arg, base_name)]
    if not arg.is_dir():
        raise DataPipelineError(f"input is neither a file nor a directory: {arg}")
    rel_paths = sorted(_walk_matching(arg, globs))
    if not rel_paths:
        raise DataPipelineError(
            f"no files matching {', '.join(globs)} under {arg}; pass --include with the right pattern "
            f"({_include_suggestion(arg)})"
        )
    return [SourceFile(arg / rel, f"{base_name}/{rel}") for rel in rel_paths]


def _include_suggestion(root: Path) -> str:
    """What the directory holds, by readable format: `it holds 3 .arrow files: --include '*.arrow'`."""
    counts: Counter[str] = Counter()
    for rel in _walk_matching(root, ("*",)):
        kind, compression = file_format(Path(rel))
        if kind != "text" or compression:
            suffixes = "".join(Path(rel).suffixes[-2 if compression and kind == "jsonl" else -1:])
            counts[suffixes.lower()] += 1
    if len(counts) > 1:  # .json beside data files is metadata (HF's state.json, dataset_info.json), not text
        counts.pop(".json", None)
    if not counts:
        return "e.g. --include '*.jsonl' --include '*.parquet'"
    found = ", ".join(f"{n} {suffix}" for suffix, n in counts.most_common(4))
    flags = " ".join(f"--include '*{suffix}'" for suffix, _ in counts.most_common(4))
    return f"it holds {found} files: {flags}"


def _walk_matching(root: Path, globs: tuple[str, ...]) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for fname in filenames:
            if fname.startswith("."):
                continue
            rel = fname if rel_dir == "." else f"{rel_dir}/{fname}"
            if any(fnmatch.fnmatchcase(rel if "/" in g else fname, g) for g in globs):
                yield rel


# ---------------------------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------------------------


def iter_documents(
    paths: Iterable[SourceFile | str | os.PathLike[str]],
    text_key: str = "text",
    report: BadInputReport | None = None,
    include_globs: Sequence[str] = DEFAULT_INCLUDE_GLOBS,
) -> Iterator[Document]:
    """Stream documents from files/directories (or already expanded `SourceFile`s), one file at a time.

    Memory stays bounded by one block (about READ_CHUNK_BYTES, one parquet batch, or one whole plain-text file)."""
    report = report if report is not None else BadInputReport()
    for item in read_blocks(_as_source_files(paths, include_globs), text_key):
        entries = parse_block(item, text_key) if isinstance(item, RecordBlock) else (item,)
        for entry in entries:
            if isinstance(entry, Document):
                yield entry
            else:
                report.add_record(entry)


def _as_source_files(
    paths: Iterable[SourceFile | str | os.PathLike[str]], include_globs: Sequence[str]
) -> list[SourceFile]:
    items = list(paths)
    if items and all(isinstance(p, SourceFile) for p in items):
        return items  # type: ignore[return-value]
    if any(isinstance(p, SourceFile) for p in items):
        raise TypeError("pass either SourceFile objects (from expand_inputs) or paths, not a mix")
    return expand_inputs(items, include_globs)  # type: ignore[arg-type]


def file_format(path: Path) -> tuple[str, str | None]:
    """("jsonl" | "parquet" | "arrow" | "text", compression or None), from the suffixes."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSION_SUFFIXES.get(suffixes[-1]) if suffixes else None
    inner = suffixes[:-1] if compression else suffixes
    if inner and inner[-1] in JSONL_SUFFIXES:
        return "jsonl", compression
    if not compression and inner and inner[-1] == ".parquet":
        return "parquet", None
    if not compression and inner and inner[-1] in ARROW_SUFFIXES:
        return "arrow", None
    return "text", compression


# --- reading raw blocks (I/O and decompression only) ------------------------------------------------------------


@dataclass(frozen=True)
class RecordBlock:
    """Consecutive records of one file, read but not yet parsed: `parse_block` turns them into documents.

    Reading and parsing are split so that one process can read for many: `read_blocks` does no per-record work
    (no JSON, no UTF-8 check), and a block pickles cheaply to the process that parses and tokenizes it."""

    source: str  # SourceFile.name
    kind: str  # "jsonl": whole lines, each with its b"\n" (the file's last may lack it); "text": one whole file;
    #            "parquet" / "arrow": rows of the text column
    first_line: int  # line (row) number of the block's first record; 0 for a "jsonl" FileRange (not counted)
    num_records: int  # lines (blank ones included) / 1 / rows; 0 for a "jsonl" FileRange (not counted)
    data: Any  # bytes for "jsonl" and "text"; a pyarrow LargeBinaryArray for "parquet"/"arrow"; or, to be read by
    #            parse_block: a FileRange, ParquetRowGroup or CompressedFile (read_blocks with byte_ranges)

    @property
    def num_bytes(self) -> int:
        if isinstance(self.data, FileRange):
            return self.data.end - self.data.start
        if isinstance(self.data, (ParquetRowGroup, CompressedFile)):
            return self.data.num_bytes
        return len(self.data) if isinstance(self.data, bytes) else int(self.data.nbytes)


@dataclass(frozen=True)
class FileRange:
    """Bytes [start, end) of an uncompressed file, for the parsing process to read itself (`read_blocks` with
    `byte_ranges=True`): then no input byte passes through the process that cuts the tasks. A "jsonl" range owns
    the lines that *start* inside it (the usual split rule), so consecutive ranges give every line exactly once
    without the cutter looking for line ends."""

    path: str
    start: int
    end: int
    is_last: bool  # the file's last range: the one that reports a file of blank lines as empty


@dataclass(frozen=True)
class CompressedFile:
    """A whole .gz/.zst file for the parsing process to read with the sequential reader (`byte_ranges=True`)."""

    path: str
    num_bytes: int  # compressed


@dataclass(frozen=True)
class ParquetRowGroup:
    """One row group of a parquet file, for the parsing process to read itself (`byte_ranges=True`)."""

    path: str
    index: int
    num_bytes: int  # uncompressed, all columns (the footer's total_byte_size)


def read_blocks(
    files: Iterable[SourceFile], text_key: str, max_records: int = sys.maxsize, max_bytes: int = READ_CHUNK_BYTES,
    byte_ranges: bool = False,
) -> Iterator[RecordBlock | BadRecord]:
    """The records of `files` in input order, as blocks of at most `max_records` records and about `max_bytes`
    bytes (one larger record is a block of its own), with each file- or stream-level problem as a `BadRecord` at
    the place it occurred. `parse_block` on every block, in order, gives exactly `iter_documents`' output.

    With `byte_ranges`, files are read by `parse_block` where it runs wherever that is possible in bounded memory:
    uncompressed JSON Lines and text files as `FileRange`s of about `max_bytes` (text: the whole file; bad records
    in JSON Lines ranges carry byte offsets for a `LineNumberer` instead of line numbers), parquet files as
    `ParquetRowGroup`s while no group exceeds PARQUET_WORKER_MAX_GROUP_BYTES, .gz/.zst files up to
    WORKER_MAX_COMPRESSED_BYTES whole (`CompressedFile`). Only the rest is read here, arrow files too (batch by
    batch: docs/data_pipeline.md has what that costs)."""
    for src in files:
        yield from _file_blocks(src, text_key, max_records, max_bytes, byte_ranges)


def _file_blocks(src: SourceFile, text_key: str, max_records: int, max_bytes: int,
                 byte_ranges: bool = False) -> Iterator[RecordBlock | BadRecord]:
    try:
        size_bytes = src.path.stat().st_size
    except OSError as err:
        yield BadRecord(src.name, 0, "unreadable_file", f"{type(err).__name__}: {err.strerror or err}")
        return
    if size_bytes == 0:
        yield BadRecord(src.name, 0, "empty_file", "file is 0 bytes")
        return
    kind, compression = file_format(src.path)
    if byte_ranges and compression is None and kind not in ("parquet", "arrow"):
        yield from _range_blocks(src, kind, size_bytes, max_bytes)
    elif byte_ranges and compression is not None and size_bytes <= WORKER_MAX_COMPRESSED_BYTES:
        yield RecordBlock(src.name, kind, 1, 0, CompressedFile(str(src.path), size_bytes))
    elif kind == "parquet":
        yield from _parquet_blocks(src, text_key, max_records, byte_ranges)
    elif kind == "arrow":
        yield from _arrow_blocks(src, text_key, max_records, max_bytes)
    elif kind == "jsonl":
        yield from _jsonl_blocks(src, compression, max_records, max_bytes)
    else:
        yield from _text_blocks(src, compression)


# --- compressed streams -----------------------------------------------------------------------------------------


class TruncatedZstdError(Exception):
    """The .zst input ended inside a frame."""


class _ZstdFrameReader(io.RawIOBase):
    """Decompresses frame by frame and raises `TruncatedZstdError` when the input ends mid-frame.

    zstandard's `stream_reader` just stops at a truncation, which would silently lose the rest of the file."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW_BYTES)
        self._dobj = self._dctx.decompressobj()
        self._in_frame = False  # fed bytes to the current frame that have not completed it
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        # RawIOBase.close() would leave the wrapped file open; closing the BufferedReader lands here.
        if not self.closed:
            self._fh.close()
        super().close()

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            if not self._fill():
                return 0
        n_bytes = min(len(buf), len(self._pending))
        buf[:n_bytes] = self._pending[:n_bytes]
        self._pending = self._pending[n_bytes:]
        return n_bytes

    def _fill(self) -> bool:
        """Decompress the next piece into `_pending`; False at a clean end of input."""
        if self._dobj.eof:
            # A .zst may hold several frames (e.g. `cat a.zst b.zst`); the next one starts in unused_data.
            leftover = self._dobj.unused_data
            self._dobj = self._dctx.decompressobj()
            self._in_frame = False
            if leftover:
                self._feed(leftover)
                return True
        chunk = self._fh.read(READ_CHUNK_BYTES)
        if not chunk:
            if self._in_frame:
                raise TruncatedZstdError("input ended inside a zstd frame (no frame end marker)")
            return False
        self._feed(chunk)
        return True

    def _feed(self, data: bytes) -> None:
        self._in_frame = True
        self._pending = memoryview(self._dobj.decompress(data))
        if self._dobj.eof:
            self._in_frame = False


def _open_binary(path: Path, compression: str | None) -> BinaryIO:
    if compression == "gzip":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    fh = open(path, "rb")  # noqa: SIM115  (the caller closes what we return, which closes fh)
    if compression == "zstd":
        return io.BufferedReader(_ZstdFrameReader(fh), buffer_size=READ_CHUNK_BYTES)  # type: ignore[return-value]
    return fh


# What a failing stream raises: cut or corrupt compression, unreadable file (see _stream_error).
_STREAM_ERRORS = (EOFError, TruncatedZstdError, zlib.error, zstandard.ZstdError, OSError)


def _line_chunks(src: SourceFile, compression: str | None) -> Iterator[bytes]:
    """The file's bytes in chunks that end at a line end (b"\\n"; only the file's last chunk may lack one). A stream
    failure raises one of _STREAM_ERRORS.

    `read1` does at most one raw read per call, so before a failure the chunks hold every line the stream completed
    and not the line it cut: the same lines a line-by-line reader sees, and the failing line is `complete lines + 1`."""
    partial: list[bytes] = []  # the start of a line whose end has not been read yet
    with _open_binary(src.path, compression) as stream:
        while chunk := stream.read1(READ_CHUNK_BYTES):  # type: ignore[attr-defined]
            cut = chunk.rfind(b"\n") + 1
            if cut == 0:
                partial.append(chunk)
                continue
            yield b"".join([*partial, chunk[:cut]]) if partial else chunk[:cut]
            partial = [chunk[cut:]] if cut < len(chunk) else []
    if partial:
        yield b"".join(partial)


def _stream_error(file: str, num_lines: int, err: Exception) -> BadRecord:
    """The report row for a stream that failed after `num_lines` complete lines."""
    line = num_lines + 1
    if isinstance(err, EOFError):
        return BadRecord(file, line, "truncated_gzip", f"gzip stream ends early after {num_lines} complete lines")
    if isinstance(err, TruncatedZstdError):
        return BadRecord(file, line, "truncated_zstd", f"zstd frame ends early after {num_lines} complete lines")
    if isinstance(err, (gzip.BadGzipFile, zlib.error)):  # before OSError: BadGzipFile is one
        return BadRecord(file, line, "corrupt_gzip",
                         f"{err}; the {num_lines} lines already read from this file may be garbled")
    if isinstance(err, zstandard.ZstdError):
        return BadRecord(file, line, "corrupt_zstd", f"{err} (after {num_lines} complete lines)")
    assert isinstance(err, OSError)
    return BadRecord(file, line, "unreadable_file", f"{type(err).__name__}: {err.strerror or err}")


def _jsonl_blocks(src: SourceFile, compression: str | None, max_records: int,
                  max_bytes: int) -> Iterator[RecordBlock | BadRecord]:
    next_line = 1
    has_records = False
    try:
        for index, chunk in enumerate(_line_chunks(src, compression)):
            if index == 0:
                chunk = chunk.removeprefix(_UTF8_BOM)  # a UTF-8 byte-order mark is not part of the first record
            # Blank lines are not records; a chunk is all blank iff all its bytes are whitespace (b"\n" included).
            has_records = has_records or not _is_blank_bytes(chunk)
            for data, num_lines in _split_lines(chunk, max_records, max_bytes):
                yield RecordBlock(src.name, "jsonl", next_line, num_lines, data)
                next_line += num_lines
    except _STREAM_ERRORS as err:
        yield _stream_error(src.name, next_line - 1, err)
        return  # a file cut short is reported as such, never also as empty
    if not has_records:
        yield BadRecord(src.name, 0, "empty_file", "no records (only blank lines)")


def _split_lines(data: bytes, max_lines: int, max_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Cut line-aligned `data` at line ends into pieces of at most `max_lines` lines and about `max_bytes`
    (a longer line is a piece of its own); yields (piece, number of lines)."""
    start = 0
    while start < len(data):
        end = _line_end_near(data, start, start + max_bytes)
        num_lines = data.count(b"\n", start, end)
        if end == len(data) and not data.endswith(b"\n"):
            num_lines += 1  # the file's last line, without its b"\n"
        if num_lines > max_lines:
            end, num_lines = _end_of_line_number(data, start, max_lines), max_lines
        yield data[start:end], num_lines
        start = end


def _line_end_near(data: bytes, start: int, limit: int) -> int:
    """The last line end after `start` up to `limit`, else the first one after it (the end of data if none)."""
    if limit >= len(data):
        return len(data)
    before = data.rfind(b"\n", start, limit) + 1
    if before:
        return before
    return data.find(b"\n", limit) + 1 or len(data)


def _end_of_line_number(data: bytes, start: int, num_lines: int) -> int:
    end = start
    for _ in range(num_lines):
        end = data.index(b"\n", end) + 1
    return end


def _range_blocks(src: SourceFile, kind: str, size_bytes: int, max_bytes: int) -> Iterator[RecordBlock]:
    if kind == "text":
        yield RecordBlock(src.name, "text", 1, 1, FileRange(str(src.path), 0, size_bytes, is_last=True))
        return
    for start in range(0, size_bytes, max_bytes):
        end = min(start + max_bytes, size_bytes)
        yield RecordBlock(src.name, "jsonl", 0, 0, FileRange(str(src.path), start, end, is_last=end == size_bytes))


def _text_blocks(src: SourceFile, compression: str | None) -> Iterator[RecordBlock | BadRecord]:
    chunks: list[bytes] = []
    try:
        # A loop, not list(): the chunks read before a stream error are needed to number its line.
        for chunk in _line_chunks(src, compression):
            chunks.append(chunk)  # noqa: PERF402
    except _STREAM_ERRORS as err:
        yield _stream_error(src.name, sum(chunk.count(b"\n") for chunk in chunks), err)
        return  # half a document is not a document
    yield RecordBlock(src.name, "text", 1, 1, b"".join(chunks))


def _parquet_blocks(src: SourceFile, text_key: str, max_records: int,
                    byte_ranges: bool = False) -> Iterator[RecordBlock | BadRecord]:
    import pyarrow.parquet as pq

    def blocks() -> Iterator[RecordBlock | BadRecord]:
        # Memory follows row-group size and read-ahead, not batch size: no pre-buffering, no threads.
        with pq.ParquetFile(src.path, pre_buffer=False, buffer_size=READ_CHUNK_BYTES) as pfile:
            problem = _text_column_problem(src, pfile.schema_arrow, text_key)
            if problem is not None:
                yield problem
            elif byte_ranges and _row_groups_fit_a_worker(pfile.metadata):
                yield from _row_group_blocks(src, pfile.metadata)
            else:
                yield from _parquet_batches(src, pfile, text_key, max_records)

    return _columnar_blocks(src, "parquet", blocks())


def _columnar_blocks(src: SourceFile, kind: str,
                     blocks: Iterator[RecordBlock | BadRecord]) -> Iterator[RecordBlock | BadRecord]:
    """A parquet or arrow file's blocks, or its column problem (then nothing else), with what stops the reading
    (`corrupt_<kind>` at the row it stopped at; the rows before it were yielded) and a file without rows reported."""
    import pyarrow as pa

    row = 0
    try:
        for item in blocks:
            yield item
            if isinstance(item, BadRecord):
                return
            row += item.num_records
    except (pa.ArrowException, OSError) as err:
        yield BadRecord(src.name, row + 1 if row else 0, f"corrupt_{kind}", f"{type(err).__name__}: {err}")
        return
    if row == 0:
        yield BadRecord(src.name, 0, "empty_file", f"{kind} file has no rows")


def _parquet_batches(src: SourceFile, pfile: Any, text_key: str, max_records: int) -> Iterator[RecordBlock]:
    import pyarrow as pa

    row = 0
    for batch in pfile.iter_batches(batch_size=min(max_records, PARQUET_BATCH_ROWS), columns=[text_key],
                                    use_threads=False):
        # As binary: pyarrow's to_pylist on a string column fails the whole batch on one bad value, and
        # parse_block skips just that row. Cast here, so any Arrow error is reported with its row.
        values = batch.column(0).cast(pa.large_binary())
        yield RecordBlock(src.name, "parquet", row + 1, len(values), values)
        row += len(values)


def _row_groups_fit_a_worker(metadata: Any) -> bool:
    """Row groups are read whole by a worker only while each is small enough to hold in memory at once; files
    with bigger groups (pyarrow's default is 1M rows) are read here in small batches instead."""
    groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
    return max((group.total_byte_size for group in groups), default=0) <= PARQUET_WORKER_MAX_GROUP_BYTES


def _row_group_blocks(src: SourceFile, metadata: Any) -> Iterator[RecordBlock]:
    row = 0
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        if group.num_rows:
            yield RecordBlock(src.name, "parquet", row + 1, group.num_rows,
                              ParquetRowGroup(str(src.path), index, group.total_byte_size))
        row += group.num_rows


def _text_column_problem(src: SourceFile, schema: object, text_key: str) -> BadRecord | None:
    import pyarrow as pa

    names = schema.names  # type: ignore[attr-defined]
    if text_key not in names:
        return BadRecord(src.name, 0, "missing_text_column",
                         f"no column {text_key!r} (columns: {', '.join(names[:8])})")
    col_type = schema.field(text_key).type  # type: ignore[attr-defined]
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type) or _is_string_view(col_type)):
        return BadRecord(src.name, 0, "text_not_string", f"column {text_key!r} has type {col_type}, not string")
    return None


def _arrow_blocks(src: SourceFile, text_key: str, max_records: int,
                  max_bytes: int) -> Iterator[RecordBlock | BadRecord]:
    """An Arrow IPC file or stream, its record batches cut into blocks of at most `max_records` rows and about
    `max_bytes` bytes of text. Read batch by batch, not memory-mapped: a mapping's pages would count in this
    process' RSS, growing with the file. A stream cut short keeps the batches before the cut."""
    import pyarrow as pa

    def blocks() -> Iterator[RecordBlock | BadRecord]:
        with pa.OSFile(str(src.path)) as source:
            reader = open_arrow(source)
            problem = _text_column_problem(src, reader.schema, text_key)
            if problem is not None:
                yield problem
                return
            column, row = reader.schema.get_field_index(text_key), 0
            for batch in arrow_batches(reader):
                values = batch.column(column).cast(pa.large_binary())
                for block in _row_slices(src, values, row, max_records, max_bytes):
                    yield block
                    row += block.num_records

    return _columnar_blocks(src, "arrow", blocks())


def open_arrow(source: Any) -> Any:
    """A reader of either Arrow IPC format: the file format (random access, `ARROW1` magic) or the stream format
    (HF `datasets`' .arrow files)."""
    import pyarrow as pa

    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source)


def arrow_batches(reader: Any) -> Iterator[Any]:
    if hasattr(reader, "get_batch"):  # file format
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    return iter(reader)


def _row_slices(src: SourceFile, values: Any, first_row: int, max_records: int,
                max_bytes: int) -> Iterator[RecordBlock]:
    """Blocks of consecutive rows, each copied into its own buffers: a slice pickles (to the process that parses it)
    with the whole batch's buffers behind it (pyarrow 26: 10 rows of a 10 MB batch pickle to 10 MB)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths = pc.fill_null(pc.binary_length(values), 0).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    start = 0
    while start < len(values):
        end = min(len(values), start + max_records)
        while end - start > 1 and offsets[end] - offsets[start] > max_bytes:  # one large record stays a block
            end = start + max(1, (end - start) // 2)
        chunk = pa.concat_arrays([values.slice(start, end - start)])
        yield RecordBlock(src.name, "arrow", first_row + start + 1, end - start, chunk)
        start = end


def _is_string_view(col_type: object) -> bool:
    import pyarrow as pa

    return bool(getattr(pa.types, "is_string_view", lambda _t: False)(col_type))


# --- parsing blocks (per-record work) ------------------------------------------------------------------------------


def parse_block(block: RecordBlock, text_key: str) -> Iterator[Document | BadRecord]:
    """The block's documents and skipped records, in record order."""
    if isinstance(block.data, FileRange):
        return _parse_range(block, block.data, text_key)
    if isinstance(block.data, ParquetRowGroup):
        return _parse_row_group(block, block.data, text_key)
    if isinstance(block.data, CompressedFile):
        return _parse_compressed_file(block, block.data, text_key)
    if block.kind == "jsonl":
        return _parse_jsonl(block, text_key)
    if block.kind in ("parquet", "arrow"):
        return _parse_parquet(block, text_key)
    return _parse_text(block)


def _parse_jsonl(block: RecordBlock, text_key: str) -> Iterator[Document | BadRecord]:
    # BytesIO splits at b"\n" only and keeps it: error details (column, excerpt) see each line as it was read.
    for line_no, raw in enumerate(io.BytesIO(block.data), start=block.first_line):
        if raw.isspace():
            continue  # a blank line is not a record (e.g. a trailing newline)
        text, reason, detail = parse_json_record(raw, text_key)
        if text is None:
            yield BadRecord(block.source, line_no, reason, detail)
        else:
            yield Document(text, block.source, line_no)


def _parse_range(block: RecordBlock, file_range: FileRange, text_key: str) -> Iterator[Document | BadRecord]:
    try:
        if block.kind == "text":
            with open(file_range.path, "rb") as f:
                data = f.read()
        else:
            data, data_start = read_line_range(file_range)
    except OSError as err:
        yield BadRecord(block.source, 0, "unreadable_file", f"{type(err).__name__}: {err.strerror or err}")
        return
    if block.kind == "text":
        yield from _parse_text(RecordBlock(block.source, "text", 1, 1, data))
        return
    if data_start == 0 and data.startswith(_UTF8_BOM):  # not part of the first record
        data, data_start = data[len(_UTF8_BOM) :], len(_UTF8_BOM)
    has_records = False
    offset = data_start
    for raw in io.BytesIO(data):
        if not raw.isspace():
            has_records = True
            text, reason, detail = parse_json_record(raw, text_key)
            if text is None:
                yield BadRecord(block.source, 0, reason, detail, offset_bytes=offset)
            else:
                yield Document(text, block.source, 0)
        offset += len(raw)
    if file_range.is_last and not has_records and _is_blank_prefix(file_range.path, data_start):
        yield BadRecord(block.source, 0, "empty_file", "no records (only blank lines)")


def _parse_compressed_file(block: RecordBlock, file: CompressedFile,
                           text_key: str) -> Iterator[Document | BadRecord]:
    """The sequential reader, run where the block is parsed: same documents, rows and line numbers."""
    for item in _file_blocks(SourceFile(Path(file.path), block.source), text_key, sys.maxsize, READ_CHUNK_BYTES):
        yield from parse_block(item, text_key) if isinstance(item, RecordBlock) else (item,)


def _parse_row_group(block: RecordBlock, group: ParquetRowGroup, text_key: str) -> Iterator[Document | BadRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(group.path, pre_buffer=False, buffer_size=READ_CHUNK_BYTES) as pfile:
            column = pfile.read_row_group(group.index, columns=[text_key], use_threads=False).column(0)
            values = column.combine_chunks().cast(pa.large_binary())
    except (pa.ArrowException, OSError) as err:
        # Its rows are lost, and said so; the file's other row groups are read on their own.
        yield BadRecord(block.source, block.first_line, "corrupt_parquet",
                        f"row group {group.index} ({block.num_records} rows): {type(err).__name__}: {err}")
        return
    yield from _parse_parquet(RecordBlock(block.source, "parquet", block.first_line, len(values), values), text_key)


def read_line_range(file_range: FileRange) -> tuple[bytes, int]:
    """(the lines that start in [start, end), each with its b"\n", and the file offset of the first one). The
    last line is read to its end, past `end` if need be; a line that started before `start` is the previous
    range's."""
    start, end = file_range.start, file_range.end
    with open(file_range.path, "rb") as f:
        f.seek(max(start - 1, 0))
        starts_at_line = start == 0 or f.read(1) == b"\n"
        data = f.read(end - start)
        if not starts_at_line:
            first = data.find(b"\n") + 1
            if first == 0:
                return b"", end  # one line covers the whole range; the range where it starts reads it
            data, start = data[first:], start + first
        if data and not data.endswith(b"\n"):
            data += _rest_of_line(f)
    return data, start


def _rest_of_line(f: BinaryIO) -> bytes:
    parts = []
    while chunk := f.read(READ_CHUNK_BYTES):
        cut = chunk.find(b"\n") + 1
        if cut:
            parts.append(chunk[:cut])
            break
        parts.append(chunk)
    return b"".join(parts)


def _is_blank_prefix(path: str, end: int) -> bool:
    """Whether bytes [0, end) of the file hold no record (only whitespace after an optional BOM). Stops at the
    first non-blank chunk, so it is cheap unless the file really is (mostly) blank."""
    with open(path, "rb") as f:
        remaining, first = end, True
        while remaining > 0 and (chunk := f.read(min(READ_CHUNK_BYTES, remaining))):
            remaining -= len(chunk)
            if first:
                chunk, first = chunk.removeprefix(_UTF8_BOM), False
            if not _is_blank_bytes(chunk):
                return False
    return True


class LineNumberer:
    """Gives bad records located by byte offset (`BadRecord.offset_bytes`) their 1-based line numbers. Records of
    a file must come in increasing offset order (input order): each file is counted once, from the last record's
    offset on, and only files that have such records are read at all."""

    def __init__(self, files: Iterable[SourceFile]) -> None:
        self._paths = {src.name: src.path for src in files}
        self._cursors: dict[str, tuple[int, int]] = {}  # file → (offset, line number of the line starting there)

    def number(self, record: BadRecord) -> BadRecord:
        if record.offset_bytes is None:
            return record
        offset, line = self._cursors.get(record.file, (0, 1))
        if record.offset_bytes < offset:
            raise AssertionError(f"bad records of {record.file} out of order: offset {record.offset_bytes} < {offset}")
        line += _count_newlines(self._paths[record.file], offset, record.offset_bytes)
        self._cursors[record.file] = (record.offset_bytes, line)
        return BadRecord(record.file, line, record.reason, record.detail)


def _count_newlines(path: Path, start: int, end: int) -> int:
    count = 0
    with open(path, "rb") as f:
        f.seek(start)
        position = start
        while position < end:
            chunk = f.read(min(READ_CHUNK_BYTES, end - position))
            if not chunk:
                break
            count += chunk.count(b"\n")
            position += len(chunk)
    return count


def parse_json_record(raw: bytes, text_key: str) -> tuple[str | None, str, str]:
    """(text, "", "") for a good record, else (None, reason, detail).

    orjson parses twice as fast as the stdlib (JSON was the largest cost of prepare after sentencepiece) and is
    stricter: it rejects invalid UTF-8, lone surrogates, NaN and over-long numbers. So whatever it accepts as a
    good record is one, with the same text the stdlib would give; everything else goes through the stdlib path,
    which names the problem exactly as before."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        record = None
    if type(record) is dict:
        text = record.get(text_key)
        if type(text) is str and not _is_blank(text):
            return text, "", ""
    return _classify_json_record(raw, text_key)


def _classify_json_record(raw: bytes, text_key: str) -> tuple[str | None, str, str]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, "invalid_utf8", f"invalid UTF-8 byte 0x{raw[err.start]:02x} at byte {err.start} of the line"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        # Some of json's messages end in "at" already ("Unterminated string starting at"): no "at at column".
        return None, "malformed_json", f"{err.msg.removesuffix(' at')} at column {err.colno}: {line[:60]!r}"
    except (ValueError, RecursionError) as err:  # a >4300-digit number; nesting deeper than the recursion limit
        return None, "malformed_json", f"{type(err).__name__}: {err}"
    if not isinstance(record, dict):
        return None, "not_an_object", f"JSON {type(record).__name__} instead of an object"
    if text_key not in record:
        keys = ", ".join(list(record)[:8])
        return None, "missing_text_key", f"no key {text_key!r} (keys: {keys or 'none'})"
    text = record[text_key]
    if not isinstance(text, str):
        return None, "text_not_string", f"{text_key!r} is {type(text).__name__}, not a string"
    # Only a \ud800-\udfff escape can produce a surrogate (strict UTF-8 decoding rejects encoded ones), so the
    # full scan runs only for lines that contain such an escape; an ASCII text (an O(1) check) has none.
    if not text.isascii() and (b"\\ud" in raw or b"\\uD" in raw) and (pos := _surrogate_position(text)) >= 0:
        return None, "lone_surrogate", f"{text_key!r} has a lone surrogate U+{ord(text[pos]):04X} at character {pos}"
    if _is_blank(text):
        return None, "empty_document", f"{text_key!r} is empty or whitespace only"
    return text, "", ""


def _is_blank(text: str) -> bool:
    # isspace() stops at the first non-space character; strip() would copy the whole document.
    return not text or text.isspace()


def _is_blank_bytes(data: bytes) -> bool:
    return not data or data.isspace()


def _surrogate_position(text: str) -> int:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return -1


def _parse_text(block: RecordBlock) -> Iterator[Document | BadRecord]:
    data: bytes = block.data.removeprefix(_UTF8_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = data.count(b"\n", 0, err.start) + 1
        yield BadRecord(block.source, line_no, "invalid_utf8",
                        f"invalid UTF-8 byte 0x{data[err.start]:02x} at byte {err.start}")
        return
    if _is_blank(text):
        yield BadRecord(block.source, 1, "empty_document", "file is empty or whitespace only")
        return
    yield Document(text, block.source, 1)


def _parse_parquet(block: RecordBlock, text_key: str) -> Iterator[Document | BadRecord]:
    for row, value in enumerate(block.data.to_pylist(), start=block.first_line):
        yield _parquet_value_to_document(block.source, row, value, text_key)


def _parquet_value_to_document(source: str, row: int, value: bytes | None, text_key: str) -> Document | BadRecord:
    if value is None:
        return BadRecord(source, row, "text_not_string", f"{text_key!r} is null")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadRecord(source, row, "invalid_utf8",
                         f"invalid UTF-8 byte 0x{value[err.start]:02x} at byte {err.start}")
    if _is_blank(text):
        return BadRecord(source, row, "empty_document", f"{text_key!r} is empty or whitespace only")
    return Document(text, source, row)
