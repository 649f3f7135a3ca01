"""What FP8 (precision.fp8) costs in loss: the same run with and without FP8 matmuls, step for step.

    python bench/bench_fp8_loss.py                                   # quickstart model on CPU, bf16, 300 steps
    python bench/bench_fp8_loss.py --steps 500 --recipes tensorwise rowwise rowwise_with_gw_hp
    python bench/bench_fp8_loss.py --config configs/125m.yaml --device cuda --data DIR   # on a GPU, prepared data

Every run is `python -m launch train` with the same config, seed and data (so the same batches in the same order and
the same initial weights); only precision.fp8 differs. On CPU torch._scaled_mm emulates the FP8 matmuls with the
same casts and scales as an H100's FP8 tensor cores, so the loss difference measured here is FP8's; the speed is
not (emulation is slower than bf16: GPU speed comes from bench/bench_gpu.py).

The first row is the yardstick: bf16 again, with the learning rate × (1 + 1e-6), a rounding-sized nudge to every
update. Training amplifies any such difference (the trajectories drift apart like two seeds); FP8 differences of
that size are drift, not FP8's cost.

Data: --data (a prepared dataset directory), or else the quickstart's corpus (this Python's standard library) is
tokenized and prepared once under the output directory. Prints, per recipe against the bf16 run: the mean of
loss(fp8) - loss(bf16) over the last quarter of the steps (the same batches, so batch noise cancels), the largest
|difference| of the smoothed curves, the final validation loss of each, and tokens/s; JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.config import load_config  # noqa: E402  (light: no torch)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
SMOOTH_STEPS = 20
LR_NUDGE = 1e-6


def quickstart_data(out_dir: Path, config: Path, corpus_mb: float) -> Path:
    """The quickstart's default corpus as tokenizer + shards in out_dir (kept for the next run)."""
    from launch.quickstart import DEFAULT_PROMPT, QuickstartPlan, prepare_corpus

    return prepare_corpus(QuickstartPlan(run_dir=out_dir, inputs=(), include_globs=("*.py",), corpus_mb=corpus_mb,
                                         config_path=config, overrides=(), prompt=DEFAULT_PROMPT))


def run(fp8: str, args: argparse.Namespace, data_dir: Path, label: str | None = None,
        extra: tuple[str, ...] = ()) -> dict:
    label = label or fp8
    run_dir = args.out / f"fp8-{label}"
    overrides = [f"precision.fp8={fp8}", f"precision.dtype={args.dtype}", f"launch.device={args.device}",
                 f"train.max_steps={args.steps}", "train.log_interval_steps=1",
                 f"train.eval_interval_steps={args.steps}", f"train.eval_steps={args.eval_steps}",
                 f"data.datasets=[{{path: '{data_dir}'}}]", f"logging.run_dir={run_dir}", "logging.tensorboard=false",
                 "checkpoint.save_interval_steps=0", "checkpoint.save_at_end=false", "checkpoint.resume=none",
                 *args.overrides, *extra]
    started_s = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "launch", "train", "--config", str(args.config), *overrides],
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    val = [r["val_loss"] for r in records if r["kind"] == "eval"]
    steps = sorted(train)
    second_half = steps[len(steps) // 2:]  # past compile and allocator warm-up
    return {"fp8": label, "loss": [train[s]["loss"] for s in steps], "val_loss": val[-1] if val else None,
            "tokens_per_s": sum(train[s]["tokens_per_s"] for s in second_half) / len(second_half),
            "wall_s": round(time.perf_counter() - started_s, 1)}


def smooth(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def compare(base: dict, other: dict) -> dict:
    diffs = [b - a for a, b in zip(base["loss"], other["loss"])]
    tail = diffs[-max(1, len(diffs) // 4):]
    curves = zip(smooth(base["loss"], SMOOTH_STEPS), smooth(other["loss"], SMOOTH_STEPS))
    return {"fp8": other["fp8"], "mean_diff_last_quarter": sum(tail) / len(tail),
            "mean_rel_diff_last_quarter": sum(tail) / len(tail) / (sum(base["loss"][-len(tail):]) / len(tail)),
            "max_abs_smoothed_diff": max(abs(b - a) for a, b in curves),
            "val_loss": other["val_loss"], "val_loss_diff": (other["val_loss"] - base["val_loss"])
            if other["val_loss"] is not None and base["val_loss"] is not None else None,
            "tokens_per_s": other["tokens_per_s"], "wall_s": other["wall_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=QUICKSTART)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--recipes", nargs="+", default=["tensorwise", "rowwise"],
                        choices=["tensorwise", "rowwise", "rowwise_with_gw_hp"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="the run's dtype, FP8 or not")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--eval-steps", type=int, default=16, help="validation batches at the end")
    parser.add_argument("--data", type=Path, help="a prepared dataset directory (default: the quickstart corpus)")
    parser.add_argument("--corpus-mb", type=float, default=8.0, help="size of the default corpus")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "fp8_loss")
    parser.add_argument("--no-noise", dest="noise", action="store_false",
                        help="skip the yardstick row (bf16 with the learning rate × (1 + 1e-6))")
    parser.add_argument("overrides", nargs="*", help="more dotted config overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = args.data or quickstart_data(args.out, args.config, args.corpus_mb)

    base = run("off", args, data_dir)
    print(f"bf16 (fp8=off): final val loss {base['val_loss']:.4f}, {base['tokens_per_s']:,.0f} tokens/s, "
          f"{base['wall_s']:.0f} s")
    # The yardstick: a bf16 run whose every update differs from the base's by a rounding-sized 1e-6 (the learning rate
    # × (1 + 1e-6)): how far two trajectories drift apart when nothing but rounding differs.
    lr = load_config(args.config).optim.lr
    nudge = f"optim.lr={lr * (1 + LR_NUDGE):.10e}"
    rows = [compare(base, run("off", args, data_dir, "bf16-lr×(1+1e-6)", (nudge,)))] if args.noise else []
    rows += [compare(base, run(recipe, args, data_dir)) for recipe in args.recipes]
    print(f"\n{args.steps} steps, {args.config.name}, {args.dtype} on {args.device}; loss(fp8) - loss(bf16):")
    print(f"{'run':<20}{'mean, last 1/4':>16}{'relative':>10}{'max |smoothed|':>16}{'val loss':>10}{'Δ val':>9}"
          f"{'tokens/s':>10}")
    for r in rows:
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        dval = f"{r['val_loss_diff']:+.4f}" if r["val_loss_diff"] is not None else "-"
        print(f"{r['fp8']:<20}{r['mean_diff_last_quarter']:>+16.4f}{r['mean_rel_diff_last_quarter']:>+10.2%}"
              f"{r['max_abs_smoothed_diff']:>16.4f}{val:>10}{dval:>9}{r['tokens_per_s']:>10,.0f}")
    result = {"config": str(args.config), "steps": args.steps, "dtype": args.dtype, "device": args.device,
              "base": {k: base[k] for k in ("val_loss", "tokens_per_s", "wall_s")}, "rows": rows,
              "losses": {"off": base["loss"]}}
    (args.out / "bench_fp8_loss.json").write_text(json.dumps(result, indent=1))
    print(f"\nJSON: {args.out / 'bench_fp8_loss.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
