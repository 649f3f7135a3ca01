"""bench/layout_sweep.py: its matrix is all runnable (a typo in an override, or a layout a later change refuses,
would otherwise show up as a quiet "refused" row), and one objective runs end to end and writes its JSON. The full
sweep (~20 min) is a tool, not a CI test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "bench" / "layout_sweep.py"


def test_every_objective_and_layout_passes_the_config_validation() -> None:
    listed = subprocess.run([sys.executable, str(SWEEP), "--list"], capture_output=True, text=True, check=True,
                            cwd=REPO).stdout.splitlines()
    assert len(listed) == 7 * 14, listed
    assert not [line for line in listed if "refused" in line]


@pytest.mark.slow
def test_one_objective_runs_and_matches_one_process(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    done = subprocess.run([sys.executable, str(SWEEP), "--objective", "tied", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 14 and all(row["status"] == "ok" for row in rows), rows
    assert max(row["max_rel_diff"] for row in rows) <= 1e-5
