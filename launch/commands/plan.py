"""`pretrain plan`: choose the parallel layout (TP × PP × DP × ZeRO stage × micro-batch × activation checkpointing ×
sequence parallel) for a model on a cluster, and show why. Every layout goes through the same validation as
`train --dry-run`; those that do not fit the GPU's memory (minus --headroom) are dropped; the rest are ranked by a
predicted step time (compute at a calibrated fraction of peak + exposed communication + pipeline bubble). No GPU, no
torch: it runs in seconds. The model behind the numbers and its sources: docs/planning.md."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from launch.commands import add_run_config_arguments

EXAMPLES = """\
examples:
  pretrain plan --config configs/70b.yaml --nodes 32 --gpus-per-node 8 --gpu h100-80gb
  pretrain plan --config configs/7b.yaml --nodes 1 --gpu a100-80gb --global-batch-tokens 1048576 --seq-len 4096
  pretrain plan --config hf/Meta-Llama-3-8B/config.json --nodes 4 --gpu h200 --top 10 --json
  pretrain plan --config configs/70b.yaml --nodes 32 --gpu h100-80gb --write runs/plan-70b.yaml
      then: pretrain submit --config runs/plan-70b.yaml launch.partition=gpu --dry-run

--config takes a YAML run config or a Hugging Face Llama config.json (or its directory); with config.json the other
sections are defaults and data/max_steps are placeholders to edit. Overrides (key=value) apply to the YAML first.
GPU kinds: {gpus}. Override any of their numbers: --gpu-memory-gib, --peak-tflops, --intra-node-gbps,
--inter-node-gbps; feed a measured GEMM-efficiency curve with --gemm-efficiency. Step times are predictions
(docs/planning.md says how far they were checked).
"""


def register(subparsers: Any) -> None:
    from trainer.gpu_specs import GPUS  # pure data: the parser stays instant

    parser = subparsers.add_parser(
        "plan",
        help="choose the parallel layout for a model and a cluster (no GPU needed)",
        description=__doc__,
        epilog=EXAMPLES.format(gpus=", ".join(GPUS)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_config_arguments(parser, config_example="configs/70b.yaml or an HF config.json",
                             overrides_example="precision.fp32_grad_accumulation=false")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--nodes", type=int, help="nodes (default: launch.nodes of the config)")
    cluster.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: launch.gpus_per_node)")
    cluster.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS), help="GPU kind (default h100-80gb)")
    cluster.add_argument("--gpu-memory-gib", type=float, help="override the kind's memory")
    cluster.add_argument("--peak-tflops", type=float, help="override the kind's dense bf16 peak")
    cluster.add_argument("--intra-node-gbps", type=float, help="override NVLink GB/s per GPU and direction")
    cluster.add_argument("--inter-node-gbps", type=float, help="override network GB/s per GPU and direction")
    cluster.add_argument("--link-efficiency", type=float, help="achieved / nominal link bandwidth (default 0.75)")
    cluster.add_argument("--compute-efficiency", type=float,
                         help="fraction of peak the trainer reaches without comm (default: calibrated 0.424)")
    cluster.add_argument("--gemm-efficiency", metavar="FILE",
                         help="JSON/YAML curve of GEMM speed by per-rank shape, a factor on that fraction: "
                              '{"width": {256: 0.8, 1024: 1.0}, "tokens": {...}} (default flat 1.0; '
                              "bench/bench_plan.py --part time writes one for a CPU)")
    search = parser.add_argument_group("search")
    search.add_argument("--seq-len", type=int, help="tokens per sample (default: train.seq_len)")
    search.add_argument("--global-batch-tokens", type=int,
                        help="tokens per optimizer step (default: train.global_batch_size × seq_len)")
    search.add_argument("--headroom", type=float, default=0.15,
                        help="fraction of GPU memory kept free for CUDA context, NCCL and fragmentation (0.15)")
    search.add_argument("--top", type=int, default=5, metavar="N", help="layouts to show (5)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the plan as JSON")
    out.add_argument("--write", metavar="PATH", help="save the winner as a run config that `submit` accepts")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trainer import plan as planner

    _check_flags(args)
    cfg = planner.with_batch(_load_model_config(args), args.seq_len, args.global_batch_tokens)
    cluster = _cluster(args, cfg)
    calib = _calibration(args)
    result = planner.plan(cfg, cluster, calib, headroom=args.headroom)
    if not result.candidates:
        raise _nothing_fits(result, cluster, args)
    if args.write:
        _write_config(result.candidates[0], cluster, Path(args.write))
    print(json.dumps(_as_json(result, cluster, calib, args), indent=2) if args.json
          else _report(result, cluster, calib, args))
    return 0


def _calibration(args: argparse.Namespace) -> Any:
    import dataclasses

    from trainer import plan as planner

    calib = planner.Calibration()
    if args.compute_efficiency is not None:
        calib = planner.Calibration(compute_efficiency=args.compute_efficiency, source="--compute-efficiency")
    if args.gemm_efficiency is not None:
        calib = dataclasses.replace(calib, gemm=planner.load_gemm_efficiency(Path(args.gemm_efficiency)))
    return calib


def _check_flags(args: argparse.Namespace) -> None:
    from trainer.config import ConfigError

    for flag in ("nodes", "gpus_per_node", "seq_len", "global_batch_tokens", "top"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} ({value}) must be >= 1")
    for flag in ("gpu_memory_gib", "peak_tflops", "intra_node_gbps", "inter_node_gbps"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} ({value}) must be > 0")
    for flag in ("link_efficiency", "compute_efficiency"):
        value = getattr(args, flag)
        if value is not None and not 0 < value <= 1:
            raise ConfigError(f"--{flag.replace('_', '-')} ({value}) must be in (0, 1], e.g. 0.75")
    if not 0 <= args.headroom < 1:
        raise ConfigError(f"--headroom ({args.headroom}) must be in [0, 1): e.g. 0.15 keeps 15 % of memory free")


def _load_model_config(args: argparse.Namespace) -> Any:
    from trainer.config import ConfigError, load_config
    from trainer.plan import config_from_hf_json, is_hf_config

    path = Path(args.config)
    if not is_hf_config(path):
        return load_config(path, args.overrides)
    if args.overrides:
        raise ConfigError("key=value overrides apply to a YAML run config; with an HF config.json pass --seq-len and "
                          "--global-batch-tokens, or --write a YAML first and plan again from it")
    return config_from_hf_json(path, args.seq_len, args.global_batch_tokens)


def _cluster(args: argparse.Namespace, cfg: Any) -> Any:
    import dataclasses

    from trainer.plan import GPUS, Cluster

    overrides = {field: getattr(args, field) for field in
                 ("peak_tflops", "intra_node_gbps", "inter_node_gbps") if getattr(args, field) is not None}
    if args.gpu_memory_gib is not None:
        overrides["memory_gib"] = args.gpu_memory_gib
    gpu = dataclasses.replace(GPUS[args.gpu], **overrides)
    extra = {"link_efficiency": args.link_efficiency} if args.link_efficiency is not None else {}
    return Cluster(args.nodes or cfg.launch.nodes, args.gpus_per_node or cfg.launch.gpus_per_node, gpu, **extra)


def _nothing_fits(result: Any, cluster: Any, args: argparse.Namespace) -> Exception:
    from trainer.config import ConfigError

    head = (f"no layout fits: {result.enumerated} enumerated on {cluster.world_size} × {cluster.gpu.name}, "
            f"{result.invalid} refused by config validation, {result.too_big} over the {result.usable_memory_gib:.1f} "
            f"GiB budget ({cluster.gpu.memory_gib:g} GiB - {args.headroom:.0%} headroom)")
    if result.smallest_misfit is None:
        return ConfigError(f"{head}; e.g. {result.example_refusal}: change --nodes / --gpus-per-node so that the "
                           f"model's heads and layers divide into the GPUs, or --global-batch-tokens")
    misfit = result.smallest_misfit
    return ConfigError(f"{head}; the smallest needs {misfit.memory.total_bytes / 2**30:.1f} GiB "
                       f"({misfit.layout.short()}): add nodes (--nodes), a GPU with more memory (--gpu), a shorter "
                       f"--seq-len, or lower --headroom")


def _write_config(best: Any, cluster: Any, path: Path) -> None:
    from trainer.config import dump_resolved

    t = best.time
    header = [
        f"# Written by `pretrain plan` for {cluster.nodes} nodes × {cluster.gpus_per_node} {cluster.gpu.name}: "
        f"{best.layout.short()}",
        f"# Predicted: {t.total_s:.3f} s/step (compute {t.compute_s:.3f} + exposed comm {t.exposed_comm_s:.3f} + "
        f"bubble {t.bubble_s:.3f}), {best.tokens_per_s:,.0f} tokens/s, MFU {best.mfu:.1%}; "
        f"memory {best.memory.total_bytes / 2**30:.1f} GiB/GPU (estimate).",
    ]
    from trainer.config import ConfigError

    if path.is_dir():
        raise ConfigError(f"--write {path} is a directory: pass a file path, e.g. {path / 'plan.yaml'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("\n".join(header) + "\n" + dump_resolved(best.cfg, best.derived), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a crash never leaves half a config for `submit` to read
    except OSError as err:
        raise ConfigError(f"--write {path}: cannot write it ({err.strerror}): pass a path in a writable "
                          f"directory") from None


def _as_json(result: Any, cluster: Any, calib: Any, args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from trainer.plan import why_line

    return {
        "cluster": {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node,
                    "gpu": dataclasses.asdict(cluster.gpu), "link_efficiency": cluster.link_efficiency},
        "calibration": dataclasses.asdict(calib),
        "headroom": args.headroom,
        "usable_memory_gib": result.usable_memory_gib,
        "enumerated": result.enumerated, "invalid": result.invalid, "too_big": result.too_big,
        "fits": len(result.candidates), "fewer_checkpointed": result.fewer_checkpointed,
        "why": why_line(result),
        "config_layout": None if result.given is None else {**result.given.as_dict(), "rank": result.given_rank()},
        "config_layout_problem": result.given_problem,
        "written": args.write,
        "candidates": [c.as_dict() for c in result.candidates[: args.top]],
    }


def _report(result: Any, cluster: Any, calib: Any, args: argparse.Namespace) -> str:
    from trainer.plan import why_line

    best = result.candidates[0]
    cfg = best.cfg
    lines = [
        f"model      {cfg.name}: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"seq {cfg.train.seq_len}, {best.derived.global_batch_size_tokens:,} tokens/step ({_precision(cfg)})",
        f"cluster    {cluster.nodes} × {cluster.gpus_per_node} {cluster.gpu.name} ({cluster.gpu.memory_gib:g} GiB, "
        f"{cluster.gpu.peak_tflops:g} TFLOP/s bf16, {cluster.gpu.intra_node_gbps:g}/{cluster.gpu.inter_node_gbps:g} "
        f"GB/s intra/inter × {cluster.link_efficiency:g}); compute at {calib.compute_efficiency:.1%} of peak, "
        f"GEMM curve: {calib.gemm.source}",
        f"searched   {result.enumerated} layouts: {result.invalid} refused by config validation, {result.too_big} over "
        f"{result.usable_memory_gib:.1f} GiB ({args.headroom:.0%} headroom), {len(result.candidates)} fit"
        + (f" ({result.fewer_checkpointed} of them: a layout that needs checkpointing, with only as many layers per "
           f"stage checkpointed as fit)" if result.fewer_checkpointed else ""),
        "",
        *_table(result.candidates[: args.top]),
        "",
        f"why        {why_line(result)}",
        f"config's   {_given_line(result)}",
    ]
    if args.write:
        lines.append(f"wrote      {args.write} (pretrain submit --config {args.write} --dry-run)")
    return "\n".join(lines)


def _precision(cfg: Any) -> str:
    if cfg.precision.fp8 == "off":
        return cfg.precision.dtype
    # FP8's matmul speed-up has no GPU measurement to calibrate on, so the step time counts the FP8 linears at the
    # bf16 rate: an upper bound. (Which layouts FP8 runs in is config validation's: rowwise at tp 1 only.)
    return f"{cfg.precision.dtype} + fp8 {cfg.precision.fp8}, priced as {cfg.precision.dtype}: FP8 speed unmeasured"


def _given_line(result: Any) -> str:
    """Where the input config's own layout stands: what `submit` would run without the plan."""
    given, rank, best = result.given, result.given_rank(), result.candidates[0]
    if given is None:
        return f"layout cannot run on this cluster: {result.given_problem}"
    text = f"{given.layout.short()}: "
    if rank is None:
        return text + f"does not fit ({result.given_problem})"
    slower = given.time.total_s / best.time.total_s - 1
    return text + (f"#{rank} of {len(result.candidates)}, {_seconds(given.time.total_s)} s/step ({slower:+.1%} vs #1), "
                   f"{given.memory.total_bytes / 2**30:.1f} GiB, MFU {given.mfu:.1%}")


def _seconds(value_s: float) -> str:
    return f"{value_s:.3f}" if value_s == 0 or value_s >= 0.01 else f"{value_s:.2e}"  # tiny models: keep digits


def _table(candidates: list[Any]) -> list[str]:
    head = ("#", "tp", "pp", "dp", "sp", "zero", "micro", "accum", "AC", "weights", "grads", "optim", "activ", "buf",
            "mem GiB", "compute s", "comm s", "bubble s", "step s", "tokens/s", "MFU")
    rows = [head]
    for i, c in enumerate(candidates, 1):
        m, t, lay = c.memory, c.time, c.layout
        gib = [f"{b / 2**30:.1f}" for b in (m.weights_bytes, m.grads_bytes, m.optimizer_bytes, m.activations_bytes,
                                            m.buffers_bytes, m.total_bytes)]
        rows.append((str(i), str(lay.tp), lay.pp_text(), str(lay.dp), "y" if lay.sequence_parallel else "-",
                     str(lay.zero_stage), str(lay.micro_batch_size_per_gpu), str(c.derived.grad_accum_steps),
                     lay.ac_label, *gib, *(_seconds(x) for x in (t.compute_s, t.exposed_comm_s,
                                                                               t.bubble_s, t.total_s)),
                     f"{c.tokens_per_s:,.0f}", f"{c.mfu:.1%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
