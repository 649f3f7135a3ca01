"""shards.py: deterministic webdataset-compatible bytes, zero-copy reads, and clear integrity errors."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.errors import DataPipelineError, ShardIntegrityError
from data_pipeline.shards import (
    ShardEntry,
    ShardReader,
    ShardSetWriter,
    sample_key,
    sha256_file,
    shard_relpath,
    token_dtype_name,
    verify_shard_file,
)

SAMPLE_LEN_TOKENS = 33
SAMPLES_PER_SHARD = 10


def _samples(num_samples: int, dtype: type = np.uint16, max_id: int = 60000) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, max_id, size=(num_samples, SAMPLE_LEN_TOKENS)).astype(dtype)


def _write(root: Path, samples: np.ndarray, dtype: str = "uint16", split: str = "train") -> list[ShardEntry]:
    with ShardSetWriter(root, split, SAMPLES_PER_SHARD, dtype) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.close()


def test_layout_counts_and_no_temp_files(tmp_path: Path) -> None:
    entries = _write(tmp_path, _samples(25))
    assert [e.path for e in entries] == [shard_relpath("train", i) for i in range(3)] == [
        "train/train-000000.tar", "train/train-000001.tar", "train/train-000002.tar"]
    assert [e.num_samples for e in entries] == [10, 10, 5]  # every shard but the last is full
    for entry in entries:
        path = tmp_path / entry.path
        assert entry.num_bytes == path.stat().st_size
        assert entry.sha256 == sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(os.listdir(tmp_path / "train")) == [Path(e.path).name for e in entries]


def test_rewrite_is_byte_identical_and_equals_webdataset_tarwriter(tmp_path: Path) -> None:
    import webdataset

    samples = _samples(25)
    first = _write(tmp_path / "a", samples)
    second = _write(tmp_path / "b", samples)
    assert first == second
    for entry in first:
        assert (tmp_path / "a" / entry.path).read_bytes() == (tmp_path / "b" / entry.path).read_bytes()
    # The contract says "webdataset.TarWriter(..., mtime=0) semantics": prove it byte for byte.
    reference = io.BytesIO()
    tar_writer = webdataset.TarWriter(reference, mtime=0)
    for index in range(SAMPLES_PER_SHARD):
        tar_writer.write({"__key__": sample_key("train", 0, index), "npy": samples[index]})
    tar_writer.close()
    assert reference.getvalue() == (tmp_path / "a" / first[0].path).read_bytes()


def test_plain_webdataset_reads_back_the_arrays(tmp_path: Path) -> None:
    import webdataset

    samples = _samples(25)
    entries = _write(tmp_path, samples)
    urls = [str(tmp_path / e.path) for e in entries]
    read = list(webdataset.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in read[:2]] == ["train-000000-000000", "train-000000-000001"]
    assert len(read) == len(samples)
    for got, expected in zip(read, samples):
        assert got["npy"].dtype == np.uint16
        np.testing.assert_array_equal(got["npy"], expected)


def test_reader_returns_views_and_gathers(tmp_path: Path) -> None:
    samples = _samples(25)
    entries = _write(tmp_path, samples)
    with ShardReader(tmp_path / entries[1].path, entries[1]) as reader:
        assert (len(reader), reader.sample_len_tokens, reader.dtype) == (10, SAMPLE_LEN_TOKENS, np.dtype("<u2"))
        view = reader.sample(3)
        np.testing.assert_array_equal(view, samples[13])
        assert not view.flags.owndata and not view.flags.writeable  # a view into the read-only map
        np.testing.assert_array_equal(reader.gather([9, 0]), samples[[19, 10]])
        with pytest.raises(IndexError):
            reader.sample(10)


def test_uint32_shards_for_large_vocabularies(tmp_path: Path) -> None:
    assert token_dtype_name(65536) == "uint16" and token_dtype_name(65537) == "uint32"
    samples = _samples(12, dtype=np.uint32, max_id=200_000)
    entries = _write(tmp_path, samples, dtype="uint32")
    with ShardReader(tmp_path / entries[0].path, entries[0]) as reader:
        np.testing.assert_array_equal(reader.sample(4), samples[4])


def test_writer_rejects_bad_samples(tmp_path: Path) -> None:
    writer = ShardSetWriter(tmp_path, "train", SAMPLES_PER_SHARD, "uint16")
    writer.write(np.arange(SAMPLE_LEN_TOKENS))
    with pytest.raises(DataPipelineError, match="pack samples to one length"):
        writer.write(np.arange(SAMPLE_LEN_TOKENS + 1))
    with pytest.raises(DataPipelineError, match="out of range for dtype uint16"):
        writer.write(np.full(SAMPLE_LEN_TOKENS, 70000))
    with pytest.raises(DataPipelineError, match="split name"):
        ShardSetWriter(tmp_path, "train.v2", SAMPLES_PER_SHARD, "uint16")
    writer.abort()  # the shard in progress is dropped with its temp file
    assert os.listdir(tmp_path / "train") == []


def test_fast_header_index_agrees_with_tarfile(tmp_path: Path) -> None:
    import tarfile

    from data_pipeline.shards import _index_uniform_members

    entries = _write(tmp_path, _samples(25))
    for entry in entries:
        raw = np.fromfile(tmp_path / entry.path, dtype=np.uint8)
        offsets, sizes = _index_uniform_members(raw)
        with tarfile.open(tmp_path / entry.path) as tar:
            members = tar.getmembers()
        assert offsets.tolist() == [m.offset_data for m in members]
        assert sizes.tolist() == [m.size for m in members]
        header = raw.copy()
        header[1024 + 10] ^= 1  # a byte in the second header's name: checksum no longer matches
        assert _index_uniform_members(header) is None  # falls back to tarfile, which reports the damage


def test_foreign_tar_layout_is_refused_clearly(tmp_path: Path) -> None:
    import webdataset

    path = tmp_path / "other.tar"
    with webdataset.TarWriter(str(path), mtime=0) as tar_writer:
        tar_writer.write({"__key__": "a", "npy": np.arange(5, dtype=np.uint16), "txt": "not a token sample"})
    with pytest.raises(ShardIntegrityError, match="unexpected member 'a.txt'"):
        ShardReader(path, verify=False)
    path.write_bytes(b"")
    with pytest.raises(ShardIntegrityError, match="is empty"):
        ShardReader(path, verify=False)


def test_damaged_header_without_verification_is_still_caught(tmp_path: Path) -> None:
    entries = _write(tmp_path, _samples(25))
    path = tmp_path / entries[0].path
    _flip_byte(path, 3 * 1024 + 10)  # the 4th member's header
    with pytest.raises(ShardIntegrityError, match="holds 3 samples but the manifest records 10"):
        ShardReader(path, entries[0], verify=False)


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_byte_names_shard_and_both_checksums(tmp_path: Path) -> None:
    entries = _write(tmp_path, _samples(25))
    path = tmp_path / entries[1].path
    _flip_byte(path, 512 + 200)  # inside the first sample's payload: the tar still parses
    actual = sha256_file(path)
    with pytest.raises(ShardIntegrityError) as err:
        ShardReader(path, entries[1])
    message = str(err.value)
    assert entries[1].path in message and entries[1].sha256 in message and actual in message
    assert err.value.user_error
    # With verification off the tar is readable and the flipped byte shows up in the data.
    with ShardReader(path, entries[1], verify=False) as reader:
        assert len(reader) == 10


def test_truncated_shard_gives_clear_error(tmp_path: Path) -> None:
    entries = _write(tmp_path, _samples(25))
    path = tmp_path / entries[0].path
    intact = path.read_bytes()
    member_bytes = 1024  # 512-byte header + a 194-byte .npy payload padded to 512
    path.write_bytes(intact[: 5 * member_bytes + 700])  # cut inside the 6th sample's payload
    with pytest.raises(ShardIntegrityError, match=r"train/train-000000\.tar.*corrupt.*truncated"):
        ShardReader(path, entries[0])
    with pytest.raises(ShardIntegrityError, match=r"train/train-000000\.tar.*truncated"):
        ShardReader(path, entries[0], verify=False)
    path.write_bytes(intact[: 5 * member_bytes])  # cut at a header boundary: tarfile alone sees 5 samples
    with pytest.raises(ShardIntegrityError, match=r"holds 5 samples but the manifest records 10"):
        ShardReader(path, entries[0], verify=False)
    path.write_bytes(intact[:300])  # not even one header
    with pytest.raises(ShardIntegrityError, match=r"truncated or not a tar file|holds no samples"):
        ShardReader(path, verify=False)
    with pytest.raises(ShardIntegrityError, match="missing"):
        verify_shard_file(str(tmp_path / "train" / "nope.tar"), entries[0])


def test_sha256_file_streams_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    payload = os.urandom(3 * 1024 + 17)
    path.write_bytes(payload)
    assert sha256_file(path, chunk_bytes=1000) == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("name", ["train-000000-000001.npy", "val-123456-999999.npy", "k" * 99, "x"])
@pytest.mark.parametrize("size_bytes", [0, 1, 4226, 10**6])
def test_templated_member_header_equals_tarfile(name: str, size_bytes: int) -> None:
    from data_pipeline.shards import _member_header, _tarinfo_header

    assert _member_header(name, size_bytes) == _tarinfo_header(name, size_bytes)


def test_write_batch_across_shard_boundaries_equals_one_by_one(tmp_path: Path) -> None:
    samples = _samples(25)
    one_by_one = _write(tmp_path / "a", samples)
    with ShardSetWriter(tmp_path / "b", "train", SAMPLES_PER_SHARD, "uint16") as writer:
        for start, stop in ((0, 3), (3, 15), (15, 16), (16, 16), (16, 25)):  # crosses both shard ends, one empty
            writer.write_batch(samples[start:stop])
    assert writer.close() == one_by_one
    # Checked before anything is written: a bad row leaves no partial batch behind.
    with ShardSetWriter(tmp_path / "c", "train", SAMPLES_PER_SHARD, "uint16") as writer:
        bad = samples[:4].astype(np.int64)
        bad[2, 5] = 70000
        with pytest.raises(DataPipelineError, match="out of range for dtype uint16"):
            writer.write_batch(bad)
        with pytest.raises(DataPipelineError, match="2-D integer array"):
            writer.write_batch(samples[0])
    assert writer.close() == []


def test_batched_member_headers_equal_tarfile() -> None:
    from data_pipeline.shards import _member_headers, _tarinfo_header

    names = ["train-000000-000001.npy", "x", "k" * 99, "", "val-123456-999999.npy"]  # mixed lengths pad with NULs
    for size_bytes in (0, 4226, 10**6):
        headers = _member_headers(names, size_bytes)
        assert [h.tobytes() for h in headers] == [_tarinfo_header(n, size_bytes) for n in names]
    # A name tarfile must handle itself (non-ASCII, or too long for USTAR's field) takes tarfile's path for all.
    odd = ["é-000000.npy", "train-000000-000002.npy"]
    assert [h.tobytes() for h in _member_headers(odd, 4226)] == [_tarinfo_header(n, 4226) for n in odd]
