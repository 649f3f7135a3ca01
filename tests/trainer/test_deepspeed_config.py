"""The generated DeepSpeed config: batch arithmetic for many shapes, each section, and DeepSpeed itself accepting it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.deepspeed_config import build_deepspeed_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
SEVEN_B = REPO / "configs" / "7b.yaml"


def generate(source: Path, world: int, *overrides: str, device: str | None = None) -> tuple[dict, object]:
    cfg = load_config(source, overrides)
    derived = cfg.validate_for_world(world, device)
    return build_deepspeed_config(cfg, derived), derived


@pytest.mark.parametrize(
    ("world", "tp", "pp", "micro", "global_batch", "expected_dp", "expected_accum"),
    [
        (1, 1, 1, 4, 16, 1, 4),
        (2, 1, 1, 4, 16, 2, 2),
        (8, 2, 1, 2, 64, 4, 8),
        (8, 2, 2, 1, 8, 2, 4),
        (16, 1, 2, 3, 96, 8, 4),
        (32, 4, 2, 2, 1024, 4, 128),
        (256, 8, 4, 1, 1024, 8, 128),
    ],
)
def test_global_batch_is_micro_times_accum_times_dp(
    world, tp, pp, micro, global_batch, expected_dp, expected_accum
) -> None:
    ds, derived = generate(
        SEVEN_B,
        world,
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        "parallel.sequence_parallel=false",
        f"train.micro_batch_size_per_gpu={micro}",
        f"train.global_batch_size={global_batch}",
    )
    assert (derived.dp, derived.grad_accum_steps) == (expected_dp, expected_accum)
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == expected_accum
    assert ds["train_batch_size"] == micro * expected_accum * expected_dp == global_batch


def test_fp32_zero0_is_minimal() -> None:
    ds, _ = generate(TINY, 2)
    assert ds["zero_optimization"] == {"stage": 0}
    assert "bf16" not in ds and "fp16" not in ds and "data_types" not in ds
    assert ds["gradient_clipping"] == 1.0 and ds["steps_per_print"] >= 10**9


def test_optimizer_is_adamw_with_our_hyperparameters() -> None:
    ds, _ = generate(SEVEN_B, 32)
    assert ds["optimizer"] == {
        "type": "AdamW",
        # fused: torch's fused CUDA AdamW (7b.yaml runs on cuda; tests/trainer/test_fused_adamw.py)
        "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-5, "weight_decay": 0.1, "torch_adam": True,
                   "fused": True},
    }
    assert "scheduler" not in ds  # the engine owns the LR schedule


def test_bf16_with_fp32_accumulation() -> None:
    ds, _ = generate(SEVEN_B, 32)
    assert ds["bf16"] == {"enabled": True}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}


def test_fp16_dynamic_and_static_loss_scaling() -> None:
    ds, _ = generate(
        SEVEN_B,
        32,
        "precision.dtype=fp16",
        "precision.fp32_grad_accumulation=false",
        "precision.initial_loss_scale_power=12",
        "precision.loss_scale_window_steps=500",
    )
    assert ds["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 12,
        "loss_scale_window": 500,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }
    assert "bf16" not in ds
    ds, _ = generate(SEVEN_B, 32, "precision.dtype=fp16", "precision.loss_scale=128.0")
    assert ds["fp16"]["loss_scale"] == 128.0


def test_zero3_with_offload() -> None:
    ds, _ = generate(
        SEVEN_B,
        32,
        "zero.stage=3",
        "zero.offload_optimizer=cpu",
        "zero.offload_param=nvme",
        "zero.nvme_path=/local/nvme",
        "zero.stage3_prefetch_bucket_size_elements=1000",
    )
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_prefetch_bucket_size"] == 1000
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/local/nvme"}
    assert "torch_adam" not in ds["optimizer"]["params"]  # offload needs DeepSpeed's CPU Adam


def test_zero2_has_no_stage3_keys() -> None:
    ds, _ = generate(SEVEN_B, 32, "zero.stage=2")
    assert ds["zero_optimization"]["stage"] == 2
    assert not any(key.startswith("stage3_") for key in ds["zero_optimization"])


def test_output_is_json_serialisable() -> None:
    ds, _ = generate(SEVEN_B, 32, "zero.stage=3", "zero.offload_optimizer=cpu")
    assert json.loads(json.dumps(ds)) == ds


# DeepSpeed parses every variant with its own (extra="forbid") config models and batch assertion, and a
# 1-process engine built from the tiny config takes optimizer steps under ZeRO 0-3. One subprocess, so the
# process group it needs never exists in the pytest process (forked distributed tests must start without one).
_DEEPSPEED_ACCEPTS = textwrap.dedent(
    """
    import json, os, sys
    import torch, deepspeed, deepspeed.comm
    torch.set_num_threads(1)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # unused JIT op, 22-75 s (deepspeed-cpu.md)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    from deepspeed.runtime.config import DeepSpeedConfig
    from trainer.config import load_config
    from trainer.deepspeed_config import build_deepspeed_config
    from trainer.model import Llama, lm_loss

    class DataParallelOnly:  # the two methods DeepSpeedConfig asks of an mpu
        def __init__(self, dp): self.dp = dp
        def get_data_parallel_world_size(self): return self.dp
        def get_data_parallel_rank(self): return 0

    out = {"parsed": [], "trained": []}
    try:
        for name, overrides in json.loads(sys.argv[1]):
            cfg = load_config(f"configs/{name}.yaml", overrides)
            derived = cfg.validate_for_world(cfg.launch.nodes * cfg.launch.gpus_per_node, "cuda")
            ds = DeepSpeedConfig(build_deepspeed_config(cfg, derived), mpu=DataParallelOnly(derived.dp))
            out["parsed"].append([ds.train_batch_size, ds.gradient_accumulation_steps, ds.zero_optimization_stage,
                                  ds.bfloat16_config.enabled, ds.float16_config.enabled, ds.optimizer_name])
        for overrides in json.loads(sys.argv[2]):
            cfg = load_config("configs/tiny.yaml", overrides)
            derived = cfg.validate_for_world(1, "cpu")
            torch.manual_seed(0)
            model = Llama(cfg.model, derived.padded_vocab_size)
            engine, optimizer, _, _ = deepspeed.initialize(
                model=model, model_parameters=model.parameters(), config=build_deepspeed_config(cfg, derived))
            for _ in range(2 * derived.grad_accum_steps):
                ids = torch.randint(0, cfg.model.vocab_size, (derived.micro_batch_size_per_gpu, cfg.train.seq_len + 1))
                loss = lm_loss(engine(ids[:, :-1]), ids[:, 1:])
                engine.backward(loss)
                engine.step()
            out["trained"].append([type(optimizer).__name__, engine.global_steps, loss.item()])
    finally:
        deepspeed.comm.destroy_process_group()
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_deepspeed_accepts_generated_configs() -> None:
    parse_cases = [
        ["tiny", []],
        ["125m", []],
        ["1b", []],
        ["7b", []],
        ["70b", []],
        ["7b", ["precision.dtype=fp16", "precision.fp32_grad_accumulation=false"]],
        ["1b", ["zero.stage=3", "zero.offload_optimizer=cpu", "zero.offload_param=cpu"]],
    ]
    train_cases = [
        [],
        ["zero.stage=1", "precision.dtype=bf16"],
        ["zero.stage=2", "precision.dtype=bf16", "precision.fp32_grad_accumulation=true"],
        ["zero.stage=3"],
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        DS_ACCELERATOR="cpu",
    )
    proc = subprocess.run(
        [sys.executable, "-c", _DEEPSPEED_ACCEPTS, json.dumps(parse_cases), json.dumps(train_cases)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["parsed"] == [
        [16, 2, 0, False, False, "adamw"],  # tiny: world 2 from its launch section
        [256, 2, 1, True, False, "adamw"],
        [512, 4, 2, True, False, "adamw"],
        [1024, 32, 1, True, False, "adamw"],
        [1024, 128, 1, True, False, "adamw"],
        [1024, 32, 1, False, True, "adamw"],
        [512, 4, 3, True, False, "adamw"],
    ]
    names = [name for name, _, _ in result["trained"]]
    assert names == ["AdamW", "DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3"]
    for _, steps, loss in result["trained"]:
        assert steps == 2 and 4.0 < loss < 7.0  # ln(256) = 5.55 at init


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
