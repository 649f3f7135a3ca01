"""The `pretrain` console command: one entry point, a subcommand per job.

Each subcommand lives in a module under `launch/commands/` that exposes `register(subparsers)`. Registering
only builds argparse parsers; the work (and every heavy import: torch, sentencepiece, deepspeed, ...) happens
inside the handler the parser points to, so `pretrain --help` and `pretrain <cmd> --help` stay instant.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        # Errors a user can fix (bad path, bad flag, inconsistent input) carry `user_error = True` in every room
        # (see data_pipeline/errors.py): print their message, which says what to do, without a traceback.
        # Errors with their own `exit_code` (trainer/exit_codes.py, e.g. a diverged run) keep it for the scheduler.
        code = getattr(err, "exit_code", None)
        if not getattr(err, "user_error", False) and code is None:
            raise
        print(f"pretrain {args.command}: error: {err}", file=sys.stderr)
        return 2 if code is None else int(code)
    except KeyboardInterrupt:
        print(f"pretrain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
