"""The console command answers `--help` at once: no heavy library is imported just to print help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launch.cli import build_parser

HEAVY_MODULES = ("torch", "deepspeed", "megatron", "sentencepiece", "pyarrow", "transformers", "webdataset")


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys; from launch.cli import build_parser\n"
        "build_parser().format_help()\n"
        f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY_MODULES!r}]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"--help imported heavy modules: {out.stdout.strip()}"


def test_python_dash_m_launch_help() -> None:
    out = subprocess.run([sys.executable, "-m", "launch", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "usage: pretrain" in out.stdout


def _subcommand_names() -> list[list[str]]:
    """Every leaf subcommand path, e.g. ['tokenizer', 'train'], found by walking the argparse tree."""
    import argparse

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return [prefix]
        return [path for name, sub in subs[0].choices.items() for path in walk(sub, prefix + [name])]

    return walk(build_parser(), [])


@pytest.mark.parametrize("path", _subcommand_names(), ids=lambda p: " ".join(p))
def test_every_subcommand_help_has_an_example(path: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(path + ["--help"])
    assert exit_info.value.code == 0
    assert "pretrain " + " ".join(path) in capsys.readouterr().out.split("xample", 1)[-1], (
        f"`pretrain {' '.join(path)} --help` needs a worked example (an 'Example:' section using the command)"
    )
