"""`pretrain inspect`: summarize a prepared dataset (manifest.json), verify its shards, decode a sample to text."""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLES = """\
examples:
  pretrain inspect data/tiny                       # summary: format, fingerprint, tokenizer, splits, bad input
  pretrain inspect data/tiny --sample 0            # + token ids and text of train sample 0
  pretrain inspect data/tiny/manifest.json --split val --sample 12 --verify
  pretrain inspect https://example.org/datasets/tiny --sample 3 --cache-dir /scratch/shards

A worked example: after `pretrain prepare ... --output data/tiny`, `pretrain inspect data/tiny --sample 0 --verify`
prints the summary, re-hashes every shard against manifest.json (exit status 2 and the bad shards listed if any
differ), then decodes train sample 0 with data/tiny/tokenizer/tokenizer.model; <|eos|> marks where one packed
document ends and the next begins.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="summarize a prepared dataset, verify its shards, decode a sample",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", metavar="DATASET_DIR_OR_MANIFEST",
                        help="dataset folder, its manifest.json, or a URL of either (fsspec: s3://, https://, ...)")
    parser.add_argument("--split", default="train", help="split to take --sample from (default: train)")
    parser.add_argument("--sample", type=int, metavar="K", help="decode sample K of --split back to text")
    parser.add_argument("--verify", action="store_true",
                        help="re-hash every shard of every split and check its sample count against the manifest")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="where shards of a remote dataset are downloaded (default: $PRETRAIN_CACHE_DIR or "
                             "~/.cache/pretrain/shards)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_pipeline.inspect import inspect_dataset

    inspect_dataset(args.dataset, split=args.split, sample=args.sample, verify=args.verify, cache_dir=args.cache_dir)
    return 0
