"""Resume is bit-exact in the same layout and continues the same losses in another one (TP, PP, DP, ZeRO stage).

Each source run trains the tiny config for 6 steps (fp32, warmup, cosine decay, active clipping) and saves at steps
2, 4 and 6. A second run resumes from step_2 (checkpoint.resume=<path>) and trains steps 3-6; its losses (from
metrics.jsonl, the global-batch mean) and its final checkpoint (weights and both Adam moments) are compared with the
source run's.

Tolerances: same layout → exactly equal (==, torch.equal; also for bf16 weights with an fp32 master). Another layout → relative 1e-5 per step, like
test_parallel_training (measured: 0 for TP 2→1 and PP 2→1, <= 9.2e-8 for DP 2→1, 1→2, ZeRO-2→3 and TP1 → TP2×PP2;
final weights within 1.4e-7 absolute). Resumed runs load with every unpickler disabled.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

# Imported once here so the forked ranks start in ~0.3 s instead of re-importing (notes/megatron-core-cpu.md).
import deepspeed  # noqa: F401
import megatron.core.parallel_state  # noqa: F401
import megatron.core.tensor_parallel  # noqa: F401
import pytest
import torch
import torch._dynamo  # noqa: F401

from trainer.checkpoint.layout import iter_full_tensors, read_metadata
from trainer.config import load_config
from trainer.testing import run_distributed

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
BASE = ["train.max_steps=6", "train.log_interval_steps=1", "train.eval_interval_steps=0", "optim.warmup_steps=2",
        "optim.grad_clip=0.5", "logging.tensorboard=false", "checkpoint.save_interval_steps=2",
        "checkpoint.keep_last=5"]
REL_TOL = 1e-5


def _train(rank: int, world_size: int, overrides: list[str], run_dir: str, forbid_pickle: bool) -> None:
    from trainer.train import train

    if forbid_pickle:
        _forbid_unpickling()
    train(load_config(TINY, [*BASE, f"logging.run_dir={run_dir}", *overrides]))


def _forbid_unpickling() -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("resuming a checkpoint tried to unpickle")

    pickle.load = pickle.loads = pickle.Unpickler = torch.load = refuse  # only inside this forked rank


def run(world_size: int, overrides: list[str], run_dir: Path, forbid_pickle: bool = False) -> dict[str, Any]:
    run_distributed(_train, world_size, overrides, str(run_dir), forbid_pickle, timeout_s=300)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = run_dir / "checkpoints" / "step_6"
    return {"losses": {r["step"]: r["loss"] for r in records if r["kind"] == "train"},
            "lrs": {r["step"]: r["lr"] for r in records if r["kind"] == "train"},
            "tokens": {r["step"]: r["consumed_tokens"] for r in records if r["kind"] == "train"},
            "checkpoints": run_dir / "checkpoints", "final": final, "meta": read_metadata(final),
            "tensors": {kind: dict(iter_full_tensors(final, kind)) for kind in ("param", "exp_avg", "exp_avg_sq")}}


def resume(source: dict[str, Any], world_size: int, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    return run(world_size, [*overrides, f"checkpoint.resume={source['checkpoints'] / 'step_2'}"], run_dir,
               forbid_pickle=True)


SOURCES = {
    "single": (1, []),
    "dp2-zero1-async": (2, ["zero.stage=1", "checkpoint.async_save=true"]),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2-zero2": (2, ["zero.stage=2"]),
    "bf16-dp2-zero0": (2, ["precision.dtype=bf16"]),  # DeepSpeed's FP16_UnfusedOptimizer holds the fp32 master
    # Tied embeddings: one tensor in one process; two copies over pipeline stages, of which only the first is saved
    "tied-single": (1, ["model.tie_embeddings=true"]),
    "tied-pp2": (2, ["model.tie_embeddings=true", "parallel.pp=2"]),
}


@pytest.fixture(scope="module")
def source_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    cache: dict[str, dict[str, Any]] = {}

    class Lazy(dict):
        def __missing__(self, name: str) -> dict[str, Any]:
            world_size, overrides = SOURCES[name]
            cache[name] = run(world_size, overrides, tmp_path_factory.mktemp(name))
            return cache[name]

    return Lazy()


@pytest.mark.parametrize("layout", ["dp2-zero1-async", "tp2", "pp2", "bf16-dp2-zero0"])
def test_resume_in_the_same_layout_is_bit_exact(layout: str, source_runs: dict, tmp_path: Path) -> None:
    source = source_runs[layout]
    world_size, overrides = SOURCES[layout]
    resumed = resume(source, world_size, overrides, tmp_path)
    assert list(resumed["losses"]) == [3, 4, 5, 6]
    assert [resumed["losses"][s] for s in (3, 4, 5, 6)] == [source["losses"][s] for s in (3, 4, 5, 6)]
    for kind, tensors in source["tensors"].items():
        for name, tensor in tensors.items():
            assert torch.equal(resumed["tensors"][kind][name], tensor), (kind, name)
    for key in ("consumed_samples", "consumed_tokens"):
        assert resumed["meta"][key] == source["meta"][key]
    # 6 applied steps (FP16_UnfusedOptimizer takes one more at construction, on zero gradients, in both runs).
    assert resumed["meta"]["trainer_state"]["adam_step"] == source["meta"]["trainer_state"]["adam_step"] in (6.0, 7.0)
    assert resumed["meta"]["trainer_state"]["lr_scheduler"] == source["meta"]["trainer_state"]["lr_scheduler"]


def test_a_resume_with_a_larger_batch_counts_the_tokens_trained_step_by_step(source_runs: dict,
                                                                           tmp_path: Path) -> None:
    """Steps 1-2 of 16 samples, then 3-6 of 32 (64 tokens each): the tokens axis must not recount steps 1-2 at the
    new batch size, in metrics.jsonl and in the checkpoint."""
    resumed = resume(source_runs["single"], 1, ["train.global_batch_size=32"], tmp_path)
    assert resumed["tokens"] == {step: (2 * 16 + (step - 2) * 32) * 64 for step in (3, 4, 5, 6)}
    assert resumed["meta"]["consumed_tokens"] == resumed["tokens"][6]
    assert resumed["meta"]["consumed_samples"] == 2 * 16 + 4 * 32


RESHARD = [
    pytest.param("tp2", 1, [], id="tp2-to-tp1"),
    pytest.param("pp2", 1, [], id="pp2-to-pp1"),
    pytest.param("dp2-zero1-async", 1, ["zero.stage=1"], id="dp2-to-dp1"),
    pytest.param("single", 2, ["zero.stage=2"], id="dp1-to-dp2-zero2"),
    pytest.param("dp2-zero2", 2, ["zero.stage=3"], id="zero2-to-zero3"),
    pytest.param("single", 4, ["parallel.tp=2", "parallel.pp=2"], id="tp1-to-tp2xpp2"),
    pytest.param("tied-pp2", 1, ["model.tie_embeddings=true"], id="tied-pp2-to-pp1"),
    pytest.param("tied-single", 4, ["model.tie_embeddings=true", "parallel.pp=2", "zero.stage=1"],
                 id="tied-pp1-to-pp2xdp2-zero1"),
]


@pytest.mark.parametrize(("layout", "world_size", "overrides"), RESHARD)
def test_resume_in_another_layout_continues_the_same_losses(layout: str, world_size: int, overrides: list[str],
                                                             source_runs: dict, tmp_path: Path) -> None:
    source = source_runs[layout]
    resumed = resume(source, world_size, overrides, tmp_path)
    for step in (3, 4, 5, 6):
        assert abs(resumed["losses"][step] - source["losses"][step]) <= REL_TOL * abs(source["losses"][step]), step
    for kind, tensors in source["tensors"].items():
        for name, tensor in tensors.items():
            torch.testing.assert_close(resumed["tensors"][kind][name], tensor, rtol=1e-4, atol=1e-5)
    assert resumed["meta"]["topology"]["world_size"] == world_size
    assert resumed["meta"]["consumed_samples"] == source["meta"]["consumed_samples"]


def test_a_cooldown_branched_from_a_stable_checkpoint_is_the_planned_wsd_run(tmp_path: Path) -> None:
    """Warmup-stable-decay as it is used: train at the peak LR with no end in mind, then branch a cooldown from a
    stable-phase checkpoint by resuming with a decay. That must be the run that planned the decay from the start."""
    wsd = ["optim.decay=1-sqrt", "optim.decay_steps=3"]  # warmup: steps 1-2; peak: 3-4 (the decay's first); decay: 5-6
    planned = run(1, wsd, tmp_path / "planned")
    stable = run(1, ["optim.decay=constant"], tmp_path / "stable")
    cooldown = run(1, [*wsd, f"checkpoint.resume={stable['checkpoints'] / 'step_4'}"], tmp_path / "cooldown")
    peak_lr = load_config(TINY).optim.lr
    assert [planned["lrs"][s] for s in (3, 4)] == [peak_lr] * 2
    assert planned["lrs"][5] == pytest.approx(peak_lr * (0.1 + 0.9 * (1 - (1 / 3) ** 0.5)), rel=1e-12)
    assert [stable["lrs"][s] for s in (1, 2, 3, 4)] == [planned["lrs"][s] for s in (1, 2, 3, 4)]
    assert stable["lrs"][5] == peak_lr  # what the branch changes
    assert list(cooldown["losses"]) == [5, 6]
    assert [cooldown["lrs"][s] for s in (5, 6)] == [planned["lrs"][s] for s in (5, 6)]
    assert [cooldown["losses"][s] for s in (5, 6)] == [planned["losses"][s] for s in (5, 6)]
    for kind, tensors in planned["tensors"].items():
        for name, tensor in tensors.items():
            assert torch.equal(cooldown["tensors"][kind][name], tensor), (kind, name)


RAMPUP = ["train.batch_size_rampup={start: 4, increment: 4, samples: 24}"]  # global batches 4, 4, 8, 12, then 16


@pytest.mark.parametrize(("world_size", "overrides"), [(1, []), (2, ["parallel.pp=2"])], ids=["same-layout", "pp2"])
def test_resume_inside_a_batch_size_rampup_continues_it(tmp_path: Path, world_size: int,
                                                         overrides: list[str]) -> None:
    """Saved at step 2 (batch 4), resumed: steps 3-6 take 8, 12, 16, 16 samples from the same place in the data, so
    the losses are the uninterrupted run's (bit for bit in its layout)."""
    source = run(1, RAMPUP, tmp_path / "source")
    assert source["meta"]["consumed_samples"] == 4 + 4 + 8 + 12 + 16 + 16
    resumed = resume(source, world_size, [*RAMPUP, *overrides], tmp_path / "resumed")
    assert resumed["meta"]["consumed_samples"] == source["meta"]["consumed_samples"]
    for step in (3, 4, 5, 6):
        if world_size == 1:
            assert resumed["losses"][step] == source["losses"][step], step
        else:
            assert abs(resumed["losses"][step] - source["losses"][step]) <= REL_TOL * source["losses"][step], step
