"""`pretrain convert to-hf` and `pretrain convert from-hf`: our weights ⇄ a Hugging Face Llama directory
(docs/hf_conversion.md). Both work on full, unsharded state dicts; torch, safetensors and transformers are imported
inside the handlers so `pretrain --help` stays instant."""

from __future__ import annotations

import argparse
import re
from typing import Any

TO_HF_EXAMPLE = """\
examples (after `pretrain quickstart`, which writes runs/quickstart/):
  pretrain convert to-hf --checkpoint runs/quickstart/checkpoints --tokenizer runs/quickstart/tokenizer \\
      --output runs/quickstart/hf-bf16 --dtype bf16

  writes runs/quickstart/hf-bf16/{config.json, model.safetensors, generation_config.json, tokenizer.json,
  tokenizer_config.json, tokenizer.model}; then, offline:
      AutoModelForCausalLM.from_pretrained("runs/quickstart/hf-bf16"); AutoTokenizer.from_pretrained(...same...)
      pretrain generate --hf runs/quickstart/hf-bf16 --prompt "def main():" --greedy

  pretrain convert to-hf --state-dict runs/imported/model.safetensors --config runs/imported/model.yaml \\
      --tokenizer runs/imported/tokenizer --output runs/imported/hf
      (runs/imported/ is what `pretrain convert from-hf --hf runs/quickstart/hf --output runs/imported` writes)

--checkpoint is one of our checkpoints (runs/<name>/checkpoints/step_N) or a directory of them (its newest intact
one), saved with any TP/PP/DP/ZeRO layout; its config.yaml supplies the model config (--config not needed).
--state-dict is our full (unsharded) state dict as *.safetensors (e.g. written by `convert from-hf`); then --config
is the run config the weights were trained with, or the model.yaml that `convert from-hf` writes. Dotted overrides
apply to either.
Vocabulary padding rows are dropped, a tied lm_head is not written (tie_word_embeddings), weights above
--max-shard-size are split into shards with model.safetensors.index.json.
"""

FROM_HF_EXAMPLE = """\
example (after `pretrain quickstart`, which writes runs/quickstart/hf):
  pretrain convert from-hf --hf runs/quickstart/hf --output runs/imported --tp 2

  writes runs/imported/model.safetensors (our parameter names, vocabulary padded to a multiple of
  tp × 128 rows), runs/imported/model.yaml (the `model:` section for a run config) and
  runs/imported/tokenizer/ (the HF directory's sentencepiece tokenizer.model, else its tokenizer.json: what
  `pretrain prepare --tokenizer` takes to tokenize your data for this model). Converting that back with
  `pretrain convert to-hf --state-dict runs/imported/model.safetensors --config runs/imported/model.yaml
  ... --dtype <the source dtype>` reproduces every tensor bit for bit.

continue pretraining from it (weights only, any tp/pp/dp/zero layout; the vocabulary padding is adjusted):
  paste runs/imported/model.yaml's model: section into your run config, then
  pretrain launch local --nproc 2 --config RUN.yaml checkpoint.init_from=runs/imported/model.safetensors
  (a checkpoint to resume from always wins over init_from; an HF directory also works as init_from)

Only the Llama architecture is accepted (Llama 3.1-3.3's rope scaling included); config.json fields our model does
not implement (attention_bias, mlp_bias, YaRN or dynamic rope scaling, another hidden_act, attention_dropout) are
refused by name. The stored dtype is kept unless --dtype is given.
"""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks (the worked example)."""


def size_bytes(text: str) -> int:
    """'5GB' → 5_000_000_000, '512MiB' → 536_870_912, '1000' → 1000 (bytes); argparse reports a ValueError."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 5GB, 500MB, 2GiB or a byte count")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 byte")
    return int(value)


def register(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "convert", help="convert weights to / from a Hugging Face directory; lm-eval tasks to task files",
        formatter_class=_HelpFormatter, epilog=TO_HF_EXAMPLE,
        description="Checkpoint conversion to and from Hugging Face format, checkpoint averaging, and "
                    "lm-evaluation-harness tasks as task files for `pretrain eval --task` / train.eval_tasks.",
    )
    commands = group.add_subparsers(dest="convert_command", metavar="<subcommand>", required=True)
    _register_to_hf(commands)
    _register_from_hf(commands)
    _register_average(commands)
    _register_lm_eval_task(commands)


def _register_to_hf(commands: Any) -> None:
    parser = commands.add_parser(
        "to-hf", help="our full state dict + run config → an HF Llama directory", formatter_class=_HelpFormatter,
        description="Export our weights as a directory that transformers' AutoModelForCausalLM and AutoTokenizer "
                    "load offline.", epilog=TO_HF_EXAMPLE,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--state-dict", metavar="FILE", help="our full state dict, *.safetensors")
    source.add_argument("--checkpoint", metavar="DIR",
                        help="a checkpoint (step_N) or a directory of them (newest intact), any parallel layout")
    parser.add_argument("--config", metavar="YAML",
                        help="run config of --state-dict weights, or a model.yaml from `convert from-hf` "
                             "(default with --checkpoint: the checkpoint's config.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. model.max_seq_len=4096 (all together, after the flags)")
    parser.add_argument("--output", required=True, metavar="DIR", help="HF directory to write")
    tokenizer = parser.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument("--tokenizer", metavar="DIR_OR_MODEL",
                           help="the tokenizer the data was prepared with, e.g. <dataset>/tokenizer: ours "
                                "(tokenizer.model) or an HF tokenizer.json directory (written back unchanged)")
    tokenizer.add_argument("--no-tokenizer", action="store_true",
                           help="write weights and configs only (AutoTokenizer will not load the directory)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="dtype of the written weights (default: %(default)s, lossless)")
    parser.add_argument("--max-shard-size", type=size_bytes, default="5GB", metavar="SIZE",
                        help="split the weights into shards of at most SIZE, e.g. 5GB, 500MB (default: 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    parser.set_defaults(func=run_to_hf)


def _register_from_hf(commands: Any) -> None:
    parser = commands.add_parser(
        "from-hf", help="an HF Llama directory → our full state dict + model config", formatter_class=_HelpFormatter,
        description="Import an HF Llama-architecture directory as our full state dict and `model:` config.",
        epilog=FROM_HF_EXAMPLE,
    )
    parser.add_argument("--hf", required=True, metavar="DIR", help="HF model directory (config.json + safetensors)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="directory for model.safetensors, model.yaml and tokenizer/")
    parser.add_argument("--tp", type=int, default=1, metavar="N",
                        help="tensor-parallel degree to train with: decides the vocab padding (default: 1)")
    parser.add_argument("--dtype", choices=("keep", "fp32", "bf16", "fp16"), default="keep",
                        help="dtype of the written weights (default: keep the stored dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier import in --output")
    parser.set_defaults(func=run_from_hf)


AVERAGE_EXAMPLE = """\
examples:
  pretrain convert average --checkpoint runs/7b/checkpoints --last 5 --output runs/7b/avg-last5
  pretrain convert average --checkpoint runs/a/checkpoints/step_900 --checkpoint runs/a/checkpoints/step_1000 \\
      --output runs/a/avg

  writes <output>/model.safetensors (the mean of the checkpoints' weights, fp32) and <output>/model.yaml (their
  model: section); then, as for `convert from-hf` output:
      pretrain eval --weights runs/7b/avg-last5/model.safetensors --config runs/7b/config.yaml
      pretrain convert to-hf --state-dict runs/7b/avg-last5/model.safetensors --config runs/7b/avg-last5/model.yaml \\
          --tokenizer <dataset>/tokenizer --output runs/7b/hf-avg
      checkpoint.init_from=runs/7b/avg-last5/model.safetensors (a fresh run from the average)

Llama 3's final pre-trained model is the average of its annealing checkpoints; averaging the last checkpoints of a
warmup-stable-decay run's stable phase approximates a cooldown (LAWA). Checkpoints of any layouts, one model shape
(another is refused, naming the field); weights only (no optimizer state).
"""


def _register_average(commands: Any) -> None:
    parser = commands.add_parser(
        "average", help="the mean of several checkpoints' weights → one full state dict", formatter_class=_HelpFormatter,
        description="Average the weights of several checkpoints (any layouts, one model shape).",
        epilog=AVERAGE_EXAMPLE,
    )
    parser.add_argument("--checkpoint", required=True, action="append", metavar="DIR",
                        help="a checkpoint (step_N) or a directory of them (its newest intact one); repeat it")
    parser.add_argument("--last", type=int, metavar="N",
                        help="with one --checkpoint directory: its newest N complete checkpoints")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="directory for model.safetensors and model.yaml")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier average in --output")
    parser.set_defaults(func=run_average)


LM_EVAL_TASK_EXAMPLE = """\
example (where the datasets can be downloaded, e.g. a login node; needs pip install "lm_eval>=0.4.13"):
  pretrain convert lm-eval-task hellaswag arc_easy piqa --output tasks

  writes tasks/hellaswag.jsonl, tasks/arc_easy.jsonl, tasks/piqa.jsonl ({"context", "choices", "label"} per
  document of the split lm-eval evaluates); then, with nothing to download:
      pretrain eval --checkpoint runs/7b/checkpoints --task tasks/hellaswag.jsonl
      train.eval_tasks=[tasks/hellaswag.jsonl,tasks/arc_easy.jsonl]  (scored at each of a run's evals)

lm-eval builds the requests itself (dataset, prompt template, few-shot examples with its seed 1234), so the
accuracies equal lm-eval's on the HF export of the same weights. A group (mmlu) writes one file per task.
Multiple-choice tasks only; Winogrande-style tasks (several contexts, one continuation) are refused by name.
"""


def _register_lm_eval_task(commands: Any) -> None:
    parser = commands.add_parser(
        "lm-eval-task", help="lm-evaluation-harness multiple-choice tasks → task files for `eval --task`",
        formatter_class=_HelpFormatter, epilog=LM_EVAL_TASK_EXAMPLE,
        description="Write lm-eval multiple-choice tasks as JSON Lines task files that score as lm-eval scores them.",
    )
    parser.add_argument("tasks", nargs="+", metavar="TASK", help="lm-eval task, group or tag names")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory for <task>.jsonl files")
    parser.add_argument("--num-fewshot", type=int, metavar="N",
                        help="few-shot examples in each context (default: the task's own, else 0)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N documents of each task")
    parser.add_argument("--include-path", metavar="DIR", help="a folder of your own lm-eval task YAML files")
    parser.add_argument("--overwrite", action="store_true", help="replace task files already in --output")
    parser.set_defaults(func=run_lm_eval_task)


def run_lm_eval_task(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trainer.lm_eval_tasks import convert_lm_eval_tasks

    converted = convert_lm_eval_tasks(args.tasks, Path(args.output), num_fewshot=args.num_fewshot, limit=args.limit,
                                      include_path=args.include_path, overwrite=args.overwrite)
    for task in converted:
        print(f"{task.name}: {task.num_examples} examples, {task.num_fewshot}-shot -> {task.path}")
    print(f"score them: pretrain eval ... --task {converted[0].path}, or train.eval_tasks=[{converted[0].path}]")
    return 0


def run_average(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trainer.checkpoint.average import average_checkpoints, newest_checkpoints
    from trainer.config import ConfigError

    if args.last is not None and len(args.checkpoint) != 1:
        raise ConfigError("--last N takes one --checkpoint: the directory of checkpoints to take the newest N of")
    paths = (newest_checkpoints(Path(args.checkpoint[0]), args.last) if args.last is not None
             else [Path(path) for path in args.checkpoint])
    averaged = average_checkpoints(paths, Path(args.output), overwrite=args.overwrite)
    print(f"averaged {len(averaged.checkpoints)} checkpoints: {', '.join(str(c) for c in averaged.checkpoints)}")
    print(f"wrote {averaged.out_dir}/model.safetensors ({averaged.num_tensors} tensors, fp32) and "
          f"{averaged.out_dir}/model.yaml")
    return 0


def run_to_hf(args: argparse.Namespace) -> int:
    from trainer.hf import export_hf, load_full_state_dict

    model_cfg = source_model_config(args)
    state_dict = load_full_state_dict(args.checkpoint or args.state_dict)
    result = export_hf(
        state_dict, model_cfg, args.output, tokenizer_model=None if args.no_tokenizer else args.tokenizer,
        dtype=args.dtype, max_shard_bytes=args.max_shard_size, overwrite=args.overwrite,
    )
    print(f"wrote {result.out_dir}: {result.num_parameters:,} parameters, {result.weights_bytes / 2**20:.1f} MiB "
          f"of {result.dtype} weights in {', '.join(result.files)}")
    tokens = result.special_tokens
    print(f"special token ids: bos={tokens.bos} eos={tokens.eos} pad={tokens.pad}"
          + ("" if not args.no_tokenizer else " (no tokenizer written)"))
    for line in result.tokenizer_mismatches:
        print(f"warning: the exported tokenizer differs from the data's tokenizer on a probe text: {line}")
    return 0


def source_model_config(args: argparse.Namespace) -> Any:
    """--config (+ overrides) if given, else the checkpoint's own config.yaml; --state-dict needs --config."""
    from trainer.hf import HFConversionError, load_model_config
    from trainer.hf.full_state import checkpoint_model_config

    if args.config is not None:
        return load_model_config(args.config, args.overrides)
    if args.checkpoint is None:
        raise HFConversionError("--state-dict needs --config: the run config the weights were trained with, or the "
                                "model.yaml `convert from-hf` wrote")
    return checkpoint_model_config(args.checkpoint, args.overrides)


def run_from_hf(args: argparse.Namespace) -> int:
    from trainer.hf import import_hf_to_dir

    written = import_hf_to_dir(args.hf, args.output, tp=args.tp, dtype=None if args.dtype == "keep" else args.dtype,
                               overwrite=args.overwrite)
    print(f"wrote {written.out_dir}/model.safetensors: {written.num_tensors} tensors, vocab "
          f"{written.model_cfg.vocab_size} padded to {written.padded_vocab_rows} rows (tp={args.tp})")
    print(f"wrote {written.out_dir}/model.yaml (the model: section for a run config)")
    if written.tokenizer_copied == "sentencepiece":
        print(f"wrote {written.out_dir}/tokenizer/ (sentencepiece model + our metadata)")
    elif written.tokenizer_copied == "hf":
        print(f"wrote {written.out_dir}/tokenizer/ (the HF tokenizer.json and its config files)")
    else:
        print(f"note: {args.hf} has no tokenizer (tokenizer.model or tokenizer.json); `pretrain prepare` needs the "
              f"model's own tokenizer to tokenize data for it")
    return 0
