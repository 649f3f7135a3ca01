"""Raw text inputs → a stream of `Document`s, with every skipped record counted in a `BadInputReport`.

Formats (chosen by file suffix):
  .jsonl / .json / .ndjson (optionally .gz / .zst / .zstd)  one JSON object per line, text under `text_key`
  .parquet                                                   one document per row of the `text_key` column
  anything else (.txt, and whatever `--include` matches)     one document per file (optionally .gz / .zst)

Bad input never crashes a run and is never dropped silently: each problem becomes one row
(file, line, reason, detail) in the report, counted by reason; `strict=True` raises `BadInputError` on the
first one instead. Line numbers are 1-based; line 0 means "the whole file". For parquet, "line" is the row.

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
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from data_pipeline.errors import BadInputError, DataPipelineError

DEFAULT_INCLUDE_GLOBS: tuple[str, ...] = ("*.txt",)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
PARQUET_BATCH_ROWS = 256
REPORT_HEADER = "file\tline\treason\tdetail\n"
# Details are for a human to find the problem; cap them so a pathological input cannot balloon the report.
MAX_DETAIL_CHARS = 200
# zstd --long=31 frames need a 2 GiB window; the library default (128 MiB) refuses them.
ZSTD_MAX_WINDOW_BYTES = 2**31
READ_CHUNK_BYTES = 1 << 20

# Every reason a record or file can be skipped for, with the fix we suggest.
REASON_HINTS: dict[str, str] = {
    "malformed_json": "each line of a JSON Lines file must be one complete JSON object; fix or delete the line",
    "not_an_object": "each line must be a JSON object like {\"text\": \"...\"}, not an array, string or number",
    "missing_text_key": "add the text field to the record, or pass --text-key with the name your data uses",
    "text_not_string": "the text field must be a JSON string (or a parquet string column without nulls)",
    "invalid_utf8": "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
    "lone_surrogate": "the JSON has an unpaired \\ud800-\\udfff escape; fix the producer to emit valid UTF-16 pairs",
    "empty_document": "the text is empty or whitespace only; drop such records upstream to silence this",
    "empty_file": "the file has no records; remove it from the inputs",
    "missing_text_column": "pass --text-key with the name of the parquet column that holds the text",
    "truncated_gzip": "the .gz ends early (interrupted copy?); the lines before the cut were kept; re-create it",
    "corrupt_gzip": "the .gz failed its integrity check; its lines read so far may be garbled: re-create the file",
    "truncated_zstd": "the .zst ends inside a frame (interrupted copy?); lines before the cut were kept; re-create it",
    "corrupt_zstd": "the .zst cannot be decompressed; re-create the file",
    "corrupt_parquet": "the parquet file cannot be read; re-create it (rows read before the error were kept)",
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
    line: int  # 1-based line (jsonl), row (parquet), or 1 for a whole-file document


@dataclass(frozen=True)
class BadRecord:
    file: str
    line: int  # 0 = the whole file
    reason: str
    detail: str


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
            return "no bad input"
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
    paths: Iterable[str | os.PathLike[str]], include_globs: Sequence[str] = DEFAULT_INCLUDE_GLOBS
) -> list[SourceFile]:
    """Files as given, directories searched recursively for `include_globs` (matched against the file name, or
    the relative path when the pattern has a '/'). Order: arguments in the order given, each directory's files
    sorted by relative path, so the same command always reads the same sequence. Hidden files and directories
    (.git, .cache, ...) are skipped. A file reached twice is read once."""
    globs = tuple(include_globs) or DEFAULT_INCLUDE_GLOBS
    files: list[SourceFile] = []
    seen_real: set[str] = set()
    seen_names: set[str] = set()
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
            "(e.g. --include '*.jsonl' --include '*.parquet')"
        )
    return [SourceFile(arg / rel, f"{base_name}/{rel}") for rel in rel_paths]


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

    Memory stays bounded by one record (one parquet batch, or one whole plain-text file)."""
    report = report if report is not None else BadInputReport()
    for src in _as_source_files(paths, include_globs):
        yield from iter_file_documents(src, text_key, report)


def _as_source_files(
    paths: Iterable[SourceFile | str | os.PathLike[str]], include_globs: Sequence[str]
) -> list[SourceFile]:
    items = list(paths)
    if items and all(isinstance(p, SourceFile) for p in items):
        return items  # type: ignore[return-value]
    if any(isinstance(p, SourceFile) for p in items):
        raise TypeError("pass either SourceFile objects (from expand_inputs) or paths, not a mix")
    return expand_inputs(items, include_globs)  # type: ignore[arg-type]


def iter_file_documents(src: SourceFile, text_key: str, report: BadInputReport) -> Iterator[Document]:
    try:
        size_bytes = src.path.stat().st_size
    except OSError as err:
        report.add(src.name, 0, "unreadable_file", f"{type(err).__name__}: {err.strerror or err}")
        return
    if size_bytes == 0:
        report.add(src.name, 0, "empty_file", "file is 0 bytes")
        return
    kind, compression = file_format(src.path)
    if kind == "parquet":
        yield from _iter_parquet(src, text_key, report)
    elif kind == "jsonl":
        yield from _iter_jsonl(src, compression, text_key, report)
    else:
        yield from _iter_text_file(src, compression, report)


def file_format(path: Path) -> tuple[str, str | None]:
    """("jsonl" | "parquet" | "text", compression or None), from the suffixes."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSION_SUFFIXES.get(suffixes[-1]) if suffixes else None
    inner = suffixes[:-1] if compression else suffixes
    if inner and inner[-1] in JSONL_SUFFIXES:
        return "jsonl", compression
    if not compression and inner and inner[-1] == ".parquet":
        return "parquet", None
    return "text", compression


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


def _iter_raw_lines(src: SourceFile, compression: str | None, report: BadInputReport) -> Iterator[bytes]:
    """Yield raw lines (with their b"\\n"); turn every stream error into one report row and stop reading.

    A partial last line before a truncation is never yielded: the error surfaces while reading it."""
    line_no = 0
    try:
        with _open_binary(src.path, compression) as stream:
            for raw in stream:
                line_no += 1
                yield raw
    except EOFError:
        report.add(src.name, line_no + 1, "truncated_gzip", f"gzip stream ends early after {line_no} complete lines")
    except TruncatedZstdError:
        report.add(src.name, line_no + 1, "truncated_zstd", f"zstd frame ends early after {line_no} complete lines")
    except (gzip.BadGzipFile, zlib.error) as err:
        report.add(
            src.name, line_no + 1, "corrupt_gzip",
            f"{err}; the {line_no} lines already read from this file may be garbled",
        )
    except zstandard.ZstdError as err:
        report.add(src.name, line_no + 1, "corrupt_zstd", f"{err} (after {line_no} complete lines)")
    except OSError as err:
        report.add(src.name, line_no + 1, "unreadable_file", f"{type(err).__name__}: {err.strerror or err}")


# --- JSON Lines ---------------------------------------------------------------------------------------------------


def _iter_jsonl(
    src: SourceFile, compression: str | None, text_key: str, report: BadInputReport
) -> Iterator[Document]:
    num_records = 0
    for line_no, raw in enumerate(_iter_raw_lines(src, compression, report), start=1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark is not part of the first record
        if raw.isspace() or not raw:
            continue  # a blank line is not a record (e.g. a trailing newline)
        num_records += 1
        text, reason, detail = parse_json_record(raw, text_key)
        if text is None:
            report.add(src.name, line_no, reason, detail)
        else:
            yield Document(text, src.name, line_no)
    if num_records == 0 and report.count_for_file(src.name) == 0:
        report.add(src.name, 0, "empty_file", "no records (only blank lines)")


def parse_json_record(raw: bytes, text_key: str) -> tuple[str | None, str, str]:
    """(text, "", "") for a good record, else (None, reason, detail)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, "invalid_utf8", f"invalid UTF-8 byte 0x{raw[err.start]:02x} at byte {err.start} of the line"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, "malformed_json", f"{err.msg} at column {err.colno}: {line[:60]!r}"
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
    # full scan runs only for lines that contain such an escape.
    if (b"\\ud" in raw or b"\\uD" in raw) and (pos := _surrogate_position(text)) >= 0:
        return None, "lone_surrogate", f"{text_key!r} has a lone surrogate U+{ord(text[pos]):04X} at character {pos}"
    if _is_blank(text):
        return None, "empty_document", f"{text_key!r} is empty or whitespace only"
    return text, "", ""


def _is_blank(text: str) -> bool:
    # isspace() stops at the first non-space character; strip() would copy the whole document.
    return not text or text.isspace()


def _surrogate_position(text: str) -> int:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return -1


# --- plain text (one document per file) ---------------------------------------------------------------------------


def _iter_text_file(src: SourceFile, compression: str | None, report: BadInputReport) -> Iterator[Document]:
    errors_before = report.count_for_file(src.name)
    data = b"".join(_iter_raw_lines(src, compression, report))
    if report.count_for_file(src.name) > errors_before:
        return  # the stream error was reported; half a document is not a document
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = data.count(b"\n", 0, err.start) + 1
        report.add(src.name, line_no, "invalid_utf8", f"invalid UTF-8 byte 0x{data[err.start]:02x} at byte {err.start}")
        return
    if _is_blank(text):
        report.add(src.name, 1, "empty_document", "file is empty or whitespace only")
        return
    yield Document(text, src.name, 1)


# --- parquet ------------------------------------------------------------------------------------------------------


def _iter_parquet(src: SourceFile, text_key: str, report: BadInputReport) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        # Memory follows row-group size and read-ahead, not batch size: no pre-buffering, no threads.
        with pq.ParquetFile(src.path, pre_buffer=False, buffer_size=READ_CHUNK_BYTES) as pfile:
            if not _check_parquet_column(src, pfile.schema_arrow, text_key, report):
                return
            batches = pfile.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_key], use_threads=False)
            for batch in batches:
                # Decode UTF-8 ourselves: pyarrow's to_pylist on a string column fails the whole batch on one
                # bad value, and we want to skip just that row.
                values = batch.column(0).cast(pa.large_binary()).to_pylist()
                for value in values:
                    row += 1
                    doc = _parquet_value_to_document(src, row, value, text_key, report)
                    if doc is not None:
                        yield doc
    except (pa.ArrowException, OSError) as err:
        report.add(src.name, row + 1 if row else 0, "corrupt_parquet", f"{type(err).__name__}: {err}")
        return
    if row == 0:
        report.add(src.name, 0, "empty_file", "parquet file has no rows")


def _check_parquet_column(src: SourceFile, schema: object, text_key: str, report: BadInputReport) -> bool:
    import pyarrow as pa

    names = schema.names  # type: ignore[attr-defined]
    if text_key not in names:
        report.add(src.name, 0, "missing_text_column", f"no column {text_key!r} (columns: {', '.join(names[:8])})")
        return False
    col_type = schema.field(text_key).type  # type: ignore[attr-defined]
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type) or _is_string_view(col_type)):
        report.add(src.name, 0, "text_not_string", f"column {text_key!r} has type {col_type}, not string")
        return False
    return True


def _is_string_view(col_type: object) -> bool:
    import pyarrow as pa

    return bool(getattr(pa.types, "is_string_view", lambda _t: False)(col_type))


def _parquet_value_to_document(
    src: SourceFile, row: int, value: bytes | None, text_key: str, report: BadInputReport
) -> Document | None:
    if value is None:
        report.add(src.name, row, "text_not_string", f"{text_key!r} is null")
        return None
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as err:
        report.add(src.name, row, "invalid_utf8", f"invalid UTF-8 byte 0x{value[err.start]:02x} at byte {err.start}")
        return None
    if _is_blank(text):
        report.add(src.name, row, "empty_document", f"{text_key!r} is empty or whitespace only")
        return None
    return Document(text, src.name, row)
