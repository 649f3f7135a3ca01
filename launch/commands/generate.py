"""`pretrain generate`: sample text from an HF directory through transformers, a quick sanity check of an export.
Checkpoints are accepted once trainer.checkpoint exists (they will be exported to a temp HF directory first)."""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLES = """\
examples:
  pretrain generate --hf runs/tiny/hf --prompt "def fibonacci(n):" --greedy --max-new-tokens 48
  pretrain generate --hf runs/tiny/hf --prompt "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 7

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
    # A --checkpoint DIR alternative joins this group with trainer.checkpoint.
    source.add_argument("--hf", metavar="DIR", help="HF model directory (e.g. written by `pretrain convert to-hf`)")
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

    result = generate_text(
        args.hf, args.prompt, max_new_tokens=args.max_new_tokens, greedy=args.greedy,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
    )
    print(args.prompt + result.text)
    return 0
