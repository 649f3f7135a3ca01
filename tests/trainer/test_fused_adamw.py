"""Fused AdamW on CUDA: the generated DeepSpeed config asks for it, DeepSpeed hands it to torch.optim.AdamW, and the
fused update equals the default one (torch implements fused AdamW on CPU too, so the numbers are checked here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.config import load_config
from trainer.deepspeed_config import build_deepspeed_config
from trainer.engine import param_groups

REPO = Path(__file__).resolve().parents[2]
ONE_B = REPO / "configs" / "1b.yaml"


def _optimizer_params(device: str, *overrides: str) -> dict:
    cfg = load_config(ONE_B, ["data.synthetic=true", "data.datasets=[]", *overrides])
    return build_deepspeed_config(cfg, cfg.validate_for_world(16, device))["optimizer"]["params"]


def test_config_asks_for_fused_adamw_on_cuda_only() -> None:
    assert _optimizer_params("cuda") | {} == {**_optimizer_params("cuda"), "torch_adam": True, "fused": True}
    assert "fused" not in _optimizer_params("cpu", "launch.device=cpu", "precision.dtype=bf16")
    # Optimizer offload runs DeepSpeed's own CPU Adam: neither torch_adam nor fused.
    offload = _optimizer_params("cuda", "zero.offload_optimizer=cpu")
    assert "fused" not in offload and "torch_adam" not in offload


def _train_weights(fused: bool, steps: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from trainer.model import Llama, lm_loss

    cfg = load_config(REPO / "configs" / "tiny.yaml", [])
    torch.manual_seed(0)
    model = Llama(cfg.model, 256)
    initial = [p.detach().clone() for p in model.parameters()]
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model.named_parameters(), o), lr=o.lr, betas=tuple(o.betas),
                                  eps=o.eps, fused=fused)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = torch.randint(0, 256, (2, 17), generator=generator)
        lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [(start, p.detach().clone()) for start, p in zip(initial, model.parameters(), strict=True)]


def test_fused_and_default_adamw_give_the_same_weights() -> None:
    """Measured: at most 9.4e-6 absolute in one element of 125k, against a training movement of ~4e-2. The same
    yardstick as tests/trainer/test_hf_reference.py: relative to how far training moved the weights, because Adam
    turns a last-bit difference in a gradient that nearly cancels (|g| ~ eps) into a visible step."""
    fused, default = _train_weights(True), _train_weights(False)
    for (start, got), (_, want) in zip(fused, default, strict=True):
        moved = (want - start).abs().max()
        assert (got - want).abs().max() <= 1e-3 * moved
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def _deepspeed_optimizer(rank: int, world_size: int, params: dict) -> tuple[str, bool, bool]:
    import deepspeed

    model = torch.nn.Linear(8, 4)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(),
        config={"train_batch_size": 1, "optimizer": {"type": "AdamW", "params": params}, "steps_per_print": 10**9})
    engine.backward(engine(torch.ones(1, 8)).sum())
    engine.step()  # the fused kernel runs (on CPU here)
    return type(optimizer).__name__, optimizer.defaults["fused"], bool(torch.isfinite(model.weight).all())


def test_deepspeed_builds_a_fused_torch_adamw_from_the_generated_section() -> None:
    """The CUDA section, as generated, given to deepspeed.initialize (on CPU, where torch's fused AdamW also runs):
    DeepSpeed must hand `fused` through to torch.optim.AdamW, not drop or reject it. In a rank of its own, so this
    process never holds a process group."""
    from trainer.testing import run_distributed

    (result,) = run_distributed(_deepspeed_optimizer, 1, _optimizer_params("cuda"), timeout_s=120)
    assert result == ("AdamW", True, True)
