"""loader.py: pure global order, exact DP/worker slicing, elastic resume, mixtures, remote cache, eval loader.

DP ranks are simulated in one process: one loader per rank, stepped in rank order. Concatenating the ranks'
micro-batches of micro-step m in rank order must give global positions [m*mb*dp, (m+1)*mb*dp) of the stream.
"""

from __future__ import annotations

import itertools

import math
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest

from data_pipeline.errors import DataPipelineError, ManifestMismatchError, ShardIntegrityError
from data_pipeline.loader import (
    EvalLoader,
    GlobalOrder,
    MixturePlan,
    SourceOrder,
    SourceSpec,
    TokenLoader,
    largest_remainder_quotas,
)
from data_pipeline.manifest import Manifest, TokenizerInfo, write_dataset_from_arrays

SEQ_LEN = 16
SAMPLES_PER_SHARD = 20
NUM_TRAIN_A = 203  # 11 shards, the last one short
NUM_TRAIN_B = 77
SEED = 1234
BLOCK_SHARDS = 3
B_OFFSET = 30000  # first token of dataset B's samples, to tell the sources apart by content
# One tokenizer for all datasets: a mixture refuses sources tokenized differently.
TOKENIZER = TokenizerInfo(fingerprint="synthetic", vocab_size=32000, model_type="none", unk_id=0, bos_id=1, eos_id=2,
                          pad_id=3, model_file=None)


def _rows(num_samples: int, first_token_offset: int, sample_len_tokens: int = SEQ_LEN + 1) -> np.ndarray:
    """Sample i starts with token (offset + i) so a batch shows which sample it holds; the rest varies per sample."""
    rows = (np.arange(num_samples)[:, None] * 7 + np.arange(sample_len_tokens)[None, :]) % 997 + 1
    rows[:, 0] = first_token_offset + np.arange(num_samples)
    return rows.astype(np.uint16)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loader_data")
    common = {"samples_per_shard": SAMPLES_PER_SHARD, "tokenizer": TOKENIZER}
    write_dataset_from_arrays(root / "a", {"train": _rows(NUM_TRAIN_A, 0), "val": _rows(45, 0)}, **common)
    write_dataset_from_arrays(root / "b", {"train": _rows(NUM_TRAIN_B, B_OFFSET)}, **common)
    write_dataset_from_arrays(root / "long", {"train": _rows(40, 0, sample_len_tokens=2 * SEQ_LEN + 1)}, **common)
    return {"a": root / "a", "b": root / "b", "long": root / "long", "root": root}


def _loader(dataset, **kwargs) -> TokenLoader:
    defaults = {"micro_batch_size": 4, "seed": SEED, "shuffle_block_shards": BLOCK_SHARDS, "return_sample_ids": True}
    return TokenLoader(dataset, **{**defaults, **kwargs})


def _run_ranks(dataset, dp_size: int, steps: int, num_workers: int = 0, state: dict | None = None,
               **kwargs) -> tuple[list[tuple[int, int]], dict]:
    """Step `dp_size` rank loaders `steps` micro-steps; return the global id stream (rank order) and the state."""
    loaders = [_loader(dataset, dp_rank=r, dp_size=dp_size, num_workers=num_workers, **kwargs)
               for r in range(dp_size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    iterators = [iter(loader) for loader in loaders]
    stream: list[tuple[int, int]] = []
    for _ in range(steps):
        for iterator in iterators:
            _tokens, _labels, sample_ids = next(iterator)
            stream.extend(map(tuple, sample_ids.tolist()))
    for iterator in iterators:
        iterator.close()  # stops DataLoader workers
    states = [loader.state_dict() for loader in loaders]
    assert all(s == states[0] for s in states), "every rank must report the same global state"
    return stream, states[0]


# ----------------------------------------------------------------------------------------------------------------
# Order
# ----------------------------------------------------------------------------------------------------------------
def _source_order(seed: int = SEED, num_samples: int = NUM_TRAIN_A) -> SourceOrder:
    shard_sizes = [SAMPLES_PER_SHARD] * (num_samples // SAMPLES_PER_SHARD) + [num_samples % SAMPLES_PER_SHARD]
    return SourceOrder("fp-a", "train", shard_sizes, seed, shuffle=True, shuffle_block_shards=BLOCK_SHARDS)


def test_order_is_a_pure_function_and_each_epoch_a_permutation() -> None:
    first, again, other_seed = _source_order(), _source_order(), _source_order(seed=SEED + 1)
    positions = range(3 * NUM_TRAIN_A)
    ids = [first.sample_index(p) for p in positions]
    # Queried in another order (as a resumed or differently sliced run would): same answers.
    assert [again.sample_index(p) for p in reversed(positions)][::-1] == ids
    assert [other_seed.sample_index(p) for p in positions] != ids
    epochs = [ids[e * NUM_TRAIN_A:(e + 1) * NUM_TRAIN_A] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(NUM_TRAIN_A))
    assert epochs[0] != epochs[1] != epochs[2]
    assert ids[:20] != sorted(ids[:20])  # shuffled, not sequential


def test_order_reads_at_most_block_shards_at_a_time() -> None:
    order = _source_order()
    shards = [order.locate(p)[0] for p in range(NUM_TRAIN_A)]
    # Greedy cut of the epoch into runs touching <= BLOCK_SHARDS shards: as few runs as blocks exist.
    runs, seen = 1, set()
    for shard in shards:
        if shard not in seen and len(seen) == BLOCK_SHARDS:
            runs, seen = runs + 1, set()
        seen.add(shard)
    assert runs <= math.ceil(len(order.shard_num_samples) / BLOCK_SHARDS)


def test_sequential_order_when_shuffle_is_off() -> None:
    order = SourceOrder("fp", "val", [20, 20, 5], seed=0, shuffle=False)
    assert [order.sample_index(p) for p in range(50)] == list(range(45)) + list(range(5))


# ----------------------------------------------------------------------------------------------------------------
# Batches, DP slicing, workers
# ----------------------------------------------------------------------------------------------------------------
def test_batches_hold_the_right_tokens_and_labels(data) -> None:
    iterator = iter(_loader(data["a"]))
    expected_rows = _rows(NUM_TRAIN_A, 0).astype(np.int64)
    for _ in range(3):
        tokens, labels, sample_ids = next(iterator)
        assert tokens.shape == labels.shape == (4, SEQ_LEN) and str(tokens.dtype) == "torch.int64"
        assert tokens.is_contiguous() and labels.is_contiguous()
        rows = expected_rows[sample_ids[:, 1].numpy()]
        np.testing.assert_array_equal(tokens.numpy(), rows[:, :-1])
        np.testing.assert_array_equal(labels.numpy(), rows[:, 1:])  # labels = tokens shifted by one
    iterator.close()


@pytest.mark.parametrize("dp_size, grad_accum", [(1, 4), (2, 2), (4, 1)])
def test_dp_slices_partition_each_global_batch(data, dp_size: int, grad_accum: int) -> None:
    micro_batch_size = 3
    global_batch = micro_batch_size * grad_accum * dp_size  # 12 in every case
    order = _loader(data["a"]).order
    loaders = [_loader(data["a"], micro_batch_size=micro_batch_size, dp_rank=r, dp_size=dp_size)
               for r in range(dp_size)]
    iterators = [iter(loader) for loader in loaders]
    for step in range(5):
        seen = []
        for _ in range(grad_accum):
            for iterator in iterators:
                seen.extend(map(tuple, next(iterator)[2].tolist()))
        expected = [order.sample_id(p) for p in range(step * global_batch, (step + 1) * global_batch)]
        assert seen == expected  # exact partition, in position order: same samples per step for any DP x GA
    assert all(loader.consumed_samples == 5 * global_batch for loader in loaders)


def test_stream_does_not_depend_on_num_workers(data) -> None:
    streams = [_run_ranks(data["a"], dp_size=1, steps=12, num_workers=w)[0] for w in (0, 1, 2)]
    assert streams[0] == streams[1] == streams[2]


def test_consumed_samples_counts_yielded_not_prefetched(data) -> None:
    loader = _loader(data["a"], dp_size=2, dp_rank=1, num_workers=2, prefetch_factor=4)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    assert loader.consumed_samples == 3 * 4 * 2  # micro-batches yielded x mb x dp, whatever the workers prefetched
    iterator.close()


# ----------------------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("before, after", [((1, 0), (2, 2)), ((2, 2), (1, 0)), ((2, 0), (2, 1))],
                         ids=["dp1w0-to-dp2w2", "dp2w2-to-dp1w0", "dp2w0-to-dp2w1"])
def test_resume_equals_uninterrupted_stream_across_epochs(data, before, after) -> None:
    (dp_before, workers_before), (dp_after, workers_after) = before, after
    total_positions = 480  # ~2.4 epochs of 203 samples: the resume point and the end lie in different epochs
    reference, _ = _run_ranks(data["a"], dp_size=1, steps=total_positions // 4)
    head, state = _run_ranks(data["a"], dp_before, steps=240 // (4 * dp_before), num_workers=workers_before)
    assert state["consumed_samples"] == 240 and set(state) >= {"consumed_samples", "fingerprint", "seed"}
    tail, end_state = _run_ranks(data["a"], dp_after, steps=240 // (4 * dp_after), num_workers=workers_after,
                                 state=state)
    assert head + tail == reference
    assert end_state["consumed_samples"] == total_positions


def test_resume_refuses_other_data_order_or_position(data) -> None:
    state = _loader(data["a"]).state_dict()
    with pytest.raises(ManifestMismatchError) as err:
        _loader(data["b"]).load_state_dict(state)
    message = str(err.value)
    assert state["fingerprint"] in message and Manifest.load(data["b"]).fingerprint in message
    assert str(data["b"]) in message
    with pytest.raises(ManifestMismatchError, match="seed=1234 .* set data.seed to 1234"):
        _loader(data["a"], seed=5).load_state_dict(state)
    with pytest.raises(ManifestMismatchError, match="shuffle_block_shards"):
        _loader(data["a"], shuffle_block_shards=4).load_state_dict(state)
    with pytest.raises(DataPipelineError, match=r"consumed_samples 6 is not a multiple of .* 4 x 2"):
        _loader(data["a"], dp_size=2).load_state_dict({**state, "consumed_samples": 6})


def test_load_state_dict_supersedes_a_live_iterator(data) -> None:
    loader = _loader(data["a"])
    iterator = iter(loader)
    next(iterator)
    loader.load_state_dict({**loader.state_dict(), "consumed_samples": 0})
    with pytest.raises(DataPipelineError, match="superseded"):
        next(iterator)


# ----------------------------------------------------------------------------------------------------------------
# Mixtures
# ----------------------------------------------------------------------------------------------------------------
def _mixture(data, weights=(3.0, 1.0)) -> list[SourceSpec]:
    return [SourceSpec(str(data["a"]), weights[0], name="a"), SourceSpec(str(data["b"]), weights[1], name="b")]


def test_largest_remainder_quotas() -> None:
    assert largest_remainder_quotas([3, 1], 64).tolist() == [48, 16]
    assert largest_remainder_quotas([1, 1, 1], 64).tolist() == [22, 21, 21]
    assert largest_remainder_quotas([0.5, 0.3, 0.2], 10).tolist() == [5, 3, 2]


def test_mixture_proportions_determinism_and_metrics(data) -> None:
    block = 64
    loader = _loader(_mixture(data), micro_batch_size=8, mixture_block_samples=block)
    iterator = iter(loader)
    ids = [tuple(i) for _ in range(64) for i in next(iterator)[2].tolist()]  # 512 positions = 8 blocks
    iterator.close()
    sources = np.array([s for s, _ in ids])
    assert (sources == 0).sum() == 384 and (sources == 1).sum() == 128  # exact 3:1 at every block boundary
    for n in (50, 100, 300):  # anywhere else within one block's worth: |share - 3/4| <= block / n
        assert abs((sources[:n] == 0).mean() - 0.75) <= block / n
    assert loader.samples_per_source() == {"a": 384, "b": 128}
    assert loader.tokens_per_source() == {"a": 384 * SEQ_LEN, "b": 128 * SEQ_LEN}
    assert loader.epochs_per_source()["b"] == pytest.approx(128 / NUM_TRAIN_B)
    # Each source runs its own epochs: B's first 77 positions are a permutation of B.
    b_ids = [i for s, i in ids if s == 1]
    assert sorted(b_ids[:NUM_TRAIN_B]) == list(range(NUM_TRAIN_B))
    a_ids = [i for s, i in ids if s == 0]
    assert sorted(a_ids[:NUM_TRAIN_A]) == list(range(NUM_TRAIN_A))
    # Content check: sample ids of source B point at B's rows.
    again = _loader(_mixture(data), micro_batch_size=8, mixture_block_samples=block)
    tokens, _, sample_ids = next(iter(again))
    assert sample_ids.tolist() == [list(i) for i in ids[:8]]  # deterministic
    for row, (source, index) in zip(tokens.tolist(), sample_ids.tolist()):
        assert row[0] == index + (B_OFFSET if source == 1 else 0)


def test_mixture_resume_mid_block_and_fingerprint(data) -> None:
    kwargs = {"mixture_block_samples": 64}
    reference, _ = _run_ranks(_mixture(data), dp_size=1, steps=40, **kwargs)
    head, state = _run_ranks(_mixture(data), dp_size=2, steps=5, **kwargs)  # 40 positions: inside block 0
    tail, _ = _run_ranks(_mixture(data), dp_size=1, steps=30, state=state, **kwargs)
    assert head + tail == reference
    reweighted = _loader(_mixture(data, weights=(1.0, 1.0)), **kwargs)
    assert reweighted.fingerprint != state["fingerprint"]
    with pytest.raises(ManifestMismatchError, match="mixture weights"):
        reweighted.load_state_dict(state)
    plan = MixturePlan([3.0, 1.0], 64, SEED, state["fingerprint"])
    assert plan.samples_per_source(40).sum() == 40


def test_mixture_refuses_different_sample_lengths(data) -> None:
    with pytest.raises(ManifestMismatchError, match="different sample lengths.*17.*33"):
        _loader([str(data["a"]), str(data["long"])])


# ----------------------------------------------------------------------------------------------------------------
# Remote shards through the cache
# ----------------------------------------------------------------------------------------------------------------
def _cache_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in cache_dir.rglob("*.tar"))


def test_file_url_goes_through_a_bounded_verified_cache(data, tmp_path: Path) -> None:
    local, _ = _run_ranks(data["a"], dp_size=1, steps=60)
    shard_bytes = Manifest.load(data["a"]).split("train").shards[0].num_bytes
    max_cache_bytes = 4 * shard_bytes
    loader = _loader(f"file://{data['a']}", cache_dir=str(tmp_path), max_cache_bytes=max_cache_bytes)
    iterator = iter(loader)
    remote = []
    for _ in range(60):
        remote.extend(map(tuple, next(iterator)[2].tolist()))
        assert _cache_bytes(tmp_path) <= max_cache_bytes
    iterator.close()
    assert remote == local
    cached = sorted(p.name for p in tmp_path.iterdir())
    known = {f"{s.sha256}.tar" for s in Manifest.load(data["a"]).split("train").shards}
    assert cached and set(cached) <= known  # content-addressed by sha256, no temp files left


def test_memory_url_matches_local(data, tmp_path: Path) -> None:
    memory = fsspec.filesystem("memory")
    for path in data["a"].rglob("*"):
        if path.is_file():
            memory.pipe(f"/loader_test/a/{path.relative_to(data['a']).as_posix()}", path.read_bytes())
    try:
        remote, _ = _run_ranks("memory://loader_test/a", dp_size=2, steps=10, cache_dir=str(tmp_path))
        local, _ = _run_ranks(data["a"], dp_size=2, steps=10)
        assert remote == local
    finally:
        memory.rm("/loader_test", recursive=True)


def _corrupt_first_shard_read(data, copy_root: Path) -> str:
    shutil.copytree(data["a"], copy_root)
    order = _loader(copy_root).order
    _, shard, _ = order.locate(0)
    entry = Manifest.load(copy_root).split("train").shards[shard]
    path = copy_root / entry.path
    raw = bytearray(path.read_bytes())
    raw[700] ^= 0xFF  # inside the first sample's payload
    path.write_bytes(bytes(raw))
    return entry.path


def test_corrupt_remote_shard_is_refused(data, tmp_path: Path) -> None:
    shard_path = _corrupt_first_shard_read(data, tmp_path / "copy")
    loader = _loader(f"file://{tmp_path / 'copy'}", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ShardIntegrityError, match=f"shard {shard_path} fetched from .* sha256 expected"):
        next(iter(loader))


def test_corrupt_local_shard_error_crosses_the_worker_boundary(data, tmp_path: Path) -> None:
    shard_path = _corrupt_first_shard_read(data, tmp_path / "copy")
    loader = _loader(tmp_path / "copy", num_workers=1)
    with pytest.raises(ShardIntegrityError, match=f"shard {shard_path}.*is corrupt: sha256 expected"):
        next(iter(loader))


# ----------------------------------------------------------------------------------------------------------------
# Eval loader
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_eval_loader_slices_without_shuffle_and_equal_counts(data, dp_size: int) -> None:
    micro_batch_size, num_val = 4, 45
    loaders = [EvalLoader(data["a"], micro_batch_size=micro_batch_size, dp_rank=r, dp_size=dp_size,
                          return_sample_ids=True) for r in range(dp_size)]
    expected_count = num_val // (micro_batch_size * dp_size)
    assert [len(loader) for loader in loaders] == [expected_count] * dp_size
    per_rank = [[batch[2][:, 1].tolist() for batch in loader] for loader in loaders]
    assert [len(batches) for batches in per_rank] == [expected_count] * dp_size
    merged = [i for step in range(expected_count) for rank in range(dp_size) for i in per_rank[rank][step]]
    assert merged == list(range(expected_count * micro_batch_size * dp_size))  # sequential, disjoint, complete
    assert [[b[2][:, 1].tolist() for b in loaders[0]]] == [per_rank[0]]  # a second pass is identical


def test_eval_loader_workers_and_cap(data) -> None:
    plain = [b[2].tolist() for b in EvalLoader(data["a"], micro_batch_size=4, return_sample_ids=True)]
    with_workers = [b[2].tolist() for b in EvalLoader(data["a"], micro_batch_size=4, num_workers=2,
                                                       return_sample_ids=True)]
    assert plain == with_workers and len(plain) == 11
    capped = EvalLoader(data["a"], micro_batch_size=4, max_microbatches=3)
    assert len(capped) == 3 and len(list(capped)) == 3
    with pytest.raises(DataPipelineError, match="fewer than micro_batch_size x dp_size"):
        EvalLoader(data["a"], micro_batch_size=50)


def test_global_order_combines_mixture_and_sources() -> None:
    sources = [SourceOrder("x", "train", [5, 5], 0), SourceOrder("y", "train", [3], 0)]
    order = GlobalOrder(sources, MixturePlan([2.0, 1.0], 3, 0, "fp"))
    ids = [order.sample_id(p) for p in range(30)]
    assert sum(1 for s, _ in ids if s == 0) == 20
    assert sorted(i for s, i in ids if s == 0) == sorted(list(range(10)) * 2)



def test_workers_survive_the_stop_signals_slurm_sends_to_the_whole_step(data: dict[str, Path]) -> None:
    """`--signal=USR1@N` and the time-limit SIGTERM reach DataLoader workers too: they must ignore both and keep
    serving the same stream, so the trainer can finish its step and checkpoint."""
    import os
    import signal

    import psutil

    import time

    num_batches = 40  # well past what the workers prefetch (prefetch_factor × workers), so they must keep working
    expected = [ids for _t, _l, ids in itertools.islice(iter(_loader(data["a"])), num_batches)]
    stream = iter(_loader(data["a"], num_workers=2))
    got = [next(stream)[2] for _ in range(2)]
    workers = psutil.Process(os.getpid()).children()
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGUSR1)
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)  # let a default signal action (termination) take effect before we look
    assert [w.status() for w in workers if w.status() == psutil.STATUS_ZOMBIE] == []
    got += [next(stream)[2] for _ in range(num_batches - 2)]
    assert [ids.tolist() for ids in got] == [ids.tolist() for ids in expected]
