"""`pretrain generate`: sample text from an HF directory through transformers, a quick sanity check of an export.
A training checkpoint (--checkpoint) is exported to a temporary HF directory first."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

EXAMPLES = """\
examples:
  pretrain generate --hf runs/tiny/hf --prompt "def fibonacci(n):" --greedy --max-new-tokens 48
  pretrain generate --hf runs/tiny/hf --prompt "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 7
  pretrain generate --checkpoint runs/tiny/checkpoints --prompt "def main():" --greedy
      (the newest intact checkpoint; its tokenizer is the training data's, or pass --tokenizer DIR)

Prints the prompt followed by the continuation. The prompt is encoded with the directory's tokenizer (BOS first,
as in training); generation stops at EOS or after --max-new-tokens. Weights that transformers would have to
initialise at random (a missing lm_head, a shape mismatch) are an error, not a warning.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate", help="sample text from an exported HF directory (transformers)", description=__doc__,
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="DIR", help="HF model directory (e.g. written by `pretrain convert to-hf`)")
    source.add_argument("--checkpoint", metavar="DIR",
                        help="a training checkpoint (step_N) or a directory of them (newest intact one)")
    parser.add_argument("--tokenizer", metavar="DIR_OR_MODEL",
                        help="with --checkpoint: our tokenizer (default: the one of the checkpoint's first dataset)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default: %(default)s")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (ignores --temperature, --top-p)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from trainer.hf import generate_text

    hf_logging.disable_progress_bar()  # the weight-loading bar would interleave with the text on a terminal

    with tempfile.TemporaryDirectory(prefix="pretrain-generate-") as scratch:
        hf_dir = args.hf if args.checkpoint is None else _export_checkpoint(args, Path(scratch) / "hf")
        result = generate_text(
            hf_dir, args.prompt, max_new_tokens=args.max_new_tokens, greedy=args.greedy,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        )
    print(args.prompt + result.text)
    return 0


def _export_checkpoint(args: argparse.Namespace, out_dir: Path) -> Path:
    from trainer.checkpoint import resolve_offline
    from trainer.config import load_config
    from trainer.data_check import data_tokenizer_file
    from trainer.hf import HFConversionError, export_hf, load_full_state_dict

    ckpt = resolve_offline(Path(args.checkpoint))
    run_cfg = load_config(ckpt / "config.yaml")
    tokenizer = args.tokenizer or data_tokenizer_file(run_cfg)
    if tokenizer is None:
        raise HFConversionError(f"{ckpt} was trained without a tokenizer on record (synthetic data, or a dataset "
                                f"without tokenizer/): pass --tokenizer DIR")
    export_hf(load_full_state_dict(ckpt), run_cfg.model, out_dir, tokenizer_model=tokenizer)
    return out_dir
