"""train() leaves nothing behind in a caller that goes on: the engine, the model and the optimizer state are freed
when it returns (the quickstart exports and samples in the same process; a sweep or notebook trains again; on a GPU
what stays behind stays in its memory). DeepSpeed's ZeRO optimizers hold their gradient hooks through C++ autograd
nodes, which Python's GC cannot collect, until engine.destroy(); ZeRO-3 also keeps the model in a module-level stack
and an lru_cache (trainer.train.release_run)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest

from trainer.config import load_config
from trainer.hooks import Hook
from trainer.testing import run_distributed

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


class KeepWeakRefs(Hook):
    def on_train_end(self, run: Any, state: Any) -> None:
        self.refs = {"engine": weakref.ref(run.engine), "model": weakref.ref(run.model.module),
                     "optimizer": weakref.ref(run.engine.optimizer)}


def _train_then_collect(rank: int, world_size: int, overrides: list[str], run_dir: str) -> dict[str, bool]:
    from trainer.train import train

    hook = KeepWeakRefs()
    train(load_config(TINY, [*overrides, "train.max_steps=2", "optim.warmup_steps=1", "train.log_interval_steps=1",
                             "train.eval_interval_steps=0", "logging.tensorboard=false",
                             f"logging.run_dir={run_dir}"]), extra_hooks=[hook])
    gc.collect()
    return {name: ref() is None for name, ref in hook.refs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["zero.stage=1"], ["zero.stage=2"], ["zero.stage=3"], ["parallel.pp=2"]],
                         ids=["zero1", "zero2", "zero3", "pp2"])
def test_train_frees_engine_model_and_optimizer_when_it_returns(overrides: list[str], tmp_path: Path) -> None:
    freed = run_distributed(_train_then_collect, 2, overrides, str(tmp_path / "run"), timeout_s=180)
    assert freed == [{"engine": True, "model": True, "optimizer": True}] * 2
