"""`pretrain eval` (trainer/eval_checkpoint.py): a checkpoint's validation loss equals what its run logged at that
step, in the run's layout (exactly) and in others (within the layout tolerance of test_parallel_training), on other
data with no training split, and every impossible request ends with exit 2 and what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Imported once here so the forked ranks start in ~0.3 s instead of re-importing (notes/megatron-core-cpu.md).
import deepspeed  # noqa: F401
import megatron.core.tensor_parallel  # noqa: F401
import numpy as np
import pytest

from trainer.config import load_config
from trainer.testing import run_distributed

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
REL_TOL = 1e-5  # another layout sums in another order (test_parallel_training.py)


def pretrain(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=240)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The tiny config, 6 steps, evaluated and saved at steps 3 and 6 (one process, synthetic data)."""
    run_dir = tmp_path_factory.mktemp("run")
    out = pretrain("train", "--config", str(TINY), "train.max_steps=6", "train.eval_interval_steps=3",
                   "checkpoint.save_interval_steps=3", f"logging.run_dir={run_dir}", "logging.tensorboard=false")
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"dir": run_dir, "val": {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}}


def test_eval_gives_the_loss_the_run_logged_at_that_step(trained: dict, tmp_path: Path) -> None:
    ckpts = trained["dir"] / "checkpoints"
    newest = pretrain("eval", "--checkpoint", str(ckpts), "--json", str(tmp_path / "e.json"))
    assert newest.returncode == 0, newest.stderr[-3000:]
    (summary,) = json.loads((tmp_path / "e.json").read_text())
    assert (summary["step"], summary["checkpoint"]) == (6, str(ckpts / "step_6"))
    assert summary["val_loss"] == trained["val"][6]  # same layout, same samples: the same number
    assert f"6     {trained['val'][6]:.4f}" in newest.stdout
    # Every checkpoint, oldest first, each loaded in turn into the one engine: each gives its own logged number.
    every = pretrain("eval", "--checkpoint", str(ckpts), "--every", "--json", str(tmp_path / "every.json"))
    assert every.returncode == 0, every.stderr[-3000:]
    assert [(s["step"], s["val_loss"]) for s in json.loads((tmp_path / "every.json").read_text())] == \
        [(3, trained["val"][3]), (6, trained["val"][6])]


def _evaluate(rank: int, world_size: int, checkpoint: str, overrides: list[str]) -> float:
    from trainer.eval_checkpoint import evaluate_checkpoints

    cfg = load_config(Path(checkpoint) / "config.yaml", overrides)
    (evaluated,) = evaluate_checkpoints(cfg, [Path(checkpoint)])
    return evaluated.result.loss


@pytest.mark.parametrize("overrides", [["parallel.tp=2"], ["parallel.pp=2"], ["zero.stage=3"]],
                         ids=["tp2", "pp2", "zero3-dp2"])
def test_eval_in_another_layout_gives_the_same_loss(trained: dict, overrides: list[str]) -> None:
    losses = run_distributed(_evaluate, 2, str(trained["dir"] / "checkpoints" / "step_6"), overrides, timeout_s=180)
    for loss in losses:  # every rank returns the global value
        assert abs(loss - trained["val"][6]) <= REL_TOL * trained["val"][6], (loss, trained["val"][6])


def _evaluate_weights(rank: int, world_size: int, checkpoint: str, overrides: list[str]) -> float:
    from trainer.eval_checkpoint import evaluate_weights

    cfg = load_config(Path(checkpoint) / "config.yaml", overrides)
    (evaluated,) = evaluate_weights(cfg, [Path(checkpoint)])
    return evaluated.result.loss


def test_weights_without_their_training_state_give_the_same_loss(trained: dict, tmp_path: Path) -> None:
    """--weights: a checkpoint read as checkpoint.init_from reads it (weights only, before the engine is built, so
    ZeRO-3 partitions them) gives the loss its run logged; so does the HF export of it, through the CLI."""
    step_6 = trained["dir"] / "checkpoints" / "step_6"
    for loss in run_distributed(_evaluate_weights, 2, str(step_6), ["zero.stage=3"], timeout_s=180):
        assert abs(loss - trained["val"][6]) <= REL_TOL * trained["val"][6], (loss, trained["val"][6])
    assert pretrain("convert", "to-hf", "--checkpoint", str(step_6), "--no-tokenizer", "--output",
                    str(tmp_path / "hf")).returncode == 0
    out = pretrain("eval", "--weights", str(tmp_path / "hf"), "--config", str(step_6 / "config.yaml"), "--json",
                   str(tmp_path / "e.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    (summary,) = json.loads((tmp_path / "e.json").read_text())
    assert summary["step"] == 0 and summary["val_loss"] == pytest.approx(trained["val"][6], rel=REL_TOL)
    refused = pretrain("eval", "--weights", str(tmp_path / "hf"))
    assert refused.returncode == 2 and "--weights needs --config" in refused.stderr


def test_eval_starts_its_own_processes_with_nproc(trained: dict, tmp_path: Path) -> None:
    """`--nproc 2`: torchrun here, as `launch local` starts it; one table (rank 0), the run's loss under TP 2."""
    out = pretrain("eval", "--nproc", "2", "--checkpoint", str(trained["dir"] / "checkpoints"), "parallel.tp=2",
                   "--json", str(tmp_path / "e.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    (summary,) = json.loads((tmp_path / "e.json").read_text())
    assert abs(summary["val_loss"] - trained["val"][6]) <= REL_TOL * trained["val"][6]
    assert out.stdout.count("step  val_loss") == 1


def test_eval_on_other_data_without_a_training_split(trained: dict, tmp_path: Path) -> None:
    from data_pipeline.manifest import write_dataset_from_arrays

    rng = np.random.default_rng(0)
    write_dataset_from_arrays(tmp_path / "web", {"test": rng.integers(0, 256, (32, 65))}, samples_per_shard=16)
    write_dataset_from_arrays(tmp_path / "same", {"test": np.full((16, 65), 255)}, samples_per_shard=16)
    write_dataset_from_arrays(tmp_path / "train-only", {"train": np.full((16, 65), 255)}, samples_per_shard=16)
    datasets = (f"data.datasets=[{{path: {tmp_path / 'web'}}}, {{path: {tmp_path / 'same'}}}, "
                f"{{path: {tmp_path / 'train-only'}}}]")
    out = pretrain("eval", "--checkpoint", str(trained["dir"] / "checkpoints"), "--json", str(tmp_path / "e.json"),
                   "data.synthetic=false", datasets, "data.eval_split=test", "data.num_workers=0")
    assert out.returncode == 0, out.stderr[-3000:]
    (summary,) = json.loads((tmp_path / "e.json").read_text())
    per_dataset = summary["per_dataset"]
    assert sorted(per_dataset) == [str(tmp_path / "same"), str(tmp_path / "web")]
    # web: 32 samples / micro 4 = 8 micro-batches (eval_steps 2 x grad_accum 4 = 8 at most); same: 16 / 4 = 4.
    assert summary["num_microbatches_per_rank"] == 12
    assert summary["val_loss"] == pytest.approx((8 * per_dataset[str(tmp_path / "web")]
                                                 + 4 * per_dataset[str(tmp_path / "same")]) / 12, rel=1e-6)
    assert out.stdout.splitlines()[0].split() == ["step", "val_loss", "perplexity", "web", "same", "checkpoint"]
    assert f"{tmp_path / 'train-only'} has no 'test' split (it has train): not evaluated" in out.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["train.eval_steps=0"], "train.eval_steps is 0, so there is nothing to evaluate"),
    (["data.eval_split=nope", "data.synthetic=false", "data.datasets=[{path: DATA}]"],
     "no dataset of data.datasets has a 'nope' split"),
])
def test_impossible_requests_exit_2_with_the_fix(trained: dict, tmp_path: Path, args: list[str], message: str) -> None:
    from data_pipeline.manifest import write_dataset_from_arrays

    write_dataset_from_arrays(tmp_path / "data", {"val": np.zeros((8, 65), dtype=np.int64)}, samples_per_shard=8)
    args = [arg.replace("DATA", str(tmp_path / "data")) for arg in args]
    out = pretrain("eval", "--checkpoint", str(trained["dir"] / "checkpoints"), *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]


def test_a_directory_without_checkpoints_exits_2(tmp_path: Path) -> None:
    out = pretrain("eval", "--checkpoint", str(tmp_path))
    assert out.returncode == 2 and "no checkpoint with a config.yaml" in out.stderr, out.stderr[-3000:]
    with_config = pretrain("eval", "--checkpoint", str(tmp_path), "--config", str(TINY))
    assert with_config.returncode == 2 and "no complete, intact checkpoint" in with_config.stderr, with_config.stderr
