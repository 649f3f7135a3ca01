"""`pretrain convert average`: the mean of checkpoints saved in different layouts, then used as any imported weights
(evaluated with `pretrain eval --weights`, exported with `convert to-hf`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoint import read_full_state_dict

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
BASE = ["optim.warmup_steps=1", "train.log_interval_steps=2", "train.eval_interval_steps=0",
        "checkpoint.save_interval_steps=2", "checkpoint.keep_last=5"]


def pretrain(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=240)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """step_2 and step_4 saved by DP 2 (ZeRO-1), step_6 by TP 2 after a resume."""
    run_dir = tmp_path_factory.mktemp("avg") / "run"
    for overrides in (["train.max_steps=4", "zero.stage=1"], ["train.max_steps=6", "parallel.tp=2"]):
        out = pretrain("launch", "local", "--nproc", "2", "--config", TINY, *BASE, *overrides,
                       f"logging.run_dir={run_dir}")
        assert out.returncode == 0, out.stderr[-3000:]
    return run_dir / "checkpoints"


def test_the_average_is_the_mean_of_the_checkpoints_in_any_layout(checkpoints: Path, tmp_path: Path) -> None:
    out = pretrain("convert", "average", "--checkpoint", str(checkpoints), "--last", "3", "--output",
                   str(tmp_path / "avg"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "averaged 3 checkpoints" in out.stdout
    averaged = load_file(str(tmp_path / "avg" / "model.safetensors"))
    states = [read_full_state_dict(checkpoints / f"step_{step}")[0] for step in (2, 4, 6)]
    assert sorted(averaged) == sorted(states[0])
    for name, got in averaged.items():
        want = sum(state[name][: got.shape[0]].double() for state in states) / 3
        # fp32 sums of three, then a division: a few float32 roundings of values of that size.
        worst = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert worst <= 4 * torch.finfo(torch.float32).eps, (name, worst)
        assert not torch.equal(got, states[2][name][: got.shape[0]])  # it moved: not just the last checkpoint

    # As imported weights: evaluated in its own right, exported to HF, a fresh run's init_from.
    config = str(checkpoints / "step_6" / "config.yaml")
    evaluated = pretrain("eval", "--weights", str(tmp_path / "avg" / "model.safetensors"), "--config", config,
                         "parallel.tp=1", "--json", str(tmp_path / "eval.json"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())[0]["val_loss"] > 0
    exported = pretrain("convert", "to-hf", "--state-dict", str(tmp_path / "avg" / "model.safetensors"), "--config",
                        str(tmp_path / "avg" / "model.yaml"), "--no-tokenizer", "--output", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr[-3000:]


def test_what_cannot_be_averaged_is_refused(checkpoints: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    out = pretrain("train", "--config", TINY, *BASE, "train.max_steps=2", "model.hidden_size=32",
                   "model.intermediate_size=96", f"logging.run_dir={other}")
    assert out.returncode == 0, out.stderr[-3000:]
    cases = [
        (["--checkpoint", str(checkpoints / "step_2"), "--checkpoint", str(other / "checkpoints")],
         "has model.hidden_size=64 but"),
        (["--checkpoint", str(checkpoints), "--last", "9"], "--last 9: "),
        (["--checkpoint", str(checkpoints), "--checkpoint", str(checkpoints / "step_6")],
         "at least 2 different checkpoints"),  # the directory's newest is step_6 itself
    ]
    for args, message in cases:
        refused = pretrain("convert", "average", *args, "--output", str(tmp_path / "avg"))
        assert refused.returncode == 2 and message in refused.stderr, (args, refused.stderr[-2000:])
        assert "Traceback" not in refused.stderr
