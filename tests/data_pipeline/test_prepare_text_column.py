"""A parquet or arrow file without the --text-key column stops `prepare` before any work (issue 14.5): the message
names the file, the columns it has and the fix; --skip-files-without-text-key skips it and counts it with its rows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.tokenizer import TokenizerTrainConfig, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def _docs(count: int, seed: int) -> list[str]:
    return [" ".join(WORDS[(seed + i * k) % len(WORDS)] for k in range(40)) for i in range(count)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("text_column")
    (root / "tok.txt").write_text("\n".join(_docs(200, 1)))
    train_tokenizer(TokenizerTrainConfig(inputs=(str(root / "tok.txt"),), output_dir=str(root / "tok"),
                                         vocab_size=300, input_sentence_size=0, num_threads=1))
    pq.write_table(pa.table({"text": _docs(300, 2)}), root / "good.parquet")
    pq.write_table(pa.table({"body": _docs(7, 3), "url": ["u"] * 7}), root / "body.parquet")
    body = pa.table({"body": _docs(5, 4), "url": ["u"] * 5})
    with pa.ipc.new_stream(str(root / "body.arrow"), body.schema) as writer:  # as HF datasets writes .arrow
        writer.write_table(body, max_chunksize=2)
    return root


def _prepare(root: Path, out: str, *files: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    args = ["prepare", "--input", *(str(root / f) for f in files), "--tokenizer", str(root / "tok"),
            "--output", str(root / out), "--seq-len", "16", "--num-proc", "1", "--no-progress", *extra]
    return subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize("files", [("body.parquet",), ("good.parquet", "body.parquet"), ("good.parquet", "body.arrow")],
                         ids=["alone", "with-good", "arrow"])
def test_a_file_without_the_text_column_stops_prepare_before_any_work(inputs: Path, files: tuple) -> None:
    out = _prepare(inputs, f"out-{'-'.join(files)}", *files)
    assert out.returncode == 2, out.stderr
    assert "1 parquet/arrow file(s) have no column 'text' (--text-key)" in out.stderr
    assert f"{files[-1]}: columns body, url" in out.stderr and "pass --text-key <column>" in out.stderr
    assert "--skip-files-without-text-key" in out.stderr and "Traceback" not in out.stderr
    assert not (inputs / f"out-{'-'.join(files)}").exists()  # stopped before the output directory was made


def test_skip_files_without_text_key_counts_the_file_with_its_rows(inputs: Path) -> None:
    out = _prepare(inputs, "skipped", "good.parquet", "body.parquet", extra=("--skip-files-without-text-key",))
    assert out.returncode == 0, out.stderr
    report = (inputs / "skipped" / "bad_input_report.tsv").read_text()
    assert "body.parquet\t0\tmissing_text_column\tfile skipped: 7 rows, no column 'text' (columns: body, url)" in report
    out = _prepare(inputs, "skipped-arrow", "good.parquet", "body.arrow", extra=("--skip-files-without-text-key",))
    assert out.returncode == 0, out.stderr
    report = (inputs / "skipped-arrow" / "bad_input_report.tsv").read_text()
    assert "body.arrow\t0\tmissing_text_column\tfile skipped: 5 rows, no column 'text' (columns: body, url)" in report
