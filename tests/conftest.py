"""Test-wide setup: CPU-only defaults for DeepSpeed/torch, and skips for hardware the machine lacks."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Before any test imports deepspeed: pick the CPU accelerator explicitly (silences auto-detect warnings) and keep
# JIT-built ops in a private cache, because a cache shared with other jobs triggers rebuilds (notes/deepspeed-cpu.md).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))
# Two cores: one intra-op thread per process keeps multi-process tests from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# On a GPU host, let torch.cuda.is_available() in this process ask NVML instead of initialising the CUDA driver
# (after which a forked child cannot use CUDA: trainer/testing.py). The rank helper spawns there anyway.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


def _has_cuda() -> bool:
    try:
        from trainer.testing import cuda_device_visible
    except ImportError:
        return False
    return cuda_device_visible()


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    return probe.returncode == 0 and "idle" in probe.stdout


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markers = {item_marker for item in items for item_marker in (m.name for m in item.iter_markers())}
    skip_gpu = None if "gpu" not in markers or _has_cuda() else pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slurm = None
    if "slurm" in markers and not _slurm_up():
        skip_slurm = pytest.mark.skip(reason="no Slurm cluster is up: start one with `bash cluster/start.sh` (as root)")
    for item in items:
        if skip_gpu and item.get_closest_marker("gpu"):
            item.add_marker(skip_gpu)
        if skip_slurm and item.get_closest_marker("slurm"):
            item.add_marker(skip_slurm)
