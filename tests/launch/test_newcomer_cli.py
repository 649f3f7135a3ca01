"""What a newcomer reads first: help texts whose examples use files that exist, and errors that say what to type."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from launch.cli import build_parser, main
from trainer.config import Config

REPO_ROOT = Path(__file__).resolve().parents[2]


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


def test_overrides_on_both_sides_of_a_flag_are_all_taken(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse would fill the overrides from the first run of words only and refuse the rest."""
    argv = ["launch", "local", "--nproc", "2", "parallel.tp=2", "--config", "configs/tiny.yaml", "train.max_steps=8",
            "--dry-run", "train.max_steps=9"]
    assert main(argv) == 0
    err = capsys.readouterr().err  # the command line it would run
    assert "--config configs/tiny.yaml parallel.tp=2 train.max_steps=8 train.max_steps=9" in err, err


# Config sections and their fields, e.g. {"train": {"max_steps", ...}, ...}.
SECTIONS = {name: set(info.annotation.model_fields) for name, info in Config.model_fields.items()
            if hasattr(info.annotation, "model_fields")}
DOTTED_KEY = re.compile(r"(?<![\w./-])(" + "|".join(SECTIONS) + r")\.([a-z_]+)\b")
FILE_SUFFIXES = {"safetensors", "yaml", "json", "jsonl", "py", "log", "png", "md", "tsv", "tar"}  # model.yaml ...


def _unknown_keys(text: str) -> list[str]:
    """Dotted keys in `text` that name no config field (module paths such as launch.commands are not keys)."""
    unknown = []
    for match in DOTTED_KEY.finditer(text):
        section, field = match.groups()
        module = REPO_ROOT / section / field
        is_module = module.is_dir() or module.with_suffix(".py").exists()
        if field in SECTIONS[section] or field in FILE_SUFFIXES or is_module:
            continue
        unknown.append(match.group(0))
    return unknown


def test_every_hint_names_a_real_option() -> None:
    """Each `section.field` in a message, help text or the README is a config field a user can set."""
    found = {}
    for path in sorted(p for room in ("launch", "trainer", "data_pipeline") for p in (REPO_ROOT / room).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _unknown_keys(node.value):
                found[f"{path.relative_to(REPO_ROOT)}:{node.lineno}"] = _unknown_keys(node.value)
    readme_keys = _unknown_keys((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    if readme_keys:
        found["README.md"] = readme_keys
    assert not found, f"hints naming settings that do not exist: {found}"
    assert _unknown_keys("set train.max_step=10") == ["train.max_step"]  # the check itself sees a typo
