"""`pretrain quickstart`: the whole system end to end on this machine's CPU, with no download."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EXAMPLES = """\
examples:
  pretrain quickstart
      corpus = this Python's standard library sources (~8 MB of .py files); trains a 4096-piece BPE tokenizer,
      prepares shards, trains configs/quickstart.yaml for 300 steps on CPU (a few minutes on 2 cores),
      checkpoints, exports to runs/quickstart/hf, samples from it through transformers, draws report.png
  pretrain quickstart --input my_corpus.jsonl --run-dir runs/mine
      the same on your own text (.jsonl[.gz|.zst] with a "text" field, .parquet, or a folder of .txt files)
  pretrain quickstart train.max_steps=60 --corpus-mb 2
      a shorter smoke run; any dotted override of configs/quickstart.yaml applies
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
    parser.add_argument("--run-dir", type=Path, default=Path("runs/quickstart"), help="where everything goes")
    parser.add_argument("--config", type=Path, default=None, metavar="YAML",
                        help="run config (default: configs/quickstart.yaml)")
    parser.add_argument("--prompt", default=None, help="prompt for the sample at the end")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=100")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from launch.quickstart import DEFAULT_PROMPT, QUICKSTART_CONFIG, QuickstartPlan, run_quickstart

    include = args.include or (["*.txt"] if args.input else ["*.py"])
    plan = QuickstartPlan(
        run_dir=args.run_dir, inputs=tuple(args.input), include_globs=tuple(include),
        corpus_mb=None if args.input else args.corpus_mb, config_path=args.config or QUICKSTART_CONFIG,
        overrides=tuple(args.overrides), prompt=args.prompt or DEFAULT_PROMPT,
    )
    return run_quickstart(plan)
