"""packing.py: shard jobs cut from a stream of chunks reassemble the stream exactly and free each chunk only after
its last job; a job reads spool files and memory alike. (prepare's spool lifecycle: test_prepare.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.errors import DataPipelineError
from data_pipeline.packing import Chunk, ShardJob, ShardLayout, ShardPlanner, SpoolWriter, write_shard
from data_pipeline.shards import ShardReader


@pytest.mark.parametrize("seed", range(4))
def test_planner_jobs_reassemble_the_stream_and_release_each_chunk_after_its_last_job(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sample_len, per_shard = int(rng.integers(1, 9)), int(rng.integers(1, 5))
    planner = ShardPlanner("train", sample_len, per_shard)
    chunks = [np.arange(n) + 1000 * i for i, n in enumerate(rng.integers(0, 30, size=40))]
    jobs, released, planned_up_to = [], [], {}
    for i, tokens in enumerate(chunks):
        new_jobs = planner.add(Chunk(f"chunk-{i}", 0, len(tokens)))
        jobs += new_jobs
        for job in new_jobs:
            for piece in job.pieces:
                planned_up_to[piece.ref] = piece.offset + piece.count
        for ref in planner.take_consumed():
            # Handed back only once every token of it is in a job already returned (or it is the dropped tail).
            assert planned_up_to.get(ref, 0) == len(chunks[int(ref.split("-")[1])])
            released.append(ref)
    jobs += planner.finish()
    released += planner.take_consumed()
    stream = np.concatenate(chunks)
    assembled = [np.concatenate([chunks[int(p.ref.split("-")[1])][p.offset : p.offset + p.count] for p in j.pieces])
                 for j in jobs]
    num_samples = len(stream) // sample_len
    assert [j.shard_index for j in jobs] == list(range(len(jobs)))
    assert [j.num_samples for j in jobs[:-1]] == [per_shard] * (len(jobs) - 1)
    assert planner.num_samples == num_samples and sum(j.num_samples for j in jobs) == num_samples
    np.testing.assert_array_equal(np.concatenate(assembled), stream[: num_samples * sample_len])
    assert planner.dropped_tail_tokens == len(stream) - num_samples * sample_len
    assert sorted(released) == sorted(f"chunk-{i}" for i, tokens in enumerate(chunks) if len(tokens))


def test_write_shard_reads_spool_files_and_memory_alike(tmp_path: Path) -> None:
    tokens = np.arange(60, dtype="<u2")
    spool = SpoolWriter(str(tmp_path / "a.tokens"))
    spool.append(tokens[:25])
    spool.append(tokens[25:40])
    assert spool.close() == 40
    layout = ShardLayout(str(tmp_path / "out"), "uint16", sample_len_tokens=10, samples_per_shard=5)
    pieces = (Chunk(str(tmp_path / "a.tokens"), 3, 37), Chunk(tokens, 40, 13))  # spool [3, 40) + memory [40, 53)
    entry = write_shard(ShardJob("train", 2, 5, pieces), layout)
    assert entry.path == "train/train-000002.tar" and entry.num_samples == 5
    with ShardReader(tmp_path / "out" / entry.path, entry) as reader:
        np.testing.assert_array_equal(np.stack([reader.sample(i) for i in range(5)]), tokens[3:53].reshape(5, 10))
    with pytest.raises(DataPipelineError, match="spool file .* ends early"):
        write_shard(ShardJob("train", 3, 5, (Chunk(str(tmp_path / "a.tokens"), 30, 50),)), layout)


def test_a_spool_write_failure_names_the_file_and_the_fix(tmp_path: Path) -> None:
    writer = SpoolWriter(str(tmp_path / "missing-dir" / "1-1.tokens.train"))
    writer.append(np.empty(0, dtype="<u2"))  # nothing to write: no file, no error
    assert writer.close() == 0
    with pytest.raises(DataPipelineError, match="cannot write the spool file .*1-1.tokens.train .*--spool-dir"):
        writer.append(np.arange(5, dtype="<u2"))
