"""The main job end to end, as a user runs it: `pretrain quickstart` on the standard-library corpus (shortened)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_quickstart_runs_every_stage_and_hands_a_loadable_model_to_transformers(tmp_path: Path) -> None:
    run_dir = tmp_path / "qs"
    result = subprocess.run(
        [sys.executable, "-m", "launch", "quickstart", "--run-dir", str(run_dir), "--corpus-mb", "4",
         "train.max_steps=40", "train.eval_interval_steps=20", "checkpoint.save_interval_steps=20"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("1/6 tokenizer", "2/6 prepare", "3/6 train", "4/6 export", "5/6 generate", "6/6 report"):
        assert stage in result.stdout
    assert (run_dir / "data" / "manifest.json").exists() and (run_dir / "report.png").stat().st_size > 10_000

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row.get("kind") == "train"]
    assert losses[-1] < losses[0] - 1.0, f"the loss must visibly fall: {losses}"
    assert any(row.get("kind") == "eval" for row in rows)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")) == [
        "step_20", "step_40"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf", local_files_only=True)
    assert model.config.vocab_size == tokenizer.vocab_size == 4096
    assert "def __init__(self" in result.stdout  # the sample, prompt first
