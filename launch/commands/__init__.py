"""One module per group of subcommands; each exposes `register(subparsers)` and imports heavy code lazily."""

import argparse


def add_run_config_arguments(parser: argparse.ArgumentParser, *, config_example: str = "configs/tiny.yaml",
                             overrides_example: str = "optim.lr=3e-4 parallel.tp=2") -> None:
    """`--config YAML` plus positional dotted `key=value` overrides: how every command that reads a run config
    takes it (the overrides go through trainer.config's one merge, which rejects unknown keys)."""
    parser.add_argument("--config", required=True, metavar="YAML", help=f"run config, e.g. {config_example}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {overrides_example}")
