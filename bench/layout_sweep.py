"""Every parallel layout against one process, for every objective: a differential sweep through `pretrain launch
local`, the command users run, on CPU/gloo.

    python bench/layout_sweep.py                          # every objective × every layout (~20 min on 2 cores)
    python bench/layout_sweep.py --objective tied docs    # some objectives
    python bench/layout_sweep.py --list                   # what it would run, and what the config refuses

Each objective (the model and loss: tied embeddings, a padded vocabulary, z-loss with eos masking, packed documents,
a batch-size rampup, ...) is first trained in one process; then in every layout (TP, SP, PP, ZeRO 1-3, the
checkpointing modes, the fused loss, and their products on 2 and 4 processes). The per-step train losses and the
validation losses must equal the one-process ones within --rel-tol. configs/tiny.yaml, fp32, 8 steps, clipping active.

The test suite proves the layouts that matter one by one (tests/trainer/test_parallel_training.py and friends); this
sweep covers their products with each objective, which is too many for CI. Its forerunner caught tied embeddings
counted twice in the grad norm under a pipeline before that landed. Run it after touching trainer/parallelize.py, the
loss, the engine or the checkpointer. A layout the config refuses (e.g. pp 2 of 3 layers without a stage list) is
listed with the refusal's first line, not run.

Writes bench/out/layout_sweep.json. Exit status 1 if any layout differs or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import ConfigError, load_config  # noqa: E402  (light: pydantic + yaml)

TINY = REPO / "configs" / "tiny.yaml"
# 8 steps with clipping active and a warmup, eval at steps 4 and 8; no checkpoints (the resume tests cover them).
COMMON = ["train.max_steps=8", "train.log_interval_steps=1", "train.eval_interval_steps=4", "optim.warmup_steps=2",
          "optim.grad_clip=0.5", "checkpoint.save_interval_steps=0", "checkpoint.save_at_end=false",
          "logging.tensorboard=false"]
# ZeRO-3 keeps tensors under this many elements whole; 0 partitions tiny's small lm_head and norms too.
PARTITION_ALL = "zero.stage3_param_persistence_threshold_elements=0"
OBJECTIVES: dict[str, list[str]] = {
    "base": [],
    "tied": ["model.tie_embeddings=true"],
    "padded_vocab": ["model.vocab_size=250"],  # 6 padding rows at tp 1, 262 at tp 2
    "zloss_eos": ["train.z_loss_weight=0.001", "train.mask_eos_loss=true"],
    "documents": ["model.attention_mask=document", "model.reset_position_ids=true"],
    "rampup": ["train.batch_size_rampup={start: 8, increment: 8, samples: 24}"],
    "three_layers": ["model.num_layers=3", "model.head_dim=24", "model.tie_embeddings=true"],
}
# (processes, overrides). Uneven stages come from the config's refusal: three_layers names its own split below.
LAYOUTS: list[tuple[int, list[str]]] = [
    (2, ["parallel.tp=2"]),
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.activation_checkpointing=selective"]),
    (2, ["parallel.tp=2", "parallel.activation_checkpointing=full", "parallel.activation_checkpointing_layers=1"]),
    (2, ["parallel.tp=2", "parallel.lm_loss=fused_linear"]),
    (2, ["parallel.pp=2"]),
    (2, ["parallel.pp=2", "parallel.activation_checkpointing=core_attention", "parallel.lm_loss=fused_linear"]),
    (2, []),
    (2, ["zero.stage=1"]),
    (2, ["zero.stage=2"]),
    (2, ["zero.stage=3", PARTITION_ALL]),
    (2, ["zero.stage=3", PARTITION_ALL, "parallel.lm_loss=fused_linear"]),
    (4, ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"]),
    (4, ["parallel.pp=2", "zero.stage=1"]),
    (4, ["parallel.tp=2", "zero.stage=3", PARTITION_ALL, "parallel.sequence_parallel=true"]),
]
STAGE_LISTS = {"three_layers": "parallel.pipeline_stage_layers=[2,1]"}


def layout_overrides(objective: str, layout: list[str]) -> list[str]:
    if objective in STAGE_LISTS and any(o.startswith("parallel.pp=") for o in layout):
        return [*layout, STAGE_LISTS[objective]]
    return layout


def refusal(nproc: int, overrides: list[str]) -> str | None:
    """The config's own first problem for this world, or None where `launch local` would start it."""
    try:
        load_config(TINY, overrides).validate_for_world(nproc, "cpu")
    except ConfigError as err:
        lines = [line.strip(" -") for line in str(err).splitlines()[1:] if line.strip()]
        return lines[0] if lines else str(err)
    return None


def run(nproc: int, overrides: list[str], run_dir: Path) -> tuple[dict[str, float] | None, str]:
    """Per-step losses ({"train/3": ..., "eval/4": ...}) of one `pretrain launch local`, or None and its output."""
    command = [sys.executable, "-m", "launch", "launch", "local", "--nproc", str(nproc), "--config", str(TINY),
               *COMMON, f"logging.run_dir={run_dir}", *overrides]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        return None, (done.stdout + done.stderr)[-2000:]
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] in ("train", "eval"):
            losses[f"{record['kind']}/{record['step']}"] = record["loss" if record["kind"] == "train" else "val_loss"]
    return losses, ""


def max_rel_diff(got: dict[str, float], want: dict[str, float]) -> float:
    if set(got) != set(want):
        return float("inf")
    return max(abs(got[k] - want[k]) / abs(want[k]) for k in want)


def sweep(objectives: list[str], rel_tol: float, work: Path) -> list[dict[str, Any]]:
    rows = []
    for objective in objectives:
        base = OBJECTIVES[objective]
        reference, output = run(1, base, work / objective / "one")
        if reference is None:
            rows.append({"objective": objective, "layout": "1 process", "status": "failed", "detail": output})
            print(f"{objective:14} reference failed:\n{output}", flush=True)
            continue
        for nproc, layout in LAYOUTS:
            own = layout_overrides(objective, layout)
            overrides, name = [*base, *own], " ".join(own) or "dp2"
            row: dict[str, Any] = {"objective": objective, "layout": name, "nproc": nproc}
            refused = refusal(nproc, overrides)
            if refused:
                row.update(status="refused", detail=refused)
            else:
                start_s = time.perf_counter()
                losses, output = run(nproc, overrides, work / objective / str(len(rows)))
                row["seconds"] = round(time.perf_counter() - start_s, 1)
                if losses is None:
                    row.update(status="failed", detail=output)
                else:
                    row["max_rel_diff"] = max_rel_diff(losses, reference)
                    row["status"] = "ok" if row["max_rel_diff"] <= rel_tol else "differs"
            rows.append(row)
            shown = f"{row['max_rel_diff']:.1e}" if "max_rel_diff" in row else row.get("detail", "")[:100]
            print(f"{objective:14} {row['status']:8} np={nproc} {name:70} {shown}", flush=True)
            if row["status"] == "failed":
                print(row["detail"], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", nargs="+", choices=sorted(OBJECTIVES), default=list(OBJECTIVES))
    parser.add_argument("--rel-tol", type=float, default=1e-5,
                        help="largest relative loss difference to one process (the suite's; default 1e-5)")
    parser.add_argument("--list", action="store_true", help="print the runs and the config's refusals; run nothing")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "layout_sweep.json")
    args = parser.parse_args()
    if args.list:
        for objective in args.objective:
            for nproc, layout in LAYOUTS:
                overrides = [*OBJECTIVES[objective], *layout_overrides(objective, layout)]
                refused = refusal(nproc, overrides)
                print(f"{objective:14} np={nproc} {' '.join(overrides) or '(dp2)'}"
                      + (f"  -- refused: {refused}" if refused else ""))
        return 0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory(prefix="layout_sweep_") as work:
        rows = sweep(args.objective, args.rel_tol, Path(work))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rel_tol": args.rel_tol, "rows": rows}, indent=1) + "\n")
    bad = [row for row in rows if row["status"] in ("differs", "failed")]
    counts = {status: sum(row["status"] == status for row in rows) for status in ("ok", "refused", "differs", "failed")}
    print(f"layout sweep: {counts}; wrote {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
