"""prepare.py: exact counts, eos between documents, packing, byte-identical re-runs for any num_proc, val splits,
uint16/uint32, and shards that plain webdataset reads back; the workers' spool stays bounded and is removed whatever
happens, and a dead worker is an error, not a hang. Plus one run of the real CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.errors import BadInputError, DataPipelineError
from data_pipeline.manifest import Manifest
from data_pipeline.prepare import PrepareConfig, PrepareResult, TaskEncoder, prepare
from data_pipeline.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN = 63  # samples of 64 tokens
SAMPLES_PER_SHARD = 7


def _documents(num_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "de", "an", "el", "or", "um", "ix"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(150)]
    docs = []
    for _ in range(num_docs):
        lines = [" " * rng.choice((0, 4)) + " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
                 for _ in range(rng.randint(1, 6))]
        docs.append("\n".join(lines) + rng.choice(("", "\n", " é\n")))
    return docs


def _jsonl(docs: list[str]) -> bytes:
    return b"".join(json.dumps({"text": d}).encode() + b"\n" for d in docs)


class Corpus:
    """Inputs in the order they are passed, the good documents in reading order, and the bad records."""

    def __init__(self, root: Path) -> None:
        self.root = root
        sizes_and_seeds = ((40, 1), (20, 2), (3, 3), (10, 4))
        jsonl_docs, gz_docs, text_docs, parquet_docs = (_documents(n, s) for n, s in sizes_and_seeds)
        (root / "a.jsonl").write_bytes(_jsonl(jsonl_docs[:20]) + b'{"text": broken\n' + _jsonl(jsonl_docs[20:])
                                       + b'{"text": "   "}\n')
        (root / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl(gz_docs), mtime=0))
        (root / "texts").mkdir()
        for i, doc in enumerate(text_docs):
            (root / "texts" / f"{i}.txt").write_text(doc, encoding="utf-8")
        (root / "texts" / "9-empty.txt").write_bytes(b"")
        column = pa.array(parquet_docs[:5] + [None] + parquet_docs[5:], type=pa.string())
        pq.write_table(pa.table({"text": column}), root / "c.parquet", row_group_size=4)
        self.inputs = (str(root / "a.jsonl"), str(root / "b.jsonl.gz"), str(root / "texts"), str(root / "c.parquet"))
        self.docs = jsonl_docs + gz_docs + text_docs + parquet_docs
        self.doc_sources = (["a.jsonl"] * 40 + ["b.jsonl.gz"] * 20 + [f"texts/{i}.txt" for i in range(3)]
                            + ["c.parquet"] * 10)
        self.bad_rows = [("a.jsonl", "21", "malformed_json"), ("a.jsonl", "42", "empty_document"),
                         ("texts/9-empty.txt", "0", "empty_file"), ("c.parquet", "6", "text_not_string")]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("prep_corpus"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prep_tok")
    (root / "train.jsonl").write_bytes(_jsonl(_documents(400, 99)))
    out = root / "tok"
    train_tokenizer(TokenizerTrainConfig(inputs=(str(root / "train.jsonl"),), output_dir=str(out), vocab_size=320,
                                         input_sentence_size=0, num_threads=2))
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


def _stream(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """The definition: each document's ids followed by eos, concatenated in input order."""
    parts = [np.append(ids, tokenizer.eos_id) for ids in tokenizer.encode(docs)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)


def _run(corpus: Corpus, tokenizer_dir: Path, out: Path, **overrides: object) -> PrepareResult:
    settings: dict[str, object] = {"seq_len": SEQ_LEN, "samples_per_shard": SAMPLES_PER_SHARD, "num_proc": 1,
                                   "progress": False}
    settings.update(overrides)
    return prepare(PrepareConfig(inputs=corpus.inputs, tokenizer=str(tokenizer_dir), output_dir=str(out),
                                 **settings))  # type: ignore[arg-type]


def _read_webdataset(out: Path, split: str, manifest: Manifest) -> tuple[list[str], np.ndarray]:
    import webdataset

    urls = [str(out / s.path) for s in manifest.split(split).shards]
    keys, arrays = [], []
    for sample in webdataset.WebDataset(urls, shardshuffle=False).decode():
        keys.append(sample["__key__"])
        arrays.append(sample["npy"])
    assert all(a.dtype == np.dtype(manifest.dtype) and a.shape == (SEQ_LEN + 1,) for a in arrays)
    return keys, (np.stack(arrays) if arrays else np.empty((0, SEQ_LEN + 1)))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_counts_stream_eos_and_webdataset_readback(corpus: Corpus, tokenizer_dir: Path, tokenizer: Tokenizer,
                                                   tmp_path: Path) -> None:
    result = _run(corpus, tokenizer_dir, tmp_path / "out")
    manifest = Manifest.load(tmp_path / "out")
    stream = _stream(tokenizer, corpus.docs)
    sample_len = SEQ_LEN + 1
    num_samples = len(stream) // sample_len
    train = manifest.split("train")
    assert list(manifest.splits) == ["train"] and manifest.dtype == "uint16"
    assert (train.num_documents, train.num_samples) == (73, num_samples)
    assert (train.num_tokens, train.dropped_tail_tokens) == (num_samples * sample_len, len(stream) % sample_len)
    assert [s.num_samples for s in train.shards] == [SAMPLES_PER_SHARD] * (num_samples // SAMPLES_PER_SHARD) + (
        [num_samples % SAMPLES_PER_SHARD] if num_samples % SAMPLES_PER_SHARD else [])

    keys, samples = _read_webdataset(tmp_path / "out", "train", manifest)
    assert keys == [f"train-{i // SAMPLES_PER_SHARD:06d}-{i % SAMPLES_PER_SHARD:06d}" for i in range(num_samples)]
    assert np.array_equal(samples.reshape(-1), stream[: num_samples * sample_len])
    # eos sits exactly after each document, so documents can be recovered from the packed stream.
    flat = samples.reshape(-1)
    doc_ends = np.cumsum([len(ids) + 1 for ids in tokenizer.encode(corpus.docs)]) - 1
    assert np.array_equal(np.flatnonzero(flat == tokenizer.eos_id), doc_ends[doc_ends < len(flat)])
    assert tokenizer.decode(flat[: doc_ends[0]]) == corpus.docs[0]

    assert manifest.bad_input == {"total": 4, "report_file": "bad_input_report.tsv",
                                  "by_reason": {"empty_document": 1, "empty_file": 1, "malformed_json": 1,
                                                "text_not_string": 1}}
    rows = [tuple(line.split("\t")[:3]) for line in result.report_path.read_text().splitlines()]
    assert rows == [("file", "line", "reason"), *corpus.bad_rows]
    assert [(s["path"], s["split"], s["num_documents"], s["num_skipped"]) for s in manifest.sources] == [
        ("a.jsonl", "train", 40, 2), ("b.jsonl.gz", "train", 20, 0), ("texts/0.txt", "train", 1, 0),
        ("texts/1.txt", "train", 1, 0), ("texts/2.txt", "train", 1, 0), ("texts/9-empty.txt", "train", 0, 1),
        ("c.parquet", "train", 10, 1)]
    assert manifest.sources[0]["num_bytes"] == sum(len(d.encode()) for d in corpus.docs[:40])
    assert manifest.tokenizer.fingerprint == tokenizer.fingerprint and manifest.tokenizer.eos_id == 2
    assert (tmp_path / "out/tokenizer/tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()
    assert (tmp_path / "out/tokenizer/tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    assert str(tmp_path) not in (tmp_path / "out/manifest.json").read_text()  # no host paths


@pytest.mark.parametrize("num_proc", [1, 2])
def test_arrow_files_as_hf_datasets_writes_them_prepare_like_the_same_jsonl(tokenizer_dir: Path, tokenizer: Tokenizer,
                                                                           tmp_path: Path, num_proc: int) -> None:
    """A `datasets.save_to_disk` directory holds .arrow files in the IPC stream format (1000-row batches, the text
    beside other columns): prepared with --include '*.arrow', the token stream is that of the same documents as
    JSON Lines, and the rows are the report's lines."""
    docs = _documents(60, seed=7)
    hf_dir = tmp_path / "hf_dataset"
    hf_dir.mkdir()
    (hf_dir / "state.json").write_text("{}")  # what else save_to_disk writes: not an input
    for index, part in enumerate((docs[:35], [*docs[35:], None])):
        table = pa.table({"id": list(range(len(part))), "text": pa.array(part, type=pa.string())})
        with pa.ipc.new_stream(str(hf_dir / f"data-{index:05d}-of-00002.arrow"), table.schema) as writer:
            for batch in table.to_batches(max_chunksize=8):
                writer.write_batch(batch)
    (tmp_path / "same.jsonl").write_bytes(_jsonl(docs))
    settings = {"seq_len": SEQ_LEN, "samples_per_shard": SAMPLES_PER_SHARD, "num_proc": num_proc, "progress": False}
    result = prepare(PrepareConfig(inputs=(str(hf_dir),), include_globs=("*.arrow",), tokenizer=str(tokenizer_dir),
                                   output_dir=str(tmp_path / "from_arrow"), **settings))  # type: ignore[arg-type]
    prepare(PrepareConfig(inputs=(str(tmp_path / "same.jsonl"),), tokenizer=str(tokenizer_dir),
                          output_dir=str(tmp_path / "from_jsonl"), **settings))  # type: ignore[arg-type]
    arrow, jsonl = (Manifest.load(tmp_path / name) for name in ("from_arrow", "from_jsonl"))
    _, arrow_samples = _read_webdataset(tmp_path / "from_arrow", "train", arrow)
    _, jsonl_samples = _read_webdataset(tmp_path / "from_jsonl", "train", jsonl)
    stream = _stream(tokenizer, docs)
    assert len(arrow_samples) == len(stream) // (SEQ_LEN + 1) > 0
    assert np.array_equal(arrow_samples, jsonl_samples)
    assert [(s["path"], s["num_documents"], s["num_skipped"]) for s in arrow.sources] == [
        ("hf_dataset/data-00000-of-00002.arrow", 35, 0), ("hf_dataset/data-00001-of-00002.arrow", 25, 1)]
    rows = [tuple(line.split("\t")[:3]) for line in result.report_path.read_text().splitlines()[1:]]
    assert rows == [("hf_dataset/data-00001-of-00002.arrow", "26", "text_not_string")]


def test_reruns_and_num_proc_give_byte_identical_files(corpus: Corpus, tokenizer_dir: Path, tmp_path: Path) -> None:
    _run(corpus, tokenizer_dir, tmp_path / "one")
    first = _tree_bytes(tmp_path / "one")
    # Small batches so that two workers really interleave; the output must not notice.
    _run(corpus, tokenizer_dir, tmp_path / "two", num_proc=2, batch_max_docs=3)
    assert _tree_bytes(tmp_path / "two") == first
    _run(corpus, tokenizer_dir, tmp_path / "one", overwrite=True)
    assert _tree_bytes(tmp_path / "one") == first
    # Tasks of one record or a few bytes: some hold only a skipped record (no document at all).
    _run(corpus, tokenizer_dir, tmp_path / "tiny", num_proc=1, batch_max_docs=1, batch_max_bytes=16)
    assert _tree_bytes(tmp_path / "tiny") == first
    expected_files = {"manifest.json", "bad_input_report.tsv", "tokenizer/tokenizer.model", "train/train-000000.tar"}
    assert expected_files <= set(first)


def test_existing_dataset_is_refused_unless_overwrite(corpus: Corpus, tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(corpus, tokenizer_dir, out, samples_per_shard=2)
    many_shards = sorted(p.name for p in (out / "train").iterdir())
    with pytest.raises(DataPipelineError, match="already holds a prepared dataset .*pass --overwrite"):
        _run(corpus, tokenizer_dir, out)
    result = _run(corpus, tokenizer_dir, out, overwrite=True, samples_per_shard=50)
    # No stale shard of the first run is left behind.
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        s.path.split("/")[-1] for s in result.manifest.split("train").shards]
    assert len(many_shards) > len(result.manifest.split("train").shards)


def _is_val(text: str, seed: int, fraction: float) -> bool:
    """The documented split rule: keyed blake2b of the UTF-8 text, as a fraction of 2**64."""
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def test_val_split_by_fraction(corpus: Corpus, tokenizer_dir: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    result = _run(corpus, tokenizer_dir, tmp_path / "out", val_fraction=0.3, seed=5)
    manifest = result.manifest
    is_val = [_is_val(d, 5, 0.3) for d in corpus.docs]
    assert 5 < sum(is_val) < 40
    for split, wanted in (("train", False), ("val", True)):
        docs = [d for d, v in zip(corpus.docs, is_val) if v == wanted]
        stream = _stream(tokenizer, docs)
        info = manifest.split(split)
        assert info.num_documents == len(docs)
        assert info.num_samples == len(stream) // (SEQ_LEN + 1)
        assert info.dropped_tail_tokens == len(stream) % (SEQ_LEN + 1)
        keys, samples = _read_webdataset(tmp_path / "out", split, manifest)
        assert np.array_equal(samples.reshape(-1), stream[: info.num_tokens])
        assert all(k.startswith(f"{split}-") for k in keys)
    val_sources = {s["path"]: s["num_documents"] for s in manifest.sources if s["split"] == "val"}
    expected = {}
    for source, v in zip(corpus.doc_sources, is_val):
        if v:
            expected[source] = expected.get(source, 0) + 1
    assert val_sources == expected
    assert sum(s["num_skipped"] for s in manifest.sources) == manifest.bad_input["total"] == 4
    assert manifest.prepare_args["val_fraction"] == 0.3 and manifest.prepare_args["val_split"] == "fraction"


def test_val_split_by_files(corpus: Corpus, tokenizer_dir: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    val_docs = _documents(12, 7)
    (tmp_path / "heldout.jsonl").write_bytes(_jsonl(val_docs))
    result = _run(corpus, tokenizer_dir, tmp_path / "out", val_inputs=(str(tmp_path / "heldout.jsonl"),))
    val = result.manifest.split("val")
    stream = _stream(tokenizer, val_docs)
    assert (val.num_documents, val.num_samples) == (12, len(stream) // (SEQ_LEN + 1))
    assert result.manifest.split("train").num_documents == 73
    assert result.manifest.sources[-1] == {"path": "heldout.jsonl", "split": "val", "num_documents": 12,
                                           "num_bytes": sum(len(d.encode()) for d in val_docs), "num_skipped": 0}
    _, samples = _read_webdataset(tmp_path / "out", "val", result.manifest)
    assert np.array_equal(samples.reshape(-1), stream[: val.num_tokens])
    with pytest.raises(DataPipelineError, match="either --val-input .* or --val-fraction"):
        _run(corpus, tokenizer_dir, tmp_path / "x", val_inputs=(str(tmp_path / "heldout.jsonl"),), val_fraction=0.1)
    with pytest.raises(DataPipelineError, match="both --input and --val-input"):
        _run(corpus, tokenizer_dir, tmp_path / "y", val_inputs=(corpus.inputs[0],))


@pytest.mark.parametrize("num_proc", [1, 2])
def test_train_and_val_files_with_one_name_stay_apart(tokenizer_dir: Path, tmp_path: Path, num_proc: int) -> None:
    """/data/train/part.jsonl and /data/val/part.jsonl (absolute paths) would both be named part.jsonl: the val
    one gets its parent directory, so report rows, line numbers and manifest sources name the right file."""
    for split, bad_line in (("train", 3), ("val", 5)):
        (tmp_path / split).mkdir()
        lines = [json.dumps({"text": d}) for d in _documents(8, bad_line)]
        lines.insert(bad_line - 1, '{"text": broken')
        (tmp_path / split / "part.jsonl").write_text("\n".join(lines) + "\n")
    result = prepare(PrepareConfig(inputs=(str(tmp_path / "train" / "part.jsonl"),), tokenizer=str(tokenizer_dir),
                                   val_inputs=(str(tmp_path / "val" / "part.jsonl"),), output_dir=str(tmp_path / "o"),
                                   seq_len=7, num_proc=num_proc, batch_max_bytes=64, progress=False))
    assert [(r.file, r.line, r.reason) for r in result.report.records] == [
        ("part.jsonl", 3, "malformed_json"), ("val/part.jsonl", 5, "malformed_json")]
    assert [(s["path"], s["split"], s["num_documents"], s["num_skipped"]) for s in result.manifest.sources] == [
        ("part.jsonl", "train", 8, 1), ("val/part.jsonl", "val", 8, 1)]


def test_vocab_over_65536_uses_uint32(corpus: Corpus, tmp_path: Path) -> None:
    import sentencepiece as spm

    # 65,600 user-defined symbols push the byte and learned pieces past id 65,535 (fast to train).
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.docs[:20]), model_writer=model, model_type="bpe", vocab_size=65950,
        user_defined_symbols=[f"<u{i}>" for i in range(65600)], byte_fallback=True, hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        minloglevel=2,
    )
    (tmp_path / "big.model").write_bytes(model.getvalue())
    tokenizer = Tokenizer.load(tmp_path / "big.model")
    assert tokenizer.vocab_size > 65536
    result = _run(corpus, tmp_path / "big.model", tmp_path / "out")
    assert result.manifest.dtype == "uint32"
    _, samples = _read_webdataset(tmp_path / "out", "train", result.manifest)
    stream = _stream(tokenizer, corpus.docs)
    assert samples.max() > 65535 and np.array_equal(samples.reshape(-1), stream[: samples.size])
    # A bare .model has no tokenizer.json: the dataset gets one generated from the model.
    assert json.loads((tmp_path / "out/tokenizer/tokenizer.json").read_text())["fingerprint"] == tokenizer.fingerprint


def test_strict_mode_stops_without_a_manifest(corpus: Corpus, tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="a.jsonl:21: malformed_json"):
        _run(corpus, tokenizer_dir, tmp_path / "out", strict=True, num_proc=2)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_too_little_text_for_one_sample(corpus: Corpus, tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataPipelineError, match="fewer tokens than one sample of 100001"):
        _run(corpus, tokenizer_dir, tmp_path / "out", seq_len=100_000)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_tokenizer_train_then_prepare(corpus: Corpus, tmp_path: Path) -> None:
    from launch.cli import COMMAND_MODULES

    assert "launch.commands.data" in COMMAND_MODULES, "add 'launch.commands.data' to COMMAND_MODULES in launch/cli.py"

    def pretrain(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "launch", *args], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = pretrain("tokenizer", "train", "--input", corpus.inputs[0], "--input", corpus.inputs[2],
                   "--output", str(tmp_path / "tok"), "--vocab-size", "300", "--num-threads", "2")
    assert "trained bpe tokenizer: 300 pieces" in out and "bad input: 3 skipped" in out
    out = pretrain("prepare", *[a for i in corpus.inputs for a in ("--input", i)], "--tokenizer", str(tmp_path / "tok"),
                   "--output", str(tmp_path / "data"), "--seq-len", "31", "--num-proc", "2", "--no-progress")
    assert "train: " in out and "val: " in out and "4 skipped" in out
    manifest = Manifest.load(tmp_path / "data")
    assert manifest.prepare_args["val_fraction"] == 0.01 and manifest.seq_len == 31
    proc = subprocess.run([sys.executable, "-m", "launch", "prepare", "--input", str(tmp_path / "missing"),
                           "--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "d2")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "input path does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_report_and_strict_stop_do_not_depend_on_workers_or_task_size(corpus: Corpus, tokenizer_dir: Path,
                                                                      tmp_path: Path) -> None:
    """Records are parsed in the workers, stream errors are found by the main process: the report must still list
    every problem once, in input order, and strict mode must stop at the first one, as one sequential reader does."""
    full = gzip.compress(_jsonl(_documents(300, 5)), mtime=0)
    cut = full[: len(full) // 2]
    (tmp_path / "cut.jsonl.gz").write_bytes(cut)
    kept_lines = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")
    (tmp_path / "val.jsonl").write_bytes(_jsonl(_documents(30, 6)) + b"[1]\n" + _jsonl(_documents(5, 8))
                                         + b'{"text": 3}\n')

    def run(out: str, inputs: tuple[str, ...], **overrides: object) -> None:
        prepare(PrepareConfig(inputs=inputs, val_inputs=(str(tmp_path / "val.jsonl"),), tokenizer=str(tokenizer_dir),
                              output_dir=str(tmp_path / out), seq_len=SEQ_LEN, samples_per_shard=SAMPLES_PER_SHARD,
                              progress=False, **overrides))  # type: ignore[arg-type]

    inputs = (*corpus.inputs, str(tmp_path / "cut.jsonl.gz"))
    run("one", inputs, num_proc=1)
    run("two", inputs, num_proc=2, batch_max_docs=2, batch_max_bytes=300)  # tiny tasks, two workers interleave
    assert _tree_bytes(tmp_path / "two") == _tree_bytes(tmp_path / "one")
    report = (tmp_path / "one" / "bad_input_report.tsv").read_text().splitlines()
    assert [tuple(line.split("\t")[:3]) for line in report[1:]] == [
        *corpus.bad_rows, ("cut.jsonl.gz", str(kept_lines + 1), "truncated_gzip"),
        ("val.jsonl", "31", "not_an_object"), ("val.jsonl", "37", "text_not_string")]

    strict_inputs = (corpus.inputs[1], str(tmp_path / "cut.jsonl.gz"))  # first problem: the truncation, found last
    messages = []
    for num_proc, task_bytes in ((1, 1 << 20), (2, 300)):
        with pytest.raises(BadInputError) as err:
            run(f"strict{num_proc}", strict_inputs, strict=True, num_proc=num_proc, batch_max_bytes=task_bytes)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and messages[0].startswith(f"cut.jsonl.gz:{kept_lines + 1}: truncated_gzip")


def test_tokenizer_json_of_another_training_is_refused(corpus: Corpus, tokenizer_dir: Path, tmp_path: Path) -> None:
    other = train_tokenizer(TokenizerTrainConfig(inputs=(corpus.inputs[0],), output_dir=str(tmp_path / "other"),
                                                 vocab_size=300, input_sentence_size=0, num_threads=2))
    mixed = tmp_path / "mixed"
    shutil.copytree(tokenizer_dir, mixed)
    shutil.copyfile(other.model_path, mixed / "tokenizer.model")  # tokenizer.json now describes another model
    with pytest.raises(DataPipelineError, match="records fingerprint .* the files come from different trainings"):
        _run(corpus, mixed, tmp_path / "out")


_SPOOL_WATCHER = textwrap.dedent("""
    import os, sys, time
    root, out = sys.argv[1], sys.argv[2]
    peak_bytes = 0
    while not os.path.exists(out + ".stop"):
        total = 0
        for dirpath, _, names in os.walk(root):
            for name in names:
                try:
                    total += os.path.getsize(os.path.join(dirpath, name))
                except OSError:
                    pass
        peak_bytes = max(peak_bytes, total)
        time.sleep(0.001)
    open(out, "w").write(str(peak_bytes))
""")


def test_spool_is_bounded_and_removed_and_output_equals_one_process(tokenizer_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "big.jsonl").write_bytes(_jsonl(_documents(800, 7)))
    spool = tmp_path / "spool"
    spool.mkdir()
    peak_file = tmp_path / "peak"
    task_bytes = 512

    def run(name: str, num_proc: int) -> PrepareResult:
        return prepare(PrepareConfig(inputs=(str(tmp_path / "big.jsonl"),), tokenizer=str(tokenizer_dir),
                                     output_dir=str(tmp_path / name), seq_len=SEQ_LEN,
                                     samples_per_shard=SAMPLES_PER_SHARD, num_proc=num_proc,
                                     batch_max_bytes=task_bytes, spool_dir=str(spool), progress=False))

    watcher = subprocess.Popen([sys.executable, "-c", _SPOOL_WATCHER, str(spool), str(peak_file)])
    try:
        result = run("two", num_proc=2)
    finally:
        Path(str(peak_file) + ".stop").touch()
        watcher.wait(timeout=30)
    run("one", num_proc=1)
    assert _tree_bytes(tmp_path / "two") == _tree_bytes(tmp_path / "one")
    assert list(spool.iterdir()) == []  # the run's spool folder is gone
    # In flight at most: 2 x num_proc tasks (a token per input byte at worst, plus an eos per document) and the
    # shards being written plus the one being filled (num_proc + 1), 2 bytes per token.
    shard_tokens = SAMPLES_PER_SHARD * (SEQ_LEN + 1)
    bound_bytes = 2 * (2 * 2 * 2 * task_bytes + (2 + 1) * shard_tokens)
    total_bytes = 2 * result.manifest.split("train").num_tokens
    assert total_bytes > 3 * bound_bytes  # so a spool that kept everything would fail the bound
    peak_bytes = int(peak_file.read_text())
    assert 0 < peak_bytes <= bound_bytes, (peak_bytes, bound_bytes)


def test_a_killed_worker_is_an_error_and_leaves_no_spool(corpus: Corpus, tokenizer_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    encode = TaskEncoder.__call__
    calls = []

    def encode_then_die(self, task, sink=None):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:  # the workers are forked, so each has its own count: each dies at its third task
            os.kill(os.getpid(), signal.SIGKILL)
        return encode(self, task, sink)

    monkeypatch.setattr(TaskEncoder, "__call__", encode_then_die)
    spool = tmp_path / "spool"
    spool.mkdir()
    with pytest.raises(DataPipelineError, match="worker process died"):
        _run(corpus, tokenizer_dir, tmp_path / "out", num_proc=2, batch_max_bytes=256, spool_dir=str(spool))
    assert list(spool.iterdir()) == []
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").rglob("*.tmp"))


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_missing_spool_dir_is_refused_before_work(corpus: Corpus, tokenizer_dir: Path, tmp_path: Path,
                                                    num_proc: int) -> None:
    with pytest.raises(DataPipelineError, match="--spool-dir .*nope is not a directory; create it"):
        prepare(PrepareConfig(inputs=corpus.inputs, tokenizer=str(tokenizer_dir), output_dir=str(tmp_path / "o"),
                              num_proc=num_proc, spool_dir=str(tmp_path / "nope"), progress=False))
    assert not (tmp_path / "o").exists()


def test_a_whole_compressed_file_task_streams_in_batches(tokenizer: Tokenizer, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker reads a .gz/.zst of up to 64 MiB whole (it cannot be split): its documents must go through
    sentencepiece and into the sink batch by batch, so memory does not grow with the file; the tokens are the same
    as encoding every document at once."""
    from data_pipeline import prepare as prepare_module
    from data_pipeline.prepare import EncodeSettings, MemorySink
    from data_pipeline.sources import CompressedFile, RecordBlock, expand_inputs, read_blocks

    docs = _documents(300, 11)
    path = tmp_path / "big.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl(docs), mtime=0))
    (block,) = read_blocks(expand_inputs([path], ["*"]), "text", byte_ranges=True)
    assert isinstance(block, RecordBlock) and isinstance(block.data, CompressedFile)

    class CountingSink(MemorySink):
        adds = 0

        def add(self, train: np.ndarray, val: np.ndarray) -> None:
            CountingSink.adds += 1
            super().add(train, val)

    monkeypatch.setattr(prepare_module, "ENCODE_BATCH_CHARS", 2000)
    encoder = TaskEncoder(tokenizer, EncodeSettings("uint16", tokenizer.eos_id, 0.0, 1234, "text"))
    encoded = encoder([(block, 0)], CountingSink(np.dtype("<u2")))
    assert CountingSink.adds >= sum(map(len, docs)) // 2000 > 10
    train, val = encoded.tokens
    np.testing.assert_array_equal(train.ref, _stream(tokenizer, docs))
    assert val.count == 0 and encoded.num_documents == 300


def _prepare_cli_in_flight(tokenizer_dir: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """`pretrain prepare` with 2 workers on ~5M tokens (about a second), returned once its first spool file exists."""
    (tmp_path / "in.jsonl").write_bytes(_jsonl(_documents(3000, 5)) * 40)
    spool = tmp_path / "spool"
    spool.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "launch", "prepare", "--input", str(tmp_path / "in.jsonl"),
                             "--tokenizer", str(tokenizer_dir), "--output", str(tmp_path / "out"), "--seq-len", "63",
                             "--num-proc", "2", "--spool-dir", str(spool), "--no-progress"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not any(spool.rglob("*.train")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.fail(f"prepare ended before it could be stopped:\n{proc.communicate()[0]}")
    return proc, spool


def test_sigterm_removes_the_spool_and_partial_shards(tokenizer_dir: Path, tmp_path: Path) -> None:
    """scancel sends SIGTERM: `pretrain prepare` stops with 143 and leaves no spool, no temp shard, no manifest."""
    proc, spool = _prepare_cli_in_flight(tokenizer_dir, tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 143, output
    assert list(spool.iterdir()) == []
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_workers_die_with_a_killed_main_process(tokenizer_dir: Path, tmp_path: Path) -> None:
    """SIGKILL (OOM killer, Slurm after the grace period) cannot be handled: the workers must not outlive the main
    process, waiting forever on its task queue."""
    proc, _ = _prepare_cli_in_flight(tokenizer_dir, tmp_path)
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 2, children
        proc.kill()
        proc.communicate(timeout=10)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(Path(f"/proc/{pid}").exists() for pid in children), "a worker outlived the main process"
    finally:
        proc.kill()
