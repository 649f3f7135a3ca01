"""The DeepSpeed config dict, generated from our Config and the world it runs in. Nobody writes DeepSpeed JSON by hand.

Pure Python (no deepspeed or torch import), so `pretrain train --dry-run` can print it instantly.
Keys and their meaning: DeepSpeed 0.19.8 (`deepspeed/runtime/zero/config.py`, `precision_config.py`); the behaviour
each choice relies on was measured in notes/deepspeed-cpu.md.
"""

from __future__ import annotations

from typing import Any

from trainer.config import Config, Derived, PrecisionConfig, ZeroConfig

# DeepSpeed prints a progress line every `steps_per_print` steps; our logging hook owns progress output.
_NEVER = 2**31 - 1


def build_deepspeed_config(cfg: Config, derived: Derived) -> dict[str, Any]:
    """DeepSpeed config for `cfg` on the world described by `derived` (from `cfg.validate_for_world`).

    Batch: DeepSpeed asserts train_batch_size == micro × grad_accum × dp, where dp is the data-parallel size it gets
    from the `mpu` we pass (not the world size when tp or pp > 1).
    Optimizer: AdamW from this dict; the engine passes parameter groups (weight decay off for norms, ...) as
    `model_parameters`, whose per-group weight_decay overrides the default here. No scheduler here: the engine owns
    the LR schedule (DeepSpeed's built-ins cannot express linear decay to a floor).
    """
    micro, accum, dp = derived.micro_batch_size_per_gpu, derived.grad_accum_steps, derived.dp
    ds: dict[str, Any] = {
        "train_batch_size": micro * accum * dp,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,  # 0.0 = off
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        "zero_optimization": _zero_section(cfg.zero),
        "optimizer": _optimizer_section(cfg, derived.device),
    }
    ds.update(_precision_sections(cfg.precision))
    if derived.pp > 1:
        ds["pipeline"] = _pipeline_section(cfg)
    return ds


def _pipeline_section(cfg: Config) -> dict[str, Any]:
    """With TP, DeepSpeed's pipeline sends each stage boundary activation (and its gradient) as 1/tp slices, one per
    TP rank, and all-gathers them over the TP group on the receiving stage: less p2p traffic, but it assumes the
    tensor is identical on every TP rank. Under sequence parallelism each TP rank holds a different sequence shard,
    so the slicing would splice shards together: send each rank's shard whole instead."""
    sliced = not cfg.parallel.sequence_parallel
    return {"pipe_partitioned": sliced, "grad_partitioned": sliced}


def _zero_section(zero: ZeroConfig) -> dict[str, Any]:
    section: dict[str, Any] = {"stage": zero.stage}
    if zero.stage == 0:
        return section
    section.update(
        overlap_comm=zero.overlap_comm,
        contiguous_gradients=True,
        reduce_scatter=True,
        reduce_bucket_size=zero.reduce_bucket_size_elements,
        allgather_bucket_size=zero.allgather_bucket_size_elements,
    )
    if zero.stage == 3:
        section.update(
            stage3_prefetch_bucket_size=zero.stage3_prefetch_bucket_size_elements,
            stage3_param_persistence_threshold=zero.stage3_param_persistence_threshold_elements,
            # We save our own format (full tensors gathered by the checkpointer), not DeepSpeed's 16-bit model file.
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if zero.offload_optimizer != "none":
        section["offload_optimizer"] = _offload(zero.offload_optimizer, zero.nvme_path)
    if zero.offload_param != "none":
        section["offload_param"] = _offload(zero.offload_param, zero.nvme_path)
    return section


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    target: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        target["nvme_path"] = nvme_path
    return target


def _optimizer_section(cfg: Config, device: str) -> dict[str, Any]:
    optim = cfg.optim
    params: dict[str, Any] = {
        "lr": optim.lr,
        "betas": list(optim.betas),
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
    }
    # torch_adam: use torch.optim.AdamW rather than DeepSpeed's FusedAdam, which JIT-compiles a C++/CUDA op at
    # start-up (41-67 s on CPU). Optimizer offload must run DeepSpeed's own DeepSpeedCPUAdam: leave the choice to it.
    if cfg.zero.offload_optimizer == "none":
        params["torch_adam"] = True
        if device == "cuda":
            # DeepSpeed passes the remaining params to torch.optim.AdamW: fused=True is torch's single-kernel CUDA
            # AdamW (the same update as the foreach one, tests/trainer/test_fused_adamw.py) instead of a handful of
            # multi-tensor kernels per step. The master weights it updates are fp32 on the GPU for every ZeRO stage
            # and precision. CPU runs keep the default implementation (their numbers are the golden trace).
            params["fused"] = True
    # "AdamW" = decoupled weight decay; DeepSpeed's "Adam" would also be AdamW unless adam_w_mode=false (a trap).
    return {"type": "AdamW", "params": params}


def _precision_sections(precision: PrecisionConfig) -> dict[str, Any]:
    if precision.dtype == "fp32":
        return {}
    sections: dict[str, Any] = {}
    if precision.dtype == "bf16":
        sections["bf16"] = {"enabled": True}
    else:
        dynamic = precision.loss_scale == "dynamic"
        sections["fp16"] = {
            "enabled": True,
            "loss_scale": 0 if dynamic else precision.loss_scale,  # DeepSpeed: 0 means dynamic
            "initial_scale_power": precision.initial_loss_scale_power,  # first scale = 2**power
            "loss_scale_window": precision.loss_scale_window_steps,  # steps without overflow before the scale doubles
            "hysteresis": precision.loss_scale_hysteresis,  # overflows tolerated before the scale halves
            "min_loss_scale": precision.min_loss_scale,
        }
    if precision.fp32_grad_accumulation:
        sections["data_types"] = {"grad_accum_dtype": "fp32"}
    return sections
