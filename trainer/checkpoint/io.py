"""Bytes on disk: a streaming safetensors writer that hashes while it writes, fsync, atomic replace, and reads that
never unpickle (safetensors headers are JSON, tensors are raw bytes; everything else is JSON or YAML).

Every file of a checkpoint is written once, fsynced, and recorded with its size and sha256. All writes go through
`_write_all` (one `os.write` loop): a full disk surfaces there as OSError(ENOSPC), and the partial file is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
}
_HASH_CHUNK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the checkpoint directory, '/'-separated
    bytes: int
    sha256: str

    def as_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha256}


def _write_all(fd: int, data: memoryview) -> None:
    """os.write until every byte is out (a write may be partial); ENOSPC and EIO surface here."""
    while len(data):
        written = os.write(fd, data)
        data = data[written:]


def write_file(path: Path, chunks: Iterable[Any], root: Path) -> FileRecord:
    """Write `chunks` (bytes-like) to a new file, fsync it, return its record. On any error the partial file is
    removed and the error re-raised, so a failed write never leaves a file that looks complete.

    The sha256 runs in a second thread, chunk by chunk in order, while this one writes: both release the GIL, so
    hashing hides behind the disk (measured on the 125M checkpoint: 1.1 s of hashing per 1.4 GB)."""
    digest = hashlib.sha256()
    size = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
            pending = []
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                pending.append(hasher.submit(digest.update, view))  # one worker: updates stay in order
                _write_all(fd, view)
                size += len(view)
            for future in pending:
                future.result()
        os.fsync(fd)  # before the record exists: a recorded file is on stable storage
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return FileRecord(path.relative_to(root).as_posix(), size, digest.hexdigest())


def write_json(path: Path, obj: Any, root: Path) -> FileRecord:
    text = json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n"
    return write_file(path, [text.encode("utf-8")], root)


def write_text(path: Path, text: str, root: Path) -> FileRecord:
    return write_file(path, [text.encode("utf-8")], root)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())  # no copy: a view of the tensor's storage


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], root: Path,
                      metadata: dict[str, str] | None = None) -> FileRecord:
    """A standard safetensors file (readable by `safetensors.safe_open`), streamed tensor by tensor: no second copy
    of the data in memory, and the sha256 is computed on the way out."""
    header: dict[str, Any] = {"__metadata__": metadata or {}}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu":
            raise ValueError(f"tensor {name} is on {tensor.device}: copy it to the CPU before writing")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name} has dtype {tensor.dtype}, which this writer does not store")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the reference writer does
    chunks: list[Any] = [struct.pack("<Q", len(encoded)), encoded]
    return write_file(path, [*chunks, *(_tensor_bytes(t) for t in tensors.values() if t.numel())], root)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (POSIX needs the directory itself fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_text_atomically(path: Path, text: str) -> None:
    """`path` holds either the old or the new text at every moment, never a mix (temp file + fsync + rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write_file(tmp, [text.encode("utf-8")], path.parent)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class TensorFiles:
    """Open safetensors files of one checkpoint, by relative path (memory-mapped; closed on exit)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._open: dict[str, Any] = {}

    def get_slice(self, relative: str, key: str) -> Any:
        from safetensors import safe_open

        handle = self._open.get(relative)
        if handle is None:
            handle = safe_open(str(self.root / relative), framework="pt", device="cpu")
            self._open[relative] = handle
        return handle.get_slice(key)

    def close(self) -> None:
        self._open.clear()  # safe_open handles release their mmaps when dropped


@contextmanager
def tensor_files(root: Path) -> Iterator[TensorFiles]:
    files = TensorFiles(root)
    try:
        yield files
    finally:
        files.close()
