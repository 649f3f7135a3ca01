"""`pretrain train --dry-run` for every shipped config, run the way a user runs it: `python -m launch train ...`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# The size each config's name promises; tiny has no nominal size (its exact count is checked in test_model.py).
NOMINAL_PARAMS = {"125m": 125e6, "1b": 1e9, "7b": 7e9, "70b": 70e9}


@pytest.fixture(scope="module", autouse=True)
def _train_command_is_registered() -> None:
    from launch.cli import COMMAND_MODULES

    assert "launch.commands.train" in COMMAND_MODULES, "add 'launch.commands.train' to COMMAND_MODULES in launch/cli.py"


def pretrain(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "launch", "train", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=60
    )


def reported_params(stdout: str) -> int:
    match = re.search(r"^parameters\s+([\d,]+)", stdout, re.MULTILINE)
    assert match, stdout
    return int(match.group(1).replace(",", ""))


def deepspeed_json(stdout: str) -> dict:
    return json.loads(stdout.split("DeepSpeed config:\n", 1)[1])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_dry_runs(config: Path) -> None:
    out = pretrain("--config", f"configs/{config.name}", "--dry-run")
    assert out.returncode == 0, out.stderr
    params = reported_params(out.stdout)
    if config.stem in NOMINAL_PARAMS:
        assert abs(params - NOMINAL_PARAMS[config.stem]) / NOMINAL_PARAMS[config.stem] < 0.15, params
    for heading in ("world ", "batch ", "FLOPs/token ", "memory/GPU "):
        assert f"\n{heading}" in out.stdout
    ds = deepspeed_json(out.stdout)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * int(
        re.search(r"× dp (\d+)\n", out.stdout).group(1)
    )


def test_overrides_and_world_size_flag() -> None:
    out = pretrain("--config", "configs/7b.yaml", "--world-size", "64", "--dry-run", "parallel.tp=4", "optim.lr=1e-4")
    assert out.returncode == 0, out.stderr
    assert "64 processes (--world-size) on cuda = tp 4 × pp 1 × dp 16" in out.stdout
    assert "(+2 overrides)" in out.stdout
    ds = deepspeed_json(out.stdout)
    assert ds["optimizer"]["params"]["lr"] == 1e-4 and ds["gradient_accumulation_steps"] == 1024 // (2 * 16)


def test_the_loss_working_set_is_shown_for_both_losses() -> None:
    """configs/1b.yaml's micro-batch (8 × 2048 tokens, vocab 32,000, bf16): the chunked loss keeps the logits and their
    gradient (2 × 1,000 MiB) + two 128 MiB chunks; the fused one the weight's and the hidden states' fp32 gradients."""
    out = pretrain("--config", "configs/1b.yaml", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert ("lm_head + loss on the last stage: 2.20 GiB of the activations (parallel.lm_loss=chunked; with "
            "fused_linear: 0.80 GiB)") in out.stdout
    fused = pretrain("--config", "configs/1b.yaml", "--dry-run", "parallel.lm_loss=fused_linear")
    assert "(parallel.lm_loss=fused_linear; with chunked: 2.20 GiB)" in fused.stdout
    activations = [float(re.search(r"activations ([\d.]+)", o.stdout).group(1)) for o in (out, fused)]
    assert activations[0] - activations[1] == pytest.approx(2.20 - 0.80, abs=0.06)


def test_fp8_is_named_in_the_memory_lines_and_rowwise_refused_with_tp() -> None:
    out = pretrain("--config", "configs/1b.yaml", "--dry-run", "precision.fp8=rowwise")
    assert out.returncode == 0, out.stderr
    assert "precision.fp8=rowwise: counted as bf16" in out.stdout
    refused = pretrain("--config", "configs/7b.yaml", "--dry-run", "precision.fp8=rowwise")  # 7b.yaml: tp 2
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "precision.fp8=rowwise with parallel.tp=2" in refused.stderr
    assert "use precision.fp8=tensorwise" in refused.stderr
    tensorwise = pretrain("--config", "configs/7b.yaml", "--dry-run", "precision.fp8=tensorwise")
    assert tensorwise.returncode == 0, tensorwise.stderr


def test_uneven_pipeline_stages_from_the_command_line() -> None:
    """The list override reaches the dry run (shell-safe, no spaces); a pp that does not divide the layers is refused
    with a split to paste."""
    out = pretrain("--config", "configs/70b.yaml", "--world-size", "192", "--dry-run", "parallel.pp=3",
                   "parallel.pipeline_stage_layers=[26,28,26]")
    assert out.returncode == 0, out.stderr
    assert "tp 8 × pp 3 × dp 8" in out.stdout
    assert "pipeline     decoder layers per stage [26, 28, 26]" in out.stdout
    assert "on the busiest stage (stage 0: " in out.stdout  # 1F1B: the first stage holds 3 micro-batches
    out = pretrain("--config", "configs/70b.yaml", "--world-size", "192", "--dry-run", "parallel.pp=3")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "parallel.pipeline_stage_layers=[27,27,26]" in out.stderr
    tied = pretrain("--config", "configs/tiny.yaml", "--world-size", "2", "--dry-run", "parallel.pp=2",
                    "model.tie_embeddings=true")
    assert tied.returncode == 0, tied.stderr
    assert "lm_head on the last; tied: lm_head is a copy of the embedding" in tied.stdout


def test_the_document_kernel_and_partial_checkpointing_are_shown() -> None:
    """What the run will do: the document mask's kernel (FlexAttention on CUDA, SDPA's dense mask on CPU) and
    checkpointing on only the first layers of each stage."""
    out = pretrain("--config", "configs/1b.yaml", "--dry-run", "model.attention_mask=document",
                   "parallel.activation_checkpointing_layers=8")
    assert out.returncode == 0, out.stderr
    assert "its own document only (FlexAttention)" in out.stdout
    assert "activation checkpointing selective on the first 8 layer(s) of each stage" in out.stdout
    out = pretrain("--config", "configs/tiny.yaml", "--dry-run", "model.attention_mask=document")
    assert "its own document only (SDPA with a dense mask)" in out.stdout
    assert "activation checkpointing none," in out.stdout


def test_world_size_from_environment() -> None:
    out = pretrain("--config", "configs/tiny.yaml", "--dry-run", env_extra={"WORLD_SIZE": "4"})
    assert out.returncode == 0, out.stderr
    assert "4 processes ($WORLD_SIZE) on cpu = tp 1 × pp 1 × dp 4" in out.stdout


def test_config_errors_print_cleanly() -> None:
    out = pretrain("--config", "configs/tiny.yaml", "--dry-run", "optim.lrr=1e-3")
    assert out.returncode == 2
    assert "optim.lrr: unknown key: did you mean optim.lr?" in out.stderr
    assert "Traceback" not in out.stderr
    out = pretrain("--config", "configs/70b.yaml", "--dry-run", "zero.stage=3")
    assert out.returncode == 2 and "set zero.stage=1 or parallel.pp=1" in out.stderr and "Traceback" not in out.stderr


def test_world_size_flag_belongs_to_dry_runs() -> None:
    # A real run takes its world size from the launcher; `pretrain train` without --dry-run trains (test_train_cli.py).
    out = pretrain("--config", "configs/tiny.yaml", "--world-size", "2")
    assert out.returncode == 2
    assert "--world-size only applies with --dry-run" in out.stderr and "Traceback" not in out.stderr


def test_dry_run_imports_nothing_heavy() -> None:
    code = (
        "import sys; from launch.cli import main\n"
        "rc = main(['train', '--config', 'configs/70b.yaml', '--dry-run'])\n"
        "print('HEAVY', [m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'megatron')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
