"""Checkpoint cost on the ~125M config, one process on CPU: save and load time and bytes, and how long the training
loop is blocked by a save, synchronous vs async (checkpoint.async_save). Also the per-step cost of the fault-tolerance
control (NaN guard + save/stop agreement) on the tiny config.

    python bench/bench_checkpoint.py                       # configs/125m.yaml, fp32, ZeRO-0 and ZeRO-1, 1 process
    python bench/bench_checkpoint.py --zero 1 --repeats 5 train.seq_len=256
    python bench/bench_checkpoint.py --dir /mnt/nvme/tmp   # where the checkpoints are written (default: a temp dir)

What is timed (median of --repeats, after one warm-up save):
- blocked_sync_s: `Checkpointer.save(blocking)`: snapshot + write + fsync + commit; the loop waits for all of it.
- blocked_async_s: the same call with async_save: snapshot (CPU copies) and return; written in a thread.
- async_total_s: from the call until the background write is committed (`wait()`).
- load_s: reading a checkpoint back into the live engine (all tensors, optimizer state, LR, loader) with
  checksum verification of every file (verify_s, measured alone) counted separately.
- full_state_s: `read_full_state_dict` (verify + assemble full tensors), what `convert to-hf --checkpoint` pays.
Prints a table and writes JSON to bench/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from trainer.bootstrap import destroy_parallel, init_parallel, single_process_defaults  # noqa: E402
from trainer.checkpoint import Checkpointer, StopSignals, read_full_state_dict  # noqa: E402
from trainer.checkpoint.load import choose_valid, load_checkpoint  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.fit import fit  # noqa: E402
from trainer.hooks import HookList, TrainState, default_hooks  # noqa: E402
from trainer.train import build_run, training_hooks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIG_OVERRIDES = ["launch.device=cpu", "precision.dtype=fp32", "data.synthetic=true", "data.datasets=[]",
                 "train.seq_len=128", "train.micro_batch_size_per_gpu=1", "train.global_batch_size=1",
                 "train.eval_interval_steps=0", "optim.warmup_steps=1", "train.max_steps=2",
                 "train.log_interval_steps=1", "logging.tensorboard=false", "logging.jsonl=false",
                 "checkpoint.save_interval_steps=0", "checkpoint.keep_last=2", "faults.hang_timeout_s=0"]
TINY_OVERRIDES = ["train.eval_interval_steps=0", "optim.warmup_steps=2", "logging.tensorboard=false",
                  "logging.jsonl=false", "checkpoint.save_interval_steps=0", "checkpoint.save_at_end=false",
                  "train.log_interval_steps=1000", "faults.hang_timeout_s=0"]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_big(zero: int, repeats: int, overrides: list[str], root: Path) -> dict[str, Any]:
    run_dir = root / f"zero{zero}"
    cfg = load_config(REPO / "configs" / "125m.yaml", [*BIG_OVERRIDES, f"zero.stage={zero}",
                                                        f"logging.run_dir={run_dir}", *overrides])
    derived = cfg.validate_for_world(1)
    ctx = init_parallel(1, 1, backend="gloo")
    try:
        run = build_run(cfg, derived, ctx, run_dir)
        state = fit(run, HookList(default_hooks(run)))  # 2 steps: Adam state exists, as in a real save
        params = sum(p.numel() for _, p in run.model.canonical_named_parameters())
        checkpointer = Checkpointer(run, StopSignals())
        result: dict[str, Any] = {"zero_stage": zero, "parameters": params, "optimizer": type(run.engine.optimizer)
                                  .__name__}
        result.update(_time_saves(run, state, checkpointer, repeats))
        ckpt = run_dir / "checkpoints" / f"step_{state.step}"
        result["checkpoint_bytes"] = _dir_bytes(ckpt)
        result.update(_time_loads(run, ckpt, repeats))
    finally:
        destroy_parallel()
    return result


def _time_saves(run: Any, state: TrainState, checkpointer: Checkpointer, repeats: int) -> dict[str, Any]:
    sync_s, async_blocked_s, async_total_s = [], [], []
    checkpointer.save(run, state, "interval", blocking=True)  # warm-up (page cache, first-time imports)
    for _ in range(repeats):
        start_s = time.perf_counter()
        checkpointer.save(run, state, "interval", blocking=True)
        sync_s.append(time.perf_counter() - start_s)
    checkpointer.cfg = checkpointer.cfg.model_copy(update={"async_save": True})
    for _ in range(repeats):
        start_s = time.perf_counter()
        checkpointer.save(run, state, "interval", blocking=False)
        async_blocked_s.append(time.perf_counter() - start_s)
        checkpointer.saver.wait()
        async_total_s.append(time.perf_counter() - start_s)
    return {"blocked_sync_s": statistics.median(sync_s), "blocked_async_s": statistics.median(async_blocked_s),
            "async_total_s": statistics.median(async_total_s), "sync_all_s": sync_s,
            "async_blocked_all_s": async_blocked_s, "async_total_all_s": async_total_s}


def _time_loads(run: Any, ckpt: Path, repeats: int) -> dict[str, Any]:
    verify_s, load_s, full_s = [], [], []
    for _ in range(repeats):
        start_s = time.perf_counter()
        assert choose_valid([ckpt], run.ctx, verify=True) == ckpt
        verify_s.append(time.perf_counter() - start_s)
        start_s = time.perf_counter()
        load_checkpoint(run, ckpt, restore_data=True)
        load_s.append(time.perf_counter() - start_s)
        start_s = time.perf_counter()
        read_full_state_dict(ckpt)
        full_s.append(time.perf_counter() - start_s)
    return {"verify_s": statistics.median(verify_s), "load_s": statistics.median(load_s),
            "full_state_s": statistics.median(full_s), "verify_all_s": verify_s, "load_all_s": load_s,
            "full_state_all_s": full_s}


def measure_control_overhead(steps: int, rounds: int, root: Path) -> dict[str, Any]:
    """ms per step of the tiny config with the metrics hooks only vs the full hook list (watchdog off, no saves):
    two runs (engines) in one process, timed in alternating blocks so that load from other jobs hits both alike."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", [*TINY_OVERRIDES, f"train.max_steps={steps}",
                                                       f"logging.run_dir={root / 'tiny'}", "checkpoint.resume=none"])
    derived = cfg.validate_for_world(1)
    ctx = init_parallel(1, 1, backend="gloo")
    try:
        plain_run, full_run = build_run(cfg, derived, ctx, root / "tiny"), build_run(cfg, derived, ctx, root / "tiny")
        loops = {"metrics_only": (plain_run, HookList(default_hooks(plain_run))),
                 "fault_tolerant": (full_run, HookList(training_hooks(full_run, StopSignals())))}
        times: dict[str, list[float]] = {name: [] for name in loops}
        for round_index in range(rounds + 1):
            for name, (run, hooks) in loops.items():
                start_s = time.perf_counter()
                fit(run, hooks)
                if round_index:  # round 0 warms up
                    times[name].append((time.perf_counter() - start_s) / steps)
    finally:
        destroy_parallel()
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"ms_per_step": {k: 1000 * v for k, v in medians.items()},
            "overhead_ratio": medians["fault_tolerant"] / medians["metrics_only"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 1], help="ZeRO stages to measure (1 process)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="filesystem to write checkpoints to (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to configs/125m.yaml")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    single_process_defaults()
    root = Path(tempfile.mkdtemp(prefix="bench_checkpoint-", dir=args.dir))
    try:
        rows = [measure_big(zero, args.repeats, args.overrides, root) for zero in args.zero]
        torch.set_num_threads(1)  # the tiny model: one thread, as in the tests
        control = measure_control_overhead(steps=40, rounds=5, root=root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nconfigs/125m.yaml, fp32, 1 process, CPU ({platform.processor() or platform.machine()}, "
          f"{args.threads} threads); median of {args.repeats} (every run: bench/out/bench_checkpoint_cpu.json)")
    header = ("zero", "params", "MiB", "sync blocked s", "async blocked s", "async total s", "verify s", "load s",
              "full state s")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([str(r["zero_stage"]), f"{r['parameters'] / 1e6:.1f}M", f"{r['checkpoint_bytes'] / 2**20:.0f}",
                          f"{r['blocked_sync_s']:.2f}", f"{r['blocked_async_s']:.2f}", f"{r['async_total_s']:.2f}",
                          f"{r['verify_s']:.2f}", f"{r['load_s']:.2f}", f"{r['full_state_s']:.2f}"]))
    ms = control["ms_per_step"]
    print(f"tiny config, per step: metrics hooks only {ms['metrics_only']:.2f} ms, with watchdog + resume + NaN "
          f"guard + checkpoint triggers {ms['fault_tolerant']:.2f} ms ({control['overhead_ratio']:.3f}x)")
    out = {"rows": rows, "control_overhead": control, "repeats": args.repeats, "overrides": args.overrides,
           "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
           "load_average": os.getloadavg()}
    out_dir = REPO / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench_checkpoint_cpu.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
