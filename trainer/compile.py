"""torch.compile of each decoder layer, the torchtitan way: one compiled region per block, applied in `parallelize`
after the TP swap and activation checkpointing and before the pipeline partition and deepspeed.initialize.

Why per block and not the whole model: every block has the same code and shapes, so dynamo traces one block and the
other blocks reuse its graph (their parameters are graph inputs, not constants: `inline_inbuilt_nn_modules`, torch's
default since 2.5); compile time stays that of one block whatever the depth. The embedding, the final norm, lm_head
and the loss stay eager: they are one matmul each, and the loss is chunked by hand (trainer.loss).

Why `nn.Module.compile()` and not `torch.compile(module)`: the in-place variant keeps the module object, so parameter
names, state-dict keys, checkpoints, HF export and init_from never see an `_orig_mod.` prefix, and the layer stays a
`DecoderLayer` for DeepSpeed's pipeline partition (`type:DecoderLayer`).

Why before deepspeed.initialize: DeepSpeed keeps references to the modules it was given (ZeRO-3 hooks, the pipeline's
layer list); compiling in place means those references already call the compiled code. Dynamo traces lazily at the
first call, so hooks DeepSpeed registers later (ZeRO-3 parameter gathers) are seen by the trace; DeepSpeed marks them
`torch.compiler.disable`, which places a graph break around each gather.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

# Every decoder layer is the same code object: without a generous limit, dynamo would stop compiling after a few
# layers whose guards differ (e.g. an activation-checkpointed forward bound to each layer) and silently run the rest
# eagerly. 1 per layer is the worst case; 8 on top is the head room for a recompile on a new shape (evaluation).
_EXTRA_RECOMPILES = 8


def compile_layers(layers: Iterable[nn.Module], backend: str | None) -> int:
    """Compile each layer in place with `backend` (None: leave eager). Returns the number of layers compiled."""
    if backend is None:
        return 0
    import torch._dynamo

    from trainer import model

    # The CUDA-only check whether flash attention takes grouped-query attention natively builds a pybind SDPAParams,
    # which dynamo cannot trace: a graph break inside every layer (and a checkpointed layer would fall back to eager
    # as a whole). Its answer depends only on device, dtype and shapes, which dynamo guards anyway: a constant per graph.
    torch.compiler.assume_constant_result(model._flash_takes_gqa)
    layers = list(layers)
    limit = len(layers) + _EXTRA_RECOMPILES
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           4 * limit)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_time_summary() -> dict[str, Any]:
    """torch's own accounting of compile time in this process (seconds), for the start-up log and the bench."""
    from torch._dynamo.utils import compile_times

    per_phase = compile_times(repr="csv", aggregate=True)  # ([names], [seconds])
    names, seconds = per_phase if isinstance(per_phase, tuple) else ([], [])
    return {str(name): float(value) for name, value in zip(names, seconds, strict=False)
            if _is_number(value)}


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


class CompileWarmupLog:
    """Logs how long the first step took (it traces and compiles the layers) next to the second (steady state), so
    the start-up cost of `parallel.compile` is visible in every run's log."""

    def __init__(self, layers_compiled: int, backend: str) -> None:
        self.layers_compiled = layers_compiled
        self.backend = backend
        self.first_step_s: float | None = None
        self._start_s = time.perf_counter()

    def step_done(self, step_time_s: float) -> dict[str, Any] | None:
        """Call after each of the first two steps; returns the summary (also logged) after the second."""
        if self.first_step_s is None:
            self.first_step_s = step_time_s
            return None
        summary = {"compile_backend": self.backend, "layers_compiled": self.layers_compiled,
                   "first_step_s": self.first_step_s, "second_step_s": step_time_s,
                   "compile_warmup_s": max(0.0, self.first_step_s - step_time_s),
                   "torch_compile_times_s": compile_time_summary()}
        log.info("torch.compile (%s) of %d decoder layers: first step %.2f s, second %.2f s -> ~%.1f s of compile "
                 "warm-up; torch's phases (s): %s", self.backend, self.layers_compiled, self.first_step_s,
                 step_time_s, summary["compile_warmup_s"],
                 _top_phases(summary["torch_compile_times_s"]))
        return summary


def _top_phases(seconds_by_phase: dict[str, float], count: int = 4) -> str:
    """The few phases that dominate (torch reports ~50 nested ones)."""
    top = sorted(seconds_by_phase.items(), key=lambda item: -item[1])[:count]
    return ", ".join(f"{name} {value:.1f}" for name, value in top) or "n/a"
