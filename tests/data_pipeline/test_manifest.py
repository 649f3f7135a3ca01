"""manifest.py: deterministic JSON, the documented fingerprint, validation messages, local and URL locations."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest

from data_pipeline.errors import DataPipelineError
from data_pipeline.manifest import (
    Manifest,
    ManifestError,
    SplitInfo,
    TokenizerInfo,
    write_dataset_from_arrays,
)
from data_pipeline.shards import ShardEntry, ShardSetWriter

TOKENIZER = TokenizerInfo(fingerprint="tok-fp-1", vocab_size=1000, model_type="bpe", unk_id=0, bos_id=1, eos_id=2,
                          pad_id=3)


def _samples(num_samples: int, sample_len_tokens: int = 9) -> np.ndarray:
    return (np.arange(num_samples * sample_len_tokens).reshape(num_samples, sample_len_tokens) % 1000).astype(np.uint16)


def _build(root: Path, num_train: int = 23, num_val: int = 7) -> Manifest:
    splits = {}
    for name, count in (("train", num_train), ("val", num_val)):
        with ShardSetWriter(root, name, 10, "uint16") as writer:
            writer.write_batch(_samples(count))
        splits[name] = SplitInfo.from_shards(writer.close(), num_tokens=count * 9, num_documents=count)
    manifest = Manifest.create(seq_len=8, dtype="uint16", samples_per_shard=10, tokenizer=TOKENIZER, splits=splits,
                               sources=[{"path": "in.jsonl", "split": "train", "num_documents": 3}],
                               bad_input={"total": 1, "by_reason": {"malformed_json": 1}},
                               prepare_args={"seq_len": 8, "seed": 1})
    manifest.save(root)
    return manifest


def test_save_load_roundtrip_and_deterministic_bytes(tmp_path: Path) -> None:
    manifest = _build(tmp_path / "a")
    loaded = Manifest.load(tmp_path / "a")
    assert loaded == manifest
    assert loaded.location == str(tmp_path / "a" / "manifest.json")
    assert Manifest.load(tmp_path / "a" / "manifest.json") == manifest
    assert loaded.sample_len_tokens == 9 and loaded.split("train").num_samples == 23
    assert [s.num_samples for s in loaded.split("train").shards] == [10, 10, 3]
    # Same input, another folder: identical manifest bytes (no timestamps, no absolute paths).
    _build(tmp_path / "b")
    text_a = (tmp_path / "a" / "manifest.json").read_text()
    assert text_a == (tmp_path / "b" / "manifest.json").read_text()
    assert str(tmp_path) not in text_a
    assert json.loads(text_a)["sample_len_tokens"] == 9
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_fingerprint_is_exactly_the_documented_hash(tmp_path: Path) -> None:
    manifest = _build(tmp_path)
    # Independent re-implementation of docs/data_pipeline.md, so a refactor cannot silently change the definition.
    content = {"format_version": 1, "seq_len": 8, "dtype": "uint16", "tokenizer_fingerprint": "tok-fp-1",
               "splits": {name: [[s.path, s.sha256, s.num_samples] for s in split.shards]
                          for name, split in manifest.splits.items()}}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert manifest.fingerprint == hashlib.sha256(canonical.encode("ascii")).hexdigest()


def test_fingerprint_covers_data_and_tokenizer_but_not_bookkeeping(tmp_path: Path) -> None:
    base = _build(tmp_path)
    kwargs = {"seq_len": 8, "dtype": "uint16", "samples_per_shard": 10, "tokenizer": TOKENIZER, "splits": base.splits}
    assert Manifest.create(**kwargs, sources=[], prepare_args={"other": 1}).fingerprint == base.fingerprint
    other_tokenizer = TokenizerInfo(**{**TOKENIZER.to_dict(), "fingerprint": "tok-fp-2"})
    assert Manifest.create(**{**kwargs, "tokenizer": other_tokenizer}).fingerprint != base.fingerprint
    shards = list(base.split("train").shards)
    shards[0] = ShardEntry(shards[0].path, "0" * 64, shards[0].num_samples, shards[0].num_bytes)
    changed = {**base.splits, "train": SplitInfo.from_shards(shards, 1, 1)}
    assert Manifest.create(**{**kwargs, "splits": changed}).fingerprint != base.fingerprint


def _edit(root: Path, change) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="something-else"), "is not a pretrain-token-shards manifest"),
    (lambda d: d.update(format_version=2), "format_version 2 but this code reads version 1"),
    (lambda d: d.pop("seq_len"), "lacks required key 'seq_len'"),
    (lambda d: d.update(surprise=1), r"unknown keys \['surprise'\]"),
    (lambda d: d["splits"]["train"]["shards"][0].update(sha256="f" * 64), "does not match its content"),
    (lambda d: d["splits"]["train"].update(num_samples=99), "records 99 samples but its shards hold 23"),
    (lambda d: d["splits"]["train"]["shards"][0].update(path="/abs/train-000000.tar"), "must be relative"),
    (lambda d: d["splits"]["train"]["shards"][0].update(path="../x.tar"), "must be relative"),
    (lambda d: d.update(dtype="float32"), "dtype 'float32' is not one of"),
    (lambda d: d.update(sample_len_tokens=7), "sample_len_tokens 7 != seq_len \\+ 1"),
])
def test_validation_errors_say_what_is_wrong(tmp_path: Path, change, message: str) -> None:
    _build(tmp_path)
    _edit(tmp_path, change)
    with pytest.raises(ManifestError, match=message) as err:
        Manifest.load(tmp_path)
    assert isinstance(err.value, DataPipelineError) and err.value.user_error
    assert str(tmp_path / "manifest.json") in str(err.value)


def test_short_shard_only_at_the_end_of_a_split(tmp_path: Path) -> None:
    entries = [ShardEntry("train/train-000000.tar", "a" * 64, 5, 100), ShardEntry("train/train-000001.tar", "b" * 64,
                                                                                    10, 100)]
    with pytest.raises(ManifestError, match="every shard but the last"):
        Manifest.create(seq_len=8, dtype="uint16", samples_per_shard=10, tokenizer=TOKENIZER,
                        splits={"train": SplitInfo.from_shards(entries, 1, 1)})


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest at .*complete only once"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        Manifest.load(tmp_path)
    _build(tmp_path / "ok")
    with pytest.raises(ManifestError, match=r"has no split 'test'; it has \['train', 'val'\]"):
        Manifest.load(tmp_path / "ok").split("test")
    unsaved = Manifest.create(seq_len=8, dtype="uint16", samples_per_shard=10, tokenizer=TOKENIZER, splits={})
    with pytest.raises(ManifestError, match="not loaded from a location"):
        unsaved.resolve("train/train-000000.tar")


def test_local_paths_resolve_in_place(tmp_path: Path) -> None:
    _build(tmp_path)
    manifest = Manifest.load(tmp_path)
    assert not manifest.is_remote
    assert manifest.resolve("train/train-000001.tar") == str(tmp_path / "train" / "train-000001.tar")


def test_file_url_and_memory_url(tmp_path: Path) -> None:
    _build(tmp_path)
    by_file_url = Manifest.load(f"file://{tmp_path}")
    assert by_file_url.is_remote and by_file_url.location == f"file://{tmp_path}/manifest.json"
    assert by_file_url.resolve("val/val-000000.tar") == f"file://{tmp_path}/val/val-000000.tar"
    memory = fsspec.filesystem("memory")
    memory.pipe("/manifest_test/ds/manifest.json", (tmp_path / "manifest.json").read_bytes())
    try:
        by_memory = Manifest.load("memory://manifest_test/ds")
        assert by_memory == Manifest.load(tmp_path)
        assert by_memory.resolve("train/train-000000.tar") == "memory://manifest_test/ds/train/train-000000.tar"
    finally:
        memory.rm("/manifest_test", recursive=True)


def test_write_dataset_from_arrays(tmp_path: Path) -> None:
    manifest = write_dataset_from_arrays(tmp_path, {"train": _samples(12), "val": _samples(3)}, samples_per_shard=5)
    assert manifest.seq_len == 8 and manifest.dtype == "uint16" and manifest.tokenizer.model_file is None
    assert [s.num_samples for s in manifest.split("train").shards] == [5, 5, 2]
    assert Manifest.load(tmp_path) == manifest
