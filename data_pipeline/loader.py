"""The training loader: a pure global sample order, sliced by DP rank and DataLoader worker, resumable exactly.

Layers, bottom up (docs/data_pipeline.md, "Loader contract"):
- `SourceOrder`: local position -> (shard, sample) for one split of one manifest, epoch after epoch. Shuffled order =
  a seeded permutation of the shards, cut into blocks of `shuffle_block_shards` consecutive shards, samples shuffled
  inside each block. A worker therefore reads from at most one block (B shards) of each source at a time: bounded
  open files and memory maps, and for remote data a bounded download cache, while the shard permutation still spreads
  every region of the corpus over the whole epoch.
- `MixturePlan`: global position -> (source, local position). Per block of `mixture_block_samples` positions each
  source gets a fixed quota (largest remainder of its weight), placed by a seeded shuffle; counting a source's
  positions before any global position is O(block), so resume never replays the stream.
- `GlobalOrder`: the two composed; `sample_id(p) -> (source, sample index in split)`.
- `TokenStream` (IterableDataset): one DP rank's micro-batches from a start position; worker w of W makes micro-batches
  m = w (mod W), which torch's DataLoader returns round-robin, so the stream does not depend on W.
- `TokenLoader` / `EvalLoader`: the objects the trainer holds; `TokenLoader` counts consumed samples in the main
  process from what it actually yielded and saves/loads that as its state.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.errors import DataPipelineError, ManifestMismatchError
from data_pipeline.manifest import Manifest, canonical_json
from data_pipeline.shards import (
    DEFAULT_MAX_CACHE_BYTES,
    ShardCache,
    ShardEntry,
    ShardReader,
    default_cache_dir,
    open_shard,
)

STATE_VERSION = 1
DEFAULT_SHUFFLE_BLOCK_SHARDS = 8
DEFAULT_MIXTURE_BLOCK_SAMPLES = 4096


def _rng(*parts: Any) -> np.random.Generator:
    """A generator seeded by a hash of `parts`, so every (seed, data, epoch, block) gets an independent stream."""
    digest = hashlib.sha256(canonical_json(list(parts)).encode("ascii")).digest()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int.from_bytes(digest, "little"))))


class _LRU(OrderedDict):
    """A tiny LRU dict: `put` evicts the least recently used entries beyond `capacity`."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def get_fresh(self, key: Any) -> Any:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> Any:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)
        return value


# ----------------------------------------------------------------------------------------------------------------
# Order of one source
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _BlockPlan:
    shard_of: np.ndarray   # [block_samples] shard index of each position in the block
    index_of: np.ndarray   # [block_samples] sample index inside that shard


class SourceOrder:
    """Local position (0, 1, 2, ... across epochs) -> (shard index, sample index in shard) for one split.

    A pure function of (seed, epoch, fingerprint, split, shuffle_block_shards); epoch = position // num_samples.
    """

    def __init__(self, fingerprint: str, split: str, shard_num_samples: Sequence[int], seed: int,
                 shuffle: bool = True, shuffle_block_shards: int = DEFAULT_SHUFFLE_BLOCK_SHARDS) -> None:
        if shuffle_block_shards < 1:
            raise DataPipelineError(f"shuffle_block_shards must be >= 1, got {shuffle_block_shards}")
        self.identity = (fingerprint, split)
        self.seed = seed
        self.shuffle = shuffle
        self.block_shards = shuffle_block_shards
        self.shard_num_samples = np.asarray(shard_num_samples, dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_num_samples)])
        self.num_samples = int(self.shard_starts[-1])
        if self.num_samples == 0:
            raise DataPipelineError(f"split {split!r} of dataset {fingerprint[:12]} has no samples")
        self._epochs = _LRU(capacity=2)   # epoch -> (shard permutation, block start offsets)
        self._blocks = _LRU(capacity=4)   # (epoch, block) -> _BlockPlan

    def locate(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(int(position), self.num_samples)
        if not self.shuffle:
            shard = int(np.searchsorted(self.shard_starts, offset, side="right")) - 1
            return shard, offset - int(self.shard_starts[shard])
        permutation, block_starts = self._epoch_plan(epoch)
        block = int(np.searchsorted(block_starts, offset, side="right")) - 1
        plan = self._block_plan(epoch, block, permutation)
        in_block = offset - int(block_starts[block])
        return int(plan.shard_of[in_block]), int(plan.index_of[in_block])

    def sample_index(self, position: int) -> int:
        """Index of the sample at `position` within the split (shard start + index in shard)."""
        shard, index = self.locate(position)
        return int(self.shard_starts[shard]) + index

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        plan = self._epochs.get_fresh(epoch)
        if plan is None:
            permutation = _rng("shards", self.seed, *self.identity, epoch).permutation(len(self.shard_num_samples))
            sizes = self.shard_num_samples[permutation]
            block_sizes = np.add.reduceat(sizes, np.arange(0, len(sizes), self.block_shards))
            plan = self._epochs.put(epoch, (permutation, np.concatenate([[0], np.cumsum(block_sizes)])))
        return plan

    def _block_plan(self, epoch: int, block: int, permutation: np.ndarray) -> _BlockPlan:
        plan = self._blocks.get_fresh((epoch, block))
        if plan is None:
            shards = permutation[block * self.block_shards: (block + 1) * self.block_shards]
            sizes = self.shard_num_samples[shards]
            shard_of = np.repeat(shards, sizes)
            index_of = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            shuffle = _rng("samples", self.seed, *self.identity, epoch, block).permutation(len(shard_of))
            plan = self._blocks.put((epoch, block), _BlockPlan(shard_of[shuffle], index_of[shuffle]))
        return plan


# ----------------------------------------------------------------------------------------------------------------
# Mixture of sources
# ----------------------------------------------------------------------------------------------------------------
def largest_remainder_quotas(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer quotas summing to `total`, proportional to `weights` (Hamilton's method; ties go to the lower index)."""
    shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * total
    quotas = np.floor(shares).astype(np.int64)
    remainder = total - int(quotas.sum())
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - quotas[i]), i))
    for i in order[:remainder]:
        quotas[i] += 1
    return quotas


class MixturePlan:
    """Global position -> (source, position within that source's own stream)."""

    def __init__(self, weights: Sequence[float], block_samples: int, seed: int, fingerprint: str) -> None:
        if any(w <= 0 for w in weights):
            raise DataPipelineError(f"mixture weights must be > 0, got {list(weights)}")
        self.num_sources = len(weights)
        self.block_samples = block_samples
        self.quotas = largest_remainder_quotas(weights, self.block_samples)
        if np.any(self.quotas == 0):
            raise DataPipelineError(f"a mixture weight is too small for blocks of {block_samples} samples (quotas "
                                    f"{self.quotas.tolist()}); raise that weight or mixture_block_samples")
        self.seed = seed
        self.fingerprint = fingerprint
        self._blocks = _LRU(capacity=4)  # block -> (source of each position, rank among that source's positions)

    def assign(self, position: int) -> tuple[int, int]:
        if self.num_sources == 1:
            return 0, int(position)
        block, offset = divmod(int(position), self.block_samples)
        source_of, rank_of = self._block(block)
        source = int(source_of[offset])
        return source, block * int(self.quotas[source]) + int(rank_of[offset])

    def samples_per_source(self, consumed_samples: int) -> np.ndarray:
        """How many of positions [0, consumed_samples) went to each source."""
        if self.num_sources == 1:
            return np.asarray([consumed_samples], dtype=np.int64)
        full_blocks, partial = divmod(int(consumed_samples), self.block_samples)
        counts = full_blocks * self.quotas.copy()
        if partial:
            source_of, _ = self._block(full_blocks)
            counts += np.bincount(source_of[:partial], minlength=self.num_sources)
        return counts

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        plan = self._blocks.get_fresh(block)
        if plan is None:
            labels = np.repeat(np.arange(self.num_sources), self.quotas)
            source_of = labels[_rng("mixture", self.seed, self.fingerprint, block).permutation(len(labels))]
            rank_of = np.empty_like(source_of)
            for source in range(self.num_sources):
                where = np.flatnonzero(source_of == source)
                rank_of[where] = np.arange(len(where))
            plan = self._blocks.put(block, (source_of, rank_of))
        return plan


class GlobalOrder:
    """Global position -> (source index, sample index within that source's split): the whole data order."""

    def __init__(self, sources: Sequence[SourceOrder], plan: MixturePlan) -> None:
        self.sources = list(sources)
        self.plan = plan

    def locate(self, position: int) -> tuple[int, int, int]:
        """(source, shard index, sample index in shard)."""
        source, local_position = self.plan.assign(position)
        shard, index = self.sources[source].locate(local_position)
        return source, shard, index

    def sample_id(self, position: int) -> tuple[int, int]:
        source, local_position = self.plan.assign(position)
        return source, self.sources[source].sample_index(local_position)


# ----------------------------------------------------------------------------------------------------------------
# Sources: manifests, weights and where their shards come from
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceSpec:
    """One dataset of a mixture. `dataset`: folder, manifest.json or URL; `weight_tokens`: relative share of tokens."""

    dataset: str
    weight_tokens: float = 1.0
    name: str | None = None


@dataclass(frozen=True)
class _Source:
    name: str
    manifest: Manifest
    split: str
    weight_tokens: float

    @property
    def shards(self) -> tuple[ShardEntry, ...]:
        return self.manifest.split(self.split).shards


def _as_specs(sources: str | os.PathLike | SourceSpec | Sequence[str | SourceSpec]) -> list[SourceSpec]:
    if isinstance(sources, (str, os.PathLike, SourceSpec)):
        sources = [sources]  # type: ignore[list-item]
    specs = [s if isinstance(s, SourceSpec) else SourceSpec(os.fspath(s)) for s in sources]  # type: ignore[arg-type]
    if not specs:
        raise DataPipelineError("no data sources given; pass a dataset folder, manifest or a list of SourceSpec")
    return specs


def _load_sources(specs: Sequence[SourceSpec], split: str) -> list[_Source]:
    sources = []
    for spec in specs:
        manifest = Manifest.load(spec.dataset)
        manifest.split(split)  # fail now, in the main process, if the split is missing
        sources.append(_Source(spec.name or os.fspath(spec.dataset), manifest, split, float(spec.weight_tokens)))
    first = sources[0].manifest
    for source in sources[1:]:
        if source.manifest.sample_len_tokens != first.sample_len_tokens:
            raise ManifestMismatchError(
                f"mixture sources have different sample lengths: {sources[0].name} has {first.sample_len_tokens} "
                f"tokens per sample, {source.name} has {source.manifest.sample_len_tokens}; prepare every source "
                "with the same --seq-len")
        if source.manifest.tokenizer.fingerprint != first.tokenizer.fingerprint:
            raise ManifestMismatchError(
                f"mixture sources were tokenized differently: {sources[0].name} uses tokenizer "
                f"{first.tokenizer.fingerprint}, {source.name} uses {source.manifest.tokenizer.fingerprint}; "
                "prepare every source with the same tokenizer")
    return sources


def mixture_fingerprint(sources: Sequence[_Source], quotas: np.ndarray, block_samples: int) -> str:
    """One source: its manifest fingerprint. Several: a hash over each (fingerprint, split) and the integer quotas
    (the weights as the loader actually applies them), so re-weighting a mixture is a different stream."""
    if len(sources) == 1:
        return sources[0].manifest.fingerprint
    content = {"sources": [[s.manifest.fingerprint, s.split] for s in sources], "quotas": quotas.tolist(),
               "mixture_block_samples": block_samples}
    return hashlib.sha256(canonical_json(content).encode("ascii")).hexdigest()


class _ShardOpener:
    """Per-process open readers of one source (bounded LRU), fetching remote shards through the cache first."""

    def __init__(self, source: _Source, verify: bool, cache: ShardCache | None, max_open: int) -> None:
        self.source = source
        self.verify = verify
        self.cache = cache
        self.readers = _LRU(capacity=max_open)

    def reader(self, shard: int) -> ShardReader:
        reader = self.readers.get_fresh(shard)
        if reader is None:
            reader = self.readers.put(shard, self._open(self.source.shards[shard]))
        return reader

    def _open(self, entry: ShardEntry) -> ShardReader:
        return open_shard(self.source.manifest.resolve(entry.path), entry, self.verify, self.cache)


# ----------------------------------------------------------------------------------------------------------------
# The torch dataset: one DP rank's micro-batches
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ReadSettings:
    verify_checksums: bool
    cache_dir: str | None
    max_cache_bytes: int
    max_open_shards: int


@dataclass
class RawMicrobatch:
    """What a worker sends to the main process: samples in their storage dtype (2-8x fewer bytes than int64) and
    their ids. Pickled through the worker pipe, which measured ~3x faster than torch's shared-memory tensors for
    micro-batch-sized arrays; the int64 tensors are built in the main process by `to_tensors`."""

    samples: np.ndarray      # (mb, seq_len + 1) uint16/uint32
    sample_ids: np.ndarray   # (mb, 2) int64: [source, sample index in split]

    def to_tensors(self, return_sample_ids: bool = False, pin_memory: bool = False) -> tuple[torch.Tensor, ...]:
        micro_batch_size, sample_len_tokens = self.samples.shape
        tokens = np.empty((micro_batch_size, sample_len_tokens - 1), dtype=np.int64)   # (mb, seq_len)
        labels = np.empty((micro_batch_size, sample_len_tokens - 1), dtype=np.int64)   # (mb, seq_len)
        tokens[:] = self.samples[:, :-1]
        labels[:] = self.samples[:, 1:]   # next-token targets: the same sample shifted by one
        batch = [torch.from_numpy(tokens), torch.from_numpy(labels)]
        if return_sample_ids:
            batch.append(torch.from_numpy(self.sample_ids))
        if pin_memory and torch.cuda.is_available():
            batch = [t.pin_memory() for t in batch]
        return tuple(batch)


class TokenStream(IterableDataset):
    """Micro-batches `m = 0, 1, ...` of one DP rank, starting at global position `start_samples`.

    Micro-batch m holds positions `start + m*mb*dp + rank*mb + [0, mb)`; worker w of W yields m = w (mod W).
    Items are `RawMicrobatch`; `TokenLoader`/`EvalLoader` turn them into `(tokens, labels[, sample_ids])`.
    """

    def __init__(self, sources: Sequence[_Source], order: GlobalOrder, micro_batch_size: int, dp_rank: int,
                 dp_size: int, start_samples: int, num_microbatches: int | None, settings: _ReadSettings) -> None:
        super().__init__()
        self.sources = list(sources)
        self.order = order
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.start_samples = start_samples
        self.num_microbatches = num_microbatches
        self.settings = settings
        self.sample_len_tokens = sources[0].manifest.sample_len_tokens
        # Mixed uint16/uint32 sources share one batch array of the wider type.
        self.storage_dtype = np.result_type(*[s.manifest.dtype for s in sources])
        self._openers: tuple[int, list[_ShardOpener]] | None = None  # (pid, openers): rebuilt in each worker

    def positions(self, microbatch: int) -> np.ndarray:
        first = (self.start_samples + microbatch * self.micro_batch_size * self.dp_size
                 + self.dp_rank * self.micro_batch_size)
        return np.arange(first, first + self.micro_batch_size, dtype=np.int64)

    def __iter__(self) -> Iterator[RawMicrobatch]:
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        openers = self._process_openers()
        microbatch = worker_id
        while self.num_microbatches is None or microbatch < self.num_microbatches:
            yield self._read(microbatch, openers)
            microbatch += num_workers

    def microbatch(self, microbatch: int) -> RawMicrobatch:
        """Micro-batch `microbatch` of this rank, read in the calling process."""
        return self._read(microbatch, self._process_openers())

    def _read(self, microbatch: int, openers: list[_ShardOpener]) -> RawMicrobatch:
        samples = np.empty((self.micro_batch_size, self.sample_len_tokens), dtype=self.storage_dtype)
        sample_ids = np.empty((self.micro_batch_size, 2), dtype=np.int64)
        for row, position in enumerate(self.positions(microbatch)):
            source, shard, index = self.order.locate(int(position))
            samples[row] = openers[source].reader(shard).sample(index)  # copy out of the memory map
            sample_ids[row] = (source, int(self.order.sources[source].shard_starts[shard]) + index)
        return RawMicrobatch(samples, sample_ids)

    def _process_openers(self) -> list[_ShardOpener]:
        # Memory maps and open files must not cross a fork, so each process (main or worker) builds its own.
        if self._openers is None or self._openers[0] != os.getpid():
            settings = self.settings
            openers = []
            for source in self.sources:
                cache = None
                if source.manifest.is_remote:
                    cache = ShardCache(settings.cache_dir or default_cache_dir(), settings.max_cache_bytes)
                openers.append(_ShardOpener(source, settings.verify_checksums, cache, settings.max_open_shards))
            self._openers = (os.getpid(), openers)
        return self._openers[1]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_openers"] = None  # never pickle open maps into spawned workers
        return state


def _make_dataloader(stream: TokenStream, num_workers: int, prefetch_factor: int) -> DataLoader:
    # batch_size=None: the stream yields whole micro-batches; workers interleave them round-robin (in order).
    # collate_fn=identity keeps RawMicrobatch as numpy for the pipe (see RawMicrobatch).
    return DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_identity,
                      prefetch_factor=prefetch_factor, worker_init_fn=_ignore_stop_signals)


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGUSR1/SIGTERM to the training process.

    Slurm's `--signal=USR1@N` and its time-limit SIGTERM go to every process of the job step, workers included;
    USR1's default action would kill a worker mid-batch, and the trainer would die of "DataLoader worker exited
    unexpectedly" instead of finishing its step and checkpointing. The trainer shuts its workers down itself.
    """
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _identity(item: RawMicrobatch) -> RawMicrobatch:
    return item


def _iterate(stream: TokenStream, num_workers: int, prefetch_factor: int) -> Iterator[RawMicrobatch]:
    if num_workers == 0:
        # No workers: read in this process directly; torch's DataLoader would only add ~50 us per micro-batch.
        yield from stream
        return
    iterator = iter(_make_dataloader(stream, num_workers, prefetch_factor))
    try:
        yield from iterator
    finally:
        # Stop workers now: an iterator left to the garbage collector after a worker raised (e.g. a corrupt shard)
        # costs a 5 s join timeout per iterator in torch 2.x; the explicit shutdown takes milliseconds.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _check_rank(micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int) -> None:
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size or num_workers < 0:
        raise DataPipelineError(f"need micro_batch_size >= 1, dp_size >= 1, 0 <= dp_rank < dp_size and "
                                f"num_workers >= 0; got micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, "
                                f"dp_size={dp_size}, num_workers={num_workers}")


# ----------------------------------------------------------------------------------------------------------------
# The objects the trainer holds
# ----------------------------------------------------------------------------------------------------------------
class TokenLoader:
    """Infinite training stream of one DP rank: iterate for `(tokens, labels)` micro-batches.

    `state_dict()` / `load_state_dict()` carry the global consumed-sample count; resuming gives exactly the stream an
    uninterrupted run would have seen, also with a different dp_size or num_workers (same global batch size).
    Keep one live iterator per loader: a new `iter()` continues from the samples consumed so far.
    """

    def __init__(self, sources: str | os.PathLike | SourceSpec | Sequence[str | SourceSpec], *,
                 micro_batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1, split: str = "train",
                 num_workers: int = 0, shuffle: bool = True,
                 shuffle_block_shards: int = DEFAULT_SHUFFLE_BLOCK_SHARDS,
                 mixture_block_samples: int = DEFAULT_MIXTURE_BLOCK_SAMPLES, verify_checksums: bool = True,
                 cache_dir: str | None = None, max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
                 return_sample_ids: bool = False, prefetch_factor: int = 4, pin_memory: bool = False) -> None:
        _check_rank(micro_batch_size, dp_rank, dp_size, num_workers)
        self.sources = _load_sources(_as_specs(sources), split)
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_block_shards = shuffle_block_shards
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.return_sample_ids = return_sample_ids
        # Weights are in tokens; every source has the same sample length, so token shares equal sample shares.
        weights = [s.weight_tokens for s in self.sources]
        block_samples = mixture_block_samples if len(self.sources) > 1 else 1
        self.fingerprint = mixture_fingerprint(self.sources, largest_remainder_quotas(weights, block_samples),
                                               block_samples)
        self.mixture = MixturePlan(weights, block_samples, seed, self.fingerprint)
        self.order = GlobalOrder([SourceOrder(s.manifest.fingerprint, split, [e.num_samples for e in s.shards], seed,
                                              shuffle, shuffle_block_shards) for s in self.sources], self.mixture)
        self.sample_len_tokens = self.sources[0].manifest.sample_len_tokens
        # Each source reads from one block of B shards at a time; +1 covers the hand-over between two blocks.
        max_open = (shuffle_block_shards if shuffle else 1) + 1
        self._settings = _ReadSettings(verify_checksums, cache_dir, max_cache_bytes, max_open)
        self._consumed_samples = 0
        self._generation = 0

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed by all DP ranks together (this rank's yielded micro-batches x mb x dp_size)."""
        return self._consumed_samples

    @property
    def samples_per_microbatch_all_ranks(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self._generation += 1
        generation = self._generation
        stream = TokenStream(self.sources, self.order, self.micro_batch_size, self.dp_rank, self.dp_size,
                             self._consumed_samples, None, self._settings)
        for raw in _iterate(stream, self.num_workers, self.prefetch_factor):
            if generation != self._generation:
                raise DataPipelineError("this TokenLoader iterator was superseded by a newer iter() or "
                                        "load_state_dict(); keep one live iterator per loader")
            # Counted here, in the main process, as the batch is handed out: prefetched batches are not consumed.
            self._consumed_samples += self.samples_per_microbatch_all_ranks
            yield raw.to_tensors(self.return_sample_ids, self.pin_memory)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "consumed_samples": self._consumed_samples, "fingerprint": self.fingerprint,
                "seed": self.seed, "sample_len_tokens": self.sample_len_tokens, "shuffle": self.shuffle,
                "shuffle_block_shards": self.shuffle_block_shards,
                "mixture_block_samples": self.mixture.block_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; refuses state from other data, another order, or an uneven position."""
        if state.get("fingerprint") != self.fingerprint:
            names = ", ".join(s.manifest.name for s in self.sources)
            raise ManifestMismatchError(
                f"loader state belongs to data fingerprint {state.get('fingerprint')} but {names} has fingerprint "
                f"{self.fingerprint} (different data, tokenizer, mixture weights or split); resume with the dataset "
                "the checkpoint was trained on, or start the data stream fresh")
        for key in ("seed", "sample_len_tokens", "shuffle", "shuffle_block_shards", "mixture_block_samples"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ManifestMismatchError(
                    f"loader state has {key}={state[key]!r} but this loader has {key}={self.state_dict()[key]!r}; "
                    f"set data.{key} to {state[key]!r} to resume the same sample stream")
        consumed = int(state["consumed_samples"])
        if consumed < 0 or consumed % self.samples_per_microbatch_all_ranks:
            raise DataPipelineError(
                f"consumed_samples {consumed} is not a multiple of micro_batch_size x dp_size = "
                f"{self.micro_batch_size} x {self.dp_size}; resume with a micro batch and DP size that divide the "
                "global batch size the checkpoint was written with")
        self._consumed_samples = consumed
        self._generation += 1  # any live iterator now points at the wrong position

    def samples_per_source(self) -> dict[str, int]:
        """Global samples consumed from each source so far (computed from the consumed positions, O(block))."""
        counts = self.mixture.samples_per_source(self._consumed_samples)
        return {source.name: int(count) for source, count in zip(self.sources, counts)}

    def tokens_per_source(self) -> dict[str, int]:
        """Global training tokens (seq_len per sample) consumed from each source so far."""
        seq_len = self.sample_len_tokens - 1
        return {name: count * seq_len for name, count in self.samples_per_source().items()}

    def epochs_per_source(self) -> dict[str, float]:
        """Fraction of passes over each source's split so far (1.5 = halfway through the second epoch)."""
        counts = self.mixture.samples_per_source(self._consumed_samples)
        return {s.name: int(c) / s.manifest.split(s.split).num_samples for s, c in zip(self.sources, counts)}


class EvalLoader:
    """Deterministic pass over a validation split: no shuffle, rank r takes its slice of each micro-step, and every
    rank yields the same number of micro-batches (the tail that would not fill all ranks is dropped)."""

    def __init__(self, dataset: str | os.PathLike, *, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 split: str = "val", num_workers: int = 0, max_microbatches: int | None = None,
                 verify_checksums: bool = True, cache_dir: str | None = None,
                 max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES, return_sample_ids: bool = False,
                 prefetch_factor: int = 4, pin_memory: bool = False) -> None:
        _check_rank(micro_batch_size, dp_rank, dp_size, num_workers)
        self.sources = _load_sources(_as_specs(dataset), split)
        manifest = self.sources[0].manifest
        num_samples = manifest.split(split).num_samples
        full_microbatches = num_samples // (micro_batch_size * dp_size)
        if full_microbatches == 0:
            raise DataPipelineError(f"split {split!r} of {manifest.name} has {num_samples} samples, fewer than "
                                    f"micro_batch_size x dp_size = {micro_batch_size * dp_size}; evaluate with a smaller "
                                    "micro batch or prepare a larger validation split (pretrain prepare "
                                    "--val-fraction F or --val-input FILES)")
        if max_microbatches is not None:
            full_microbatches = min(full_microbatches, max_microbatches)
        self.num_microbatches = full_microbatches
        order = GlobalOrder([SourceOrder(manifest.fingerprint, split, [e.num_samples for e in manifest.split(split)
                                                                       .shards], seed=0, shuffle=False)],
                            MixturePlan([1.0], 1, 0, manifest.fingerprint))
        settings = _ReadSettings(verify_checksums, cache_dir, max_cache_bytes, max_open_shards=2)
        self._stream = TokenStream(self.sources, order, micro_batch_size, dp_rank, dp_size, 0,
                                   self.num_microbatches, settings)
        self.return_sample_ids = return_sample_ids
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory

    def __len__(self) -> int:
        return self.num_microbatches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for raw in _iterate(self._stream, self.num_workers, self.prefetch_factor):
            yield raw.to_tensors(self.return_sample_ids, self.pin_memory)
