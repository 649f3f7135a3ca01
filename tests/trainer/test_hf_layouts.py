"""Export is layout-free: a TP=2 × PP=2 checkpoint and a TP=1 checkpoint of the same weights give the same HF files."""

from __future__ import annotations

import json
from pathlib import Path

import deepspeed  # noqa: F401  - import once in the parent so forked ranks start fast
import megatron.core.tensor_parallel  # noqa: F401
import pytest
import torch
from safetensors.torch import load_file

from trainer.config import load_config
from trainer.testing import run_distributed

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
BASE = ["train.log_interval_steps=1", "train.eval_interval_steps=0", "logging.tensorboard=false",
        "checkpoint.save_interval_steps=2", "train.max_steps=2", "optim.warmup_steps=1"]


def _train(rank: int, world_size: int, overrides: list[str]) -> None:
    from trainer.train import train

    train(load_config(TINY, overrides))


def _save_the_same_weights_in_another_layout(rank: int, world_size: int, overrides: list[str]) -> None:
    """Build the run in the new layout with the TP=1 checkpoint's weights (init_from slices each tensor exactly) and
    save it at once, with no step in between that could change a weight."""
    from trainer.bootstrap import init_parallel
    from trainer.checkpoint.hooks import Checkpointer, StopSignals
    from trainer.hooks import TrainState
    from trainer.train import build_run

    cfg = load_config(TINY, overrides)
    derived = cfg.validate_for_world(world_size)
    ctx = init_parallel(cfg.parallel.tp, cfg.parallel.pp)
    run = build_run(cfg, derived, ctx, Path(derived.run_dir))
    assert (ctx.tp, ctx.pp) == (2, 2)
    Checkpointer(run, StopSignals()).save(run, TrainState(step=2), "test", blocking=True)


def _export(checkpoints: Path, out: Path) -> dict[str, torch.Tensor]:
    from launch.cli import main

    assert main(["convert", "to-hf", "--checkpoint", str(checkpoints), "--no-tokenizer", "--output", str(out)]) == 0
    return load_file(out / "model.safetensors")


def test_export_from_tp2_pp2_checkpoint_equals_export_from_tp1(tmp_path: Path) -> None:
    tp1_run, tp2pp2_run = tmp_path / "tp1", tmp_path / "tp2pp2"
    run_distributed(_train, 1, [*BASE, f"logging.run_dir={tp1_run}"], timeout_s=300)
    run_distributed(_save_the_same_weights_in_another_layout, 4,
                    [*BASE, f"logging.run_dir={tp2pp2_run}", "parallel.tp=2", "parallel.pp=2",
                     f"checkpoint.init_from={tp1_run / 'checkpoints' / 'step_2'}"], timeout_s=300)
    saved = json.loads((tp2pp2_run / "checkpoints" / "step_2" / "metadata.json").read_text())["topology"]
    assert (saved["tp"], saved["pp"]) == (2, 2)

    from_tp1 = _export(tp1_run / "checkpoints", tmp_path / "hf_tp1")
    from_tp2pp2 = _export(tp2pp2_run / "checkpoints", tmp_path / "hf_tp2pp2")
    assert sorted(from_tp1) == sorted(from_tp2pp2)
    different = [name for name in from_tp1 if not torch.equal(from_tp1[name], from_tp2pp2[name])]
    assert different == [], f"tensors differ between the layouts: {different}"
    assert (tmp_path / "hf_tp1" / "config.json").read_text() == (tmp_path / "hf_tp2pp2" / "config.json").read_text()
