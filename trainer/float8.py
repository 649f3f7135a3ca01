"""FP8 matmuls for the decoder layers' linears (`precision.fp8`), by torchao's float8 training.

Each q/k/v/o/gate/up/down projection becomes torchao's `Float8Linear`: its input, weight and output gradient are cast
to float8 with a dynamic scale (per tensor, or per row for the rowwise recipes) right before each of the three
matmuls of forward and backward; weights, gradients, optimizer state and every other op stay in the run's dtype. On an
H100/H200 the matmuls run on FP8 tensor cores (2× the bf16 peak); on CPU `torch._scaled_mm` emulates them, so the
numerics of an FP8 run can be tested and measured here (bench/bench_fp8_loss.py).

What stays in high precision, and why (torchtitan and torchao's own recipes do the same):
- the embedding (a lookup, not a matmul) and lm_head: the logits' precision decides the loss, and lm_head is one
  matmul of L·12 per step;
- norms, rotary, attention's softmax(QK^T)V (SDPA), SiLU·mul: not linears.

`Float8Linear.from_float` keeps the `nn.Linear`'s Parameter objects and names, so checkpoints, `init_from`, the HF
export and resharding see the same state as a bf16 run: a run can switch FP8 on or off across a resume.

Under tensor parallelism the projections are megatron-core's Column/RowParallelLinear instead; their local matmul
becomes torchao's float8 matmul, with megatron's communication around it (`_convert_tensor_parallel`).

Order in `parallelize`: after the weights are materialised and initialised (the swap keeps them) and before
activation checkpointing and torch.compile, which then wrap and trace the FP8 layers.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# torchao's CUDA kernels (mxfp8, cutlass) fail to load without a GPU driver and torchao logs each failure as a
# warning at import; float8 training does not use them (it calls torch._scaled_mm). torch's pytree logs a deprecation
# warning about how torchao 0.18 registers an enum: torchao's to fix, nothing a user can act on.
_IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree")


def convert_to_float8(layers: Iterable[nn.Module], recipe: str, device_type: str) -> int:
    """Swap every `nn.Linear` inside `layers` for torchao's `Float8Linear` with `recipe` (precision.fp8: tensorwise,
    rowwise, rowwise_with_gw_hp) in place; "off" leaves them. Returns the number of linears converted."""
    if recipe == "off":
        return 0
    float8 = _torchao_float8(quiet=device_type != "cuda")
    config = float8_config(recipe)
    converted = 0
    for layer in layers:
        converted += _count_linears(layer) + _convert_tensor_parallel(layer, config)
        float8.convert_to_float8_training(layer, config=config)
    return converted


def _convert_tensor_parallel(layer: nn.Module, config: Any) -> int:
    """Under TP the projections are megatron-core's Column/RowParallelLinear, which torchao's swap does not reach:
    their local matmul (`_forward_impl`) becomes torchao's float8 matmul, with the TP communication megatron's own
    implementation does around it. Each rank scales its own shard by the shard's amax, as Transformer Engine does
    for TP weights; with power-of-two scales that equals the whole tensor's scale unless the shard's amax falls a
    binade lower. (Rowwise recipes are refused under TP by config validation: a row-parallel layer splits the rows
    the scales run along.) Returns the number of layers converted."""
    if "megatron.core.tensor_parallel" not in sys.modules:  # tp 1: no megatron layers (and no slow import)
        return 0
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    parallel = [m for m in layer.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    if parallel:
        matmul = functools.partial(_float8_parallel_matmul, _mm_config(config), config)
        for module in parallel:
            # An instance attribute, not a bound method: megatron calls self._forward_impl(input=..., weight=...).
            module._forward_impl = matmul
    return len(parallel)


def _mm_config(config: Any) -> Any:
    """torchao's LinearMMConfig for `config` (the _scaled_mm settings of the three matmuls, not shape-dependent), as
    its Float8Linear builds it (for a linear on the meta device: no memory)."""
    _torchao_float8(quiet=True)
    from torchao.float8.float8_linear import Float8Linear as float8_linear

    with torch.device("meta"):
        shape_only = nn.Linear(16, 16, bias=False)
    return float8_linear.from_float(shape_only, config=config).linear_mm_config


def _float8_parallel_matmul(mm_config: Any, config: Any, *, input: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None = None, allreduce_dgrad: bool = False,
                            sequence_parallel: bool = False, tp_group: Any = None,
                            gradient_accumulation_fusion: bool = False, **_unused: Any) -> torch.Tensor:
    """megatron's linear_with_grad_accumulation_and_async_allreduce with an FP8 matmul: sequence parallel gathers
    the input over the sequence (its gradient reduce-scattered back), otherwise the input gradient is all-reduced
    over TP when `allreduce_dgrad` (a column-parallel layer without SP); a row-parallel layer's caller reduces its
    output. Without gradient accumulation fusion (trainer.parallelize leaves it off)."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    if gradient_accumulation_fusion:  # megatron would accumulate into weight.main_grad, which autograd here cannot
        raise NotImplementedError("precision.fp8 under TP runs without megatron's gradient_accumulation_fusion (the "
                                  "trainer leaves it off): turn it off, or set precision.fp8=off")
    if sequence_parallel:
        input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
    elif allreduce_dgrad:
        input = copy_to_tensor_model_parallel_region(input, group=tp_group)
    output = matmul_with_hp_or_float8_args.apply(input, weight.t(), mm_config, config)
    return output if bias is None else output + bias


def float8_config(recipe: str) -> Any:
    """torchao's `Float8LinearConfig` for `recipe`, with every scale rounded down to a power of two.

    torchao's rowwise recipes already do this; its tensorwise recipe uses the exact amax / fp8_max scale. With that
    scale, a 1e-7 difference in one element of a tensor (another loss chunking, another DP reduction order) moves
    the scale, and so every element of the tensor, by 1e-7, which flips the e4m3/e5m2 rounding of the few elements
    that sit on a boundary by 12-25 %: the gradients of the chunked loss and the plain loss differed by 1.9e-2
    (measured, tests/trainer/test_float8.py), and ZeRO-3 over 2 ranks drifted from one process. A power-of-two scale
    does not move for such a difference (the gap fell to 3e-7) and scaling by it is exact in fp32; it uses at most
    one binade less of FP8's range."""
    import dataclasses

    config_cls = _torchao_float8(quiet=True).Float8LinearConfig
    return dataclasses.replace(config_cls.from_recipe_name(recipe), round_scales_to_power_of_2=True)


def _count_linears(module: nn.Module) -> int:
    return sum(type(m) is nn.Linear for m in module.modules())


def _torchao_float8(quiet: bool) -> Any:
    """The `torchao.float8` module; `quiet`: without torchao's import-time warnings about its CUDA kernels."""
    loggers = [logging.getLogger(name) for name in _IMPORT_NOISE_LOGGERS[0 if quiet else 1:]]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        import torchao.float8
    except ImportError as err:
        raise ImportError("precision.fp8 needs torchao (pip install 'torchao>=0.18'), or set precision.fp8=off") \
            from err
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
    return torchao.float8
