"""Token sources for training and evaluation: (tokens, labels) int64 (micro_batch, seq_len) for one DP rank.

- `data.synthetic: true` → `SyntheticTokens`: no files, deterministic from the seed, learnable (so a loss curve means
  something); kept for tests and benchmarks.
- `data.datasets: [...]` → data_pipeline.loader.TokenLoader / EvalLoader over prepared datasets.

Both follow the loader contract (docs/data_pipeline.md): micro-step j of global batch k on DP rank r gets the global
positions k·G + j·(mb·dp) + r·mb + [0, mb), G = mb × grad_accum × dp. So "DP=2, GA=1" and "DP=1, GA=2" see the
same samples per optimizer step, and TP/PP ranks of one DP rank all see the same micro-batches. State:
`state_dict()` / `load_state_dict()` carry the global `consumed_samples`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from trainer.bootstrap import ParallelContext
from trainer.config import Config, ConfigError, Derived

log = logging.getLogger(__name__)

SYNTHETIC_STATE_VERSION = 1
_SPLIT_SALT = {"train": 0x5EED_0000, "val": 0x5EED_0001}
_MAX_STRIDE = 16


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread uint64 hash of each value (vectorised, no generator state)."""
    z = values.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def synthetic_samples(positions: np.ndarray, seed: int, split: str, vocab_size: int,
                      sample_len_tokens: int) -> np.ndarray:
    """(len(positions), sample_len_tokens) int64: sample p is the arithmetic sequence start + stride·t (mod vocab),
    with start and stride hashed from (seed, split, p). Learnable: the next token follows from the last two."""
    key = _mix64(np.asarray(positions, dtype=np.uint64) ^ _mix64(np.array([seed * 4 + _SPLIT_SALT[split]])))
    start = (key % np.uint64(vocab_size)).astype(np.int64)
    stride = (1 + (key >> np.uint64(32)) % np.uint64(_MAX_STRIDE - 1)).astype(np.int64)
    t = np.arange(sample_len_tokens, dtype=np.int64)
    return (start[:, None] + stride[:, None] * t[None, :]) % vocab_size


class SyntheticTokens:
    """Infinite synthetic training stream of one DP rank, with TokenLoader's interface and state."""

    def __init__(self, *, vocab_size: int, seq_len: int, micro_batch_size: int, seed: int, dp_rank: int = 0,
                 dp_size: int = 1, split: str = "train") -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size={dp_size})")
        self.vocab_size, self.seq_len, self.seed, self.split = vocab_size, seq_len, seed, split
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self._consumed_samples = 0

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed by all DP ranks together."""
        return self._consumed_samples

    def microbatch(self, first_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch whose first row is global position `first_position`: (tokens, labels), each (mb, T)."""
        positions = np.arange(first_position, first_position + self.micro_batch_size)
        samples = synthetic_samples(positions, self.seed, self.split, self.vocab_size, self.seq_len + 1)
        tokens = torch.from_numpy(samples[:, :-1].copy())  # (mb, T)
        labels = torch.from_numpy(samples[:, 1:].copy())  # (mb, T): the next token of each position
        return tokens, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        per_microstep = self.micro_batch_size * self.dp_size  # samples all DP ranks take per micro-step
        while True:
            batch = self.microbatch(self._consumed_samples + self.dp_rank * self.micro_batch_size)
            self._consumed_samples += per_microstep  # counted as handed out, like TokenLoader
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"version": SYNTHETIC_STATE_VERSION, "kind": "synthetic", "consumed_samples": self._consumed_samples,
                "seed": self.seed, "vocab_size": self.vocab_size, "seq_len": self.seq_len, "split": self.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("kind", "seed", "vocab_size", "seq_len", "split"):
            if state.get(key) != self.state_dict()[key]:
                raise ValueError(f"synthetic data state has {key}={state.get(key)!r} but this run has "
                                 f"{self.state_dict()[key]!r}: resume with the same model/train/data settings")
        consumed = int(state["consumed_samples"])
        if consumed % (self.micro_batch_size * self.dp_size):
            raise ValueError(f"consumed_samples {consumed} is not a multiple of micro_batch_size × dp = "
                             f"{self.micro_batch_size} × {self.dp_size}: resume with the same global batch size")
        self._consumed_samples = consumed


class SyntheticEval:
    """A fixed validation pass: `num_microbatches` micro-batches of this DP rank from the synthetic 'val' stream."""

    def __init__(self, *, num_microbatches: int, **stream_args: Any) -> None:
        self.num_microbatches = num_microbatches
        self._stream = SyntheticTokens(split="val", **stream_args)

    def __len__(self) -> int:
        return self.num_microbatches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = self._stream
        per_microstep = stream.micro_batch_size * stream.dp_size
        for step in range(self.num_microbatches):
            yield stream.microbatch(step * per_microstep + stream.dp_rank * stream.micro_batch_size)


class ConcatEval:
    """Several validation passes, one per dataset (`passes`: its name → its loader), run back to back; the eval
    loss is the mean over all their micro-batches, and each dataset's own mean is logged as well."""

    def __init__(self, passes: dict[str, Any]) -> None:
        self.passes = passes

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.passes.values())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for loader in self.passes.values():
            yield from loader


# ---------------------------------------------------------------------------------------------------------------------
# Building the loaders of a run


def build_train_loader(cfg: Config, ctx: ParallelContext) -> Any:
    """This DP rank's training stream: SyntheticTokens or a data_pipeline TokenLoader (mixture by `weight`)."""
    train = cfg.train
    if cfg.data.synthetic:
        return SyntheticTokens(vocab_size=cfg.model.vocab_size, seq_len=train.seq_len,
                               micro_batch_size=train.micro_batch_size_per_gpu, seed=train.seed,
                               dp_rank=ctx.dp_rank, dp_size=ctx.dp)
    from data_pipeline.loader import SourceSpec, TokenLoader

    loader = TokenLoader([SourceSpec(entry.path, entry.weight) for entry in cfg.data.datasets],
                         micro_batch_size=train.micro_batch_size_per_gpu, seed=train.seed, dp_rank=ctx.dp_rank,
                         dp_size=ctx.dp, split=cfg.data.train_split, num_workers=cfg.data.num_workers,
                         cache_dir=cfg.data.cache_dir, pin_memory=ctx.device.type == "cuda")
    for source in loader.sources:
        _check_dataset_fits(cfg, source.name, source.manifest)
    return loader


def build_eval_loader(cfg: Config, derived: Derived, ctx: ParallelContext) -> Any | None:
    """This DP rank's validation pass, or None when there is none. A pass is `train.eval_steps` global batches
    (eval_steps × grad_accum micro-batches per DP rank), so every layout evaluates the same samples: the first
    eval_steps × global_batch_size of the split (of each dataset; fewer if the split is smaller)."""
    return validation_passes(cfg, derived, ctx) if cfg.train.eval_enabled else None


def validation_passes(cfg: Config, derived: Derived, ctx: ParallelContext) -> Any | None:
    """The validation pass of `build_eval_loader` whatever train.eval_interval_steps says (`pretrain eval`); None
    when no dataset has the eval split."""
    train = cfg.train
    microbatches = train.eval_steps * derived.grad_accum_steps
    if cfg.data.synthetic:
        return SyntheticEval(num_microbatches=microbatches, vocab_size=cfg.model.vocab_size, seq_len=train.seq_len,
                             micro_batch_size=train.micro_batch_size_per_gpu, seed=train.seed, dp_rank=ctx.dp_rank,
                             dp_size=ctx.dp)
    from data_pipeline.loader import EvalLoader
    from data_pipeline.manifest import Manifest

    passes = {}
    for entry in cfg.data.datasets:
        manifest = Manifest.load(entry.path)
        if cfg.data.eval_split not in manifest.splits:
            if ctx.rank == 0:  # said, not silently skipped: a dataset prepared without it is trained on only
                log.warning("%s has no %r split (it has %s): not evaluated", entry.path, cfg.data.eval_split,
                            ", ".join(sorted(manifest.splits)) or "none")
            continue
        _check_eval_split_fits(cfg, ctx, entry.path, manifest.splits[cfg.data.eval_split].num_samples)
        loader = EvalLoader(entry.path, micro_batch_size=train.micro_batch_size_per_gpu, dp_rank=ctx.dp_rank,
                            dp_size=ctx.dp, split=cfg.data.eval_split, max_microbatches=microbatches,
                            cache_dir=cfg.data.cache_dir)
        passes[loader.sources[0].name] = loader  # the name the train loader's tokens/<name> metrics use
    # Every DP rank runs the same number of eval micro-batches (the loss is averaged over DP): EvalLoader drops the
    # tail that would not fill all ranks, so the lengths agree.
    return ConcatEval(passes) if passes else None


def _check_eval_split_fits(cfg: Config, ctx: ParallelContext, path: str, num_samples: int) -> None:
    """Before the loader says the same in data-layer words: the fixes here are options of this run's config."""
    micro = cfg.train.micro_batch_size_per_gpu
    if num_samples >= micro * ctx.dp:
        return
    raise ConfigError(
        f"the {cfg.data.eval_split!r} split of {path} has {num_samples} samples, fewer than one evaluation micro-step "
        f"(train.micro_batch_size_per_gpu {micro} × dp {ctx.dp}): lower train.micro_batch_size_per_gpu to at most "
        f"{max(1, num_samples // ctx.dp)} (train.global_batch_size stays; gradient accumulation makes up the rest), "
        f"turn evaluation off with train.eval_interval_steps=0, or prepare a larger validation split "
        f"(pretrain prepare --val-fraction F or --val-input FILES)")


def _check_dataset_fits(cfg: Config, name: str, manifest: Any) -> None:
    if manifest.seq_len != cfg.train.seq_len:
        raise ConfigError(f"dataset {name} was prepared with seq_len {manifest.seq_len} but train.seq_len is "
                          f"{cfg.train.seq_len}: set train.seq_len={manifest.seq_len} or prepare the data again "
                          f"with --seq-len {cfg.train.seq_len}")
    if manifest.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"dataset {name} uses a tokenizer with {manifest.tokenizer.vocab_size} tokens but "
                          f"model.vocab_size is {cfg.model.vocab_size}: set "
                          f"model.vocab_size={manifest.tokenizer.vocab_size}")
