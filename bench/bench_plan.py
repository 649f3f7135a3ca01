"""Check `pretrain plan`'s two models against the real trainer on CPU/gloo (2 ranks), on this machine.

    python bench/bench_plan.py --part time --rounds 3      # step time: DP2 vs TP2 vs PP2, predicted vs measured ratios
    python bench/bench_plan.py --part memory               # memory: a grid of layouts, estimate vs peak RSS growth

time: a small Llama (hidden 256 or --hidden, 4 layers, vocab 2048, seq 128, fp32, global batch 16) through
`trainer.train.train` on forked gloo ranks (trainer.testing.run_distributed), one torch thread per rank, seconds per optimizer step from a
hook (median of the steps after the first two). The plan model is fed this machine's constants, measured in the same
run: the single-process step time of the same model gives the compute rate (peak × efficiency: the calibration), a
gloo all-reduce of 4 KiB and 4 MiB gives latency and bandwidth, timing the model's per-rank GEMMs at tp 1 and 2 gives
the GEMM width curve (written to bench/out/gemm_efficiency_cpu_h<hidden>.json, the form `pretrain plan
--gemm-efficiency` reads). Then trainer.plan.step_time predicts DP2 (ZeRO-0), TP2 and PP2, with a flat curve and with
the measured one, and the ratios between them are compared with the measured ones. Layouts are interleaved round by
round, so the load of other jobs hits them alike.

memory: a bigger model (hidden 512, 4 layers, vocab 8192, seq 256, micro 4, fp32; global batch 8) for 3 steps per
layout; measured = peak RSS of the rank minus its RSS when the body started (forked ranks share the parent's torch
import), i.e. everything the run allocated: weights, grads, optimizer, activations, DeepSpeed/gloo buffers, allocator
slack. Estimate = trainer.estimate.estimate_memory for that layout. CPU RSS is not CUDA's max_memory_allocated: read
the ranking and the ratios, not the absolute numbers.

gpu (prepared, not yet run: no GPU in the session that wrote it): configs/1b.yaml on one GPU in 4 settings (ZeRO
stage × AC mode × micro-batch), each a `python -m launch train` subprocess of 8 steps; measured = max of
`max_memory_allocated_gib` and median `step_time_s` of steps 3-8 from metrics.jsonl; predicted = the estimate and
trainer.plan.step_time for `--gpu` (default h200). Targets: memory within ±10 %, step-time ratios between settings.

    python bench/bench_plan.py --part gpu --gpu h200        # ~4 min on an H200

Writes bench/out/bench_plan_<part>.json. Results and the date they were taken: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401  (DeepSpeed's optimizer setup imports it: 1.2 s per rank otherwise)

from trainer.config import load_config  # noqa: E402
from trainer.estimate import estimate_memory, flops_per_token  # noqa: E402
from trainer.gpu_specs import GpuSpec  # noqa: E402
from trainer.hooks import Hook  # noqa: E402
from trainer.plan import Calibration, Cluster, GemmEfficiency, layer_gemms, step_time  # noqa: E402
from trainer.testing import run_distributed  # noqa: E402
from trainer.train import train  # noqa: E402,F401  (deepspeed + megatron imported before the fork, not per run)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
COMMON = ["train.eval_interval_steps=0", "checkpoint.save_interval_steps=0", "checkpoint.save_at_end=false",
          "logging.tensorboard=false", "train.log_interval_steps=1000", "optim.warmup_steps=0", "data.num_workers=0",
          "faults.hang_timeout_s=0"]
TIME_MODEL_REST = ["model.vocab_size=2048", "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=4",
                   "model.max_seq_len=128", "train.seq_len=128", "train.micro_batch_size_per_gpu=4",
                   "train.global_batch_size=16"]


def time_model(hidden: int) -> list[str]:
    """The time part's model: `hidden` wide, SwiGLU width ~8/3 of it rounded up to a multiple of 16."""
    intermediate = -(-hidden * 8 // 3 // 16) * 16
    return [f"model.hidden_size={hidden}", f"model.intermediate_size={intermediate}", *TIME_MODEL_REST]

TIME_LAYOUTS = {"DP2": [], "TP2": ["parallel.tp=2"], "PP2": ["parallel.pp=2"],
                # full AC on every layer, and on the first 2 of 4: the recompute the plan prices at N / L of the mode's
                "DP2full": ["parallel.activation_checkpointing=full"],
                "DP2full2": ["parallel.activation_checkpointing=full", "parallel.activation_checkpointing_layers=2"]}
MEMORY_MODEL = ["model.vocab_size=8192", "model.hidden_size=512", "model.intermediate_size=1376",
                "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=4", "model.max_seq_len=256",
                "train.seq_len=256", "train.micro_batch_size_per_gpu=4", "train.global_batch_size=8",
                # Small DeepSpeed buckets: on CPU an untouched torch.empty is not resident, so 5e8-element buckets
                # would be counted by the estimate (as on a GPU) but never show up in RSS.
                "zero.reduce_bucket_size_elements=2000000", "zero.allgather_bucket_size_elements=2000000"]
# The fixed cost of a run (engine, gloo, loader, allocator arenas) measured with the tiny model, subtracted from each.
BASELINE = ["model.vocab_size=256", "model.hidden_size=64", "model.intermediate_size=176", "model.num_layers=2",
            "model.num_heads=4", "model.num_kv_heads=2", "model.max_seq_len=256", "train.seq_len=256",
            "train.micro_batch_size_per_gpu=4", "train.global_batch_size=8"]
MEMORY_LAYOUTS = {
    "dp2 zero0 none": ["zero.stage=0"],
    "dp2 zero1 none": ["zero.stage=1"],
    "dp2 zero2 none": ["zero.stage=2"],
    "dp2 zero3 none": ["zero.stage=3"],
    "dp2 zero1 selective": ["zero.stage=1", "parallel.activation_checkpointing=selective"],
    "dp2 zero1 full": ["zero.stage=1", "parallel.activation_checkpointing=full"],
    "dp2 zero1 full:2": ["zero.stage=1", "parallel.activation_checkpointing=full",
                         "parallel.activation_checkpointing_layers=2"],
    "dp2 zero1 selective:2": ["zero.stage=1", "parallel.activation_checkpointing=selective",
                              "parallel.activation_checkpointing_layers=2"],
    "tp2 zero0 none": ["parallel.tp=2"],
    "tp2+sp zero0 selective": ["parallel.tp=2", "parallel.sequence_parallel=true",
                               "parallel.activation_checkpointing=selective"],
    "pp2 zero0 none": ["parallel.pp=2"],
}


class StepClock(Hook):
    """Wall time at the end of every optimizer step (every rank calls every hook)."""

    def __init__(self) -> None:
        self.ends_s: list[float] = []
        self.cpu_ends_s: list[float] = []
        self.run_delay_ends_s: list[float] = []

    def on_step_end(self, run: Any, state: Any, out: Any) -> None:
        self.ends_s.append(time.perf_counter())
        self.cpu_ends_s.append(time.process_time())  # CPU time of this rank: wall ≫ CPU means it waited or was starved
        self.run_delay_ends_s.append(_run_delay_s())


def _run_delay_s() -> float:
    """Seconds this thread was runnable but waited for a core (Linux schedstat field 2): other jobs' share."""
    with open("/proc/thread-self/schedstat") as stat:
        return int(stat.read().split()[1]) / 1e9


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _train_body(rank: int, world_size: int, overrides: list[str], run_dir: str) -> dict[str, Any]:
    from trainer.train import train  # imported in the parent already (below): its pages are not counted

    start_rss = _rss_bytes()
    clock = StepClock()
    train(load_config(TINY, [*COMMON, f"logging.run_dir={run_dir}", *overrides]), extra_hooks=[clock])
    steps_s = [b - a for a, b in zip(clock.ends_s, clock.ends_s[1:])]
    cpu_steps_s = [b - a for a, b in zip(clock.cpu_ends_s, clock.cpu_ends_s[1:])]
    delay_steps_s = [b - a for a, b in zip(clock.run_delay_ends_s, clock.run_delay_ends_s[1:])]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"steps_s": steps_s, "cpu_steps_s": cpu_steps_s, "run_delay_steps_s": delay_steps_s,
            "rss_growth_bytes": peak - start_rss,
            "start_rss_bytes": start_rss}


def _run(world_size: int, overrides: list[str]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as run_dir:
        return run_distributed(_train_body, world_size, overrides, run_dir, timeout_s=900)


def _allreduce_body(rank: int, world_size: int, sizes: list[int], reps: int) -> dict[int, float]:
    import torch.distributed as dist

    out = {}
    for nbytes in sizes:
        tensor = torch.ones(nbytes // 4)
        for _ in range(3):
            dist.all_reduce(tensor)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - start)
        out[nbytes] = statistics.median(times)
    return out


def measure_link() -> tuple[float, float]:
    """(latency s, bandwidth B/s) of a 2-rank gloo all-reduce, in the plan's model: t = 2(α + n / (2B))."""
    small, big = 4096, 4 * 2**20
    times = run_distributed(_allreduce_body, 2, [small, big], 30, timeout_s=120)[0]
    latency_s = times[small] / 2
    bandwidth = big / (times[big] - 2 * latency_s)
    return latency_s, bandwidth


def _gemm_s(tokens: int, k: int, n: int, repeats: int) -> float:
    """Fastest of `repeats` forward + backward passes of one linear as the trainer runs it (megatron's
    LinearWithGradAccumulation: y = x Wᵀ; dx = dy W; dW = dyᵀ x): the least disturbed by other jobs."""
    x, weight, dy = torch.randn(tokens, k), torch.randn(n, k), torch.randn(tokens, n)
    best_s = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up the allocator and caches
        start = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        dy.matmul(weight)
        dy.t().matmul(x)
        best_s = min(best_s, time.perf_counter() - start)
    return best_s


def gemm_shapes(model: list[str], tp: int) -> list[tuple[str, int, int, int, int]]:
    """The per-rank GEMMs of one decoder layer and lm_head at `tp`, from the plan's own list (so the bench times what
    the plan prices): (name, tokens, K, N, width = the TP-split dimension per rank)."""
    cfg = load_config(TINY, [*COMMON, *model])
    hidden, vocab = cfg.model.hidden_size, cfg.validate_for_world(1, device="cpu").padded_vocab_size
    tokens = cfg.train.micro_batch_size_per_gpu * cfg.train.seq_len
    column = {"q", "k", "v", "gate", "up"}  # split the output (N); o and down split their input (K)
    shapes = [(name, tokens, hidden, split // tp, split // tp) if name in column else
              (name, tokens, split // tp, hidden, split // tp) for name, _, split in layer_gemms(cfg.model)]
    return [*shapes, ("lm_head", tokens, hidden, vocab // tp, vocab // tp)]


def measure_gemm_curve(model: list[str], repeats: int) -> dict[str, Any]:
    """This machine's width curve, one thread as the ranks run: every per-rank GEMM of the model at tp 1 and 2,
    interleaved; factor(width) = FLOP/s of the GEMMs of that width (FLOP-weighted) / the best width's."""
    flops_at: dict[int, float] = {}
    seconds_at: dict[int, float] = {}
    rows = []
    for tp in (1, 2):
        for name, tokens, k, n, width in gemm_shapes(model, tp):
            seconds = _gemm_s(tokens, k, n, repeats)
            flops = 6 * tokens * k * n
            flops_at[width] = flops_at.get(width, 0.0) + flops
            seconds_at[width] = seconds_at.get(width, 0.0) + seconds
            rows.append({"tp": tp, "gemm": name, "tokens": tokens, "k": k, "n": n, "width": width,
                         "gflops": flops / seconds / 1e9})
    rate = {width: flops_at[width] / seconds_at[width] for width in flops_at}
    best = max(rate.values())
    return {"gemms": rows, "width": {width: rate[width] / best for width in sorted(rate)},
            "best_gflops": best / 1e9}


def _median_step_s(ranks: list[dict[str, Any]], key: str = "steps_s") -> float:
    return statistics.median(ranks[0][key][1:])  # after the first two steps (warm-up, first optimizer state)


def _undisturbed_step_s(ranks: list[dict[str, Any]]) -> float:
    """Rank 0's step time minus the longest run-queue wait of any rank in that step: ranks move in lock-step, so a
    rank kept off its core by another job delays all of them. What the step would take with a core per rank."""
    waits = [max(step) for step in zip(*(r["run_delay_steps_s"] for r in ranks))]
    return statistics.median(wall - wait for wall, wait in list(zip(ranks[0]["steps_s"], waits))[1:])


def _load_average() -> float:
    return os.getloadavg()[0]


def time_part(args: argparse.Namespace) -> dict[str, Any]:
    steps = [f"train.max_steps={args.steps}", *time_model(args.hidden)]
    measured: dict[str, list[float]] = {"1proc": [], **{name: [] for name in TIME_LAYOUTS}}
    cpu: dict[str, list[float]] = {name: [] for name in measured}
    undisturbed: dict[str, list[float]] = {name: [] for name in measured}
    links, loads, curves = [], [], []
    for round_index in range(args.rounds):
        loads.append(_load_average())
        links.append(measure_link())
        curves.append(measure_gemm_curve(time_model(args.hidden), args.gemm_repeats))
        for name, overrides in {"1proc": [], **TIME_LAYOUTS}.items():
            ranks = _run(1 if name == "1proc" else 2, [*steps, *overrides])
            measured[name].append(_median_step_s(ranks))
            cpu[name].append(_median_step_s(ranks, "cpu_steps_s"))
            undisturbed[name].append(_undisturbed_step_s(ranks))
        print(f"round {round_index} (load {loads[-1]:.1f}): " + ", ".join(
            f"{k} {v[-1]:.3f} s (cpu {cpu[k][-1]:.3f}, minus run-queue wait {undisturbed[k][-1]:.3f})"
            for k, v in measured.items()), flush=True)
    # Wall time minus run-queue waits, best round: other jobs on this machine only ever make a step slower.
    step_s = {name: min(values) for name, values in undisturbed.items()}
    latency_s = statistics.median(link[0] for link in links)
    bandwidth = statistics.median(link[1] for link in links)
    # Per width, the best round's factor: like the step times, other jobs only ever make a GEMM slower.
    widths = curves[0]["width"]
    curve = GemmEfficiency(width=tuple((w, max(c["width"][w] for c in curves)) for w in widths),
                           source=f"bench_plan --part time --hidden {args.hidden}, "
                                  f"{time.strftime('%Y-%m-%d', time.gmtime())}: torch matmuls, one CPU thread")
    model = time_model(args.hidden)
    flat = predict_times(model, step_s["1proc"], latency_s, bandwidth, GemmEfficiency())
    predicted = predict_times(model, step_s["1proc"], latency_s, bandwidth, curve)
    return {"measured_s": measured, "cpu_s_rank0": cpu, "undisturbed_s": undisturbed, "load_average": loads,
            "min_wall_s": {name: min(values) for name, values in measured.items()}, "min_s": step_s,
            "median_s": {name: statistics.median(values) for name, values in measured.items()},
            "gloo_latency_s": latency_s, "gloo_bandwidth_Bps": bandwidth, "gemm_rounds": curves,
            "gemm_efficiency": {"width": {str(w): f for w, f in curve.width}, "source": curve.source},
            "predicted_flat": flat, "predicted": predicted}


def predict_times(model: list[str], single_s: float, latency_s: float, bandwidth: float,
                  gemm: GemmEfficiency) -> dict[str, Any]:
    """Feed the plan model this machine: one 'GPU' = one CPU rank whose compute rate makes the 1-process run match
    (with the GEMM curve applied to the 1-process shapes too, so the curve moves only the ratios)."""
    base = load_config(TINY, [*COMMON, *model])
    derived1 = base.validate_for_world(1, device="cpu")
    flops = flops_per_token(base.model, derived1.padded_vocab_size, base.train.seq_len).total
    rate = flops * derived1.global_batch_size_tokens / single_s  # FLOP/s reached by the trainer on one rank
    calib = Calibration(compute_efficiency=1.0, source="bench_plan: 1-process step time", gemm=gemm)
    # One process has no communication: its predicted time scales as 1 / rate, so one correction calibrates it.
    rate *= _predict(model, "1proc", rate, latency_s, bandwidth, calib).total_s / single_s
    out: dict[str, Any] = {"compute_rate_gflops": rate / 1e9}
    for name in ("1proc", *TIME_LAYOUTS):
        t = _predict(model, name, rate, latency_s, bandwidth, calib)
        out[name] = {"total_s": t.total_s, "compute_s": t.compute_s, "comm_s": t.exposed_comm_s,
                     "bubble_s": t.bubble_s}
    return out


def _predict(model: list[str], name: str, rate: float, latency_s: float, bandwidth: float,
             calib: Calibration) -> Any:
    cpu = GpuSpec("cpu-rank", 24.0, rate / 1e12, bandwidth / 1e9, bandwidth / 1e9, latency_s, latency_s)
    world = 1 if name == "1proc" else 2
    cfg = load_config(TINY, [*COMMON, *model, *TIME_LAYOUTS.get(name, [])])
    derived = cfg.validate_for_world(world, device="cpu")
    return step_time(cfg, derived, Cluster(1, world, cpu, link_efficiency=1.0), calib)


def memory_part(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for round_index in range(args.rounds):
        base = max(r["rss_growth_bytes"] for r in _run(2, [*BASELINE, "train.max_steps=3"]))
        rows.setdefault("baseline (tiny model, dp2 zero0)", {"measured_bytes": [], "estimate": {"total_bytes": 0}})
        rows["baseline (tiny model, dp2 zero0)"]["measured_bytes"].append(base)
        for name, overrides in MEMORY_LAYOUTS.items():
            full = [*MEMORY_MODEL, "train.max_steps=3", *overrides]
            ranks = _run(2, full)
            growth = max(r["rss_growth_bytes"] for r in ranks)
            row = rows.setdefault(name, {"measured_bytes": [], "estimate": _estimate(full)})
            row["measured_bytes"].append(growth)
            print(f"round {round_index} {name}: RSS growth {growth / 2**20:.0f} MiB, "
                  f"estimate {row['estimate']['total_bytes'] / 2**20:.0f} MiB", flush=True)
    return rows


def _estimate(overrides: list[str]) -> dict[str, int]:
    cfg = load_config(TINY, [*COMMON, *overrides])
    memory = estimate_memory(cfg, cfg.validate_for_world(2, device="cpu"))
    return {"weights_bytes": memory.weights_bytes, "grads_bytes": memory.grads_bytes,
            "optimizer_bytes": memory.optimizer_bytes, "activations_bytes": memory.activations_bytes,
            "total_bytes": memory.total_bytes}


GPU_BASE = ["data.synthetic=true", "data.datasets=[]", "train.global_batch_size=32", "train.max_steps=8",
            "train.log_interval_steps=1", "train.eval_interval_steps=0", "optim.warmup_steps=2",
            "checkpoint.save_interval_steps=0", "checkpoint.save_at_end=false", "logging.tensorboard=false",
            "faults.hang_timeout_s=0"]
GPU_SETTINGS = {
    "zero2 selective micro8": ["zero.stage=2", "parallel.activation_checkpointing=selective",
                               "train.micro_batch_size_per_gpu=8"],  # the notes/gpu-h200.md run
    "zero1 none micro4": ["zero.stage=1", "parallel.activation_checkpointing=none", "train.micro_batch_size_per_gpu=4"],
    "zero0 full micro16": ["zero.stage=0", "parallel.activation_checkpointing=full",
                           "train.micro_batch_size_per_gpu=16"],
    "zero3 selective micro8": ["zero.stage=3", "parallel.activation_checkpointing=selective",
                               "train.micro_batch_size_per_gpu=8"],
}


def gpu_part(args: argparse.Namespace) -> dict[str, Any]:
    import subprocess

    from trainer.gpu_specs import GPUS

    rows = {}
    for name, overrides in GPU_SETTINGS.items():
        with tempfile.TemporaryDirectory() as run_dir:
            full = [*GPU_BASE, *overrides, f"launch.device={args.device}", f"logging.run_dir={run_dir}"]
            env = {**os.environ, "DS_ACCELERATOR": "cuda" if args.device == "cuda" else "cpu"}
            env.pop("WORLD_SIZE", None)
            cmd = [sys.executable, "-m", "launch", "train", "--config", str(REPO / args.config), *full]
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                rows[name] = {"error": done.stderr[-2000:]}
                print(f"{name}: failed (exit {done.returncode})\n{done.stderr[-2000:]}", flush=True)
                continue
            records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        rows[name] = {**_gpu_measured(records), **_gpu_predicted(args, full, GPUS[args.gpu])}
        print(f"{name}: {rows[name]}", flush=True)
    return rows


def _gpu_measured(records: list[dict[str, Any]]) -> dict[str, float]:
    train = [r for r in records if r.get("kind") == "train"]
    memory = max(r.get("max_memory_allocated_gib", r.get("max_rss_gib", 0.0)) for r in train)
    return {"measured_gib": memory, "measured_step_s": statistics.median(r["step_time_s"] for r in train[2:])}


def _gpu_predicted(args: argparse.Namespace, overrides: list[str], gpu: GpuSpec) -> dict[str, float]:
    cfg = load_config(REPO / args.config, overrides)
    derived = cfg.validate_for_world(1, device=args.device)
    time_s = step_time(cfg, derived, Cluster(1, 1, gpu), Calibration()).total_s
    return {"estimate_gib": estimate_memory(cfg, derived).total_bytes / 2**30, "predicted_step_s": time_s}


def print_gpu(rows: dict[str, dict[str, Any]]) -> None:
    ok = {name: row for name, row in rows.items() if "error" not in row}
    if not ok:
        return
    first = next(iter(ok.values()))
    print(f"\n{'setting':<24}{'mem GiB':>9}{'estimate':>10}{'est/meas':>10}{'step s':>9}{'predicted':>11}"
          f"{'ratio meas':>12}{'ratio pred':>12}")
    for name, row in ok.items():
        print(f"{name:<24}{row['measured_gib']:>9.2f}{row['estimate_gib']:>10.2f}"
              f"{row['estimate_gib'] / row['measured_gib']:>10.3f}{row['measured_step_s']:>9.3f}"
              f"{row['predicted_step_s']:>11.3f}{row['measured_step_s'] / first['measured_step_s']:>12.3f}"
              f"{row['predicted_step_s'] / first['predicted_step_s']:>12.3f}")


def print_time(result: dict[str, Any]) -> None:
    med, pred, flat = result["min_s"], result["predicted"], result["predicted_flat"]
    print(f"\ngloo all-reduce: latency {result['gloo_latency_s'] * 1e6:.0f} us, bus bandwidth "
          f"{result['gloo_bandwidth_Bps'] / 1e9:.2f} GB/s; compute rate {pred['compute_rate_gflops']:.1f} GFLOP/s "
          f"(flat curve: {flat['compute_rate_gflops']:.1f})")
    print("GEMM width curve (factor on the best width's FLOP/s): " + ", ".join(
        f"{w}: {f:.3f}" for w, f in result["gemm_efficiency"]["width"].items()))
    print("measured: wall minus run-queue wait (longest of the ranks, per step), median over steps, best round")
    print(f"{'layout':<8}{'measured s':>12}{'pred flat s':>13}{'pred curve s':>14}{'comm s':>9}{'bubble s':>10}")
    for name in med:
        p = pred[name]
        print(f"{name:<8}{med[name]:>12.3f}{flat[name]['total_s']:>13.3f}{p['total_s']:>14.3f}{p['comm_s']:>9.3f}"
              f"{p['bubble_s']:>10.3f}")
    print(f"{'ratio':<14}{'measured':>10}{'flat':>9}{'pred/meas':>11}{'curve':>9}{'pred/meas':>11}")
    for a, b in (("TP2", "DP2"), ("PP2", "DP2"), ("PP2", "TP2"), ("DP2", "1proc"), ("DP2full", "DP2"),
                 ("DP2full2", "DP2")):
        m = med[a] / med[b]
        f, p = flat[a]["total_s"] / flat[b]["total_s"], pred[a]["total_s"] / pred[b]["total_s"]
        print(f"{a + '/' + b:<14}{m:>10.3f}{f:>9.3f}{f / m:>11.3f}{p:>9.3f}{p / m:>11.3f}")


def print_memory(rows: dict[str, dict[str, Any]]) -> None:
    base_name = next(name for name in rows if name.startswith("baseline"))
    base = statistics.median(rows[base_name]["measured_bytes"])
    print(f"\n{base_name}: RSS growth {base / 2**20:.0f} MiB, subtracted below")
    print(f"{'layout':<24}{'measured MiB':>14}{'- baseline':>12}{'estimate MiB':>14}{'(meas-base)/est':>17}")
    for name, row in rows.items():
        if name == base_name:
            continue
        measured = statistics.median(row["measured_bytes"])
        estimate = row["estimate"]["total_bytes"]
        print(f"{name:<24}{measured / 2**20:>14.0f}{(measured - base) / 2**20:>12.0f}{estimate / 2**20:>14.0f}"
              f"{(measured - base) / estimate:>17.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("time", "memory", "gpu"), required=True)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the layouts")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (time part)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the time part's model (256)")
    parser.add_argument("--gemm-repeats", type=int, default=5,
                        help="time part: passes per GEMM shape per round, fastest kept (5)")
    parser.add_argument("--gpu", default="h200", help="GPU kind for the gpu part's predictions (trainer/gpu_specs.py)")
    parser.add_argument("--config", default="configs/1b.yaml", help="the gpu part's config (configs/1b.yaml)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="gpu part: cpu only to dry-run it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = {"time": (time_part, print_time), "memory": (memory_part, print_memory), "gpu": (gpu_part, print_gpu)}
    measure_fn, print_fn = parts[args.part]
    result = measure_fn(args)
    print_fn(result)
    out_dir = REPO / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_plan_{args.part}{'_h' + str(args.hidden) if args.part == 'time' else ''}.json"
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
            "torch": torch.__version__, "args": vars(args)}
    path.write_text(json.dumps({**meta, "result": result}, indent=2) + "\n")
    print(f"wrote {path}")
    if args.part == "time":  # the curve as `pretrain plan --gemm-efficiency` reads it
        curve_path = out_dir / f"gemm_efficiency_cpu_h{args.hidden}.json"
        curve_path.write_text(json.dumps(result["gemm_efficiency"], indent=2) + "\n")
        print(f"wrote {curve_path} (pretrain plan --gemm-efficiency {curve_path.relative_to(REPO)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
