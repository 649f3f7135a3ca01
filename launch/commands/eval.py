"""`pretrain eval`: the validation loss of a training checkpoint, without training: on its own run's validation data
or on other data, with more batches, in any layout. The same evaluation as the eval lines a run logs (per dataset too)
and the same checkpoint loader as a resume (any TP/PP/DP/ZeRO layout reads any other's checkpoint). Writes nothing
into the run directory: a live run's checkpoints can be evaluated while it trains."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

EXAMPLES = """\
examples:
  pretrain eval --checkpoint runs/tiny/checkpoints                      # newest intact checkpoint, its run's config
  pretrain eval --checkpoint runs/tiny/checkpoints/step_40 train.eval_steps=50
  pretrain eval --checkpoint runs/tiny/checkpoints "data.datasets=[{path: data/held-out}]" data.eval_split=test
  pretrain eval --checkpoint runs/wsd-a/checkpoints --checkpoint runs/wsd-b/checkpoints   # two WSD cooldowns
  pretrain eval --checkpoint runs/tiny/checkpoints --every --json curve.json  # every checkpoint, oldest first
  pretrain eval --nproc 8 --checkpoint runs/7b/checkpoints parallel.tp=2      # 8 processes here (torchrun), any layout
  pretrain eval --weights runs/imported/model.safetensors --config RUN.yaml  # a base model before continued pretraining
  pretrain eval --weights path/to/hf-llama --config RUN.yaml                 # an HF directory, as init_from reads it
  pretrain eval --checkpoint runs/7b/checkpoints --every --task tasks/hellaswag.jsonl --task tasks/arc_easy.jsonl

The config is the first checkpoint's own (config.yaml, saved with it) unless --config is given; dotted overrides
apply on top. The model is built once and each checkpoint loaded into it in turn (they must share the model's
shape). It evaluates train.eval_steps global batches of the data.eval_split split of every data.datasets entry that
has it (of the synthetic stream for a synthetic run). Prints a row per checkpoint: step, loss, perplexity and, with
several datasets, each one's loss; --json writes a list of the same. Exit codes: 0; 2 a config or checkpoint problem;
74 a data shard missing or corrupt.

--task FILE (repeatable) also scores a multiple-choice task: JSON Lines of {"context": ..., "choices": [...],
"label": N}, each choice scored by the summed log-probability of its tokens after the context (lm-evaluation-harness's
acc and acc_norm, per character; equal to lm-eval's on the HF export), tokenized with the first dataset's tokenizer
or --tokenizer (trainer/downstream.py).
It replaces the config's train.eval_tasks, which a run scores at each of its evals and which `pretrain eval` scores
too when no --task is given.

--weights evaluates weights that have no training state, whatever checkpoint.init_from reads: an HF Llama directory,
a full state dict (*.safetensors, e.g. from `convert from-hf`) or one of our checkpoints; --config names the run
config whose model (it must fit the weights) and data to use. Its rows show step 0.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval", help="validation loss of a checkpoint, without training (any data, any layout)",
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", action="append", metavar="DIR",
                        help="a checkpoint (step_N) or a directory of them (the newest intact one); repeat it to "
                             "evaluate several")
    source.add_argument("--weights", action="append", metavar="PATH",
                        help="weights without a training state (an HF directory, a *.safetensors full state dict, "
                             "a checkpoint), as checkpoint.init_from reads them; needs --config; repeatable")
    parser.add_argument("--every", action="store_true",
                        help="every intact checkpoint of each directory, oldest first, not only the newest")
    parser.add_argument("--config", metavar="YAML", help="run config (default: the checkpoint's config.yaml)")
    parser.add_argument("--task", action="append", default=[], metavar="FILE",
                        help="a multiple-choice task (JSON Lines of context / choices / label) to score, or a "
                             "directory of them (`convert lm-eval-task` output); repeatable")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="with --task: the tokenizer (default: train.eval_tasks_tokenizer, else the first "
                             "data.datasets entry's)")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="processes on this machine, as `launch local` starts them (default: %(default)s; under "
                             "a launcher that sets RANK, WORLD_SIZE, ... this is not needed)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.eval_steps=50 data.eval_split=test")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trainer.config import ConfigError, load_config

    if args.weights and (args.config is None or args.every):
        raise ConfigError("--weights needs --config (the run config whose model and data to use) and takes no "
                          "--every: pass --config RUN.yaml, e.g. with the model.yaml `convert from-hf` wrote pasted in")
    paths = [Path(path) for path in args.checkpoint or args.weights]
    cfg = load_config(args.config or _checkpoint_config(paths[0]), [*args.overrides, *_task_overrides(args)])
    if args.nproc > 1 and "RANK" not in os.environ:
        return _launch_local(args, cfg)
    from trainer.eval_checkpoint import evaluate_checkpoints, evaluate_weights  # heavy (torch, deepspeed, megatron)

    evaluations = (evaluate_weights(cfg, paths) if args.weights
                   else evaluate_checkpoints(cfg, paths, every=args.every))
    if int(os.environ.get("RANK", "0")) == 0:
        summaries = [_summary(evaluated) for evaluated in evaluations]
        print(_format(summaries))
        if args.json:
            Path(args.json).write_text(json.dumps(summaries, indent=2) + "\n")
    return 0


def _launch_local(args: argparse.Namespace, cfg: Any) -> int:
    """This command again in `--nproc` processes under torchrun, with `launch local`'s environment and exit codes."""
    import sys

    from launch.commands.launch_local import process_environment, run_forwarding_stop_signals

    cfg.validate_for_world(args.nproc)  # one clear error now instead of the same one from N processes
    flag = "--weights" if args.weights else "--checkpoint"
    again = [arg for path in args.checkpoint or args.weights for arg in (flag, path)]
    again += ["--every"] * args.every + ["--config", args.config] * bool(args.config)
    again += ["--json", args.json] * bool(args.json)
    again += [arg for path in args.task for arg in ("--task", path)] + ["--tokenizer", args.tokenizer] * bool(
        args.tokenizer)
    command = [sys.executable, "-m", "launch.torchrun_agent", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "launch", "eval", *again, *args.overrides]
    return run_forwarding_stop_signals(command, {**os.environ, **process_environment(cfg.launch.device, args.nproc)})


def _task_overrides(args: argparse.Namespace) -> list[str]:
    """--task / --tokenizer as the config keys they set (train.eval_tasks replaces the config's own list)."""
    overrides = [f"train.eval_tasks={json.dumps(args.task)}"] if args.task else []
    return overrides + ([f"train.eval_tasks_tokenizer={json.dumps(args.tokenizer)}"] if args.tokenizer else [])


def _checkpoint_config(path: Path) -> Path:
    """The config saved with the newest checkpoint under `path` (every checkpoint of a run holds one)."""
    from trainer.checkpoint.layout import CheckpointError
    from trainer.checkpoint.load import candidates

    for ckpt in candidates(path):
        if (ckpt / "config.yaml").is_file():
            return ckpt / "config.yaml"
    raise CheckpointError(f"no checkpoint with a config.yaml at {path}: pass a step_N directory or a directory of "
                          f"them (e.g. runs/<name>/checkpoints), or the run's config with --config")


def _summary(evaluated: Any) -> dict[str, Any]:
    from trainer.hooks import perplexity

    result = evaluated.result
    return {"checkpoint": str(evaluated.checkpoint), "step": evaluated.step, "val_loss": result.loss,
            "val_ppl": perplexity(result.loss),
            "num_microbatches_per_rank": result.num_microbatches, "per_dataset": result.per_dataset,
            "tasks": {task.name: {"acc": task.acc, "acc_norm": task.acc_norm, "num_examples": task.num_examples,
                                  "logliks": task.logliks} for task in result.tasks}}


def _format(summaries: list[dict[str, Any]]) -> str:
    """A row per checkpoint; a column per validation dataset when there are several (named by their last path part
    when those are unique)."""
    from trainer.report import dataset_labels, is_group_member

    names = list(summaries[0]["per_dataset"])
    tasks = [task for task in summaries[0]["tasks"] if not is_group_member(task)]  # a group: its accuracy only
    task_columns = [f"{task} {metric}" for task in tasks for metric in ("acc", "acc_norm")]
    header = ["step", "val_loss", "perplexity", *dataset_labels(names), *task_columns, "checkpoint"]
    rows = [[str(s["step"]), f"{s['val_loss']:.4f}", f"{s['val_ppl']:.2f}",
             *(f"{s['per_dataset'][name]:.4f}" for name in names),
             *(f"{s['tasks'][task][metric]:.4f}" for task in tasks for metric in ("acc", "acc_norm")),
             s["checkpoint"]] for s in summaries]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    micro = summaries[0]["num_microbatches_per_rank"]
    return "\n".join([*lines, f"({micro} validation micro-batches per DP rank per checkpoint)"])
