"""README.md's command blocks, run as a newcomer runs them: in order, in a fresh copy of the repository.

Every ```bash block of the README is extracted and run with bash (`set -euo pipefail`) in a copy of the tracked
files (what a fresh clone holds: no runs/, no data/), one block after the other, so a later block sees what the
earlier ones wrote, exactly as a reader following the README does. Changes to the commands, all listed here:
- `pip install ...` is left out: the package is installed already (the test must not reinstall it into the
  environment the suite runs in);
- `python -m pytest` is left out: it is this very suite;
- `pretrain submit` without `--dry-run` is left out: it needs a Slurm cluster with the README's partition and
  account (tests/launch/test_submit.py submits real jobs to the localhost cluster);
- commands that train get `train.max_steps=N` appended (later overrides win), to keep CI short: the README says
  that `pretrain quickstart train.max_steps=20` is a smoke run, and the other step counts are only how long the
  example trains. MAX_STEPS below lists them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# command prefix -> steps it trains in this test (the README's own counts: quickstart 300, train 200, launch 50).
MAX_STEPS = {"pretrain quickstart": 20, "pretrain train": 20, "pretrain launch local": 10}
BLOCK_TIMEOUT_S = 600
_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_blocks(readme: str) -> list[str]:
    return [match.group(1) for match in _BLOCK.finditer(readme)]


def logical_lines(block: str) -> list[str]:
    """Lines with their `\\` continuations joined: one shell command each."""
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def as_test_command(line: str) -> str | None:
    """The command as this test runs it (None: left out, see the module docstring)."""
    parts = [part.strip() for part in line.split("&&")]
    kept = [part for part in parts if not part.startswith(("pip install", "python -m pytest"))]
    if not kept:
        return None
    command = " && ".join(kept)
    if command.startswith("pretrain submit") and "--dry-run" not in command:
        return None
    for prefix, steps in MAX_STEPS.items():
        if command.startswith(prefix) and "--dry-run" not in command:
            code, _, comment = command.partition("  #")  # keep the README's trailing comment out of the arguments
            return f"{code.rstrip()} train.max_steps={steps}" + (f"  #{comment}" if comment else "")
    return command


def test_rewrite_rules() -> None:
    assert as_test_command("pip install torch==2.13.0 && pip install -e . && pretrain quickstart") == (
        "pretrain quickstart train.max_steps=20")
    assert as_test_command('pip install -e ".[dev]" && python -m pytest') is None
    assert as_test_command("pretrain submit --config c.yaml launch.chain_jobs=3") is None
    dry_run = "pretrain train --config c.yaml --dry-run  # x"
    assert as_test_command(dry_run) == dry_run
    assert as_test_command("pretrain launch local --nproc 2 --config c.yaml  # torchrun") == (
        "pretrain launch local --nproc 2 --config c.yaml train.max_steps=10  # torchrun")
    assert logical_lines("a \\\n    b\n\nc\n") == ["a" + " " * 6 + "b", "c"]


def fresh_copy(dest: Path) -> Path:
    """The tracked files of this checkout (with their current content), as a fresh clone would hold them."""
    listed = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z"], capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell the tracked files from build outputs")
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def user_environment(clone: Path, tmp_path: Path) -> dict[str, str]:
    """The shell of a user who installed the package from the clone: `pretrain` on PATH (a shim if this environment
    lacks the console script) running the clone's code (PYTHONPATH goes before an editable install's finder), and
    no thread cap from the test session (the user's commands choose their own)."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(clone), env.get("PYTHONPATH")]))
    if shutil.which("pretrain") is None:
        shim_dir = tmp_path / "bin"
        shim_dir.mkdir()
        (shim_dir / "pretrain").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m launch "$@"\n')
        (shim_dir / "pretrain").chmod(0o755)
        env["PATH"] = f"{shim_dir}{os.pathsep}{env['PATH']}"
    return env


def test_every_readme_command_block_runs_in_order_in_a_fresh_copy(tmp_path: Path) -> None:
    clone = fresh_copy(tmp_path / "clone")
    env = user_environment(clone, tmp_path)
    blocks = readme_blocks((clone / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 6, "the README's command blocks were not found"
    for number, block in enumerate(blocks, start=1):
        commands = [command for line in logical_lines(block) if (command := as_test_command(line))]
        if not commands:
            continue
        script = "set -euo pipefail\n" + "\n".join(commands) + "\n"
        start_s = time.perf_counter()
        result = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True,
                                timeout=BLOCK_TIMEOUT_S)
        # With -s: how long each block took (the README promises minutes; this is where to look).
        print(f"block {number}: {time.perf_counter() - start_s:.1f} s  {commands[0][:70]}", flush=True)
        output = result.stdout + result.stderr
        where = f"README block {number}:\n{script}\n--- output (tail) ---\n{output[-4000:]}"
        assert result.returncode == 0, where
        assert "Traceback (most recent call last)" not in output, where
        assert "recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS" not in output, where
    # The README's tiny runs have their own run directories: the launch did not resume the vocab-2000 run.
    assert (clone / "runs/tiny-py/checkpoints").is_dir() and (clone / "runs/tiny/checkpoints").is_dir()
