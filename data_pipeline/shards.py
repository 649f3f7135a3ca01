"""Shard format v1: webdataset-compatible tars of fixed-length token samples (docs/data_pipeline.md).

Writer: `ShardSetWriter` packs 1-D token arrays into `<split>/<split>-NNNNNN.tar`, one `<key>.npy` member per sample,
byte for byte as `webdataset.TarWriter(..., mtime=0)` would write them, so a re-run gives identical shards. A shard
is written under a temp name and renamed when complete, so a crash never leaves a half shard under a final name.

Reader: `ShardReader` indexes the tar headers once, memory-maps the file and returns samples as views into the map
(no tar parsing per sample). Integrity problems (missing, truncated, wrong sha256) raise `ShardIntegrityError`.

Remote shards: `ShardCache` fetches a URL (any fsspec protocol) into a local folder, content-addressed by sha256 and
verified while downloading, evicting least-recently-used shards beyond a byte budget; `open_shard` picks the path.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import tarfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipeline.errors import DataPipelineError, ShardIntegrityError

SHARD_FORMAT_VERSION = 1
# Explicit little-endian dtypes: the bytes of a shard must not depend on the host that wrote it.
TOKEN_DTYPES: dict[str, np.dtype] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_HASH_CHUNK_BYTES = 1 << 20
_DOWNLOAD_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_CACHE_BYTES = 32 << 30
_STALE_DOWNLOAD_S = 3600.0  # a .part file untouched this long belongs to a crashed download


def default_cache_dir() -> str:
    """Where remote shards are cached unless a cache_dir is given: $PRETRAIN_CACHE_DIR or ~/.cache/pretrain/shards."""
    base = os.environ.get("PRETRAIN_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "pretrain"))
    return os.path.join(base, "shards")


def token_dtype_name(vocab_size: int) -> str:
    """The dtype name the format prescribes for a vocabulary: uint16 while every id fits, else uint32."""
    return "uint16" if vocab_size <= 65536 else "uint32"


def token_dtype(name: str) -> np.dtype:
    if name not in TOKEN_DTYPES:
        raise DataPipelineError(f"unsupported token dtype {name!r}; shard format v1 knows {sorted(TOKEN_DTYPES)}")
    return TOKEN_DTYPES[name]


def shard_relpath(split: str, shard_index: int) -> str:
    """Path of a shard relative to the dataset root (the manifest's directory), always with '/' separators."""
    return f"{split}/{split}-{shard_index:06d}.tar"


def sample_key(split: str, shard_index: int, sample_index: int) -> str:
    # No dots: webdataset splits a member name at the first dot of its basename into key and field.
    return f"{split}-{shard_index:06d}-{sample_index:06d}"


def sha256_file(path: str | os.PathLike, chunk_bytes: int = _HASH_CHUNK_BYTES) -> str:
    """Hex sha256 of a file, read in chunks so memory stays flat for any shard size."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardEntry:
    """One shard as recorded in the manifest. `path` is relative to the dataset root."""

    path: str
    sha256: str
    num_samples: int
    num_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "num_samples": self.num_samples, "num_bytes": self.num_bytes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardEntry:
        return cls(path=str(data["path"]), sha256=str(data["sha256"]), num_samples=int(data["num_samples"]),
                   num_bytes=int(data["num_bytes"]))


class _TarShardFile:
    """Streams one USTAR tar with exactly the bytes of `webdataset.TarWriter(f, mtime=0)`, hashing as it writes.

    Written by hand rather than through webdataset/tarfile because importing webdataset costs ~2 s (it imports
    torch) and tarfile's stream mode adds ~100 us per sample; tests/data_pipeline/test_shards.py proves the bytes
    are identical to webdataset's writer. Header fields are webdataset's defaults: mode 0o444, uid=gid=0,
    uname=gname='bigdata', and mtime=0 so a re-run is byte-identical (notes/data-and-hf.md §2).
    """

    def __init__(self, path: str) -> None:
        self.raw = open(path, "wb")
        self.digest = hashlib.sha256()
        self.num_bytes = 0

    def add_members(self, names: list[str], npy_header: bytes, rows: np.ndarray) -> None:
        """One member per row: `names[i]` holding `npy_header + rows[i]` bytes, zero-padded to whole blocks.

        Laid out in one buffer and written with one call: per-call overhead, not bytes, dominated at ~4 KB a
        member when each member took three writes and three hash updates."""
        payload_bytes = len(npy_header) + rows.shape[1] * rows.itemsize
        header_end, payload_start = tarfile.BLOCKSIZE, tarfile.BLOCKSIZE + len(npy_header)
        members = np.zeros((len(names), header_end + payload_bytes + -payload_bytes % tarfile.BLOCKSIZE), np.uint8)
        members[:, :header_end] = _member_headers(names, payload_bytes)
        members[:, header_end:payload_start] = np.frombuffer(npy_header, np.uint8)
        members[:, payload_start : header_end + payload_bytes] = rows.view(np.uint8)
        self._write(members.reshape(-1).data)

    def finish(self) -> None:
        """End-of-archive marker (two zero blocks), then zero-pad to a whole record as tarfile's 'w|' mode does."""
        self._write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        record_padding_bytes = -self.num_bytes % tarfile.RECORDSIZE
        if record_padding_bytes:
            self._write(tarfile.NUL * record_padding_bytes)
        self.raw.flush()
        os.fsync(self.raw.fileno())  # before the rename, so a final shard name always means complete bytes
        self.raw.close()

    def _write(self, data: bytes | memoryview) -> None:
        self.digest.update(data)
        self.num_bytes += len(data)
        self.raw.write(data)


_CHKSUM_FIELD = slice(148, 156)  # header checksum: six octal digits, NUL, space
_OCTAL_SHIFTS = np.array([15, 12, 9, 6, 3, 0])  # the six octal digits of a checksum, most significant first
_header_templates: dict[int, tuple[bytes, int]] = {}


def _tarinfo_header(name: str, size_bytes: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size_bytes
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = "bigdata"
    return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")


def _member_header(name: str, size_bytes: int) -> bytes:
    """The USTAR header tarfile would build for this member."""
    return _member_headers([name], size_bytes)[0].tobytes()


def _member_headers(names: list[str], size_bytes: int) -> np.ndarray:
    """[len(names), 512] uint8: the USTAR header tarfile would build for each member, from a per-size template.

    Every member of a shard has the same size, so all header bytes but the name and checksum repeat. Building
    headers with tarfile costs ~50 us per sample (~15 % of unigram encode time), and even from the template one by
    one ~4 us, which made header building the largest per-token cost left in the main process. The checksum is the
    byte sum of the header with the checksum field read as spaces: the template's sum plus the name's bytes (a
    USTAR header sums to at most 512 * 255 < 8**6, so always six octal digits).
    """
    if not all(name.isascii() and len(name) < 100 for name in names):
        # Long or non-ASCII names: let tarfile handle the edge cases.
        return np.stack([np.frombuffer(_tarinfo_header(name, size_bytes), np.uint8) for name in names])
    base, base_sum = _header_template(size_bytes)
    headers = np.tile(np.frombuffer(base, np.uint8), (len(names), 1))
    # A fixed-width bytes array pads shorter names with NULs, as the name field is padded.
    name_bytes = np.array([name.encode("ascii") for name in names]).view(np.uint8).reshape(len(names), -1)
    headers[:, : name_bytes.shape[1]] = name_bytes
    checksums = base_sum + name_bytes.sum(axis=1, dtype=np.int64)
    headers[:, _CHKSUM_FIELD.start : _CHKSUM_FIELD.start + 6] = ord("0") + ((checksums[:, None] >> _OCTAL_SHIFTS) & 7)
    headers[:, _CHKSUM_FIELD.start + 6 : _CHKSUM_FIELD.stop] = np.frombuffer(b"\0 ", np.uint8)
    return headers


def _header_template(size_bytes: int) -> tuple[bytes, int]:
    """The header of a nameless member of this size with its checksum field as spaces, and that header's byte sum."""
    template = _header_templates.get(size_bytes)
    if template is None:
        base = bytearray(_tarinfo_header("", size_bytes))
        base[_CHKSUM_FIELD] = b" " * 8
        template = _header_templates.setdefault(size_bytes, (bytes(base), sum(base)))
    return template


class ShardSetWriter:
    """Writes the shards of one split: `out_dir/<split>/<split>-NNNNNN.tar`, `samples_per_shard` samples each.

    Every sample must be a 1-D integer array of the same length (`seq_len + 1` tokens). `first_shard_index` lets
    several writers produce disjoint shard ranges of one split in parallel.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, samples_per_shard: int, dtype: str,
                 sample_len_tokens: int | None = None, first_shard_index: int = 0) -> None:
        if samples_per_shard < 1:
            raise DataPipelineError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if not split or "/" in split or "." in split or "-" in split:
            raise DataPipelineError(f"split name {split!r} must be non-empty without '/', '.' or '-' (it is part of "
                                    "every sample key); use e.g. 'train' or 'val'")
        self.out_dir = os.fspath(out_dir)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.dtype_name = dtype
        self.dtype = token_dtype(dtype)
        self.sample_len_tokens = sample_len_tokens
        self._max_token_id = int(np.iinfo(self.dtype).max)
        self._shard_index = first_shard_index
        self._entries: list[ShardEntry] = []
        self._open: tuple[_TarShardFile, str] | None = None  # (shard file being written, its temp path)
        self._num_in_shard = 0
        self._npy_header: bytes | None = None
        self._closed = False
        os.makedirs(os.path.join(self.out_dir, split), exist_ok=True)

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, sample: np.ndarray) -> None:
        """Append one sample (1-D array of token ids); starts and finishes shards as needed."""
        sample = np.asarray(sample)
        if sample.ndim != 1 or sample.dtype.kind not in "iu":
            raise DataPipelineError(f"a sample must be a 1-D integer array, got shape {sample.shape} "
                                    f"dtype {sample.dtype}")
        self._write_rows(sample[np.newaxis])

    def write_batch(self, samples: np.ndarray) -> None:
        """Append every row of a 2-D array [num_samples, sample_len_tokens]."""
        samples = np.asarray(samples)
        if samples.ndim != 2 or samples.dtype.kind not in "iu":
            raise DataPipelineError(f"write_batch expects a 2-D integer array [num_samples, sample_len], got shape "
                                    f"{samples.shape} dtype {samples.dtype}")
        self._write_rows(samples)

    def close(self) -> list[ShardEntry]:
        """Finish the last (possibly short) shard; return the entries of every shard this writer wrote, in order."""
        if not self._closed:
            if self._open is not None:
                self._finish_shard()
            self._closed = True
        return list(self._entries)

    def abort(self) -> None:
        """Drop the shard in progress (its temp file); completed shards stay on disk."""
        if self._open is not None:
            shard_file, tmp_path = self._open
            self._open = None
            shard_file.raw.close()
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
        self._closed = True

    @property
    def entries(self) -> list[ShardEntry]:
        return list(self._entries)

    def _write_rows(self, samples: np.ndarray) -> None:
        # Checks and conversion run once per batch, not per sample: prepare writes ~2,500 samples per 5M tokens.
        if self._closed:
            raise DataPipelineError("ShardSetWriter.write() after close(); create a new writer")
        if not len(samples):
            return
        rows = self._validated(samples)
        npy_header = self._npy_header_for(rows[0])
        start = 0
        while start < len(rows):
            if self._open is None:
                self._open_shard()
            shard_file, _ = self._open
            count = min(len(rows) - start, self.samples_per_shard - self._num_in_shard)
            names = [sample_key(self.split, self._shard_index, self._num_in_shard + i) + ".npy" for i in range(count)]
            shard_file.add_members(names, npy_header, rows[start : start + count])
            self._num_in_shard += count
            start += count
            if self._num_in_shard == self.samples_per_shard:
                self._finish_shard()

    def _validated(self, samples: np.ndarray) -> np.ndarray:
        """`samples` [n, len] as C-contiguous rows of the shard dtype, after checking their length and id range."""
        if self.sample_len_tokens is None:
            self.sample_len_tokens = int(samples.shape[1])
        if samples.shape[1] != self.sample_len_tokens:
            raise DataPipelineError(f"sample has {samples.shape[1]} tokens but this split's samples have "
                                    f"{self.sample_len_tokens} (seq_len + 1); pack samples to one length")
        if samples.size and (int(samples.min()) < 0 or int(samples.max()) > self._max_token_id):
            raise DataPipelineError(f"token id out of range for dtype {self.dtype_name} "
                                    f"(min {int(samples.min())}, max {int(samples.max())}); use uint32 for "
                                    "vocabularies over 65536")
        return np.ascontiguousarray(samples, dtype=self.dtype)

    def _npy_header_for(self, row: np.ndarray) -> bytes:
        if self._npy_header is None:
            # The .npy header depends only on dtype and shape; compute it once with numpy's own writer so the
            # payload equals `numpy.save` byte for byte.
            buf = io.BytesIO()
            np.lib.format.write_array(buf, row)
            self._npy_header = buf.getvalue()[: -row.nbytes] if row.nbytes else buf.getvalue()
        return self._npy_header

    def _open_shard(self) -> None:
        tmp_path = os.path.join(self.out_dir, shard_relpath(self.split, self._shard_index)) + ".tmp"
        self._open = (_TarShardFile(tmp_path), tmp_path)
        self._num_in_shard = 0

    def _finish_shard(self) -> None:
        assert self._open is not None
        shard_file, tmp_path = self._open
        self._open = None
        shard_file.finish()
        rel_path = shard_relpath(self.split, self._shard_index)
        os.replace(tmp_path, os.path.join(self.out_dir, rel_path))
        self._entries.append(ShardEntry(path=rel_path, sha256=shard_file.digest.hexdigest(),
                                        num_samples=self._num_in_shard, num_bytes=shard_file.num_bytes))
        self._shard_index += 1
        self._num_in_shard = 0


def verify_shard_file(path: str, entry: ShardEntry) -> None:
    """Raise ShardIntegrityError unless the file at `path` has the size and sha256 the manifest records."""
    if not os.path.exists(path):
        raise ShardIntegrityError(f"shard {entry.path} is missing (looked for {path}); copy the complete dataset "
                                  "folder or re-run `pretrain prepare`")
    actual_bytes = os.path.getsize(path)
    actual_sha256 = sha256_file(path)
    if actual_sha256 != entry.sha256:
        size_note = ("" if actual_bytes == entry.num_bytes else
                     f"; it has {actual_bytes} bytes but the manifest records {entry.num_bytes} (truncated or "
                     "partial copy?)")
        raise ShardIntegrityError(f"shard {entry.path} ({path}) is corrupt: sha256 expected {entry.sha256}, "
                                  f"actual {actual_sha256}{size_note}; re-copy or re-download it, or re-run "
                                  "`pretrain prepare`")


_USTAR_MAGIC = np.frombuffer(b"ustar", dtype=np.uint8)
_OCTAL_WEIGHTS = 8 ** np.arange(5, -1, -1, dtype=np.int64)


def _index_uniform_members(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Payload offsets and sizes for a tar laid out as ShardSetWriter writes it: plain USTAR members of one size back
    to back, then the zero end block.

    Reads every header at once with numpy: tarfile spends ~35-60 us per member, so opening a 1,000-sample shard took
    ~34 ms and held the loader benchmark to ~17M tokens/s (this path: ~1 ms). Returns None for any other layout (or
    damage); the caller then falls back to tarfile, whose errors explain the problem."""
    if raw.size < 2 * tarfile.BLOCKSIZE:
        return None
    first = raw[: tarfile.BLOCKSIZE]
    size_field = first[124:136].tobytes().rstrip(b"\0 ")
    if not np.array_equal(first[257:262], _USTAR_MAGIC) or first[156] != ord("0") or not size_field:
        return None
    try:
        size = int(size_field.decode("ascii"), 8)
    except (UnicodeDecodeError, ValueError):
        return None
    stride = tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    headers = np.lib.stride_tricks.as_strided(raw, (raw.size // stride, tarfile.BLOCKSIZE), (stride, 1))
    same = ((headers[:, 257:262] == _USTAR_MAGIC).all(axis=1) & (headers[:, 156] == ord("0"))
            & (headers[:, 124:136] == first[124:136]).all(axis=1))
    num_members = int(np.argmin(same)) if not same.all() else len(same)
    end_offset = num_members * stride
    if end_offset + tarfile.BLOCKSIZE > raw.size or raw[end_offset: end_offset + tarfile.BLOCKSIZE].any():
        return None
    headers = headers[:num_members]
    # Header checksum as tarfile writes it ("%06o\0 "): sum of all header bytes with the field read as spaces.
    digits = headers[:, 148:154].astype(np.int64) - ord("0")
    if np.any((digits < 0) | (digits > 7)):
        return None
    computed = headers.sum(axis=1, dtype=np.int64) - headers[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * ord(" ")
    if np.any(digits @ _OCTAL_WEIGHTS != computed):
        return None
    offsets = np.arange(num_members, dtype=np.int64) * stride + tarfile.BLOCKSIZE
    return offsets, np.full(num_members, size, dtype=np.int64)


class ShardReader:
    """Random access to the samples of one local shard through a memory map.

    `sample(i)` returns a read-only 1-D view into the map (no copy); `gather(indices)` copies several samples into one
    2-D array. With `entry` and `verify=True` the file's sha256 is checked against the manifest first.
    """

    def __init__(self, path: str | os.PathLike, entry: ShardEntry | None = None, verify: bool = True) -> None:
        self.path = os.fspath(path)
        self.name = entry.path if entry is not None else self.path
        if entry is not None and verify:
            verify_shard_file(self.path, entry)
        elif not os.path.exists(self.path):
            raise ShardIntegrityError(f"shard {self.name} is missing (looked for {self.path})")
        try:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as err:  # mmap refuses an empty file
            raise ShardIntegrityError(f"shard {self.name} ({self.path}) is empty; re-copy it or re-run "
                                      "`pretrain prepare`") from err
        raw = np.frombuffer(self._mmap, dtype=np.uint8)
        index = _index_uniform_members(raw)
        data_offsets, member_bytes = index if index is not None else self._index_members_with_tarfile()
        if entry is not None and len(data_offsets) != entry.num_samples:
            raise ShardIntegrityError(f"shard {self.name} holds {len(data_offsets)} samples but the manifest records "
                                      f"{entry.num_samples} (truncated or a different file?); re-copy it or re-run "
                                      "`pretrain prepare`")
        self._map_samples(raw, data_offsets, member_bytes)

    def __len__(self) -> int:
        return self.num_samples

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sample(self, index: int) -> np.ndarray:
        """Sample `index` as a read-only view of `sample_len_tokens` tokens in the shard's dtype."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for shard {self.name} with {self.num_samples} samples")
        return self._samples[index]

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Copy of samples `indices` as [len(indices), sample_len_tokens]."""
        return self._samples[np.asarray(indices, dtype=np.int64)]

    def close(self) -> None:
        # Views handed out keep the map alive (numpy holds a reference); dropping ours is all that is safe here.
        self._samples = None  # type: ignore[assignment]
        self._mmap = None

    def _index_members_with_tarfile(self) -> tuple[np.ndarray, np.ndarray]:
        """Offsets and sizes of every member's payload via tarfile: the general path, and the one whose errors
        explain a truncated or foreign file."""
        offsets: list[int] = []
        sizes: list[int] = []
        try:
            with tarfile.open(self.path, "r:") as tar:
                for member in tar:
                    if not member.isfile() or not member.name.endswith(".npy"):
                        raise ShardIntegrityError(f"shard {self.name} has an unexpected member {member.name!r}; "
                                                  "shard format v1 holds only '<key>.npy' samples")
                    offsets.append(member.offset_data)
                    sizes.append(member.size)
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ShardIntegrityError(f"shard {self.name} ({self.path}) is truncated or not a tar file ({err}); "
                                      "re-copy it or re-run `pretrain prepare`") from err
        if not offsets:
            raise ShardIntegrityError(f"shard {self.name} ({self.path}) holds no samples")
        file_bytes = os.path.getsize(self.path)
        if offsets[-1] + sizes[-1] > file_bytes:
            raise ShardIntegrityError(f"shard {self.name} ({self.path}) is truncated: its last sample ends at byte "
                                      f"{offsets[-1] + sizes[-1]} but the file has {file_bytes} bytes")
        return np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)

    def _map_samples(self, raw: np.ndarray, data_offsets: np.ndarray, member_bytes: np.ndarray) -> None:
        header_bytes, dtype, sample_len = self._parse_npy_header(raw, int(data_offsets[0]), int(member_bytes[0]))
        self.dtype = dtype
        self.sample_len_tokens = sample_len
        self.num_samples = len(data_offsets)
        stride = int(data_offsets[1] - data_offsets[0]) if len(data_offsets) > 1 else int(member_bytes[0])
        if np.any(member_bytes != member_bytes[0]) or np.any(np.diff(data_offsets) != stride):
            raise ShardIntegrityError(f"shard {self.name}: samples differ in size or are not evenly spaced (extra "
                                      "tar headers?); every sample of a v1 shard has one shape, written by "
                                      "data_pipeline.shards.ShardSetWriter")
        npy_headers = np.lib.stride_tricks.as_strided(raw[int(data_offsets[0]):], (self.num_samples, header_bytes),
                                                      (stride, 1))
        if np.any(npy_headers != npy_headers[0]):
            raise ShardIntegrityError(f"shard {self.name}: samples differ in dtype or length; every sample of a "
                                      "v1 shard has the same shape")
        # One strided 2-D view over the whole file: row i is sample i, so a batch gather is one numpy fancy index.
        self._samples = np.ndarray(shape=(self.num_samples, sample_len), dtype=dtype, buffer=self._mmap,
                                   offset=int(data_offsets[0]) + header_bytes, strides=(stride, dtype.itemsize))

    def _parse_npy_header(self, raw: np.ndarray, offset: int, size: int) -> tuple[int, np.dtype, int]:
        member = io.BytesIO(raw[offset: offset + min(size, 4096)].tobytes())
        try:
            major, _minor = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if major == 1 else
                           np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(member)
        except ValueError as err:
            raise ShardIntegrityError(f"shard {self.name}: first sample is not a .npy array ({err})") from err
        if len(shape) != 1 or fortran_order or dtype not in TOKEN_DTYPES.values():
            raise ShardIntegrityError(f"shard {self.name}: samples must be 1-D uint16/uint32 arrays, found shape "
                                      f"{shape} dtype {dtype}")
        header_bytes = member.tell()
        if header_bytes + shape[0] * dtype.itemsize != size:
            raise ShardIntegrityError(f"shard {self.name}: sample payload size {size} does not match its .npy header")
        return header_bytes, dtype, int(shape[0])


class ShardCache:
    """Local copies of remote shards: content-addressed by sha256, verified before use, LRU-evicted by bytes.

    Safe with several worker processes sharing the folder: downloads go to a unique temp name and are renamed into
    place; a file evicted while another process has it memory-mapped stays readable there (unlink semantics).
    """

    def __init__(self, cache_dir: str, max_bytes: int = DEFAULT_MAX_CACHE_BYTES) -> None:
        self.cache_dir = cache_dir
        self.max_bytes = max_bytes
        os.makedirs(cache_dir, exist_ok=True)

    def path_for(self, entry: ShardEntry) -> str:
        return os.path.join(self.cache_dir, f"{entry.sha256}.tar")

    def fetch(self, url: str, entry: ShardEntry) -> tuple[str, bool]:
        """Local path of the shard, and whether it was downloaded (and so verified) just now."""
        path = self.path_for(entry)
        try:
            os.utime(path)  # a hit: mark it most recently used
            return path, False
        except FileNotFoundError:
            pass
        tmp_path = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.part"
        try:
            self._download(url, entry, tmp_path)
            os.replace(tmp_path, path)
        finally:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
        self._evict(keep=path)
        return path, True

    def _download(self, url: str, entry: ShardEntry, tmp_path: str) -> None:
        import fsspec

        digest = hashlib.sha256()
        try:
            with fsspec.open(url, "rb") as src, open(tmp_path, "wb") as dst:
                while chunk := src.read(_DOWNLOAD_CHUNK_BYTES):
                    digest.update(chunk)
                    dst.write(chunk)
        except (OSError, ValueError) as err:
            raise ShardIntegrityError(f"shard {entry.path}: cannot fetch {url} ({err}); check the URL and "
                                      "network, or copy the dataset locally") from err
        if digest.hexdigest() != entry.sha256:
            raise ShardIntegrityError(f"shard {entry.path} fetched from {url} is corrupt: sha256 expected "
                                      f"{entry.sha256}, actual {digest.hexdigest()}; fix the copy at the source")

    def _evict(self, keep: str) -> None:
        """Delete least-recently-used shards until the cache fits `max_bytes` (never `keep`, the one just fetched),
        and downloads abandoned by crashed processes."""
        files = []
        now_s = time.time()
        for name in os.listdir(self.cache_dir):
            path = os.path.join(self.cache_dir, name)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue  # removed by another process meanwhile
            if name.endswith(".part") and now_s - stat.st_mtime > _STALE_DOWNLOAD_S:
                _remove_if_present(path)
            elif name.endswith(".tar"):
                files.append((stat.st_mtime, path, stat.st_size))
        total_bytes = sum(size for _, _, size in files)
        for _, path, size in sorted(files):
            if total_bytes <= self.max_bytes:
                break
            if path != keep:
                _remove_if_present(path)
                total_bytes -= size


def _remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass  # another process got there first


def open_shard(location: str, entry: ShardEntry, verify: bool = True, cache: ShardCache | None = None) -> ShardReader:
    """Open the shard at `location`: a local path is read in place; a URL (with `cache`) is fetched into the cache,
    checksum-verified, then memory-mapped like a local shard."""
    if cache is None:
        return ShardReader(location, entry, verify=verify)
    for attempt in range(2):
        path, fresh = cache.fetch(location, entry)
        try:
            # A fresh download was hashed while streaming; a cache hit is re-checked if asked to.
            return ShardReader(path, entry, verify=verify and not fresh)
        except ShardIntegrityError:
            if attempt == 1:
                raise
            # Evicted by another process between fetch and open, or a damaged cached copy: fetch once more.
            if os.path.exists(path):
                os.remove(path)
    raise AssertionError("unreachable: the second attempt returns or raises")
