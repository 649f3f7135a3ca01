"""The main job end to end, as a user runs it: `pretrain quickstart --input` on a small corpus of their own (~70 KB,
200 records: smaller than one validation micro batch), then a second quickstart with other input. The default
standard-library corpus runs in tests/test_readme.py (the README's first command)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from launch.commands.quickstart import split_inputs
from launch.quickstart_inputs import default_run_dir

NUM_RECORDS = 200


def small_english_corpus(path: Path, num_records: int = NUM_RECORDS) -> Path:
    """Docstrings of the standard library's top-level modules (English prose), 200-480 characters each: ~65 KB."""
    root = Path(sysconfig.get_paths()["stdlib"])
    records: list[str] = []
    for module in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(module.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and 200 <= len(doc) <= 480:
                    records.append(doc)
        if len(records) >= num_records:
            break
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in records[:num_records]), encoding="utf-8")
    return path


def quickstart(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launch", "quickstart", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=900)


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and modification time: equal states mean nothing was touched."""
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_quickstart_on_a_small_corpus_then_other_input_leaves_the_first_run_intact(tmp_path: Path) -> None:
    corpus = small_english_corpus(tmp_path / "notes.jsonl")
    assert 50_000 < corpus.stat().st_size < 90_000
    # Overrides right after --input (nargs='+') go back to the overrides; the run directory follows the input.
    result = quickstart(tmp_path, "--input", corpus.name, "train.max_steps=40", "train.eval_interval_steps=20",
                        "checkpoint.save_interval_steps=20")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    run_dir = tmp_path / "runs" / "quickstart-notes"
    for stage in ("1/6 tokenizer", "2/6 prepare", "3/6 train", "4/6 export", "5/6 generate", "6/6 report"):
        assert stage in result.stdout
    # The validation split is smaller than the micro batch of 16: evaluation fits by a smaller micro batch.
    assert "note: the validation split has" in result.stdout
    assert (run_dir / "data" / "manifest.json").exists() and (run_dir / "report.png").stat().st_size > 10_000
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row.get("kind") == "train"]
    assert losses[-1] < losses[0] - 1.0, f"the loss must visibly fall: {losses}"
    assert any(row.get("kind") == "eval" for row in rows)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")) == [
        "step_20", "step_40"]
    # Progress of the whole job, and a closing note a user can paste line by line; no library noise.
    assert "left for the whole job" in out and "(0:" in result.stdout  # stage headers carry the elapsed time
    assert f"next:\n  pretrain generate --hf {Path('runs/quickstart-notes/hf')}" in result.stdout
    assert "matplotlib" not in out and "CUDA_DEVICE_MAX_CONNECTIONS" not in out

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf", local_files_only=True)
    assert model.config.vocab_size == tokenizer.vocab_size == 4096
    assert "def __init__(self" in result.stdout  # the sample, prompt first

    # The same input with another model shape: refused before any stage runs (not at the checkpoint load).
    before = tree_state(run_dir)
    reshaped = quickstart(tmp_path, "--input", corpus.name, "model.hidden_size=192")
    assert reshaped.returncode == 2, reshaped.stdout + reshaped.stderr
    assert "another model shape (model.hidden_size 128 → 192, model.head_dim 32 → 48)" in reshaped.stderr, reshaped.stderr
    assert "--run-dir runs/quickstart-notes-2" in reshaped.stderr and "== 3/6 train" not in reshaped.stdout
    assert tree_state(run_dir) == before

    # Other input into the same run directory: refused before anything is touched, naming --run-dir.
    other = tmp_path / "other.jsonl"
    other.write_text("".join(corpus.read_text().splitlines(keepends=True)[:100]))
    before = tree_state(run_dir)
    refused = quickstart(tmp_path, "--input", other.name, "--run-dir", "runs/quickstart-notes")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--run-dir runs/quickstart-other" in refused.stderr and "Nothing was changed" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert tree_state(run_dir) == before


def test_each_input_has_its_own_default_run_dir() -> None:
    assert default_run_dir(()) == Path("runs/quickstart")
    assert default_run_dir(("data/my corpus.jsonl.zst", "b.jsonl")) == Path("runs/quickstart-my_corpus")
    assert default_run_dir(("texts/",)) == Path("runs/quickstart-texts")


def test_overrides_after_input_are_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text("")
    assert split_inputs(["a.jsonl", "train.max_steps=20"], ["optim.lr=1e-3"]) == (
        ["a.jsonl"], ["train.max_steps=20", "optim.lr=1e-3"])


def test_a_run_dir_of_other_input_is_refused_untouched(tmp_path: Path) -> None:
    from launch.quickstart_inputs import QuickstartError, claim_run_dir, recipe

    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text('{"text": "a"}\n')
    second.write_text('{"text": "b"}\n')
    run_dir = tmp_path / "runs" / "quickstart-first"
    wanted = recipe((str(first),), [str(first)], ("*.txt",), None, 4096, 128)
    assert claim_run_dir(run_dir, wanted, Path("unused")) is False  # new: recorded
    (run_dir / "checkpoints").mkdir()
    assert claim_run_dir(run_dir, wanted, Path("unused")) is True  # the same input again: continue
    before = tree_state(run_dir)
    other = recipe((str(second),), [str(second)], ("*.txt",), None, 4096, 128)
    with pytest.raises(QuickstartError, match="--run-dir runs/quickstart-second"):
        claim_run_dir(run_dir, other, Path("runs/quickstart-second"))
    first.write_text('{"text": "a, edited"}\n')
    edited = recipe((str(first),), [str(first)], ("*.txt",), None, 4096, 128)
    with pytest.raises(QuickstartError, match="its input has changed since"):
        claim_run_dir(run_dir, edited, Path("unused"))
    assert tree_state(run_dir) == before


@pytest.mark.parametrize("num_records", [32, 12])
def test_a_corpus_of_about_one_batch_gets_a_vocabulary_and_evaluation_that_fit(
        num_records: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The stages before training, in process (no training: seconds): ~10 KB (32 records) gives one training batch
    but has merges for fewer than 4096 pieces and too little validation text; ~4 KB (12 records) is refused."""
    from data_pipeline.manifest import Manifest
    from launch.quickstart import (
        QUICKSTART_CONFIG, QuickstartError, QuickstartPlan, _config, _fit_to_data, _prepare, _train_tokenizer)

    corpus = small_english_corpus(tmp_path / "tiny.jsonl", num_records)
    plan = QuickstartPlan(run_dir=tmp_path / "run", inputs=(str(corpus),), include_globs=("*.txt",), corpus_mb=None,
                          config_path=QUICKSTART_CONFIG, overrides=(), prompt="x")
    _train_tokenizer(plan, [str(corpus)])
    _prepare(plan, [str(corpus)])
    manifest = Manifest.load(plan.data_dir)
    if num_records == 12:
        with pytest.raises(QuickstartError, match="fewer than one training batch of 16 .* give more text"):
            _fit_to_data(plan)
        return
    assert manifest.splits["train"].num_samples >= 16  # one training batch: the quickstart must train
    cfg = _config(_fit_to_data(plan))
    assert cfg.model.vocab_size == manifest.tokenizer.vocab_size < 4096
    val_samples = manifest.splits["val"].num_samples if "val" in manifest.splits else 0
    assert cfg.train.eval_interval_steps == 0 or cfg.train.micro_batch_size_per_gpu <= val_samples
    assert "note: the input has too little text for 4096 pieces" in capsys.readouterr().out
