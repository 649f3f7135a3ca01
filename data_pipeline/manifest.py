"""manifest.json: what a prepared dataset holds, how to check it, and the fingerprint the loader state is bound to.

Shard paths are relative to the manifest's location, so a dataset folder can be moved, copied or served from a URL.
A location with `://` (including `file://`) is a URL and is read through fsspec; anything else is a local path.
See docs/data_pipeline.md for the JSON layout and the exact fingerprint definition.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.errors import DataPipelineError
from data_pipeline.shards import TOKEN_DTYPES, ShardEntry

FORMAT_NAME = "pretrain-token-shards"
FORMAT_VERSION = 1
MANIFEST_FILENAME = "manifest.json"

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_FILENAME", "Manifest", "ManifestError", "ShardEntry",
           "SplitInfo", "TokenizerInfo", "canonical_json", "compute_fingerprint", "is_url", "manifest_location",
           "write_dataset_from_arrays"]


class ManifestError(DataPipelineError):
    """manifest.json is missing, unreadable, of another format/version, or inconsistent with itself."""


def is_url(location: str) -> bool:
    return "://" in location


def canonical_json(value: Any) -> str:
    """The one serialisation fingerprints hash: sorted keys, no whitespace, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def manifest_location(dataset: str | os.PathLike) -> str:
    """`dataset` may name the dataset folder (local or URL) or its manifest.json; return the manifest's location."""
    location = os.fspath(dataset)
    if location.endswith(".json"):
        return location
    if is_url(location):
        return location.rstrip("/") + "/" + MANIFEST_FILENAME
    return os.path.join(location, MANIFEST_FILENAME)


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer a dataset was encoded with. `model_file` is relative to the dataset root (None: not copied)."""

    fingerprint: str
    vocab_size: int
    model_type: str
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    model_file: str | None = "tokenizer/tokenizer.model"

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "vocab_size": self.vocab_size, "model_type": self.model_type,
                "unk_id": self.unk_id, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "model_file": self.model_file}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerInfo:
        return cls(fingerprint=str(data["fingerprint"]), vocab_size=int(data["vocab_size"]),
                   model_type=str(data["model_type"]), unk_id=int(data["unk_id"]), bos_id=int(data["bos_id"]),
                   eos_id=int(data["eos_id"]), pad_id=int(data["pad_id"]), model_file=data.get("model_file"))


@dataclass(frozen=True)
class SplitInfo:
    """One split (e.g. train, val): counts and its shards in order; sample index i lives in the shard whose
    cumulative range holds i."""

    num_samples: int
    num_tokens: int
    num_documents: int
    dropped_tail_tokens: int
    shards: tuple[ShardEntry, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "num_tokens": self.num_tokens, "num_documents": self.num_documents,
                "dropped_tail_tokens": self.dropped_tail_tokens, "shards": [s.to_dict() for s in self.shards]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitInfo:
        return cls(num_samples=int(data["num_samples"]), num_tokens=int(data["num_tokens"]),
                   num_documents=int(data["num_documents"]), dropped_tail_tokens=int(data["dropped_tail_tokens"]),
                   shards=tuple(ShardEntry.from_dict(s) for s in data["shards"]))

    @classmethod
    def from_shards(cls, shards: list[ShardEntry], num_tokens: int, num_documents: int,
                    dropped_tail_tokens: int = 0) -> SplitInfo:
        """Convenience for writers: num_samples is the sum over the shards."""
        return cls(num_samples=sum(s.num_samples for s in shards), num_tokens=num_tokens,
                   num_documents=num_documents, dropped_tail_tokens=dropped_tail_tokens, shards=tuple(shards))


def compute_fingerprint(format_version: int, seq_len: int, dtype: str, tokenizer_fingerprint: str,
                        splits: dict[str, SplitInfo]) -> str:
    """sha256 over what decides the token stream: format, sample shape, tokenizer and every shard's bytes."""
    content = {
        "format_version": format_version,
        "seq_len": seq_len,
        "dtype": dtype,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "splits": {name: [[s.path, s.sha256, s.num_samples] for s in split.shards] for name, split in splits.items()},
    }
    return hashlib.sha256(canonical_json(content).encode("ascii")).hexdigest()


_TOP_LEVEL_KEYS = {"format", "format_version", "fingerprint", "seq_len", "sample_len_tokens", "dtype",
                   "samples_per_shard", "tokenizer", "splits", "sources", "bad_input", "prepare_args"}


@dataclass(frozen=True)
class Manifest:
    """A prepared dataset. Build one with `Manifest.create(...)` (computes the fingerprint), read one with `load`."""

    seq_len: int
    dtype: str
    samples_per_shard: int
    tokenizer: TokenizerInfo
    splits: dict[str, SplitInfo]
    fingerprint: str
    sources: list[dict[str, Any]] = field(default_factory=list)
    bad_input: dict[str, Any] = field(default_factory=dict)
    prepare_args: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    # Where the manifest was read from (local path or URL); not part of the JSON, so copies stay byte-identical.
    location: str | None = field(default=None, compare=False)

    @classmethod
    def create(cls, *, seq_len: int, dtype: str, samples_per_shard: int, tokenizer: TokenizerInfo,
               splits: dict[str, SplitInfo], sources: list[dict[str, Any]] | None = None,
               bad_input: dict[str, Any] | None = None, prepare_args: dict[str, Any] | None = None) -> Manifest:
        fingerprint = compute_fingerprint(FORMAT_VERSION, seq_len, dtype, tokenizer.fingerprint, splits)
        manifest = cls(seq_len=seq_len, dtype=dtype, samples_per_shard=samples_per_shard, tokenizer=tokenizer,
                       splits=dict(splits), fingerprint=fingerprint, sources=list(sources or []),
                       bad_input=dict(bad_input or {}), prepare_args=dict(prepare_args or {}))
        manifest.validate()
        return manifest

    @property
    def sample_len_tokens(self) -> int:
        """Tokens stored per sample: seq_len inputs plus one so labels are the inputs shifted by one."""
        return self.seq_len + 1

    @property
    def name(self) -> str:
        return self.location or f"<manifest {self.fingerprint[:12]}>"

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ManifestError(f"{self.name} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    @property
    def root(self) -> str:
        """The dataset root (directory or URL prefix) shard paths are relative to."""
        if self.location is None:
            raise ManifestError("this manifest was not loaded from a location; save it or load it first")
        if is_url(self.location):
            return self.location.rsplit("/", 1)[0]
        return os.path.dirname(os.path.abspath(self.location))

    @property
    def is_remote(self) -> bool:
        return self.location is not None and is_url(self.location)

    def resolve(self, relative_path: str) -> str:
        """Local path or URL of a file named relative to the dataset root (a shard or the tokenizer model)."""
        _check_relative(relative_path, self.name)
        if self.is_remote:
            return self.root + "/" + relative_path
        return os.path.join(self.root, *relative_path.split("/"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format, "format_version": self.format_version, "fingerprint": self.fingerprint,
            "seq_len": self.seq_len, "sample_len_tokens": self.sample_len_tokens, "dtype": self.dtype,
            "samples_per_shard": self.samples_per_shard, "tokenizer": self.tokenizer.to_dict(),
            "splits": {name: split.to_dict() for name, split in self.splits.items()},
            "sources": self.sources, "bad_input": self.bad_input, "prepare_args": self.prepare_args,
        }

    def to_json(self) -> str:
        # Sorted keys + fixed indent: the same dataset always gives the same manifest bytes.
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=True) + "\n"

    def save(self, path: str | os.PathLike) -> str:
        """Write manifest.json (given a file path or the dataset folder); local writes are atomic (temp + rename),
        since the manifest's presence is what marks a dataset complete. Returns the location written."""
        location = manifest_location(path)
        text = self.to_json()
        if is_url(location):
            import fsspec

            with fsspec.open(location, "w") as f:
                f.write(text)
            return location
        tmp_path = location + ".tmp"
        with open(tmp_path, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, location)
        return location

    @classmethod
    def load(cls, dataset: str | os.PathLike) -> Manifest:
        """Read and validate the manifest of a dataset folder, a manifest.json path, or a URL of either."""
        location = manifest_location(dataset)
        text = _read_text(location)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{location} is not valid JSON ({err}); re-run `pretrain prepare`") from err
        return cls.from_dict(data, location=location)

    @classmethod
    def from_dict(cls, data: dict[str, Any], location: str | None = None) -> Manifest:
        name = location or "manifest"
        _check_format(data, name)
        unknown = set(data) - _TOP_LEVEL_KEYS
        if unknown:
            raise ManifestError(f"{name} has unknown keys {sorted(unknown)} for format version {FORMAT_VERSION}")
        try:
            manifest = cls(
                seq_len=int(data["seq_len"]), dtype=str(data["dtype"]),
                samples_per_shard=int(data["samples_per_shard"]), tokenizer=TokenizerInfo.from_dict(data["tokenizer"]),
                splits={k: SplitInfo.from_dict(v) for k, v in data["splits"].items()},
                fingerprint=str(data["fingerprint"]), sources=list(data.get("sources", [])),
                bad_input=dict(data.get("bad_input", {})), prepare_args=dict(data.get("prepare_args", {})),
                location=location)
        except KeyError as err:
            message = f"{name} lacks required key {err}; it is incomplete, re-run `pretrain prepare`"
            raise ManifestError(message) from err
        except (TypeError, ValueError, AttributeError) as err:
            raise ManifestError(f"{name} has a malformed field ({err}); re-run `pretrain prepare`") from err
        if int(data.get("sample_len_tokens", manifest.sample_len_tokens)) != manifest.sample_len_tokens:
            raise ManifestError(f"{name}: sample_len_tokens {data['sample_len_tokens']} != seq_len + 1 "
                                f"({manifest.sample_len_tokens})")
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Raise ManifestError if the manifest contradicts itself (counts, dtypes, paths, fingerprint)."""
        if self.dtype not in TOKEN_DTYPES:
            raise ManifestError(f"{self.name}: dtype {self.dtype!r} is not one of {sorted(TOKEN_DTYPES)}")
        if self.seq_len < 1 or self.samples_per_shard < 1:
            raise ManifestError(f"{self.name}: seq_len ({self.seq_len}) and samples_per_shard "
                                f"({self.samples_per_shard}) must be >= 1")
        for split_name, split in self.splits.items():
            _validate_split(split_name, split, self.samples_per_shard, self.name)
        expected = compute_fingerprint(self.format_version, self.seq_len, self.dtype, self.tokenizer.fingerprint,
                                       self.splits)
        if expected != self.fingerprint:
            raise ManifestError(f"{self.name}: fingerprint {self.fingerprint} does not match its content "
                                f"({expected}); the manifest was edited by hand or is damaged, re-run "
                                "`pretrain prepare`")


def _check_format(data: Any, name: str) -> None:
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ManifestError(f"{name} is not a {FORMAT_NAME} manifest (format {found!r}); point at the "
                            "manifest.json written by `pretrain prepare`")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{name} has format_version {data.get('format_version')!r} but this code reads version "
                            f"{FORMAT_VERSION}; re-run `pretrain prepare` with this version or use the matching code")


def _validate_split(split_name: str, split: SplitInfo, samples_per_shard: int, name: str) -> None:
    total = sum(s.num_samples for s in split.shards)
    if total != split.num_samples:
        raise ManifestError(f"{name}: split {split_name!r} records {split.num_samples} samples but its shards hold "
                            f"{total}")
    for index, shard in enumerate(split.shards):
        _check_relative(shard.path, name)
        is_last = index == len(split.shards) - 1
        if shard.num_samples < 1 or shard.num_samples > samples_per_shard or \
                (not is_last and shard.num_samples != samples_per_shard):
            raise ManifestError(f"{name}: shard {shard.path} holds {shard.num_samples} samples; every shard but the "
                                f"last of a split must hold exactly samples_per_shard ({samples_per_shard})")


def _check_relative(path: str, name: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or ".." in parts or is_url(path):
        raise ManifestError(f"{name}: path {path!r} must be relative to the dataset root, with '/' separators and "
                            "no '..'")


def _read_text(location: str) -> str:
    try:
        if is_url(location):
            import fsspec

            with fsspec.open(location, "r", encoding="utf-8") as f:
                return f.read()
        with open(location, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError as err:
        raise ManifestError(f"no manifest at {location}; a dataset folder is complete only once `pretrain prepare` "
                            "has written manifest.json there") from err
    except OSError as err:
        raise ManifestError(f"cannot read manifest {location}: {err}") from err



def write_dataset_from_arrays(out_dir: str | os.PathLike, splits: dict[str, Any], *, samples_per_shard: int,
                              tokenizer: TokenizerInfo | None = None, dtype: str | None = None) -> Manifest:
    """Write a complete dataset (shards + manifest.json) from in-memory samples: `splits` maps a split name to a
    2-D array [num_samples, seq_len + 1]. For tests, benchmarks and small tools; `pretrain prepare` is the real
    producer. Without `tokenizer` a placeholder (no model file) sized to the largest token id is recorded."""
    import numpy as np

    from data_pipeline.shards import ShardSetWriter, token_dtype_name

    arrays = {name: np.asarray(samples) for name, samples in splits.items()}
    sample_len_tokens = {a.shape[1] for a in arrays.values() if a.ndim == 2}
    if len(sample_len_tokens) != 1 or any(a.ndim != 2 for a in arrays.values()):
        raise ManifestError("every split must be a 2-D array [num_samples, seq_len + 1] of one sample length")
    if tokenizer is None:
        vocab_size = max(int(a.max()) for a in arrays.values() if a.size) + 1
        tokenizer = TokenizerInfo(fingerprint=f"synthetic-vocab{vocab_size}", vocab_size=vocab_size,
                                  model_type="none", unk_id=-1, bos_id=-1, eos_id=-1, pad_id=-1, model_file=None)
    dtype = dtype or token_dtype_name(tokenizer.vocab_size)
    split_infos = {}
    for name, samples in arrays.items():
        with ShardSetWriter(out_dir, name, samples_per_shard, dtype) as writer:
            writer.write_batch(samples)
        split_infos[name] = SplitInfo.from_shards(writer.close(), num_tokens=int(samples.size),
                                                  num_documents=len(samples))
    manifest = Manifest.create(seq_len=sample_len_tokens.pop() - 1, dtype=dtype, samples_per_shard=samples_per_shard,
                               tokenizer=tokenizer, splits=split_infos)
    return Manifest.load(manifest.save(out_dir))
