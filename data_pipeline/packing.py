"""Packing a split's token stream into shards: planned in order by one process, written by any.

A split's samples are consecutive `sample_len_tokens` slices of its token stream (every document's tokens followed
by eos, and preceded by bos with `prepare --add-bos`, in input order), and shard j holds samples
[j * samples_per_shard, (j + 1) * samples_per_shard). So once the token counts of everything before a shard are
known, the shard's content is fixed. `ShardPlanner` turns the stream, arriving as `Chunk`s in input order, into
`ShardJob`s (which token ranges of which chunks form shard j):
bookkeeping only, no token is touched. `write_shard` assembles and writes one job wherever it runs. Shards are
therefore byte-identical whichever process writes them, in whatever order they finish.

A chunk's tokens live in memory (prepare with one process) or in a spool file a worker wrote (several processes),
so that with many workers no token passes through the main process (prepare.py).
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipeline.errors import DataPipelineError
from data_pipeline.shards import ShardEntry, ShardSetWriter, token_dtype

# In-memory tokens, or the path of a spool file of raw tokens in the shard dtype (native little-endian).
TokenRef = np.ndarray | str


@dataclass(frozen=True)
class Chunk:
    """`count` tokens of a split's stream, starting `offset` tokens into `ref`."""

    ref: TokenRef
    offset: int
    count: int


@dataclass(frozen=True)
class ShardLayout:
    """Where and how a dataset's shards are written: the same for every shard of every split."""

    out_dir: str
    dtype_name: str
    sample_len_tokens: int  # seq_len + 1
    samples_per_shard: int


@dataclass(frozen=True)
class ShardJob:
    split: str
    shard_index: int
    num_samples: int
    pieces: tuple[Chunk, ...]  # in stream order; their counts add up to num_samples * sample_len_tokens


class ShardPlanner:
    """Cuts one split's stream of chunks into shard jobs. `take_consumed()` names the chunks (one entry per added
    chunk) the planner no longer needs: all of it is in jobs already returned, or it is part of the dropped tail;
    a spool file can go once those jobs are written."""

    def __init__(self, split: str, sample_len_tokens: int, samples_per_shard: int) -> None:
        self.split = split
        self.sample_len_tokens = sample_len_tokens
        self.samples_per_shard = samples_per_shard
        self._consumed: list[TokenRef] = []
        self._pending: deque[Chunk] = deque()  # the stream not yet in a job, in order
        self._num_pending_tokens = 0
        self.num_tokens_in = 0
        self.num_samples = 0
        self.num_shards = 0
        self.dropped_tail_tokens = 0

    def add(self, chunk: Chunk) -> list[ShardJob]:
        """Append a chunk; return the jobs of every shard it completes."""
        if chunk.count == 0:
            return []
        self.num_tokens_in += chunk.count
        self._pending.append(chunk)
        self._num_pending_tokens += chunk.count
        jobs = []
        while self._num_pending_tokens >= self.samples_per_shard * self.sample_len_tokens:
            jobs.append(self._cut(self.samples_per_shard))
        return jobs

    def finish(self) -> list[ShardJob]:
        """The last, shorter shard (if a full sample is left); the rest (< one sample) is the dropped tail."""
        num_samples = self._num_pending_tokens // self.sample_len_tokens
        jobs = [self._cut(num_samples)] if num_samples else []
        self.dropped_tail_tokens = self._num_pending_tokens
        self._consumed.extend(chunk.ref for chunk in self._pending)
        self._pending.clear()
        self._num_pending_tokens = 0
        return jobs

    def take_consumed(self) -> list[TokenRef]:
        consumed, self._consumed = self._consumed, []
        return consumed

    def _cut(self, num_samples: int) -> ShardJob:
        needed_tokens = num_samples * self.sample_len_tokens
        pieces = []
        while needed_tokens:
            head = self._pending[0]
            take = min(head.count, needed_tokens)
            pieces.append(Chunk(head.ref, head.offset, take))
            if take == head.count:
                self._consumed.append(self._pending.popleft().ref)
            else:
                self._pending[0] = Chunk(head.ref, head.offset + take, head.count - take)
            needed_tokens -= take
        self._num_pending_tokens -= num_samples * self.sample_len_tokens
        job = ShardJob(self.split, self.num_shards, num_samples, tuple(pieces))
        self.num_shards += 1
        self.num_samples += num_samples
        return job


def write_shard(job: ShardJob, layout: ShardLayout) -> ShardEntry:
    """Assemble one job's samples from its pieces and write its shard (temp name, fsync, rename)."""
    sample_len_tokens = layout.sample_len_tokens
    rows = np.empty(job.num_samples * sample_len_tokens, token_dtype(layout.dtype_name))
    position = 0
    for piece in job.pieces:
        _read_piece(piece, rows[position : position + piece.count])
        position += piece.count
    if position != len(rows):
        raise AssertionError(f"shard job {job.split}/{job.shard_index} has {position} tokens, expected {len(rows)}")
    writer = ShardSetWriter(layout.out_dir, job.split, layout.samples_per_shard, layout.dtype_name,
                            sample_len_tokens, first_shard_index=job.shard_index)
    with writer:
        writer.write_batch(rows.reshape(job.num_samples, sample_len_tokens))
    (entry,) = writer.entries
    return entry


def _read_piece(piece: Chunk, out: np.ndarray) -> None:
    if isinstance(piece.ref, np.ndarray):
        out[:] = piece.ref[piece.offset : piece.offset + piece.count]
        return
    with open(piece.ref, "rb") as f:
        f.seek(piece.offset * out.itemsize)
        num_read_bytes = f.readinto(out.view(np.uint8))
    if num_read_bytes != out.nbytes:
        raise DataPipelineError(f"spool file {piece.ref} ends early ({num_read_bytes} of {out.nbytes} bytes at token "
                                f"{piece.offset}); was it deleted or its disk full? Re-run prepare, with --spool-dir "
                                "on a disk with free space")


class SpoolWriter:
    """Appends token arrays to one raw spool file (read back by `_read_piece`). The file is created at the first
    non-empty array: a split a task has no tokens for leaves no file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.num_tokens = 0
        self._file: Any = None

    def append(self, tokens: np.ndarray) -> None:
        if not len(tokens):
            return
        try:
            if self._file is None:
                self._file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
            tokens.tofile(self._file)
        except OSError as err:
            self._fail(err)
        self.num_tokens += len(tokens)

    def close(self) -> int:
        """Close the file; the number of tokens written."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError as err:
                self._fail(err)
            self._file = None
        return self.num_tokens

    def _fail(self, err: OSError) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        _remove_quietly(self.path)
        raise DataPipelineError(f"cannot write the spool file {self.path} ({err}); pass --spool-dir on a local disk "
                                "with free space (it holds a few shards' worth of tokens at a time)") from err


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
