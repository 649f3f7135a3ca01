"""precision.fp8: torchao's Float8Linear in every decoder-layer linear (trainer/float8.py).

On CPU `torch._scaled_mm` emulates the FP8 matmul with the same casts and scales as on an H100, so the numerics are
tested here: the reference is HF's `LlamaForCausalLM` with torchao's own conversion applied to the same linears,
trained by `torch.optim.AdamW` (hf_fixtures.train_hf_reference); and every layout FP8 composes with (ZeRO-2/3 over
DP2, PP2, selective activation checkpointing, compile) trains the same losses as one process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Imported once here so the forked ranks start fast (notes/megatron-core-cpu.md).
import deepspeed  # noqa: F401
import pytest
import torch
from hf_fixtures import TINY, hf_llama, train_hf_reference
from torch import nn

from trainer.config import ConfigError, load_config
from trainer.float8 import convert_to_float8, float8_config
from trainer.model import Llama
from trainer.testing import run_distributed

# ---------------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(("overrides", "fix"), [
    (["precision.dtype=fp16"], "set precision.dtype=bf16"),
    (["parallel.tp=2"], "model.intermediate_size / tp 2 (88) is not: change it or parallel.tp"),
    (["parallel.tp=2", "model.intermediate_size=192", "precision.fp8=rowwise"],
     "use precision.fp8=tensorwise under TP, or parallel.tp=1"),
    (["model.intermediate_size=184"], "model.intermediate_size (184)"),
    (["train.seq_len=62"], "train.micro_batch_size_per_gpu × train.seq_len (248)"),
])
def test_config_refuses_what_fp8_cannot_run(overrides: list[str], fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["precision.fp8=tensorwise", *overrides])
    assert fix in str(info.value)


def test_off_accepts_what_fp8_refuses() -> None:
    load_config(TINY, ["model.intermediate_size=184", "train.seq_len=62", "parallel.tp=2"])


# ---------------------------------------------------------------------------------------------------------------------
# The swap


def _tiny_llama() -> Llama:
    torch.manual_seed(0)
    model = Llama(load_config(TINY).model, 256)
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    return model


def test_every_decoder_linear_becomes_float8_and_keeps_its_parameters() -> None:
    model = _tiny_llama()
    before = {name: id(p) for name, p in model.named_parameters()}
    converted = convert_to_float8(model.layers, "rowwise", "cpu")
    assert converted == 7 * len(model.layers)
    projections = [m for name, m in model.layers.named_modules() if name.endswith("_proj")]
    assert len(projections) == converted and all(type(m).__name__ == "Float8Linear" for m in projections)
    assert type(model.lm_head) is nn.Linear  # the logits stay in high precision
    # Same Parameter objects under the same names: checkpoints, init_from and HF export see a bf16 run's state.
    assert {name: id(p) for name, p in model.named_parameters()} == before
    assert convert_to_float8(_tiny_llama().layers, "off", "cpu") == 0


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_fp8_matmuls_round_like_fp8(recipe: str) -> None:
    """The converted model computes something else than the plain one, by the error FP8 rounding makes (e4m3 keeps
    3 mantissa bits: ~3 % per element, averaged down by the matmul sums), in forward and in the gradients."""
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    plain, fp8 = _tiny_llama(), _tiny_llama()
    convert_to_float8(fp8.layers, recipe, "cpu")
    outputs, grads = [], []
    for model in (plain, fp8):
        logits = model(ids)
        nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        outputs.append(logits.detach())
        grads.append(model.layers[0].mlp.down_proj.weight.grad)
    out_err = ((outputs[1] - outputs[0]).norm() / outputs[0].norm()).item()
    grad_err = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    assert 1e-4 < out_err < 0.05, out_err
    assert 1e-4 < grad_err < 0.1, grad_err


def test_selective_checkpointing_keeps_the_fp8_matmuls() -> None:
    """Selective AC recomputes the elementwise work, not the matmuls, FP8 ones included: a backward runs as many
    matmuls as without checkpointing (14 more under full AC: each layer's 7 forward projections again)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from trainer.parallelize import _apply_activation_checkpointing

    class CountMatmuls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            self.count += func.overloadpacket.__name__ in ("mm", "_scaled_mm")
            return func(*args, **(kwargs or {}))

    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    counts = {}
    for mode in ("none", "selective", "full"):
        model = _tiny_llama()
        convert_to_float8(model.layers, "tensorwise", "cpu")
        _apply_activation_checkpointing(list(model.layers), mode)
        with CountMatmuls() as matmuls:
            model(ids).float().sum().backward()
        counts[mode] = matmuls.count
    assert counts["selective"] == counts["none"] and counts["full"] == counts["none"] + 7 * len(model.layers)


# ---------------------------------------------------------------------------------------------------------------------
# Training: HF + torchao reference, and every layout
#
# FP8 turns rounding noise into visible steps: an element near a rounding boundary of e4m3/e5m2 (3/2 mantissa bits)
# moves by 12-25 % when a 1e-7 difference upstream flips it. Power-of-two scales (trainer.float8.float8_config) keep
# most such differences from reaching the FP8 values, not all: on HF + torchao itself, computing the same loss in
# fp64 instead of fp32 moved the losses of 12 steps by 6e-4 relative (rowwise), a fifth of what FP8 on/off changes.
# So the runs are compared where the noise has not been amplified yet: the weights after one optimizer step,
# relative to how far that step moved them. optim.eps=1 makes Adam's first step lr·g/(|g|+1) ≈ lr·g, linear in the
# gradient: with eps=1e-8 it is lr·sign(g), and a gradient of 1e-9 whose sign a rounding flips moves by 2·lr.
# Measured: tensorwise 1.1e-5, rowwise 9.2e-5 from HF + torchao; every layout <= 2.6e-6 from one process (PP2,
# selective AC and compile: 0); the same runs without FP8 are 0.18-0.23 away.

BASE = ["train.max_steps=1", "optim.warmup_steps=0", "optim.eps=1.0", "train.log_interval_steps=1",
        "train.eval_interval_steps=0", "logging.tensorboard=false", "checkpoint.save_interval_steps=1000",
        "checkpoint.save_at_end=true"]
WEIGHT_REL_TOL = 1e-3


def _train(rank: int, world_size: int, overrides: list[str]) -> None:
    from trainer.train import train

    train(load_config(TINY, overrides))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from trainer.hf.full_state import load_full_state_dict

    return load_full_state_dict(run_dir / "checkpoints")


def _worst_step_gap(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                    start: dict[str, torch.Tensor]) -> float:
    """max over tensors of |got - want| / |want - start|: the gap relative to how far the step moved the weights."""
    assert sorted(got) == sorted(want)
    return max(((got[k] - want[k]).norm() / (want[k] - start[k]).norm()).item() for k in want)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_step_equals_hf_with_torchao_and_adamw(tmp_path: Path, recipe: str) -> None:
    from torchao.float8 import convert_to_float8_training

    from trainer.hf import import_hf_to_dir
    from trainer.model import to_hf_key

    vocab = 512  # no padding rows: the padding rules have their own reference test (test_hf_reference.py)
    # One micro-batch per step, as the reference runs one forward per global batch: FP8's dynamic scales are maxima
    # over the tensor (tensorwise) or over the tokens (the rowwise weight gradient), so they depend on what else is
    # in the micro-batch.
    cfg_args = [*BASE, f"model.vocab_size={vocab}", "train.micro_batch_size_per_gpu=16"]
    hf = hf_llama(vocab, tie=False, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    start = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    imported = import_hf_to_dir(tmp_path / "hf", tmp_path / "imported", tp=1)
    convert_to_float8_training(hf, module_filter_fn=lambda module, fqn: fqn.startswith("model.layers."),
                               config=float8_config(recipe))
    train_hf_reference(hf, load_config(TINY, cfg_args))
    want = {k: v.detach() for k, v in hf.state_dict().items()}

    gaps = {}
    for fp8 in (recipe, "off"):
        run_dir = tmp_path / fp8
        run_distributed(_train, 1, [*cfg_args, f"precision.fp8={fp8}", f"logging.run_dir={run_dir}",
                                    f"checkpoint.init_from={imported.out_dir / 'model.safetensors'}"], timeout_s=300)
        got = {to_hf_key(k): v for k, v in _weights(run_dir).items()}
        gaps[fp8] = _worst_step_gap(got, want, start)
    print(f"step vs HF + torchao {recipe}: ours with fp8 {gaps[recipe]:.2e}, ours without {gaps['off']:.2e}")
    assert gaps[recipe] <= WEIGHT_REL_TOL, gaps
    assert gaps["off"] > 10 * WEIGHT_REL_TOL, gaps  # the comparison sees FP8: the same model without it is far off


# Each trains the same 4 micro-batches per step as one process (tiny.yaml: micro-batch 4, global batch 16); DP2
# against one process is also DP against gradient accumulation.
LAYOUTS = {
    "zero2-dp2": (2, ["zero.stage=2"]),
    "zero3-dp2": (2, ["zero.stage=3"]),
    "pp2": (2, ["parallel.pp=2"]),
    "selective-ac": (1, ["parallel.activation_checkpointing=selective"]),
    "compile": (1, ["parallel.compile=aot_eager"]),
    "fused-loss": (1, ["parallel.lm_loss=fused_linear"]),
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A start (an imported HF model), and the weights one FP8 step and one plain step take it to in one process."""
    from trainer.hf import import_hf_to_dir
    from trainer.hf.full_state import load_full_state_dict

    root = tmp_path_factory.mktemp("fp8")
    hf_llama(512, tie=False, seed=5).save_pretrained(root / "hf")
    init_from = import_hf_to_dir(root / "hf", root / "imported", tp=1).out_dir / "model.safetensors"
    args = [*BASE, "model.vocab_size=512", f"checkpoint.init_from={init_from}"]
    out: dict[str, Any] = {"args": args, "start": load_full_state_dict(init_from)}
    for fp8 in ("tensorwise", "off"):
        run_distributed(_train, 1, [*args, f"precision.fp8={fp8}", f"logging.run_dir={root / fp8}"], timeout_s=300)
        out[fp8] = _weights(root / fp8)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp8_steps_the_same_in_every_layout(one_process: dict[str, Any], tmp_path: Path, layout: str) -> None:
    world_size, overrides = LAYOUTS[layout]
    run_distributed(_train, world_size, [*one_process["args"], "precision.fp8=tensorwise",
                                         f"logging.run_dir={tmp_path}", *overrides], timeout_s=300)
    start, want = one_process["start"], one_process["tensorwise"]
    gap = _worst_step_gap(_weights(tmp_path), want, start)
    print(f"{layout}: {gap:.2e} (one process without fp8: {_worst_step_gap(one_process['off'], want, start):.2e})")
    assert gap <= WEIGHT_REL_TOL, gap


def _initial_weights(*overrides: str) -> dict[str, torch.Tensor]:
    """The deterministic init every layout starts from (drawn in full per name, then sliced: TP-invariant)."""
    from test_parallelize import build

    pmodel, _ = build(*overrides)
    return {name: tensor.detach().clone() for name, tensor in pmodel.module.state_dict().items()}


# Per-rank shards a multiple of 16 at tp 2: intermediate 192 / 2 = 96 (tiny.yaml's 176 would leave 88).
FP8_TP_ARGS = [*BASE, "model.intermediate_size=192"]


@pytest.fixture(scope="module")
def one_process_192(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fp8_tp")
    out: dict[str, Any] = {"start": _initial_weights("model.intermediate_size=192")}
    for fp8 in ("tensorwise", "off"):
        run_distributed(_train, 1, [*FP8_TP_ARGS, f"precision.fp8={fp8}", f"logging.run_dir={root / fp8}"],
                        timeout_s=300)
        out[fp8] = _weights(root / fp8)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["parallel.tp=2"],
    ["parallel.tp=2", "parallel.sequence_parallel=true"],
    ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.activation_checkpointing=selective",
     "parallel.compile=aot_eager"],
    ["parallel.tp=2", "parallel.pp=2"],
], ids=["tp2", "tp2-sp", "tp2-sp-selective-compile", "tp2-pp2"])
def test_fp8_under_tensor_parallelism_steps_like_one_process(one_process_192: dict[str, Any], tmp_path: Path,
                                                            overrides: list[str]) -> None:
    """megatron's Column/RowParallelLinear get torchao's FP8 matmul (trainer/float8.py): one step at tp 2 moves the
    weights as one process does. Each rank scales its own shard; with power-of-two scales that is the whole
    tensor's scale unless a shard's amax falls a binade lower."""
    world_size = 4 if "parallel.pp=2" in overrides else 2
    run_distributed(_train, world_size, [*FP8_TP_ARGS, "precision.fp8=tensorwise", f"logging.run_dir={tmp_path}",
                                         *overrides], timeout_s=300)
    start, want = one_process_192["start"], one_process_192["tensorwise"]
    gap = _worst_step_gap(_weights(tmp_path), want, start)
    without_fp8 = _worst_step_gap(one_process_192["off"], want, start)
    print(f"{overrides}: {gap:.2e} (one process without fp8: {without_fp8:.2e})")
    assert without_fp8 > 10 * WEIGHT_REL_TOL  # FP8 is on in the reference: the same step without it is far off
    assert gap <= WEIGHT_REL_TOL, gap


@pytest.mark.slow
def test_a_bf16_checkpoint_resumes_with_fp8_on(tmp_path: Path) -> None:
    """Same Parameter names with FP8 on or off: a run can switch across a resume, and the log says it did."""
    args = ["optim.warmup_steps=1", "train.log_interval_steps=1", "train.eval_interval_steps=0",
            "logging.tensorboard=false", f"logging.run_dir={tmp_path}"]
    run_distributed(_train, 1, [*args, "train.max_steps=2"], timeout_s=300)
    run_distributed(_train, 1, [*args, "train.max_steps=4", "precision.fp8=tensorwise"], timeout_s=300)
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert "resumed from" in log and "precision.fp8: 'off' -> 'tensorwise'" in log
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
