"""Bucketed reads of ZeRO state (FragmentAccess.read_all: one all_reduce per bucket and value) give bit for bit what
DeepSpeed's per-parameter getters give, for ZeRO-1/2, BF16_Optimizer and ZeRO-3 (per parameter), before the first
Adam step (zero moments) and after, with buckets small enough that parameters share, fill and overflow them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Imported once here so the forked ranks start in ~0.3 s instead of re-importing (notes/megatron-core-cpu.md).
import deepspeed  # noqa: F401
import megatron.core.parallel_state  # noqa: F401
import megatron.core.tensor_parallel  # noqa: F401
import pytest
import torch
import torch._dynamo  # noqa: F401

from trainer.config import load_config
from trainer.hooks import Hook, RunContext, StepOutput, TrainState
from trainer.testing import run_distributed

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
# The tiny model's tensors hold 32 to 65,536 elements: with these sizes some share buckets, some fill them and some
# are read alone.
BUCKET_NUMEL, BUCKETED_MAX_NUMEL = 5000, 4096
assert BUCKETED_MAX_NUMEL < BUCKET_NUMEL


class _CompareReads(Hook):
    def __init__(self) -> None:
        self.result: dict[str, Any] = {"checked": [], "buckets": 0}

    def on_step_start(self, run: RunContext, state: TrainState) -> None:
        if state.step == 0:
            self._compare(run, "before the first step")

    def on_step_end(self, run: RunContext, state: TrainState, out: StepOutput) -> None:
        self._compare(run, f"after step {state.step}")

    def _compare(self, run: RunContext, when: str) -> None:
        from trainer.checkpoint import state as state_module

        access = state_module.optimizer_access(run.engine)
        access.prepare_read()
        params = [p for _, p in run.model.canonical_named_parameters()]
        wanted = [i % 3 != 1 for i in range(len(params))]
        bucketed = list(access.read_all(params, wanted))  # kept as given: they must not change afterwards
        reference = [access.read(p) for p in params]  # DeepSpeed's getters, one collective per parameter and value
        for (name, _), got, want, wanted_it in zip(run.model.canonical_named_parameters(), bucketed, reference,
                                                    wanted, strict=True):
            if not wanted_it:
                assert got is None
                continue
            for kind, g, w in zip(("weight", "exp_avg", "exp_avg_sq"), got, want, strict=True):
                assert g.shape == w.shape and torch.equal(g, w), f"{when}: {kind} of {name} differs"
        nonzero_moments = any(bool(values[1].abs().sum()) for values in reference)
        self.result["checked"].append((when, nonzero_moments))


def _train(rank: int, world_size: int, overrides: list[str], run_dir: str) -> Any:
    from trainer.checkpoint import state as state_module
    from trainer.train import train

    state_module.READ_BUCKET_NUMEL, state_module.READ_BUCKETED_MAX_NUMEL = BUCKET_NUMEL, BUCKETED_MAX_NUMEL
    hook = _CompareReads()
    train(load_config(TINY, ["train.max_steps=2", "optim.warmup_steps=1", "train.eval_interval_steps=0", "logging.tensorboard=false",
                             "checkpoint.save_interval_steps=0", f"logging.run_dir={run_dir}", *overrides]),
          extra_hooks=[hook])
    return hook.result


@pytest.mark.parametrize("overrides", [["zero.stage=1"], ["zero.stage=2"], ["zero.stage=1", "precision.dtype=bf16"],
                                       ["zero.stage=3"]], ids=["zero1", "zero2", "bf16-zero1", "zero3"])
def test_bucketed_zero_reads_equal_deepspeeds_getters(overrides: list[str], tmp_path: Path) -> None:
    for result in run_distributed(_train, 2, overrides, str(tmp_path), timeout_s=180):
        assert result["checked"] == [("before the first step", False), ("after step 1", True), ("after step 2", True)]
