"""The `pretrain` console command: one entry point, a subcommand per job.

Each subcommand lives in a module under `launch/commands/` that exposes `register(subparsers)`. Registering
only builds argparse parsers; the work (and every heavy import: torch, sentencepiece, deepspeed, ...) happens
inside the handler the parser points to, so `pretrain --help` and `pretrain <cmd> --help` stay instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

# Order here is the order in `pretrain --help`: the data flow, left to right.
COMMAND_MODULES: tuple[str, ...] = (
    "launch.commands.data",
    "launch.commands.inspect",
    "launch.commands.plan",
    "launch.commands.train",
    "launch.commands.launch_local",
    "launch.commands.submit",
    "launch.commands.convert",
    "launch.commands.eval",
    "launch.commands.generate",
    "launch.commands.report",
    "launch.commands.quickstart",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Distributed LLM pretraining: data preparation, training, launch, checkpoint conversion.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `pretrain <command> --help` for the options and a worked example of each command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for module_name in COMMAND_MODULES:
        import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and hasattr(args, "overrides"):
        unknown = _take_late_overrides(args, unknown)
    if unknown:
        return _refuse_unknown_flags(args, unknown, sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        # Errors a user can fix (bad path, bad flag, inconsistent input) carry `user_error = True` in every room
        # (see data_pipeline/errors.py): print their message, which says what to do, without a traceback.
        # Errors with their own `exit_code` (trainer/exit_codes.py, e.g. a diverged run) keep it for the scheduler.
        code = getattr(err, "exit_code", None)
        if not getattr(err, "user_error", False) and code is None:
            raise
        print(_error_text(args.command, err), file=sys.stderr)
        return 2 if code is None else int(code)
    except KeyboardInterrupt:
        print(f"pretrain {args.command}: interrupted", file=sys.stderr)
        return 130


def _take_late_overrides(args: argparse.Namespace, unknown: list[str]) -> list[str]:
    """argparse fills a positional from one run of words: overrides after a flag that follows the first ones
    (`launch local --nproc 2 parallel.tp=2 --config X train.max_steps=8`) come back unknown. They are overrides all
    the same, and later on the line than those taken, so they go last (a key given twice: the later value wins, as
    in one run). Returns what is still unknown."""
    late = [word for word in unknown if "=" in word and not word.startswith("-")]
    args.overrides = [*args.overrides, *late]
    return [word for word in unknown if word not in late]


def _error_text(command: str, err: BaseException) -> str:
    """The whole message, except on rank > 0 of a multi-process run whose error is already in its rank log: every
    rank meets the same config or data error, and N copies of a multi-line message bury the one that matters. Those
    ranks print one line (the first of their own message, so a rank that failed differently still shows how) and
    the log file that holds the rest."""
    rank_log = getattr(err, "rank_log_path", None)
    if rank_log is None or os.environ.get("RANK", "0") == "0":
        return f"pretrain {command}: error: {err}"
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"pretrain {command} (rank {os.environ['RANK']}): error: {first_line} (whole message: {rank_log})"


def _refuse_unknown_flags(args: argparse.Namespace, unknown: list[str], argv: list[str]) -> int:
    """argparse alone would print the top-level usage; a newcomer typing `--max-steps=10` wants the dotted override
    it meant (`train.max_steps=10`), so every unknown `--flag` that names a config field gets that hint."""
    command = " ".join(word for word in (args.command, getattr(args, "launch_target", None),
                                         getattr(args, "convert_command", None)) if word)
    print(f"pretrain {command}: error: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
    takes_overrides = hasattr(args, "overrides")
    for word in unknown:
        # The value after a bare `--flag` was taken as a positional override, so it is looked up in argv.
        hint = _override_hint(word, argv[argv.index(word) + 1:]) if takes_overrides else None
        if hint:
            print(f"  {word}: config fields are dotted key=value overrides, after the flags: {hint}", file=sys.stderr)
    print(f"see `pretrain {command} --help`", file=sys.stderr)
    return 2


def _override_hint(word: str, following: list[str]) -> str | None:
    """'--max-steps=10' → 'train.max_steps=10' when exactly that field name exists in one config section."""
    if not word.startswith("--"):
        return None
    name, has_value, value = word[2:].partition("=")
    if not has_value:
        value = following[0] if following and not following[0].startswith("-") else "VALUE"
    from trainer.config import Config  # light (pydantic + yaml), imported only on this error path

    field = name.replace("-", "_")
    sections = [section for section, info in Config.model_fields.items()
                if field in getattr(info.annotation, "model_fields", {})]
    return f"{sections[0]}.{field}={value}" if len(sections) == 1 else None


if __name__ == "__main__":
    raise SystemExit(main())
