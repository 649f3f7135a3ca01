"""How long a checkpoint's collective state read takes under ZeRO (DP ranks on CPU/gloo): FragmentAccess.read_all
(one all_reduce per bucket and value, reused buffers) vs DeepSpeed's per-parameter getters (one per parameter and
value, a fresh full-size buffer each: what `safe_get_full_fp32_param` / `safe_get_full_optimizer_state` do). As in a
checkpoint, every rank takes part in reading fp32 weights and both Adam moments of every parameter and keeps a copy
of ~1/DP of them; after one training step; the kept values are checked to be bit-identical.

    python bench/bench_zero_snapshot.py                              # configs/tiny.yaml, ZeRO-1, DP=2
    python bench/bench_zero_snapshot.py --config configs/125m.yaml --zero 2 train.seq_len=128

Prints the median of --repeats per variant and writes JSON to bench/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.hooks import Hook, RunContext, StepOutput, TrainState  # noqa: E402
from trainer.testing import run_distributed  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out"


class _TimeReads(Hook):
    def __init__(self, repeats: int) -> None:
        self.repeats = repeats
        self.result: dict[str, Any] = {}

    def on_step_end(self, run: RunContext, state: TrainState, out: StepOutput) -> None:
        import torch.distributed as dist

        from trainer.checkpoint.state import optimizer_access

        access = optimizer_access(run.engine)
        access.prepare_read()
        params = [p for _, p in run.model.canonical_named_parameters()]
        # As a checkpoint does: every rank takes part in every read and keeps (copies) about 1/DP of the values.
        rank, dp = dist.get_rank(), dist.get_world_size()
        keep = [i % dp == rank for i in range(len(params))]
        variants = {
            "bucketed": lambda: list(access.read_all(params, keep)),
            "per_parameter": lambda: [values if k else None for values, k in zip(map(access.read, params), keep)],
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        values: dict[str, Any] = {}
        for _ in range(self.repeats):
            for name, read in variants.items():
                dist.barrier()
                start_s = time.perf_counter()
                values[name] = read()
                times[name].append(time.perf_counter() - start_s)
        identical = all(torch.equal(a, b) for x, y in zip(values["bucketed"], values["per_parameter"])
                        if x is not None for a, b in zip(x, y))
        self.result = {"num_tensors": len(params), "num_params": sum(p.numel() for p in params),
                       "identical": identical, **{f"{k}_s": round(statistics.median(v), 4) for k, v in times.items()}}


def _rank(rank: int, world_size: int, config: str, overrides: list[str], repeats: int, run_dir: str,
          bucket_numel: int | None) -> Any:
    from trainer.checkpoint import state
    from trainer.train import train

    if bucket_numel:
        state.READ_BUCKET_NUMEL = bucket_numel
    hook = _TimeReads(repeats)
    train(load_config(config, ["train.max_steps=1", "optim.warmup_steps=0", "train.eval_interval_steps=0",
                               "logging.tensorboard=false", "checkpoint.save_interval_steps=0",
                               f"logging.run_dir={run_dir}", *overrides]), extra_hooks=[hook])
    return hook.result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--zero", type=int, default=1, choices=[1, 2, 3])
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-numel", type=int, default=None, help="default: state.READ_BUCKET_NUMEL")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-zero-snapshot-") as tmp:
        results = run_distributed(_rank, args.dp, args.config, [f"zero.stage={args.zero}", *args.overrides],
                                  args.repeats, tmp, args.bucket_numel, timeout_s=1800)
    row = results[0]
    print(f"{args.config} ZeRO-{args.zero} DP={args.dp}: {row['num_tensors']} tensors, {row['num_params'] / 1e6:.1f}M "
          f"params; read of weights + 2 moments: bucketed {row['bucketed_s']:.3f} s, per parameter "
          f"{row['per_parameter_s']:.3f} s ({row['per_parameter_s'] / row['bucketed_s']:.1f}x); "
          f"bit-identical: {row['identical']}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"bench_zero_snapshot_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"benchmark": "zero_snapshot", "config": args.config, "zero": args.zero, "dp": args.dp,
                               "overrides": args.overrides, "ranks": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
