"""Trainer overhead: optimizer-step time through our trainer (trainer.fit with its hooks, DeepSpeed engine, data
loader) against a plain PyTorch loop of the same model (same weights, same data, same AdamW + LR schedule + clipping),
in the same process. Blocks of steps alternate between the two so that load on a shared machine hits both alike; the
first round is warm-up and is also used to check that both produce the same losses.

    python bench/bench_trainer_overhead.py                 # CPU: configs/tiny.yaml, fp32, 1 process (target <= 1.15x)
    python bench/bench_trainer_overhead.py --gpu           # 1 GPU: configs/1b.yaml, bf16, seq 2048; tokens/s and MFU
    python bench/bench_trainer_overhead.py --gpu train.micro_batch_size_per_gpu=4   # any dotted override

Plain reference on GPU: the same Llama (SDPA attention) with fp32 weights under torch.autocast(bf16) and fused
torch AdamW. Prints a table and writes JSON to bench/out/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu" if "--gpu" not in sys.argv else "cuda")

import torch  # noqa: E402

from trainer.bootstrap import destroy_parallel, init_parallel, single_process_defaults  # noqa: E402
from trainer.config import Config, Derived, load_config  # noqa: E402
from trainer.data import SyntheticTokens  # noqa: E402
from trainer.engine import lr_schedule, param_groups  # noqa: E402
from trainer.fit import fit  # noqa: E402
from trainer.hooks import (  # noqa: E402
    Hook,
    HookList,
    RunContext,
    StepOutput,
    TrainState,
    default_hooks,
    peak_tflops_per_gpu,  # noqa: E402
)
from trainer.model import lm_loss  # noqa: E402
from trainer.parallelize import build_model_on_meta, init_weights_deterministic  # noqa: E402
from trainer.train import build_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CPU_PRESET = ("configs/tiny.yaml", ["optim.warmup_steps=2", "train.eval_interval_steps=0"])
GPU_PRESET = ("configs/1b.yaml", ["launch.device=cuda", "train.global_batch_size=32", "optim.warmup_steps=2",
                                  "train.eval_interval_steps=0", "parallel.activation_checkpointing=none",
                                  "data.synthetic=true", "data.datasets=[]"])


class RecordLosses(Hook):
    """Per-step losses of the trainer, for the equality check in the warm-up round."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_step_end(self, run: RunContext, state: TrainState, out: StepOutput) -> None:
        self.losses.append(out.loss.detach())  # no .item(): a host sync per step would slow the GPU loop


def plain_loop(cfg: Config, derived: Derived, device: torch.device) -> Callable[[], float]:
    """The reference: the same model and data in a textbook loop. Returns a function that runs one step."""
    model = build_model_on_meta(cfg.model, derived.padded_vocab_size).to_empty(device=device)
    if cfg.model.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    init_weights_deterministic(model, cfg.model, cfg.train.seed)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model.named_parameters(), o), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  fused=device.type == "cuda")
    scheduler = lr_schedule(optimizer, o, cfg.train.max_steps)
    batches = iter(SyntheticTokens(vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len,
                                   micro_batch_size=derived.micro_batch_size_per_gpu, seed=cfg.train.seed))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision.dtype == "bf16")

    def step() -> torch.Tensor:
        total = torch.zeros((), device=device)
        for _ in range(derived.grad_accum_steps):
            tokens, labels = next(batches)
            with autocast:
                logits = model(tokens.to(device, non_blocking=True))
            loss = lm_loss(logits, labels.to(device, non_blocking=True), cfg.model.vocab_size)
            loss = loss / derived.grad_accum_steps
            loss.backward()
            total += loss.detach()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return step


def time_block(run_steps: Callable[[], Any], steps: int, device: torch.device) -> tuple[float, Any]:
    """(seconds per optimizer step over a block of `steps`, whatever run_steps returned)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start_s = time.perf_counter()
    result = run_steps()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start_s) / steps, result


def measure(cfg: Config, derived: Derived, run: RunContext, rounds: int, steps: int) -> dict[str, Any]:
    device = run.ctx.device
    recorder = RecordLosses()
    hooks = HookList([*default_hooks(run), recorder])
    plain_step = plain_loop(cfg, derived, device)

    def plain_steps() -> list[torch.Tensor]:
        return [plain_step() for _ in range(steps)]  # loss tensors: no host sync inside the timed block

    trainer_s, plain_s, plain_losses = [], [], []
    for round_index in range(rounds + 1):  # round 0: warm-up and equality check
        # fit() runs train.max_steps (= steps) from a fresh TrainState; engine, optimizer and loader state carry on.
        trainer_s.append(time_block(lambda: fit(run, hooks), steps, device)[0])
        seconds, losses = time_block(plain_steps, steps, device)
        plain_s.append(seconds)
        if round_index == 0:
            plain_losses = [float(loss) for loss in losses]
    first = [float(loss) for loss in recorder.losses[:steps]]
    max_rel = max(abs(a - b) / abs(b) for a, b in zip(first, plain_losses, strict=True))
    return {"trainer_s_per_step": statistics.median(trainer_s[1:]), "plain_s_per_step": statistics.median(plain_s[1:]),
            "trainer_s_all_rounds": trainer_s[1:], "plain_s_all_rounds": plain_s[1:],
            "warmup_round_max_rel_loss_diff": max_rel, "losses_trainer": first, "losses_plain": plain_losses}


def report(cfg: Config, derived: Derived, run: RunContext, result: dict[str, Any], args: argparse.Namespace) -> dict:
    tokens = derived.global_batch_size_tokens
    peak = peak_tflops_per_gpu(cfg, run.ctx.device)
    rows = {}
    for name in ("trainer", "plain"):
        step_s = result[f"{name}_s_per_step"]
        tflops = tokens / step_s * run.flops_per_token / 1e12
        rows[name] = {"s_per_step": step_s, "tokens_per_s": tokens / step_s, "tflops_per_gpu": tflops,
                      "mfu": None if peak is None else tflops / peak}
    overhead = result["trainer_s_per_step"] / result["plain_s_per_step"]
    print(f"\n{cfg.name}: {run.ctx.device.type}, {cfg.precision.dtype}, global batch {derived.global_batch_size} x "
          f"{cfg.train.seq_len} tokens, grad_accum {derived.grad_accum_steps}, "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'loop':<10}{'ms/step':>12}{'tokens/s':>14}{'TFLOP/s':>10}{'MFU':>8}")
    for name, row in rows.items():
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(f"{name:<10}{1000 * row['s_per_step']:>12.2f}{row['tokens_per_s']:>14,.0f}"
              f"{row['tflops_per_gpu']:>10.3g}{mfu:>8}")
    print(f"overhead trainer/plain: {overhead:.3f}x (target <= 1.15x); warm-up losses agree to "
          f"{result['warmup_round_max_rel_loss_diff']:.1e} relative")
    return {"config": args.config, "overrides": args.overrides, "device": run.ctx.device.type,
            "device_name": torch.cuda.get_device_name() if run.ctx.device.type == "cuda" else platform.processor(),
            "torch_threads": torch.get_num_threads(), "peak_tflops": peak, "overhead_ratio": overhead,
            "target_ratio": 1.15, "rows": rows, **result, "python": platform.python_version(),
            "torch": torch.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="1b config, bf16, seq 2048 on one CUDA GPU")
    parser.add_argument("--config", help="default: configs/tiny.yaml (CPU) or configs/1b.yaml (--gpu)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up round")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per block")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    preset_config, preset_overrides = GPU_PRESET if args.gpu else CPU_PRESET
    args.config = args.config or preset_config
    args.overrides = [*preset_overrides, f"train.max_steps={args.steps}", *args.overrides]
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU: none is visible (run without --gpu for the CPU benchmark)")
    torch.set_num_threads(args.threads)
    single_process_defaults()
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [*args.overrides, f"logging.run_dir={run_dir}", "logging.tensorboard=false"]
        cfg = load_config(REPO / args.config, overrides)
        derived = cfg.validate_for_world(1)
        ctx = init_parallel(1, 1, backend="nccl" if args.gpu else "gloo")
        try:
            run = build_run(cfg, derived, ctx, Path(run_dir))
            out = report(cfg, derived, run, measure(cfg, derived, run, args.rounds, args.steps), args)
        finally:
            destroy_parallel()
    out_dir = REPO / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_trainer_overhead_{'gpu' if args.gpu else 'cpu'}.json"
    path.write_text(json.dumps(out, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
                    + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
