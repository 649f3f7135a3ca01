"""torch.compile of each decoder layer (parallel.compile) trains to the same per-step losses as eager, in every layout.

The reference is the checked-in eager single-process trace (tests/trainer/golden/tiny_losses.json): every eager
layout already matches it within 1e-5 relative (test_parallel_training.py), so a compiled layout that matches it is
equal to its own eager run within the same tolerance.

Backend: the layout tests use `aot_eager`: dynamo's graph capture and AOTAutograd's joint forward/backward graph,
i.e. everything that can break when compile meets megatron's TP layers and collectives, the activation-checkpoint
policy, DeepSpeed's pipeline and ZeRO-3 hooks, but no code generation. Inductor's C++ code generation costs ~55 s of
a 2-core CI box per process for the tiny model (measured: first step 54.7 s vs 0.11 s), so one single-process test
runs the real inductor backend, and the layouts would add ~55 s each for nothing that aot_eager does not already
exercise. On a GPU host `pytest -m gpu` (tests/trainer/test_gpu.py) and bench/bench_gpu.py run inductor for real.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import deepspeed  # noqa: F401  (imported once in the parent: forked ranks start in ~0.3 s)
import megatron.core.tensor_parallel  # noqa: F401
import pytest
import torch
import torch._dynamo  # noqa: F401

from test_parallel_training import GOLDEN, REL_TOL, max_rel_diff, run_and_read
from trainer.compile import is_compiled
from trainer.config import ParallelConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def _warmup_logged(run_dir: Path, backend: str, layers: int) -> bool:
    text = (run_dir / "logs" / "rank0.log").read_text()
    return re.search(rf"torch\.compile \({backend}\) of {layers} decoder layers: first step [\d.]+ s", text) is not None


@pytest.mark.parametrize(("world_size", "overrides", "layers_on_rank0"), [
    pytest.param(1, [], 2, id="1proc"),
    pytest.param(1, ["parallel.activation_checkpointing=selective"], 2, id="1proc-selective_ac"),
    pytest.param(2, ["parallel.tp=2", "parallel.sequence_parallel=true",
                     "parallel.activation_checkpointing=selective"], 2, id="tp2-sp-selective_ac"),
    pytest.param(2, ["parallel.tp=2", "parallel.activation_checkpointing=core_attention"], 2,
                 id="tp2-core_attention_ac"),
    pytest.param(2, ["parallel.pp=2", "parallel.activation_checkpointing=full"], 1, id="pp2-full_ac"),
    pytest.param(2, ["zero.stage=3"], 2, id="dp2-zero3"),
])
def test_compiled_layout_matches_eager(world_size: int, overrides: list[str], layers_on_rank0: int, golden: dict,
                                       tmp_path: Path) -> None:
    got = run_and_read(world_size, ["parallel.compile=aot_eager", *overrides], tmp_path)
    assert max_rel_diff(got["losses"], golden["train_losses"]) <= REL_TOL, (got["losses"], golden["train_losses"])
    assert max_rel_diff([got["val_loss"]], [golden["val_loss"]]) <= REL_TOL
    assert _warmup_logged(tmp_path, "aot_eager", layers_on_rank0)


def test_inductor_single_process_matches_eager(golden: dict, tmp_path: Path) -> None:
    """The real code generator once (C++ on CPU; Triton on a GPU): ~60 s here, see the module docstring."""
    got = run_and_read(1, ["parallel.compile=on"], tmp_path)
    assert max_rel_diff(got["losses"], golden["train_losses"]) <= REL_TOL
    assert _warmup_logged(tmp_path, "inductor", 2)


def test_compile_keeps_names_and_state_dict_keys() -> None:
    """No `_orig_mod.` anywhere: checkpoints, HF export and init_from key on these names."""
    from test_parallelize import build

    eager, _ = build("parallel.compile=off")
    compiled, _ = build("parallel.compile=aot_eager", "parallel.activation_checkpointing=selective")
    assert compiled.compile_backend == "aot_eager" and compiled.layers_compiled == 2
    assert all(is_compiled(layer) for layer in compiled.module.layers)
    assert [n for n, _ in compiled.canonical_named_parameters()] == [n for n, _ in eager.canonical_named_parameters()]
    assert list(compiled.module.state_dict()) == list(eager.module.state_dict())
    assert type(compiled.module.layers[0]).__name__ == "DecoderLayer"  # the pipeline partitions on the type name


def test_auto_compiles_on_cuda_only() -> None:
    def backend(mode: str, device: str) -> str | None:
        return ParallelConfig(compile=mode).compile_backend(device)

    assert backend("auto", "cuda") == "inductor"
    assert backend("auto", "cpu") is None
    assert backend("on", "cpu") == "inductor"
    assert backend("off", "cuda") is None
    assert backend("aot_eager", "cpu") == "aot_eager"


def test_compile_off_is_plain_eager() -> None:
    from test_parallelize import build

    pmodel, _ = build()  # tiny.yaml runs on cpu: auto = off
    assert pmodel.compile_backend is None and not any(is_compiled(layer) for layer in pmodel.module.layers)
    assert torch.compiler.is_compiling() is False


def test_the_flash_gqa_check_does_not_break_the_compiled_graph() -> None:
    """On CUDA, attention asks whether flash takes GQA natively (trainer.model._flash_takes_gqa), which builds a
    pybind object dynamo cannot trace. compile_layers marks it constant; without that every compiled layer would
    break in two on a GPU. Called directly here (on CPU the model only reaches it for CUDA tensors)."""
    from trainer.compile import compile_layers
    from trainer.model import _flash_takes_gqa

    compile_layers([], "aot_eager")

    def attention_choice(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return q.sin() * (2 if _flash_takes_gqa(q, k, k) else 3)

    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    explained = torch._dynamo.explain(attention_choice)(q, k)
    assert explained.graph_break_count == 0, explained.break_reasons
