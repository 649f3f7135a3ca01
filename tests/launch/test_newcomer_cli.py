"""What a newcomer reads first: help texts whose examples use files that exist, and errors that say what to type."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launch.cli import build_parser, main


def _help(capsys: pytest.CaptureFixture[str], *path: str) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*path, "--help"])
    return capsys.readouterr().out


def test_convert_help_starts_with_files_the_quickstart_writes(capsys: pytest.CaptureFixture[str]) -> None:
    for path in (["convert"], ["convert", "to-hf"]):
        text = _help(capsys, *path)
        examples = text[text.index("examples"):]
        first_example = examples[examples.index("pretrain convert"):].split("\n\n")[0]
        assert "--checkpoint runs/quickstart/checkpoints --tokenizer runs/quickstart/tokenizer" in first_example
        assert "weights.safetensors" not in text  # a file nothing writes


def test_submit_help_explains_instead_of_naming_a_source_file(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "submit")
    assert not re.search(r"[\w/]+\.py\b", text), "the reader of --help should not be sent to a source file"
    assert "SIGUSR1" in text and "exits 75" in text


def test_generate_names_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--hf", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "hint"), [
    (["--max-steps=10"], "train.max_steps=10"),
    (["--max-steps", "10"], "train.max_steps=10"),
    (["--lr=3e-4"], "optim.lr=3e-4"),
])
def test_a_config_field_typed_as_a_flag_gets_its_dotted_override(flags: list[str], hint: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", "configs/tiny.yaml", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain train: error: unrecognized arguments") and hint in err
