"""`pretrain quickstart`: the whole system end to end on this machine's CPU, with no download."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

EXAMPLES = """\
examples:
  pretrain quickstart
      corpus = this Python's standard library sources (~8 MB of .py files); trains a 4096-piece BPE tokenizer,
      prepares shards, trains configs/quickstart.yaml for 300 steps on CPU, checkpoints, exports to
      runs/quickstart/hf, samples from it through transformers, draws report.png. Time: ~1.5 min on 2 idle cores,
      nearly all of it the 300 training steps, so it grows with whatever else keeps the cores busy
  pretrain quickstart --input my_corpus.jsonl
      the same on your own text (.jsonl[.gz|.zst] with a "text" field, .parquet, .arrow, or a folder of .txt files), in
      runs/quickstart-my_corpus; any input with one training batch of samples (16 x 129 tokens) trains
  pretrain quickstart train.max_steps=60 --corpus-mb 2
      a shorter smoke run; any dotted override of configs/quickstart.yaml applies

Each input gets its own run directory. Running the same command again continues that run (from its newest
checkpoint, the tokenizer and shards kept); a --run-dir that holds a run of other input is refused untouched.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="the whole pipeline end to end on CPU: tokenizer → shards → train → checkpoint → HF → sample",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", nargs="+", default=[], metavar="PATH",
                        help="your corpus instead of the standard library: files or folders")
    parser.add_argument("--include", nargs="+", default=None, metavar="GLOB",
                        help="file-name patterns for folders (default: '*.py' for the standard library, else '*.txt')")
    parser.add_argument("--corpus-mb", type=float, default=8.0,
                        help="size cap of the default standard-library corpus in MB (default: 8)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where everything goes (default: runs/quickstart, with --input runs/quickstart-<name>)")
    parser.add_argument("--config", type=Path, default=None, metavar="YAML",
                        help="run config (default: configs/quickstart.yaml)")
    parser.add_argument("--prompt", default=None, help="prompt for the sample at the end")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=100")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from launch.quickstart import DEFAULT_PROMPT, QUICKSTART_CONFIG, QuickstartPlan, run_quickstart
    from launch.quickstart_inputs import default_run_dir

    inputs, overrides = split_inputs(args.input, args.overrides)
    include = args.include or (["*.txt"] if inputs else ["*.py"])
    plan = QuickstartPlan(
        run_dir=args.run_dir or default_run_dir(tuple(inputs)), inputs=tuple(inputs), include_globs=tuple(include),
        corpus_mb=None if inputs else args.corpus_mb, config_path=args.config or QUICKSTART_CONFIG,
        overrides=tuple(overrides), prompt=args.prompt or DEFAULT_PROMPT,
    )
    return run_quickstart(plan)


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def split_inputs(inputs: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """`--input my.jsonl train.max_steps=20`: argparse gives the override to --input (nargs='+'); a word shaped like
    a dotted override that is no existing path goes back to the overrides."""
    is_override = [bool(_OVERRIDE.match(word)) and not os.path.exists(word) for word in inputs]
    return ([word for word, flag in zip(inputs, is_override) if not flag],
            [word for word, flag in zip(inputs, is_override) if flag] + list(overrides))
