"""sources.py: every bad-input case is skipped, counted by reason and located by file:line; strict mode fails fast."""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline.errors import BadInputError, DataPipelineError
from data_pipeline.sources import (
    REPORT_HEADER,
    BadInputReport,
    Document,
    SourceFile,
    expand_inputs,
    iter_documents,
)


def _read(paths, **kwargs) -> tuple[list[Document], BadInputReport]:
    report = BadInputReport()
    docs = list(iter_documents(paths, report=report, **kwargs))
    return docs, report


def _rows(report: BadInputReport) -> list[tuple[str, int, str]]:
    return [(r.file, r.line, r.reason) for r in report.records]


def _numbered_lines(n: int) -> bytes:
    # Varied content so the compressed stream is long enough to cut in the middle.
    lines = (json.dumps({"text": f"doc {i} " + "x" * (i % 37) + str(i * 7919)}).encode() + b"\n" for i in range(n))
    return b"".join(lines)


def _complete_lines(decompressed_prefix: bytes) -> int:
    return decompressed_prefix.count(b"\n")


MIXED_JSONL = b"\n".join(
    [
        b'{"text": "hello"}',  # 1 ok
        b'{"text": "world"',  # 2 malformed_json
        b"[1, 2]",  # 3 not_an_object
        b'{"body": "x"}',  # 4 missing_text_key
        b'{"text": 5}',  # 5 text_not_string
        b'{"text": "caf\xe9"}',  # 6 invalid_utf8 (latin-1 byte)
        b'{"text": "a\\ud800b"}',  # 7 lone_surrogate
        b'{"text": "  \\n\\t "}',  # 8 empty_document
        b"",  # 9 blank line: not a record
        b'{"text": "pair \\ud83d\\ude00 ok"}',  # 10 ok: a valid surrogate pair
        b'{"text": "x", "n": ' + b"9" * 5000 + b"}",  # 11 malformed_json: Python refuses >4300-digit ints
        b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # 12 malformed_json: deeper than the recursion limit
    ]
) + b"\n"


def test_jsonl_every_record_problem_is_counted_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "mixed.jsonl").write_bytes(MIXED_JSONL)
    docs, report = _read([tmp_path / "mixed.jsonl"])
    assert [(d.text, d.line) for d in docs] == [("hello", 1), ("pair \U0001F600 ok", 10)]
    assert all(d.source == "mixed.jsonl" for d in docs)  # absolute input → name relative to its parent
    assert _rows(report) == [
        ("mixed.jsonl", 2, "malformed_json"),
        ("mixed.jsonl", 3, "not_an_object"),
        ("mixed.jsonl", 4, "missing_text_key"),
        ("mixed.jsonl", 5, "text_not_string"),
        ("mixed.jsonl", 6, "invalid_utf8"),
        ("mixed.jsonl", 7, "lone_surrogate"),
        ("mixed.jsonl", 8, "empty_document"),
        ("mixed.jsonl", 11, "malformed_json"),
        ("mixed.jsonl", 12, "malformed_json"),
    ]
    assert report.total == 9
    assert report.by_reason == {
        "empty_document": 1, "invalid_utf8": 1, "lone_surrogate": 1, "malformed_json": 3,
        "missing_text_key": 1, "not_an_object": 1, "text_not_string": 1,
    }
    assert "0xe9" in report.records[4].detail


def test_text_key_bom_and_json_suffixes(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(b'\xef\xbb\xbf{"content": "first"}\n{"content": "second"}')  # no final \n
    (tmp_path / "b.ndjson").write_bytes(b'{"content": "third"}\r\n')
    docs, report = _read([tmp_path / "a.json", tmp_path / "b.ndjson"], text_key="content")
    assert [d.text for d in docs] == ["first", "second", "third"]
    assert report.total == 0


def test_empty_and_blank_only_files(tmp_path: Path) -> None:
    (tmp_path / "zero.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n  \n")
    (tmp_path / "zero.txt").write_bytes(b"")
    docs, report = _read([tmp_path / "zero.jsonl", tmp_path / "blank.jsonl", tmp_path / "zero.txt"])
    assert docs == []
    assert _rows(report) == [("zero.jsonl", 0, "empty_file"), ("blank.jsonl", 0, "empty_file"),
                             ("zero.txt", 0, "empty_file")]


def test_truncated_gzip_keeps_the_lines_before_the_cut(tmp_path: Path) -> None:
    payload = _numbered_lines(3000)
    full = gzip.compress(payload, mtime=0)
    cut = full[: len(full) // 2]
    (tmp_path / "cut.jsonl.gz").write_bytes(cut)
    kept_lines = _complete_lines(zlib.decompressobj(wbits=31).decompress(cut))
    assert 0 < kept_lines < 3000
    docs, report = _read([tmp_path / "cut.jsonl.gz"])
    assert len(docs) == kept_lines
    assert docs[-1].line == kept_lines
    assert _rows(report) == [("cut.jsonl.gz", kept_lines + 1, "truncated_gzip")]


def test_corrupt_gzip_is_reported_and_flagged_untrustworthy(tmp_path: Path) -> None:
    full = bytearray(gzip.compress(_numbered_lines(50), mtime=0))
    full[-8] ^= 0xFF  # the CRC32 trailer: every line decompresses, then the check fails at the end
    (tmp_path / "crc.jsonl.gz").write_bytes(bytes(full))
    (tmp_path / "tail.jsonl.gz").write_bytes(gzip.compress(_numbered_lines(5), mtime=0) + b"garbage!")
    docs, report = _read([tmp_path / "crc.jsonl.gz", tmp_path / "tail.jsonl.gz"])
    assert len(docs) == 55
    assert _rows(report) == [("crc.jsonl.gz", 51, "corrupt_gzip"), ("tail.jsonl.gz", 6, "corrupt_gzip")]
    assert "may be garbled" in report.records[0].detail


def test_not_gzip_at_all(tmp_path: Path) -> None:
    (tmp_path / "fake.jsonl.gz").write_bytes(b'{"text": "plain, not gzip"}\n')
    docs, report = _read([tmp_path / "fake.jsonl.gz"])
    assert docs == [] and _rows(report) == [("fake.jsonl.gz", 1, "corrupt_gzip")]


def test_zstd_multi_frame_truncated_and_corrupt(tmp_path: Path) -> None:
    cctx = zstandard.ZstdCompressor(level=3)
    (tmp_path / "two.jsonl.zst").write_bytes(cctx.compress(_numbered_lines(10)) + cctx.compress(_numbered_lines(7)))
    full = cctx.compress(_numbered_lines(12000))  # > 128 KiB: several zstd blocks, so a cut keeps some lines
    cut = full[: len(full) // 2]
    (tmp_path / "cut.jsonl.zst").write_bytes(cut)
    kept_lines = _complete_lines(zstandard.ZstdDecompressor().decompressobj().decompress(cut))
    assert 0 < kept_lines < 12000
    (tmp_path / "junk.jsonl.zst").write_bytes(b"this is not zstd data at all")
    docs, report = _read([tmp_path / "two.jsonl.zst", tmp_path / "cut.jsonl.zst", tmp_path / "junk.jsonl.zst"])
    assert len(docs) == 17 + kept_lines
    assert [d.line for d in docs[:17]] == list(range(1, 11)) + list(range(11, 18))
    assert _rows(report) == [("cut.jsonl.zst", kept_lines + 1, "truncated_zstd"), ("junk.jsonl.zst", 1, "corrupt_zstd")]


def _write_table(path: Path, table: pa.Table, batch_rows: int = 128) -> None:
    """By suffix: .parquet (row groups of `batch_rows`); .arrow an Arrow IPC stream, as HF `datasets` writes its
    .arrow files (`save_to_disk`: a RecordBatchStreamWriter, other columns beside the text); .feather the IPC file
    format (Feather v2)."""
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=batch_rows)
        return
    opener = pa.ipc.new_file if path.suffix == ".feather" else pa.ipc.new_stream
    with opener(str(path), table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)


def _write_texts(path: Path, values: list[bytes | None], name: str = "text", batch_rows: int = 128) -> None:
    # Build as binary, then view as string: pyarrow would refuse invalid UTF-8 in a string array.
    column = pa.array(values, type=pa.binary()).view(pa.string())
    _write_table(path, pa.table({name: column, "id": list(range(len(values)))}), batch_rows)


@pytest.mark.parametrize("name", ["t.parquet", "t.arrow", "t.feather"])
def test_columnar_rows_across_batches(tmp_path: Path, name: str) -> None:
    values: list[bytes | None] = [f"row {i}".encode() for i in range(300)]
    values[1] = None  # row 2
    values[2] = b"   "  # row 3
    values[289] = b"bad \xff byte"  # row 290: parquet's second 256-row read batch, arrow's third 128-row batch
    _write_texts(tmp_path / name, values)
    docs, report = _read([tmp_path / name])
    assert len(docs) == 297
    assert docs[0] == Document("row 0", name, 1) and docs[-1] == Document("row 299", name, 300)
    assert _rows(report) == [(name, 2, "text_not_string"), (name, 3, "empty_document"), (name, 290, "invalid_utf8")]


@pytest.mark.parametrize(("suffix", "junk"), [(".parquet", b"PAR1 definitely not parquet"),
                                              (".arrow", b"ARROW1 definitely not arrow")])
def test_columnar_whole_file_problems(tmp_path: Path, suffix: str, junk: bytes) -> None:
    kind = suffix[1:]
    names = [f"{stem}{suffix}" for stem in ("other", "ints", "junk", "empty")]
    _write_texts(tmp_path / names[0], [b"a", b"b"], name="body")
    _write_table(tmp_path / names[1], pa.table({"text": [1, 2, 3]}))
    (tmp_path / names[2]).write_bytes(junk)
    _write_texts(tmp_path / names[3], [])
    docs, report = _read([tmp_path / n for n in names])
    assert docs == []
    assert _rows(report) == [(names[0], 0, "missing_text_column"), (names[1], 0, "text_not_string"),
                             (names[2], 0, f"corrupt_{kind}"), (names[3], 0, "empty_file")]
    docs, report = _read([tmp_path / names[0]], text_key="body")
    assert [d.text for d in docs] == ["a", "b"] and report.total == 0


def test_a_cut_arrow_stream_keeps_the_batches_before_the_cut(tmp_path: Path) -> None:
    _write_texts(tmp_path / "whole.arrow", [f"row {i}".encode() for i in range(100)], batch_rows=10)
    data = (tmp_path / "whole.arrow").read_bytes()
    (tmp_path / "cut.arrow").write_bytes(data[: len(data) * 2 // 3])
    docs, report = _read([tmp_path / "cut.arrow"])
    kept = len(docs)
    assert 0 < kept < 100 and kept % 10 == 0 and docs[-1].text == f"row {kept - 1}"
    assert _rows(report) == [("cut.arrow", kept + 1, "corrupt_arrow")]


def _make_text_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("second file\n  indented\n")
    (root / "sub" / "a.txt").write_text("nested\n")
    (root / "c.py").write_text("def f():\n    return 1\n")
    (root / ".hidden.txt").write_text("hidden\n")
    (root / ".git" / "x.txt").write_text("git internals\n")
    (root / "latin1.txt").write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    (root / "ws.txt").write_text(" \n\t\n")
    (root / "zero.txt").write_bytes(b"")
    (root / "gone.txt").symlink_to(root / "does-not-exist")  # a broken link: listed, but cannot be opened


def test_text_directory_globs_order_and_bad_files(tmp_path: Path) -> None:
    _make_text_tree(tmp_path / "corpus")
    files = expand_inputs([tmp_path / "corpus"], ["*.txt", "*.py"])
    assert [f.name for f in files] == ["corpus/b.txt", "corpus/c.py", "corpus/gone.txt", "corpus/latin1.txt",
                                       "corpus/sub/a.txt", "corpus/ws.txt", "corpus/zero.txt"]
    docs, report = _read(files)
    assert [(d.source, d.text, d.line) for d in docs] == [
        ("corpus/b.txt", "second file\n  indented\n", 1),
        ("corpus/c.py", "def f():\n    return 1\n", 1),
        ("corpus/sub/a.txt", "nested\n", 1),
    ]
    assert _rows(report) == [("corpus/gone.txt", 0, "unreadable_file"), ("corpus/latin1.txt", 2, "invalid_utf8"),
                             ("corpus/ws.txt", 1, "empty_document"), ("corpus/zero.txt", 0, "empty_file")]
    # Default glob is *.txt only; a path pattern with '/' matches the relative path.
    assert "corpus/c.py" not in [f.name for f in expand_inputs([tmp_path / "corpus"])]
    assert [f.name for f in expand_inputs([tmp_path / "corpus"], ["sub/*.txt"])] == ["corpus/sub/a.txt"]


def test_compressed_text_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"one\ntwo\n", mtime=0))
    cut = gzip.compress(_numbered_lines(100), mtime=0)[:-12]
    (tmp_path / "b.txt.gz").write_bytes(cut)
    kept_lines = _complete_lines(zlib.decompressobj(wbits=31).decompress(cut))
    docs, report = _read([tmp_path / "a.txt.gz", tmp_path / "b.txt.gz"])
    assert [d.text for d in docs] == ["one\ntwo\n"]  # half a document is not a document: b.txt.gz is skipped
    assert _rows(report) == [("b.txt.gz", kept_lines + 1, "truncated_gzip")]


def test_expand_inputs_names_order_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "z.txt").write_text("z")
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "one.jsonl").write_text('{"text": "x"}\n')
    monkeypatch.chdir(tmp_path)
    # Argument order is kept; relative inputs keep their relative form; a file reached twice is read once.
    files = expand_inputs(["one.jsonl", "d", "d/a.txt"])
    assert files == [SourceFile(Path("one.jsonl"), "one.jsonl"), SourceFile(Path("d/a.txt"), "d/a.txt"),
                     SourceFile(Path("d/z.txt"), "d/z.txt")]
    with pytest.raises(DataPipelineError, match="does not exist: missing.jsonl"):
        expand_inputs(["missing.jsonl"])
    with pytest.raises(DataPipelineError, match="no files matching \\*.parquet under d; pass --include"):
        expand_inputs(["d"], ["*.parquet"])
    # What the directory does hold is named, with the flag: an HF save_to_disk directory, say.
    (tmp_path / "hf").mkdir()
    for name in ("data-00000-of-00002.arrow", "data-00001-of-00002.arrow", "state.json", "dataset_info.json"):
        (tmp_path / "hf" / name).write_text("")
    with pytest.raises(DataPipelineError, match=r"under hf; pass --include with the right pattern \(it holds 2 \.arrow "
                                                r"files: --include '\*\.arrow'\)"):
        expand_inputs(["hf"], ["*.txt"])
    with pytest.raises(DataPipelineError, match="no input files"):
        expand_inputs([])


def test_strict_mode_raises_on_first_problem_with_location_and_hint(tmp_path: Path) -> None:
    (tmp_path / "mixed.jsonl").write_bytes(MIXED_JSONL)
    report = BadInputReport(strict=True)
    docs: list[Document] = []
    with pytest.raises(BadInputError) as exc_info:
        docs.extend(iter_documents([tmp_path / "mixed.jsonl"], report=report))  # keeps what came before the raise
    message = str(exc_info.value)
    assert message.startswith("mixed.jsonl:2: malformed_json: ")
    assert "hint: each line of a JSON Lines file must be one complete JSON object" in message
    assert "--strict" in message
    assert [d.line for d in docs] == [1]
    assert exc_info.value.user_error is True


def test_strict_mode_for_a_file_level_problem(tmp_path: Path) -> None:
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(_numbered_lines(10), mtime=0)[:-10])
    with pytest.raises(BadInputError, match=r"(?s)cut.jsonl.gz:\d+: truncated_gzip: .*hint: "):
        list(iter_documents([tmp_path / "cut.jsonl.gz"], report=BadInputReport(strict=True)))


def test_report_tsv_has_header_and_one_row_per_problem(tmp_path: Path) -> None:
    (tmp_path / "mixed.jsonl").write_bytes(MIXED_JSONL)
    _, report = _read([tmp_path / "mixed.jsonl"])
    path = report.write_tsv(tmp_path / "bad_input_report.tsv")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] + "\n" == REPORT_HEADER == "file\tline\treason\tdetail\n"
    assert len(lines) == 1 + 9
    assert all(len(line.split("\t")) == 4 for line in lines)
    assert lines[1].startswith("mixed.jsonl\t2\tmalformed_json\t")
    assert "9 skipped" in report.summary() and report.count_for_file("mixed.jsonl") == 9
    assert BadInputReport().write_tsv(tmp_path / "empty.tsv").read_text() == REPORT_HEADER


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without read permission")
def test_permission_denied_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "secret.jsonl"
    path.write_text('{"text": "x"}\n')
    path.chmod(0)
    docs, report = _read([path])
    assert docs == [] and _rows(report) == [("secret.jsonl", 1, "unreadable_file")]


def _mixed_inputs(root: Path) -> list[Path]:
    """One of each format and failure that cuts a file into blocks differently."""
    (root / "mixed.jsonl").write_bytes(b"\xef\xbb\xbf" + MIXED_JSONL + b'{"text": "last line, no newline"}')
    (root / "cut.jsonl.gz").write_bytes(gzip.compress(_numbered_lines(3000), mtime=0)[:9000])
    cctx = zstandard.ZstdCompressor(level=3)
    (root / "two.jsonl.zst").write_bytes(cctx.compress(_numbered_lines(40)) + cctx.compress(_numbered_lines(7)))
    (root / "blank.jsonl").write_bytes(b"\n \n\r\n")
    (root / "doc.txt").write_bytes(b"\xef\xbb\xbfline one\nline two\n" * 50)
    (root / "cut.txt.gz").write_bytes(gzip.compress(_numbered_lines(100), mtime=0)[:-12])
    values: list[bytes | None] = [f"row {i}".encode() for i in range(300)]
    values[5], values[270] = None, b"bad \xff byte"
    _write_texts(root / "t.parquet", values)
    _write_texts(root / "s.arrow", values[:50], batch_rows=16)
    names = ("mixed.jsonl", "cut.jsonl.gz", "two.jsonl.zst", "blank.jsonl", "doc.txt", "cut.txt.gz", "t.parquet",
             "s.arrow")
    return [root / name for name in names]


@pytest.mark.parametrize(("read_chunk_bytes", "max_records", "max_bytes"),
                         [(7, 3, 50), (64, 1, 1), (1 << 20, 4096, 1 << 20)])
def test_blocks_parse_to_exactly_what_iter_documents_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           read_chunk_bytes: int, max_records: int,
                                                           max_bytes: int) -> None:
    """prepare reads blocks in one process and parses them in others: whatever the block sizes, the documents and
    report rows (with their line numbers and details) must be those of the sequential reader, in the same order."""
    import pickle

    from data_pipeline import sources
    from data_pipeline.sources import BadRecord, parse_block, read_blocks

    files = expand_inputs(_mixed_inputs(tmp_path), ["*"])
    expected_docs, expected_report = _read(files)
    monkeypatch.setattr(sources, "READ_CHUNK_BYTES", read_chunk_bytes)
    docs: list[Document] = []
    rows: list[BadRecord] = []
    next_line: dict[str, int] = {}
    for item in read_blocks(files, "text", max_records, max_bytes):
        if isinstance(item, BadRecord):
            rows.append(item)
            continue
        assert item.num_records <= max_records or item.kind == "text"
        assert item.first_line == next_line.get(item.source, 1)  # blocks of a file are consecutive
        next_line[item.source] = item.first_line + item.num_records
        for entry in parse_block(pickle.loads(pickle.dumps(item)), "text"):  # as a worker receives it
            (docs if isinstance(entry, Document) else rows).append(entry)  # type: ignore[arg-type]
    assert docs == expected_docs and len(docs) > 300
    assert rows == expected_report.records
    assert {r.reason for r in rows} >= {"truncated_gzip", "empty_file", "invalid_utf8", "lone_surrogate"}


@pytest.mark.parametrize(("read_chunk_bytes", "max_bytes", "worker_max_compressed_bytes"),
                         [(7, 1, 1 << 20), (64, 7, 0), (5, 50, 1000), (1 << 20, 1 << 20, 1 << 20)])
def test_byte_ranges_parse_to_exactly_what_iter_documents_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                read_chunk_bytes: int, max_bytes: int,
                                                                worker_max_compressed_bytes: int) -> None:
    """With byte_ranges the cutter reads nothing and every worker reads its own range: each line must still be
    parsed exactly once (ranges as small as one byte, lines longer than a range, CRLF, BOM, no final newline, a
    blank file over many ranges), and bad records, numbered afterwards by LineNumberer, must equal the
    sequential reader's rows, in order. Compressed files go whole to the worker up to a size, else through the
    cutter; parquet by row group; arrow by the cutter, in blocks."""
    import pickle

    from data_pipeline import sources
    from data_pipeline.sources import (
        BadRecord,
        CompressedFile,
        FileRange,
        LineNumberer,
        ParquetRowGroup,
        parse_block,
        read_blocks,
    )

    inputs = _mixed_inputs(tmp_path)
    (tmp_path / "long.jsonl").write_bytes(b'{"text": "' + b"y" * 300 + b'"}\r\n{"text": "after"}\n{bad\n' * 3)
    files = expand_inputs([*inputs, tmp_path / "long.jsonl"], ["*"])
    expected_docs, expected_report = _read(files)
    monkeypatch.setattr(sources, "READ_CHUNK_BYTES", read_chunk_bytes)
    monkeypatch.setattr(sources, "WORKER_MAX_COMPRESSED_BYTES", worker_max_compressed_bytes)
    # 0: the parquet file's row groups count as too big for a worker, so the cutter reads it in batches.
    monkeypatch.setattr(sources, "PARQUET_WORKER_MAX_GROUP_BYTES", worker_max_compressed_bytes and (64 << 20))
    numberer = LineNumberer(files)
    docs: list[tuple[str, str]] = []
    rows: list[BadRecord] = []
    kinds: Counter[str] = Counter()
    for item in read_blocks(files, "text", 4096, max_bytes, byte_ranges=True):
        if isinstance(item, BadRecord):
            rows.append(item)
            continue
        kinds["arrow" if item.kind == "arrow" else type(item.data).__name__] += 1
        for entry in parse_block(pickle.loads(pickle.dumps(item)), "text"):  # as a worker receives it
            if isinstance(entry, Document):
                docs.append((entry.text, entry.source))
            else:
                rows.append(numberer.number(entry))
    assert docs == [(d.text, d.source) for d in expected_docs] and len(docs) > 300
    assert rows == expected_report.records
    assert kinds[FileRange.__name__]  # the worker-side readers really ran
    assert bool(kinds[ParquetRowGroup.__name__]) == bool(worker_max_compressed_bytes)
    assert bool(kinds["LargeBinaryArray"]) == (not worker_max_compressed_bytes)  # parquet batches read by the cutter
    assert kinds["arrow"] >= 4  # arrow: read by the cutter, 50 rows in 16-row batches
    compressed = [f for f in files if f.path.suffix in (".gz", ".zst")]
    num_whole = sum(f.path.stat().st_size <= worker_max_compressed_bytes for f in compressed)
    assert kinds[CompressedFile.__name__] == num_whole
    assert ("bytes" in kinds) == (num_whole < len(compressed))  # the cutter still decompresses the larger ones
    assert {r.reason for r in rows} >= {"truncated_gzip", "empty_file", "invalid_utf8", "malformed_json"}


def test_read_line_range_owns_the_lines_that_start_in_it(tmp_path: Path) -> None:
    from data_pipeline.sources import FileRange, read_line_range

    path = tmp_path / "f.jsonl"
    data = b"aa\nbbbbbbbb\n\ncc"
    path.write_bytes(data)
    pieces = [read_line_range(FileRange(str(path), start, min(start + 4, len(data)), False))
              for start in range(0, len(data), 4)]
    # [0,4) owns "aa\n" and "bbbbbbbb\n" (read past 4 to its end); [4,8) and [8,12) own nothing; [12,15) owns
    # the blank line and "cc", which has no final newline
    assert pieces == [(b"aa\nbbbbbbbb\n", 0), (b"", 8), (b"", 12), (b"\ncc", 12)]
    assert b"".join(piece for piece, _ in pieces) == data


def test_a_corrupt_parquet_row_group_loses_only_its_rows(tmp_path: Path) -> None:
    """Read by row group (prepare's workers), a damaged group is reported with its first row and the file's
    other groups are still read; the row count of the loss is in the detail."""
    from data_pipeline.sources import BadRecord, LineNumberer, parse_block, read_blocks

    path = tmp_path / "t.parquet"
    _write_texts(path, [f"row {i} ".encode() * 20 for i in range(300)], batch_rows=100)
    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(1).column(0)
    start = column.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start + 20 : start + 60] = b"\xff" * 40  # inside the second group's data page
    path.write_bytes(bytes(raw))
    files = expand_inputs([path], ["*"])
    numberer = LineNumberer(files)
    texts, rows = [], []
    for item in read_blocks(files, "text", 4096, 1 << 20, byte_ranges=True):
        entries = [item] if isinstance(item, BadRecord) else parse_block(item, "text")
        for entry in entries:
            (texts.append(entry.text) if isinstance(entry, Document) else rows.append(numberer.number(entry)))
    assert [(r.line, r.reason) for r in rows] == [(101, "corrupt_parquet")]
    assert "row group 1 (100 rows)" in rows[0].detail
    assert texts == [f"row {i} ".encode().decode() * 20 for i in (*range(100), *range(200, 300))]


def test_malformed_json_details_say_at_column_once() -> None:
    from data_pipeline.sources import parse_json_record

    _, reason, detail = parse_json_record(b'{"text": "never closed', "text")
    assert reason == "malformed_json" and "Unterminated string starting at column 10" in detail
    assert "at at" not in detail
