"""Loader throughput from local shards: tokens/s delivered to one training process.

Builds a synthetic dataset (random uint16 tokens) with the real shard writer, then times `TokenLoader` for each
num_workers setting after a warm-up (page cache hot, shards verified and mapped). Prints a table and writes JSON to
bench/out/. Target (docs/data_pipeline.md): >= 20M tokens/s per process.

    python bench/bench_loader.py           # seq_len 2048, mb 8, 16,000 samples in 1,000-sample shards, ~10 s
    python bench/bench_loader.py --quick   # 4,000 samples, 500 timed micro-batches per setting, ~5 s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.loader import TokenLoader
from data_pipeline.manifest import write_dataset_from_arrays


def build_dataset(root: str, num_samples: int, seq_len: int, samples_per_shard: int) -> None:
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 32000, size=(num_samples, seq_len + 1), dtype=np.uint16)
    write_dataset_from_arrays(root, {"train": samples}, samples_per_shard=samples_per_shard)


def time_loader(root: str, micro_batch_size: int, num_workers: int, warmup_microbatches: int,
                timed_microbatches: int) -> dict[str, float]:
    loader = TokenLoader(root, micro_batch_size=micro_batch_size, seed=0, num_workers=num_workers)
    iterator = iter(loader)
    for _ in range(warmup_microbatches):
        next(iterator)
    tokens_per_microbatch = 0
    start_s = time.perf_counter()
    for _ in range(timed_microbatches):
        tokens, _labels = next(iterator)
        tokens_per_microbatch = tokens.numel()
    elapsed_s = time.perf_counter() - start_s
    iterator.close()  # stops the DataLoader workers
    tokens_per_s = timed_microbatches * tokens_per_microbatch / elapsed_s
    return {"num_workers": num_workers, "micro_batch_size": micro_batch_size, "microbatches": timed_microbatches,
            "elapsed_s": round(elapsed_s, 4), "tokens_per_s": round(tokens_per_s),
            "microbatches_per_s": round(timed_microbatches / elapsed_s, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=16000)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--microbatches", type=int, default=2000, help="timed micro-batches per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--quick", action="store_true", help="small run: 4,000 samples, 500 timed micro-batches")
    args = parser.parse_args()
    if args.quick:
        args.num_samples, args.microbatches = 4000, 500
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as root:
        build_dataset(root, args.num_samples, args.seq_len, args.samples_per_shard)
        rows = [time_loader(root, args.micro_batch_size, workers, warmup_microbatches=50,
                            timed_microbatches=args.microbatches) for workers in args.workers]
    print(f"{'workers':>7} {'mb':>3} {'micro-batches/s':>16} {'Mtokens/s':>10}")
    for row in rows:
        print(f"{row['num_workers']:>7} {row['micro_batch_size']:>3} {row['microbatches_per_s']:>16} "
              f"{row['tokens_per_s'] / 1e6:>10.1f}")
    result = {"benchmark": "loader_local_shards", "seq_len": args.seq_len, "num_samples": args.num_samples,
              "samples_per_shard": args.samples_per_shard, "cpu_count": os.cpu_count(),
              "python": platform.python_version(), "rows": rows}
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, "bench_loader.json")
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
