"""inspect: manifest summary, sample decoding with the dataset's own tokenizer, --verify, the CLI subcommand."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from data_pipeline.errors import DataPipelineError, ShardIntegrityError
from data_pipeline.inspect import EOS_MARKER, inspect_dataset, read_sample, summarize
from data_pipeline.manifest import Manifest, TokenizerInfo, write_dataset_from_arrays
from launch.commands import inspect as inspect_command

SEQ_LEN = 24
DOCS = [f"Document {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(40)]


def _train_tokenizer() -> bytes:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(DOCS), model_writer=model, vocab_size=300, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        num_threads=1, minloglevel=2)
    return model.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset packed like prepare does: documents + eos, cut into samples of seq_len + 1 tokens."""
    root = tmp_path_factory.mktemp("inspect_data")
    model_proto = _train_tokenizer()
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    stream = np.concatenate([np.array(processor.encode(doc) + [2]) for doc in DOCS])
    num_samples = len(stream) // (SEQ_LEN + 1)
    samples = stream[: num_samples * (SEQ_LEN + 1)].reshape(num_samples, SEQ_LEN + 1)
    tokenizer = TokenizerInfo(fingerprint="test-bpe-300", vocab_size=300, model_type="bpe", unk_id=0, bos_id=1,
                              eos_id=2, pad_id=3, model_file="tokenizer/tokenizer.model")
    write_dataset_from_arrays(root, {"train": samples[:-3], "val": samples[-3:]}, samples_per_shard=8,
                              tokenizer=tokenizer)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.model").write_bytes(model_proto)
    return root


def _lines(dataset, **kwargs) -> str:
    printed: list[str] = []
    inspect_dataset(dataset, out=printed.append, **kwargs)
    return "\n".join(printed)


def test_summary_names_everything_a_user_checks(dataset: Path) -> None:
    manifest = Manifest.load(dataset)
    text = summarize(manifest)
    for expected in ("pretrain-token-shards v1", manifest.fingerprint, "bpe, vocab 300", "eos 2",
                     "tokenizer/tokenizer.model", f"seq_len {SEQ_LEN} ({SEQ_LEN + 1} tokens stored per sample)",
                     "dtype uint16", "split train", "bad input    0 records skipped"):
        assert expected in text, f"{expected!r} missing from:\n{text}"
    train = manifest.split("train")
    train_line = next(line for line in text.splitlines() if line.startswith("split train"))
    assert f"{train.num_samples:,} samples" in train_line and f"{len(train.shards)} shards" in train_line
    val_line = next(line for line in text.splitlines() if line.startswith("split val"))
    assert " 3 samples, 75 tokens, 3 documents, 1 shards" in val_line


def test_sample_decodes_to_the_packed_documents(dataset: Path) -> None:
    view = read_sample(Manifest.load(dataset), "train", 0)
    assert len(view.token_ids) == SEQ_LEN + 1
    # Sample 0 starts with document 0; an eos inside the sample shows up as the marker.
    assert view.text is not None and view.text.startswith(DOCS[0][:20])
    if 2 in view.token_ids.tolist():
        assert view.text.startswith(DOCS[0] + EOS_MARKER)
    output = _lines(dataset, split="val", sample=1)
    assert "sample 1 of split val (val/val-000000.tar, sample 1 in shard)" in output
    assert "\nids   " in output and f"\ntext  ({EOS_MARKER} marks document ends)" in output


def test_out_of_range_sample_is_a_clear_error(dataset: Path) -> None:
    with pytest.raises(DataPipelineError, match=r"has samples 0\.\.2; --sample 3 is out of range"):
        _lines(dataset, split="val", sample=3)


def test_verify_passes_then_names_a_corrupted_shard(dataset: Path, tmp_path: Path) -> None:
    assert "all " in _lines(dataset, verify=True) and "shards match their sha256" in _lines(dataset, verify=True)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    shard = copy / "train" / "train-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[600] ^= 0xFF
    shard.write_bytes(bytes(raw))
    printed: list[str] = []
    with pytest.raises(ShardIntegrityError, match="1 of .* shards failed verification"):
        inspect_dataset(copy, verify=True, out=printed.append)
    assert any(line.startswith("FAILED") and "train/train-000001.tar" in line for line in printed)


def test_remote_dataset_and_no_tokenizer(dataset: Path, tmp_path: Path) -> None:
    output = _lines(f"file://{dataset}", sample=2, cache_dir=str(tmp_path / "cache"))
    assert f"dataset      file://{dataset}/manifest.json" in output and "text  (" in output
    bare = tmp_path / "bare"
    write_dataset_from_arrays(bare, {"train": np.arange(50).reshape(2, 25)}, samples_per_shard=4)
    assert "ids only" in _lines(bare, sample=1)


def test_cli_subcommand_runs_and_help_has_an_example(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser(prog="pretrain")
    inspect_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["inspect", str(dataset), "--split", "val", "--sample", "0", "--verify"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "fingerprint" in out and "sample 0 of split val" in out and "shards match" in out
    with pytest.raises(SystemExit):
        parser.parse_args(["inspect", "--help"])
    assert "pretrain inspect data/tiny --sample 0" in capsys.readouterr().out  # the worked example
    # Registering and --help must not import heavy modules (the CLI contract in launch/cli.py).
    code = ("import argparse, sys; from launch.commands import inspect as c\n"
            "p = argparse.ArgumentParser(); c.register(p.add_subparsers()); p.format_help()\n"
            "print(','.join(m for m in ('torch', 'sentencepiece', 'numpy', 'webdataset') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.stdout.strip() == ""
