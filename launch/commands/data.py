"""`pretrain tokenizer train` and `pretrain prepare`: the data commands (docs/data_pipeline.md).

Registering only builds parsers; sentencepiece, pyarrow and numpy are imported inside the handlers so that
`pretrain --help` stays instant.
"""

from __future__ import annotations

import argparse
import signal
from typing import Any

TOKENIZER_TRAIN_EXAMPLE = """\
example:
  # BPE with 32k pieces on JSON Lines files plus a folder of Python sources
  pretrain tokenizer train \\
      --input data/web.jsonl.zst --input data/code/ --include '*.py' \\
      --output tokenizers/bpe32k --vocab-size 32000 --model-type bpe

  writes tokenizers/bpe32k/tokenizer.model, tokenizer.json (special ids unk=0 bos=1 eos=2 pad=3, fingerprint,
  sampling counts) and bad_input_report.tsv (one row per skipped record).

Sampling: at most --input-sentence-size lines are drawn with a seeded reservoir (same --seed, same input →
same tokenizer). Lines longer than --max-sentence-length bytes are split into chunks, never dropped.
"""

PREPARE_EXAMPLE = """\
example:
  # tokenize, pack 2048+1-token samples, hold out 1% of documents for validation
  pretrain prepare \\
      --input data/web.jsonl.zst --input data/books/ --include '*.txt' \\
      --tokenizer tokenizers/bpe32k --output datasets/web-bpe32k --seq-len 2048 --num-proc 8

  # validation from separate files instead of a fraction
  pretrain prepare --input data/train/ --val-input data/heldout.jsonl \\
      --tokenizer tokenizers/bpe32k --output datasets/web-bpe32k-v2

  # continued pretraining of a released model: its own tokenizer (an HF directory with tokenizer.json, or the
  # tokenizer/ that `pretrain convert from-hf` wrote)
  pretrain prepare --input data/domain/ --tokenizer runs/imported/tokenizer --output datasets/domain-llama3 --add-bos

  writes <output>/manifest.json (last), train/ and val/ webdataset shards, tokenizer/ (a copy of the model) and
  bad_input_report.tsv. Re-running on the same input gives byte-identical files, whatever --num-proc is.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks (the worked example) while wrapping option help as usual."""


def register(subparsers: Any) -> None:
    _register_tokenizer(subparsers)
    _register_prepare(subparsers)


# ---------------------------------------------------------------------------------------------------------------
# pretrain tokenizer train
# ---------------------------------------------------------------------------------------------------------------


def _register_tokenizer(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "tokenizer", help="train a sentencepiece tokenizer", formatter_class=_HelpFormatter,
        description="Tokenizer commands.", epilog=TOKENIZER_TRAIN_EXAMPLE,
    )
    tokenizer_commands = group.add_subparsers(dest="tokenizer_command", metavar="<subcommand>", required=True)
    parser = tokenizer_commands.add_parser(
        "train", help="train a BPE or unigram sentencepiece model on raw text", formatter_class=_HelpFormatter,
        description="Train a sentencepiece tokenizer (byte fallback, identity normalization, fixed special ids).",
        epilog=TOKENIZER_TRAIN_EXAMPLE,
    )
    _add_input_flags(parser)
    parser.add_argument("--output", required=True, metavar="DIR", help="directory for tokenizer.model/.json")
    parser.add_argument("--vocab-size", type=int, default=32000, help="number of pieces (default: %(default)s)")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                        help="sentencepiece algorithm (default: %(default)s)")
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000, metavar="N",
                        help="at most N lines are sampled for training (seeded reservoir); 0 = every line "
                             "(default: %(default)s)")
    parser.add_argument("--max-sentence-length", type=int, default=4192, metavar="BYTES",
                        help="longer lines are split into chunks of at most BYTES (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed (default: %(default)s)")
    parser.add_argument("--num-threads", type=int, default=16,
                        help="sentencepiece training threads; part of the recipe: unigram scores depend on it, so "
                             "keep it fixed to reproduce a tokenizer (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer in --output")
    parser.set_defaults(func=_run_tokenizer_train)


def _run_tokenizer_train(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizer import TokenizerTrainConfig, train_tokenizer

    config = TokenizerTrainConfig(
        inputs=tuple(args.input), output_dir=args.output, vocab_size=args.vocab_size, model_type=args.model_type,
        text_key=args.text_key, include_globs=tuple(args.include or ("*.txt",)),
        input_sentence_size=args.input_sentence_size, max_sentence_length_bytes=args.max_sentence_length,
        seed=args.seed, num_threads=args.num_threads, strict=args.strict,
        overwrite=args.overwrite,
    )
    result = train_tokenizer(config)
    meta = result.metadata
    print(f"trained {meta['model_type']} tokenizer: {meta['vocab_size']} pieces, "
          f"fingerprint {meta['fingerprint'][:12]}")
    print(f"  {meta['num_documents']} documents, {meta['num_lines']} lines, {meta['num_sentences']} sentences sampled")
    print(f"  {meta['num_long_lines_split']} lines over {config.max_sentence_length_bytes} bytes split into "
          f"{meta['num_chunks_from_long_lines']} chunks")
    print(f"  bad input: {result.report.summary()}; see {result.report_path}")
    print(f"  wrote {result.model_path} and {result.metadata_path}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# pretrain prepare
# ---------------------------------------------------------------------------------------------------------------


def _register_prepare(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "prepare", help="tokenize and pack raw text into webdataset shards + manifest",
        formatter_class=_HelpFormatter, epilog=PREPARE_EXAMPLE,
        description="Tokenize documents in parallel, put eos after each, pack fixed samples of seq_len + 1 tokens "
                    "and write shards plus manifest.json.",
    )
    _add_input_flags(parser)
    parser.add_argument("--val-input", action="extend", nargs="+", default=[], metavar="PATH",
                        help="validation files or directories (several after one flag, or the flag repeated); excludes --val-fraction")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="share of --input documents held out for validation, chosen by a seeded hash of "
                             "their text (default: 0.01, or 0 with --val-input)")
    parser.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="directory written by `pretrain tokenizer train` (or a .model file), or an HF "
                             "tokenizer: a directory with tokenizer.json (and tokenizer_config.json naming eos_token)")
    parser.add_argument("--output", required=True, metavar="DIR", help="dataset directory to write")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per training sequence; samples hold "
                                                                   "seq_len + 1 (default: %(default)s)")
    parser.add_argument("--samples-per-shard", type=int, default=1000,
                        help="samples per .tar shard; the last shard of a split may hold fewer (default: %(default)s)")
    parser.add_argument("--num-proc", type=int, default=None,
                        help="tokenizer processes; does not change the output (default: all cores)")
    parser.add_argument("--spool-dir", default=None, metavar="DIR",
                        help="where workers leave tokens until their shard is written: a few shards' worth at a "
                             "time, removed at the end (default: $TMPDIR or /tmp; use node-local disk on clusters)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the validation hash (default: %(default)s)")
    parser.add_argument("--skip-files-without-text-key", action="store_true",
                        help="skip parquet/arrow files that have no --text-key column (counted in the report with "
                             "their rows) instead of stopping before any work")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it only shows on a terminal)")
    parser.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import PrepareConfig, prepare

    val_fraction = args.val_fraction if args.val_fraction is not None else (0.0 if args.val_input else 0.01)
    config = PrepareConfig(
        inputs=tuple(args.input), tokenizer=args.tokenizer, output_dir=args.output,
        val_inputs=tuple(args.val_input), val_fraction=val_fraction, seq_len=args.seq_len,
        samples_per_shard=args.samples_per_shard, num_proc=args.num_proc, spool_dir=args.spool_dir, seed=args.seed,
        text_key=args.text_key, add_bos=args.add_bos,
        include_globs=tuple(args.include or ("*.txt",)), strict=args.strict, overwrite=args.overwrite,
        progress=not args.no_progress, skip_files_without_text_key=args.skip_files_without_text_key,
    )
    # scancel and Slurm time limits send SIGTERM (SIGKILL follows after KillWait): as an exception it unwinds prepare,
    # which removes its spool folder and half-written shards on the way out instead of leaving them behind.
    signal.signal(signal.SIGTERM, _raise_system_exit)
    result = prepare(config)
    print(result.summary())
    return 0


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _add_input_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="extend", nargs="+", required=True, metavar="PATH",
                        help="files or directories (several after one flag, or the flag repeated): .jsonl/.json[.gz|.zst], "
                             ".parquet, .arrow/.feather (HF datasets' save_to_disk files: --include '*.arrow'), or "
                             "text files (one document per file); directories are searched recursively for --include")
    parser.add_argument("--include", action="extend", nargs="+", default=None, metavar="GLOB",
                        help="file-name patterns for directories (several, or repeated; default: '*.txt'), e.g. "
                             "--include '*.jsonl.zst' --include '*.py'")
    parser.add_argument("--text-key", default="text",
                        help="JSON key / parquet or arrow column holding the text (default: %(default)s)")
    parser.add_argument("--add-bos", action="store_true",
                        help="put the tokenizer's bos before each document (bos + tokens + eos, Llama 3's format); "
                             "default: tokens + eos")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad record instead of skipping and counting it")
