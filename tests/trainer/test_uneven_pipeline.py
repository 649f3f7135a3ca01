"""Uneven pipeline stages (parallel.pipeline_stage_layers) train like one process, and checkpoints move between splits.

The tiny config with 5 decoder layers (so no pp > 1 divides it evenly) trains for 6 steps (fp32, warmup, cosine decay,
active clipping, saves at steps 2, 4, 6) through trainer.train on forked gloo ranks, as in test_parallel_training.py
and test_checkpoint_resume.py:
- pp 2 as [2, 3] and pp 3 as [1, 3, 1] give the single-process per-step losses and grad norms;
- a checkpoint saved under [2, 3] resumes at step 2 under one process (pp 1), under pp 3 as [1, 3, 1] and under
  pp 2 as [3, 2], and one saved by one process resumes under [1, 3, 1]: the same losses for steps 3-6 and the same
  final weights and Adam moments. Checkpoints key on canonical layer names (trainer.parallelize.canonical_name), so
  nothing in the format knows the split.

Tolerance: relative 1e-5 per step, as in those files (a wrong stage boundary or a lost layer is off by far more: the
5-layer model's losses differ from the 4-layer one's by > 1e-2 from step 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Imported once here so the forked ranks start in ~0.3 s instead of re-importing (notes/megatron-core-cpu.md).
import deepspeed  # noqa: F401
import megatron.core.parallel_state  # noqa: F401
import megatron.core.tensor_parallel  # noqa: F401
import pytest
import torch
import torch._dynamo  # noqa: F401

from trainer.checkpoint.layout import iter_full_tensors
from trainer.config import load_config
from trainer.testing import run_distributed

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
BASE = ["model.num_layers=5", "train.max_steps=6", "train.log_interval_steps=1", "train.eval_interval_steps=0",
        "optim.warmup_steps=2", "optim.grad_clip=0.5", "logging.tensorboard=false",
        "checkpoint.save_interval_steps=2", "checkpoint.keep_last=5"]
REL_TOL = 1e-5
SPLITS = {
    "single": (1, []),
    "pp2-[2,3]": (2, ["parallel.pp=2", "parallel.pipeline_stage_layers=[2,3]"]),
    "pp2-[3,2]": (2, ["parallel.pp=2", "parallel.pipeline_stage_layers=[3,2]"]),
    "pp3-[1,3,1]": (3, ["parallel.pp=3", "parallel.pipeline_stage_layers=[1,3,1]"]),
}


def _train(rank: int, world_size: int, overrides: list[str], run_dir: str) -> None:
    from trainer.train import train

    train(load_config(TINY, [*BASE, f"logging.run_dir={run_dir}", *overrides]))


def run(split: str, run_dir: Path, *extra: str) -> dict[str, Any]:
    world_size, overrides = SPLITS[split]
    run_distributed(_train, world_size, [*overrides, *extra], str(run_dir), timeout_s=300)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = run_dir / "checkpoints" / "step_6"
    return {"losses": {r["step"]: r["loss"] for r in records if r["kind"] == "train"},
            "grad_norms": {r["step"]: r["grad_norm"] for r in records if r["kind"] == "train"},
            "checkpoints": run_dir / "checkpoints",
            "tensors": {kind: dict(iter_full_tensors(final, kind)) for kind in ("param", "exp_avg", "exp_avg_sq")}}


def rel_diff(got: dict[int, float], want: dict[int, float], steps: list[int]) -> float:
    return max(abs(got[step] - want[step]) / abs(want[step]) for step in steps)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Full 6-step runs, each made on first use and shared by the tests below."""

    class Lazy(dict):
        def __missing__(self, split: str) -> dict[str, Any]:
            self[split] = run(split, tmp_path_factory.mktemp(split.replace("[", "").replace("]", "")))
            return self[split]

    return Lazy()


@pytest.mark.parametrize("split", ["pp2-[2,3]", "pp3-[1,3,1]"])
def test_uneven_stages_match_single_process(split: str, runs: dict) -> None:
    got, want = runs[split], runs["single"]
    steps = list(range(1, 7))
    assert list(got["losses"]) == steps
    assert rel_diff(got["losses"], want["losses"], steps) <= REL_TOL, (got["losses"], want["losses"])
    assert rel_diff(got["grad_norms"], want["grad_norms"], steps) <= 1e-4  # the same clipping
    assert want["losses"][6] < want["losses"][1] - 0.1  # it learns (measured 5.55 → 5.38): not two flat lines
    topology = json.loads((got["checkpoints"] / "step_6" / "metadata.json").read_text())["topology"]
    assert topology["stage_layers"] == json.loads(SPLITS[split][1][1].split("=", 1)[1])  # recorded, informative


@pytest.mark.parametrize(("source", "target"), [
    pytest.param("pp2-[2,3]", "single", id="uneven-pp2-to-pp1"),
    pytest.param("pp2-[2,3]", "pp3-[1,3,1]", id="uneven-pp2-to-uneven-pp3"),
    pytest.param("pp2-[2,3]", "pp2-[3,2]", id="uneven-pp2-to-other-split"),
    pytest.param("single", "pp3-[1,3,1]", id="pp1-to-uneven-pp3"),
])
def test_resume_under_another_split_continues_the_same_losses(source: str, target: str, runs: dict,
                                                              tmp_path: Path) -> None:
    saved = runs[source]
    resumed = run(target, tmp_path, f"checkpoint.resume={saved['checkpoints'] / 'step_2'}")
    assert list(resumed["losses"]) == [3, 4, 5, 6]
    assert rel_diff(resumed["losses"], saved["losses"], [3, 4, 5, 6]) <= REL_TOL
    for kind, tensors in saved["tensors"].items():
        assert set(resumed["tensors"][kind]) == set(tensors), kind  # every layer, under its canonical name
        for name, tensor in tensors.items():
            torch.testing.assert_close(resumed["tensors"][kind][name], tensor, rtol=1e-4, atol=1e-5)
