"""The on-disk layout of one checkpoint, its index, and integrity checks (docs/checkpointing.md, "Format").

    <checkpoint.dir>/
      latest                       "step_200": the newest complete checkpoint, written after it (a hint for people
                                   and tools; resume scans the step_* directories itself)
      step_200/
        metadata.json              written last: format version, step, tokens, topology, software, trainer state
                                   (LR schedule, Adam step, data-loader state, fault counters) and
                                   {file: bytes, sha256} for every other file
        index.json                 tensor key → global shape, dtype and the slices that tile it (file, offset, shape)
        config.yaml                the resolved config of the run that wrote it
        shards/rank-00003.safetensors   the slices rank 3 owned: full fp32 weights and Adam moments
        rng/rank-00003.json        rank 3's python / numpy / torch RNG states
      .step_300.tmp/               a save in progress (or left by a crash): never read, removed by the next save

Tensor keys: "param/<name>", "exp_avg/<name>", "exp_avg_sq/<name>", where <name> is the canonical parameter name
(`Llama.named_parameters()`). Global shapes are the unsharded ones, with the vocabulary padded as in training
(rows beyond model.vocab_size are zero: the loss leaves those columns out of its softmax, so nothing trains them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint.io import read_json, sha256_file

FORMAT_NAME = "pretrain-checkpoint"
FORMAT_VERSION = 1
METADATA = "metadata.json"
INDEX = "index.json"
CONFIG = "config.yaml"
LATEST = "latest"
MARKERS = ".done"  # per-rank "my files are written" records inside a temp dir; merged into index/metadata
TENSOR_KINDS = ("param", "exp_avg", "exp_avg_sq")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_DIR = re.compile(r"^\.step_(\d+)\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which file and what to do."""

    user_error = True


class CheckpointCompatibilityError(CheckpointError):
    """The checkpoint does not fit this run's config (model shape, data); the message names the field."""


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def tmp_dir_name(step: int) -> str:
    return f".step_{step}.tmp"


def shard_file(rank: int) -> str:
    return f"shards/rank-{rank:05d}.safetensors"


def rng_file(rank: int) -> str:
    return f"rng/rank-{rank:05d}.json"


def marker_file(rank: int, failed: bool = False) -> str:
    return f"{MARKERS}/rank-{rank:05d}.{'failed' if failed else 'ok'}.json"


def tensor_key(kind: str, name: str) -> str:
    return f"{kind}/{name}"


def step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / METADATA).is_file()


def list_step_dirs(root: Path) -> list[Path]:
    """step_* directories under `root`, newest (highest step) first. Completeness is not checked here."""
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]


def list_tmp_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir() and _TMP_DIR.match(p.name)] if root.is_dir() else []


# ---------------------------------------------------------------------------------------------------------------------
# Metadata and index


def read_metadata(ckpt: Path) -> dict[str, Any]:
    meta = read_json(ckpt / METADATA)
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{ckpt / METADATA} is not a {FORMAT_NAME} metadata file (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt} has checkpoint format version {meta.get('format_version')}, this code reads "
                              f"version {FORMAT_VERSION}: use the pretrain version that wrote it (software in "
                              f"metadata.json), or convert it")
    return meta


@dataclass(frozen=True)
class Slice:
    file: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorEntry:
    shape: tuple[int, ...]  # global (unsharded) shape
    dtype: str
    slices: tuple[Slice, ...]


def parse_index(raw: dict[str, Any]) -> dict[str, TensorEntry]:
    entries = {}
    for key, entry in raw["tensors"].items():
        slices = tuple(Slice(s["file"], tuple(s["offset"]), tuple(s["shape"])) for s in entry["slices"])
        entries[key] = TensorEntry(tuple(entry["shape"]), entry["dtype"], slices)
    return entries


def index_problems(index: dict[str, TensorEntry]) -> list[str]:
    """Slices must lie inside their tensor and their sizes add up to it (a missing writer leaves a hole)."""
    problems = []
    for key, entry in index.items():
        covered = 0
        for piece in entry.slices:
            if len(piece.offset) != len(entry.shape) or any(
                    o < 0 or o + n > full for o, n, full in zip(piece.offset, piece.shape, entry.shape)):
                problems.append(f"{key}: slice at {list(piece.offset)} of shape {list(piece.shape)} in {piece.file} "
                                f"lies outside the tensor shape {list(entry.shape)}")
            covered += math.prod(piece.shape)
        if covered != math.prod(entry.shape):
            problems.append(f"{key}: its slices hold {covered} of {math.prod(entry.shape)} elements (a shard is "
                            f"missing or duplicated)")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# Integrity


def checkpoint_files(meta: dict[str, Any]) -> list[str]:
    return sorted(meta.get("files", {}))


def verify_files(ckpt: Path, meta: dict[str, Any], names: list[str], *, hash_contents: bool = True) -> list[str]:
    """Problems with the named files of `ckpt`: missing, wrong size, or (hash_contents) wrong sha256."""
    problems = []
    for name in names:
        record = meta["files"][name]
        path = ckpt / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != record["bytes"]:
            problems.append(f"{name} has {size} bytes, metadata.json recorded {record['bytes']} (truncated?)")
        elif hash_contents and sha256_file(path) != record["sha256"]:
            problems.append(f"{name} does not match its sha256 in metadata.json (corrupt)")
    return problems


def shallow_problems(ckpt: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """(metadata or None, problems) from metadata.json and index.json alone: cheap checks every rank can run."""
    if not (ckpt / METADATA).is_file():
        return None, [f"{ckpt.name} has no {METADATA} (an incomplete save)"]
    try:
        meta = read_metadata(ckpt)
    except (ValueError, OSError, CheckpointError) as err:  # JSONDecodeError is a ValueError
        return None, [f"{ckpt.name}/{METADATA} is unreadable: {err}"]
    problems = verify_files(ckpt, meta, [INDEX], hash_contents=True) if INDEX in meta.get("files", {}) else [
        f"{ckpt.name}/{METADATA} does not list {INDEX}"]
    if not problems:
        try:
            problems = index_problems(parse_index(read_json(ckpt / INDEX)))
        except (ValueError, KeyError, TypeError) as err:
            problems = [f"{INDEX} is unreadable: {err}"]
    return meta, problems


def verify_checkpoint(ckpt: Path) -> list[str]:
    """Every problem of one checkpoint, checked by one process (tools and tests; training splits the hashing)."""
    meta, problems = shallow_problems(ckpt)
    if meta is None or problems:
        return problems
    return verify_files(ckpt, meta, checkpoint_files(meta))


# ---------------------------------------------------------------------------------------------------------------------
# Reading a region of a global tensor from its slices


def read_region(files: Any, entry: TensorEntry, key: str, start: tuple[int, ...], shape: tuple[int, ...],
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The block [start, start + shape) of the global tensor `key`, assembled from the stored slices that overlap
    it. Parts outside the stored global shape (vocabulary rows a larger padding adds) are zero."""
    out = torch.zeros(shape, dtype=dtype)
    for piece in entry.slices:
        lo = [max(s, o) for s, o in zip(start, piece.offset)]
        hi = [min(s + n, o + m) for s, n, o, m in zip(start, shape, piece.offset, piece.shape)]
        if any(a >= b for a, b in zip(lo, hi)):
            continue
        source = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, piece.offset))
        target = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
        out[target] = files.get_slice(piece.file, key)[source].to(dtype)
    return out


def iter_full_tensors(ckpt: Path, kind: str = "param") -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, full fp32 tensor) for every stored tensor of `kind`, one at a time."""
    from trainer.checkpoint.io import tensor_files

    index = parse_index(read_json(ckpt / INDEX))
    prefix = f"{kind}/"
    with tensor_files(ckpt) as files:
        for key, entry in index.items():
            if key.startswith(prefix):
                yield key[len(prefix):], read_region(files, entry, key, (0,) * len(entry.shape), entry.shape)
