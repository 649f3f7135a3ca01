"""GPU throughput, in one process and one run: our trainer (the code path `pretrain train` runs, as configured) next
to Hugging Face's LlamaForCausalLM eager and compiled, on the same shape and batch (issue 13).

    python bench/bench_gpu.py                          # one GPU: configs/1b.yaml, bf16, seq 2048, 65,536 tokens/step
    python bench/bench_gpu.py --config configs/125m.yaml
    python bench/bench_gpu.py --device cpu --tiny      # CPU smoke run (configs/tiny.yaml): proves the script, not speed

Loops (each: build, warm-up steps including compilation, then timed steps, then freed):
  trainer[<label>]  trainer.train.build_run + trainer.fit.fit with the config and the variant's overrides: the
                    DeepSpeed engine, ZeRO stage, precision, compile, activation checkpointing, chunked loss and
                    fused AdamW exactly as `pretrain train` builds them. Default variants: no activation
                    checkpointing, and the config's own setting.
  hf_eager          transformers LlamaForCausalLM (SDPA), fp32 weights under autocast bf16, fused torch AdamW,
                    clip_grad_norm_: the reference loop of ../shared/notes/gpu-h200.md.
  hf_compile        the same with torch.compile(model).
  torchtitan        only when it is installed (offline machines have no way to get it): reported as skipped.
All loops see the same synthetic token stream and the same global batch (micro × grad_accum); TFLOP/s uses the
project's FLOPs/token (trainer.estimate: 6 × matmul params + attention) for every loop, so the ratios are tokens/s
ratios. MFU divides by the dense bf16 peak of the GPU (hooks.GPU_PEAK_BF16_TFLOPS). Peak memory: CUDA
max_memory_allocated per loop; on CPU the process' peak RSS so far (monotonic, so only the first loop's is its own).

A wall-clock budget (`--budget-s`, default 330 s) skips loops that would start after it, so one GPU check fits its
6-minute slot; skipped loops are listed as such. A loop that fails (OOM, compile or kernel error) is reported with its
traceback and as an error row, and the next loop runs; the exit status is then 1. After every loop its numbers are
printed and the JSON so far is written to bench/out/bench_gpu_<device>.json (`"complete": false` until the end), so a
run cut off by a time limit keeps what it measured; at the end, the whole table.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import re
import resource
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu" if "cpu" in sys.argv else "cuda")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

from trainer.bootstrap import destroy_parallel, init_parallel, single_process_defaults  # noqa: E402
from trainer.config import Config, Derived, load_config  # noqa: E402
from trainer.data import SyntheticTokens  # noqa: E402
from trainer.estimate import estimate_memory, flops_per_token  # noqa: E402
from trainer.fit import fit  # noqa: E402
from trainer.hooks import CompileWarmupHook, HookList, default_hooks, peak_tflops_per_gpu  # noqa: E402
from trainer.profile_summary import ProfileSummary, comparison_table  # noqa: E402
from trainer.profiling import ProfilerHook, StepProfiler  # noqa: E402
from trainer.train import build_run, release_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMMON = ["data.synthetic=true", "data.datasets=[]", "train.eval_interval_steps=0", "optim.warmup_steps=1",
          "checkpoint.save_interval_steps=0", "checkpoint.save_at_end=false", "logging.tensorboard=false",
          "logging.jsonl=false", "faults.hang_timeout_s=0"]
GPU_PRESET = ("configs/1b.yaml", ["launch.device=cuda", "train.global_batch_size=32"])  # micro 8 × accum 4
TINY_PRESET = ("configs/tiny.yaml", ["launch.device=cpu", "train.global_batch_size=8"])  # micro 4 × accum 2
DEFAULT_VARIANTS = ["no_ac=parallel.activation_checkpointing=none", "config_ac="]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="configs/tiny.yaml (the CPU smoke shape)")
    parser.add_argument("--config", help="default: configs/1b.yaml (cuda) or configs/tiny.yaml (--tiny)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per loop")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (compile happens here)")
    parser.add_argument("--variant", action="append", metavar="LABEL=OVERRIDE[,OVERRIDE...]",
                        help=f"a trainer loop; repeatable (default: {DEFAULT_VARIANTS})")
    parser.add_argument("--then-variant", action="append", default=[], metavar="LABEL=OVERRIDE[,OVERRIDE...]",
                        help="a trainer loop run after the HF loops (so the budget drops it first); repeatable")
    parser.add_argument("--hf-compile-backend", default="inductor", help="torch.compile backend of hf_compile")
    parser.add_argument("--skip", nargs="*", default=[], help="loops to leave out: trainer hf_eager hf_compile")
    parser.add_argument("--budget-s", type=float, default=330.0, help="start no loop after this many seconds")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each loop (trainer: the last 2 warm-up steps through profiling.*; HF: one "
                             "extra step): device time by category and GPU busy fraction in the JSON, traces beside it")
    parser.add_argument("--memory-snapshot", action="store_true",
                        help="with --profile on CUDA: each trainer loop also saves its allocation history from step 1 "
                             "to the profiled window's end (profiling.memory_snapshot; pytorch.org/memory_viz)")
    parser.add_argument("--plan-gpu", default="h200", help="GPU kind whose `pretrain plan` step time is printed next to "
                        "each trainer loop's (trainer.gpu_specs; on CPU the column is that GPU's prediction, not this "
                        "machine's)")
    parser.add_argument("--out", help="JSON path (default bench/out/bench_gpu_<device>.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every trainer loop")
    return parser.parse_args()


def load(args: argparse.Namespace, variant_overrides: list[str], run_dir: str) -> tuple[Config, Derived]:
    preset_config, preset_overrides = TINY_PRESET if args.tiny else GPU_PRESET
    if args.device == "cpu" and not args.tiny:
        preset_overrides = [o for o in preset_overrides if not o.startswith("launch.device")] + ["launch.device=cpu"]
    overrides = [*preset_overrides, *COMMON, f"train.max_steps={max(args.steps, args.warmup_steps)}",
                 *args.overrides, *variant_overrides, f"logging.run_dir={run_dir}"]
    cfg = load_config(REPO / (args.config or preset_config), overrides)
    return cfg, cfg.validate_for_world(1)


# ---------------------------------------------------------------------------------------------------------------------
# Timing and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_compiled_state() -> None:
    """Dynamo's caches hold the compiled graphs (and through their guards, the modules): drop them between loops."""
    torch._dynamo.reset()
    gc.collect()


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(run_steps: Callable[[int], None], warmup_steps: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Warm-up (compilation included), then the timed block; seconds per optimizer step."""
    start_s = time.perf_counter()
    run_steps(warmup_steps)
    sync(device)
    warmup_s = time.perf_counter() - start_s
    start_s = time.perf_counter()
    run_steps(steps)
    sync(device)
    return {"warmup_s": warmup_s, "s_per_step": (time.perf_counter() - start_s) / steps}


# ---------------------------------------------------------------------------------------------------------------------
# Loops


def trainer_loop(args: argparse.Namespace, label: str, overrides: list[str], ctx: Any) -> dict[str, Any]:
    """Our trainer exactly as `pretrain train` builds it; fit() runs train.max_steps steps per call."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg, derived = load(args, [*overrides, *profile_overrides(args, label)], run_dir)
        run = build_run(cfg, derived, ctx, Path(run_dir))
        module = weakref.ref(run.model.module)
        try:
            result = _time_trainer(run, cfg, derived, args, label, overrides, ctx.device)
        finally:  # also when the loop fails: the next loops need the memory (and run_loops goes on to them)
            release_run(run)  # as train() does: ZeRO-1/2 would otherwise keep model and optimizer state on the GPU
            del run
    free_compiled_state()
    # A loop that is not freed would count against the next loop's memory (and could OOM it on a GPU).
    result["model_freed_after_loop"] = module() is None
    return result


def _time_trainer(run: Any, cfg: Config, derived: Derived, args: argparse.Namespace, label: str,
                  overrides: list[str], device: torch.device) -> dict[str, Any]:
    hooks = default_hooks(run)
    warmup_hook = next((h for h in hooks if isinstance(h, CompileWarmupHook)), None)
    profiler_hook = next((h for h in hooks if isinstance(h, ProfilerHook)), None)  # fires in the warm-up call only

    def run_steps(_: int) -> None:  # each fit() call runs train.max_steps steps from a fresh TrainState
        fit(run, HookList(hooks))

    result = timed(run_steps, 1, 1, device)  # one call of warm-up, one timed
    # What stays allocated between steps (weights, fp32 master, Adam moments): with the peak, it splits the measured
    # memory as the estimate is split, so a miss of issue 16's ±10 % says which part missed.
    result["after_step_gib"] = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    steps_per_call = cfg.train.max_steps
    result["s_per_step"] /= steps_per_call
    result.update(kind="trainer", label=label, overrides=overrides, steps=steps_per_call,
                  compile_backend=run.model.compile_backend,
                  activation_checkpointing=cfg.parallel.activation_checkpointing, zero_stage=cfg.zero.stage,
                  precision=cfg.precision.dtype, fp8=cfg.precision.fp8, fp8_linears=run.model.fp8_linears,
                  attention_mask=cfg.model.attention_mask, attention_kernel=derived.attention_kernel,
                  engine=type(run.engine).__name__,
                  optimizer=type(run.engine.optimizer).__name__,
                  compile_summary=None if warmup_hook is None else warmup_hook.summary,
                  # The dry-run's memory estimate and `pretrain plan`'s step time of this very config (issue 16).
                  **estimate_gib(cfg, derived),
                  plan_s_per_step=planned_step_s(cfg, derived, args.plan_gpu),
                  profile=None if profiler_hook is None or profiler_hook.summary is None
                  else profiler_hook.summary.as_dict())
    return result


def estimate_gib(cfg: Config, derived: Derived) -> dict[str, Any]:
    """The dry-run's memory estimate of this config, in total and by part."""
    memory = estimate_memory(cfg, derived)
    return {"estimate_gib": memory.total_bytes / 2**30,
            "estimate_parts_gib": {part: getattr(memory, f"{part}_bytes") / 2**30
                                   for part in ("weights", "grads", "optimizer", "activations", "buffers")}}


def memory_split_line(row: dict[str, Any]) -> str | None:
    """Measured vs estimated, split where a GPU can measure it: what stays allocated after a step against the
    estimate's weights + optimizer, and the rest of the peak against its grads + activations + buffers."""
    after_gib, parts = row.get("after_step_gib"), row.get("estimate_parts_gib")
    if after_gib is None or not parts:
        return None
    kept_gib = parts["weights"] + parts["optimizer"]
    step_gib = parts["grads"] + parts["activations"] + parts["buffers"]
    return (f"  memory: after a step {after_gib:.2f} GiB (estimate: weights + optimizer {kept_gib:.2f}); peak - that "
            f"{row['peak_memory_gib'] - after_gib:.2f} GiB (estimate: grads + activations + buffers {step_gib:.2f})")


def out_path(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else REPO / "bench" / "out" / f"bench_gpu_{args.device}.json"


def trace_dir(args: argparse.Namespace, label: str) -> Path:
    out = out_path(args)
    return out.parent / f"{out.stem}_traces" / re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def profile_overrides(args: argparse.Namespace, label: str) -> list[str]:
    """The trainer's own profiler (profiling.*) over the warm-up call's last 2 steps: compiled by then, and the
    timed call that follows is not profiled (the hook fires once)."""
    if not args.profile:
        return []
    last_step = max(args.steps, args.warmup_steps)
    return [f"profiling.start_step={max(1, last_step - 1)}", f"profiling.num_steps={min(2, last_step)}",
            f"profiling.dir={trace_dir(args, label)}", f"profiling.memory_snapshot={str(args.memory_snapshot).lower()}"]


def planned_step_s(cfg: Config, derived: Derived, gpu: str) -> float:
    """`pretrain plan`'s predicted step time for this config on one GPU of kind `gpu`, default calibration."""
    from trainer.gpu_specs import GPUS
    from trainer.plan import Calibration, Cluster, step_time

    return step_time(cfg, derived, Cluster(nodes=1, gpus_per_node=1, gpu=GPUS[gpu]), Calibration()).total_s


def hf_loop(args: argparse.Namespace, cfg: Config, derived: Derived, device: torch.device,
            compile_backend: str | None) -> dict[str, Any]:
    """transformers' Llama in a textbook loop: fp32 weights, autocast bf16, fused AdamW, clip_grad_norm_."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    hf_cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                         num_key_value_heads=m.num_kv_heads, head_dim=m.resolved_head_dim(),
                         rope_theta=m.rope_theta, rms_norm_eps=m.rms_norm_eps, tie_word_embeddings=m.tie_embeddings,
                         max_position_embeddings=m.max_seq_len, attn_implementation="sdpa")
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg)
    model.train()
    forward = model if compile_backend is None else torch.compile(model, backend=compile_backend)
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay, fused=True)
    batches = iter(SyntheticTokens(vocab_size=m.vocab_size, seq_len=cfg.train.seq_len,
                                   micro_batch_size=derived.micro_batch_size_per_gpu, seed=cfg.train.seed))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision.dtype == "bf16")

    def run_steps(count: int) -> None:
        for _ in range(count):
            for _ in range(derived.grad_accum_steps):
                tokens, labels = next(batches)
                with autocast:
                    logits = forward(input_ids=tokens.to(device, non_blocking=True)).logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                         labels.to(device, non_blocking=True).flatten())
                (loss / derived.grad_accum_steps).backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    label = "hf_compile" if compile_backend else "hf_eager"
    result = timed(run_steps, args.warmup_steps, args.steps, device)
    if args.profile:  # one more step, after the timed ones
        profiler = StepProfiler(device)
        profiler.start()
        with torch.profiler.record_function("train_step_1"):  # as the trainer's profiled steps are named
            run_steps(1)
        result["profile"] = profiler.stop(1, 1, 0, trace_dir(args, label) / "rank0_trace.json.gz").as_dict()
    result.update(kind="hf", label=label, compile_backend=compile_backend,
                  steps=args.steps, precision=f"fp32 weights + autocast {cfg.precision.dtype}"
                  if cfg.precision.dtype == "bf16" else cfg.precision.dtype)
    module = weakref.ref(model)
    del model, forward, optimizer, run_steps
    free_compiled_state()
    result["model_freed_after_loop"] = module() is None
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Report


def add_rates(row: dict[str, Any], tokens_per_step: int, flops_per_tok: int, peak_tflops: float | None) -> None:
    row["tokens_per_s"] = tokens_per_step / row["s_per_step"]
    row["tflops_per_gpu"] = row["tokens_per_s"] * flops_per_tok / 1e12
    row["mfu"] = None if peak_tflops is None else row["tflops_per_gpu"] / peak_tflops


def print_table(rows: list[dict[str, Any]], header: str | None) -> None:
    """The rows under the column names, and above them `header` if given (the lines printed after each loop have
    none)."""
    if header is not None:
        print(f"\n{header}")
    print(f"{'loop':<26}{'s/step':>9}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'est GiB':>9}"
          f"{'est/peak':>9}{'plan s':>8}{'plan/meas':>10}{'warm-up s':>11}")
    for row in rows:
        if row.get("skipped") or row.get("error"):
            print(f"{row['label']:<26}  {'skipped' if row.get('skipped') else 'FAILED'}: "
                  f"{row.get('skipped') or row['error']}")
            continue
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        estimate = row.get("estimate_gib")
        est, ratio = ("-", "-") if estimate is None else (f"{estimate:.2f}", f"{estimate / row['peak_memory_gib']:.3f}")
        planned = row.get("plan_s_per_step")
        plan_s, plan_ratio = ("-", "-") if planned is None else (f"{planned:.3f}", f"{planned / row['s_per_step']:.3f}")
        print(f"{row['label']:<26}{row['s_per_step']:>9.3f}{row['tokens_per_s']:>12,.0f}{row['tflops_per_gpu']:>10.4g}"
              f"{mfu:>8}{row['peak_memory_gib']:>10.2f}{est:>9}{ratio:>9}{plan_s:>8}{plan_ratio:>10}"
              f"{row['warmup_s']:>11.1f}")


def variants(specs: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for spec in specs:
        label, _, overrides = spec.partition("=")
        out.append((f"trainer[{label}]", [o for o in overrides.split(",") if o]))
    return out


def plan_loops(args: argparse.Namespace, ctx: Any, cfg: Config, derived: Derived) -> list[tuple[str, Callable]]:
    loops: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if "trainer" not in args.skip:
        for label, overrides in variants(args.variant or DEFAULT_VARIANTS):
            loops.append((label, lambda lbl=label, ovr=overrides: trainer_loop(args, lbl, ovr, ctx)))
    if "hf_eager" not in args.skip:
        loops.append(("hf_eager", lambda: hf_loop(args, cfg, derived, ctx.device, None)))
    if "hf_compile" not in args.skip:
        loops.append(("hf_compile", lambda: hf_loop(args, cfg, derived, ctx.device, args.hf_compile_backend)))
    if "trainer" not in args.skip:
        for label, overrides in variants(args.then_variant):
            loops.append((label, lambda lbl=label, ovr=overrides: trainer_loop(args, lbl, ovr, ctx)))
    return loops


def run_loops(loops: list[tuple[str, Callable]], device: torch.device, budget_s: float,
              measured: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """Each loop in turn; a loop that fails (an OOM, a kernel or compile error) becomes an error row and the next loop
    still runs: one device call has to bring back every number it can. `measured` sees the rows after every loop."""
    start_s, rows = time.perf_counter(), []
    for label, loop in loops:
        elapsed_s = time.perf_counter() - start_s
        if elapsed_s > budget_s:
            rows.append({"label": label, "skipped": f"budget: {elapsed_s:.0f} s > --budget-s {budget_s:.0f}"})
            continue
        reset_peak(device)
        in_use_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        print(f"[{elapsed_s:6.1f} s] {label} ... ({in_use_gib:.2f} GiB still allocated from before)", flush=True)
        try:
            row = loop()
        except Exception as exc:  # noqa: BLE001 - reported in the row, the log and the exit status
            traceback.print_exc()
            row = {"label": label, "error": " ".join(f"{type(exc).__name__}: {exc}".split())[:800]}
        if "error" in row:  # the failed loop's frames are gone with the exception: give its memory back
            free_compiled_state()
        row["allocated_before_loop_gib"] = in_use_gib
        row["peak_memory_gib"] = peak_memory_gib(device)
        rows.append(row)
        measured(rows)
    reset_peak(device)
    return rows


def main() -> int:
    args = parse_args()
    if args.tiny and args.device == "cuda" and not torch.cuda.is_available():
        args.device = "cpu"
    if args.memory_snapshot and (args.device != "cuda" or not args.profile):
        raise SystemExit("bench_gpu: --memory-snapshot records CUDA allocations inside the profiled window: use it "
                         "with --profile on --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device visible: run on a GPU host, or pass --device cpu --tiny for the "
                         "CPU smoke run")
    if args.device == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    single_process_defaults()
    with tempfile.TemporaryDirectory() as run_dir:
        cfg, derived = load(args, [], run_dir)
    ctx = init_parallel(1, 1, backend="nccl" if args.device == "cuda" else "gloo")
    tokens_per_step = derived.global_batch_size_tokens
    flops = flops_per_token(cfg.model, derived.padded_vocab_size, cfg.train.seq_len).total
    peak = peak_tflops_per_gpu(cfg, ctx.device)
    device_name = torch.cuda.get_device_name() if ctx.device.type == "cuda" else platform.processor() or "cpu"
    report = {"config": args.config or (TINY_PRESET if args.tiny else GPU_PRESET)[0], "overrides": args.overrides,
              "device": ctx.device.type, "device_name": device_name, "tokens_per_step": tokens_per_step,
              "flops_per_token": flops, "peak_tflops": peak, "rows": [], "complete": False,
              "torch": torch.__version__, "python": platform.python_version(),
              "measured_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = out_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)

    def measured(rows: list[dict[str, Any]]) -> None:
        """Rates, one line and the JSON so far after every loop: a device call cut off by its time limit still
        brings back each loop that finished."""
        row = rows[-1]
        if "s_per_step" in row:
            add_rates(row, tokens_per_step, flops, peak)
        print_table([row], header=None)
        if row.get("profile"):
            print(f"  {ProfileSummary(**row['profile']).line()}")
        if memory_line := memory_split_line(row):
            print(memory_line)
        write_report(out, {**report, "rows": rows})

    try:
        rows = run_loops(plan_loops(args, ctx, cfg, derived), ctx.device, args.budget_s, measured)
    finally:
        destroy_parallel()
    if importlib.util.find_spec("torchtitan") is None:
        rows.append({"label": "torchtitan", "skipped": "not installed (and no package index on the GPU host)"})
    print_table(rows, f"{cfg.name}: {device_name}, {cfg.precision.dtype}, micro {derived.micro_batch_size_per_gpu} x "
                      f"grad_accum {derived.grad_accum_steps} x seq {cfg.train.seq_len} = {tokens_per_step:,} "
                      f"tokens/step, {flops / 1e9:.3g} GFLOP/token, peak {peak} TFLOP/s")
    profiled = {row["label"]: ProfileSummary(**row["profile"]) for row in rows if row.get("profile")}
    if profiled:
        print(f"\nwhere the time goes ({'kernel' if ctx.device.type == 'cuda' else 'CPU op'} time by category):")
        print(comparison_table(profiled))
    write_report(out, {**report, "rows": rows, "complete": True})
    print(f"wrote {out}")
    failed = [row["label"] for row in rows if "error" in row]
    if failed:
        print(f"bench_gpu: {len(failed)} loop(s) failed: {', '.join(failed)} (traceback above, 'error' in the JSON); "
              "the other loops' numbers stand", file=sys.stderr)
    return 1 if failed else 0


def write_report(out: Path, report: dict[str, Any]) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    raise SystemExit(main())
