"""The run config: one typed tree, a sub-config per component, loaded from YAML plus dotted overrides.

    cfg = load_config("configs/7b.yaml", ["optim.lr=3e-4", "parallel.tp=2"])
    derived = cfg.validate_for_world(world_size=32)     # dp, grad_accum_steps, padded_vocab_size, ...
    save_resolved(cfg, "runs/x/config.yaml", derived)

Two levels of checking, on purpose:
- `load_config` (pydantic, `extra="forbid"`, strict types) checks that the config is self-consistent: types, ranges,
  unknown keys (with a close-match suggestion), model shape, sections that contradict each other.
- `Config.validate_for_world` checks that the run plan fits a world: tp/pp/dp, ZeRO with pipeline, batch divisibility,
  fp16 on CPU. A config can be loaded to inspect or convert a checkpoint without naming a cluster.
Every message names the dotted path and says what to do. Derived values (dp, grad_accum_steps, padded vocab, ...) live
in the separate `Derived` object and are never written back into user fields, so a resolved config round-trips.

This module is imported by `--help` and `--dry-run` paths: keep it free of torch (import time < 1 s).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

# Megatron's convention: pad the embedding rows so each TP shard holds a multiple of 128 rows (tensor-core friendly).
VOCAB_PAD_MULTIPLE = 128


class ConfigError(ValueError):
    """A config problem the user can fix; the message names the dotted path and the fix."""

    user_error = True  # launch/cli.py prints these without a traceback


PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    # strict: YAML already gives typed values, so "2" for an int or `true` for an int is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class RopeScalingConfig(_Section):
    """RoPE frequency scaling, for a context longer than the one the model was first trained at (HF's
    rope_parameters; imported from and exported to config.json). linear: every frequency divided by `factor`
    (position interpolation, Chen et al. 2023). llama3: Llama 3.1's rule: wavelengths shorter than
    original_max_seq_len / high_freq_factor stay, longer than original_max_seq_len / low_freq_factor are divided
    by `factor`, and those between move smoothly from one to the other."""

    type: Literal["linear", "llama3"]  # linear: every frequency / factor; llama3: Llama 3.1's rule by wavelength
    factor: Annotated[float, Field(ge=1.0)]  # Llama 3.1: 8; Llama 3.2 1B/3B: 32
    low_freq_factor: PositiveFloat = 1.0  # llama3 only
    high_freq_factor: PositiveFloat = 4.0  # llama3 only
    original_max_seq_len: PositiveInt = 8192  # llama3 only: the context the unscaled model was trained at

    @model_validator(mode="after")
    def _check_llama3(self) -> RopeScalingConfig:
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"model.rope_scaling: high_freq_factor ({self.high_freq_factor}) must be greater than "
                             f"low_freq_factor ({self.low_freq_factor}) (Llama 3.1: 4 and 1)")
        return self


class ModelConfig(_Section):
    vocab_size: PositiveInt  # the tokenizer's vocabulary; the embedding is padded beyond it (Derived.padded_vocab_size)
    hidden_size: PositiveInt  # model width (HF hidden_size)
    intermediate_size: PositiveInt  # SwiGLU inner width
    num_layers: PositiveInt  # decoder layers
    num_heads: PositiveInt  # query heads
    num_kv_heads: PositiveInt  # = num_heads for multi-head attention; fewer for grouped-query attention
    head_dim: PositiveInt | None = None  # None: hidden_size // num_heads
    rope_theta: PositiveFloat = 10000.0  # RoPE base (Llama 2: 10000; Llama 3: 500000)
    # RoPE scaling for a longer context than the model first trained at (Llama 3.1-3.3 use llama3; imported from and
    # exported to HF's rope_parameters). None: plain RoPE.
    rope_scaling: RopeScalingConfig | None = None
    rms_norm_eps: PositiveFloat = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # lm_head shares the input embedding's weight
    max_seq_len: PositiveInt = 2048  # context length recorded for export (HF max_position_embeddings)
    # Normal(0, init_std) for every weight; o_proj and down_proj use init_std / sqrt(2 * num_layers) (GPT-2,
    # Megatron); norms start at 1.
    init_std: PositiveFloat = 0.02
    # Packed samples hold several documents, each ending with the tokenizer's eos (data_pipeline/packing.py).
    # causal: every token attends to all earlier tokens of the sample, across document ends (GPT-3, Llama 2);
    # document: only to earlier tokens of its own document (Llama 3's intra-document mask; Megatron-LM's
    # --reset-attention-mask). The eos id is the data's (its manifests' tokenizer; synthetic data: 2).
    attention_mask: Literal["causal", "document"] = "causal"
    # RoPE positions restart at 0 with each document instead of running over the sample (Megatron-LM's
    # --reset-position-ids): a document then sees the positions it would see alone, as at inference.
    reset_position_ids: bool = False

    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def uses_documents(self) -> bool:
        """Whether the model reads the document boundaries (the eos tokens) of its input."""
        return self.attention_mask == "document" or self.reset_position_ids


def _on_off_as_text(value: Any) -> Any:
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class ParallelConfig(_Section):
    tp: PositiveInt = 1  # tensor-parallel ranks (megatron-core layers); divides the heads and intermediate_size
    pp: PositiveInt = 1  # pipeline stages (DeepSpeed 1F1B); needs ZeRO 0 or 1
    # Decoder layers on each pipeline stage, first to last; None: model.num_layers / pp on every stage. For a pp that
    # does not divide num_layers: the first and last stages take fewer, as they also run the embedding and lm_head
    # (Llama 3 405B: 126 layers on 16 stages as [7, 8 × 14, 7]); `balanced_stage_layers` gives that split.
    pipeline_stage_layers: list[int] | None = None
    dp: PositiveInt | Literal["auto"] = "auto"  # auto: world_size // (tp * pp)
    # With tp > 1: the activations outside the TP matmuls (norms, residual) split along the sequence over the TP
    # ranks (Megatron's sequence parallelism: less activation memory, all-gather + reduce-scatter per block).
    sequence_parallel: bool = False
    # selective: recompute cheap elementwise ops (norms, rotary, SiLU*mul), keep matmul and attention outputs.
    # core_attention: Megatron's "selective": recompute only the attention core, keep everything else.
    activation_checkpointing: Literal["none", "selective", "core_attention", "full"] = "none"
    # Checkpoint only the first N decoder layers of each pipeline stage; the others keep every activation (Megatron-
    # LM's --recompute-method block --recompute-num-layers N): less recompute for more memory, the knob between two
    # modes. None: every layer. A stage with fewer layers checkpoints all of its own. `pretrain plan` picks the
    # smallest N that fits.
    activation_checkpointing_layers: PositiveInt | None = None
    # torch.compile of each decoder layer (trainer/compile.py). auto: inductor on launch.device=cuda, off on CPU
    # (inductor's C++ build costs minutes there for little gain); on: inductor everywhere; off: eager; aot_eager:
    # graph capture + AOTAutograd without code generation (debugging and the CPU equivalence tests).
    # YAML 1.1 reads a bare on/off as true/false: both spellings are accepted.
    compile: Annotated[Literal["auto", "on", "off", "aot_eager"], BeforeValidator(_on_off_as_text)] = "auto"
    # The loss (trainer/loss.py). chunked: lm_head makes the (B, T, V) logits, the cross entropy walks them in token
    # chunks (no fp32 copy). fused_linear: lm_head and the loss in one, chunk by chunk: no logits and no logits'
    # gradient for the whole micro-batch (2 × 1 GB in bf16 at the 1B shape); any tp, pp and ZeRO stage.
    lm_loss: Literal["chunked", "fused_linear"] = "chunked"
    # The attention kernel under model.attention_mask=document (trainer/document_attention.py). sdpa: a dense
    # (B, 1, T, T) mask into SDPA (CUDA: the memory-efficient kernel, which computes every tile and keeps the mask for
    # backward). flex: FlexAttention with a block mask built from the document ids: tiles across documents are
    # skipped, tiles inside one document run unmasked, no T×T mask and native GQA; CUDA only (FlexAttention has no
    # backward on CPU), on Ampere or later GPUs, and only where inductor builds its kernel (see `flex_is_fused`).
    # auto: flex where it is fused on an Ampere or later GPU, else sdpa. The causal mask always runs SDPA (flash).
    attention_kernel: Literal["auto", "sdpa", "flex"] = "auto"

    def checkpointed_layers(self, stage_layers: int) -> int:
        """How many of a pipeline stage's `stage_layers` decoder layers are checkpointed (its first ones)."""
        if self.activation_checkpointing == "none":
            return 0
        return min(self.activation_checkpointing_layers or stage_layers, stage_layers)

    def compile_backend(self, device: str) -> str | None:
        """The torch.compile backend of the decoder layers (parallel.compile) on `device`; None: eager."""
        if self.compile == "off" or (self.compile == "auto" and device != "cuda"):
            return None
        return "aot_eager" if self.compile == "aot_eager" else "inductor"

    def flex_is_fused(self, device: str) -> bool:
        """Whether FlexAttention runs inductor's fused kernel, not its reference math (the full T × T scores): inside
        inductor-compiled layers; in eager layers it compiles itself, except under selective or core_attention
        checkpointing, whose recompute policy is a dispatch mode and torch.compile stands aside while one is active."""
        backend = self.compile_backend(device)
        return backend == "inductor" or (backend is None and self.activation_checkpointing in ("none", "full"))

    def resolved_attention_kernel(self, device: str,
                                  gpu_capability: tuple[int, int] | None = None) -> Literal["sdpa", "flex"]:
        """parallel.attention_kernel on `device` ("cuda" or "cpu"): the kernel the document mask runs.
        `gpu_capability`: the CUDA compute capability where known (training); None (a dry run on a login node,
        `plan`) takes an Ampere or later GPU."""
        if self.attention_kernel == "auto":
            fused = device == "cuda" and self.flex_is_fused(device)
            return "flex" if fused and flex_suits_gpu(gpu_capability) else "sdpa"
        return self.attention_kernel


# FlexAttention is Triton's kernel, tuned for Ampere and later. Before (V100: sm 7.0, T4 / RTX 20xx: 7.5) it ran
# ~10× slower than SDPA (meta-pytorch/attention-gym#21, V100) or failed to compile (pytorch/pytorch#164813, 2080 Ti).
FLEX_MIN_CAPABILITY = (8, 0)


def flex_suits_gpu(gpu_capability: tuple[int, int] | None) -> bool:
    return gpu_capability is None or tuple(gpu_capability) >= FLEX_MIN_CAPABILITY


# The document mask's kernel (Derived.attention_kernel) as the run log and the dry run name it.
DOCUMENT_KERNEL_NAMES = {"flex": "FlexAttention", "sdpa": "SDPA with a dense mask"}

OffloadDevice = Literal["none", "cpu", "nvme"]


class ZeroConfig(_Section):
    stage: Annotated[int, Field(ge=0, le=3)] = 0  # ZeRO: 1 shards optimizer state, 2 also gradients, 3 also weights
    offload_optimizer: OffloadDevice = "none"  # optimizer state and its step on the host or on NVMe; ZeRO >= 1
    offload_param: OffloadDevice = "none"  # ZeRO-3 only
    nvme_path: str | None = None  # a node-local directory, for offload to nvme
    overlap_comm: bool = True  # overlap gradient reduction with the backward pass (DeepSpeed overlap_comm)
    # DeepSpeed's buckets, in elements: larger buckets mean fewer, larger collectives and more memory
    # (the estimate counts them).
    reduce_bucket_size_elements: PositiveInt = 500_000_000  # gradients per reduce(-scatter)
    allgather_bucket_size_elements: PositiveInt = 500_000_000  # ZeRO 1-2: updated weights per all-gather
    stage3_prefetch_bucket_size_elements: PositiveInt = 50_000_000  # ZeRO-3: weights gathered ahead of use
    stage3_param_persistence_threshold_elements: NonNegativeInt = 100_000  # ZeRO-3: smaller tensors stay whole


class PrecisionConfig(_Section):
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"  # compute dtype; master weights and optimizer state stay fp32
    # Accumulate gradients across micro-steps in fp32 (DeepSpeed data_types.grad_accum_dtype); needs ZeRO >= 1.
    fp32_grad_accumulation: bool = False
    # fp16 only. "dynamic" = DeepSpeed dynamic loss scaling; a number = static scale.
    loss_scale: PositiveFloat | Literal["dynamic"] = "dynamic"
    initial_loss_scale_power: Annotated[int, Field(ge=0, le=40)] = 16  # fp16 dynamic scaling starts at 2^this
    loss_scale_window_steps: PositiveInt = 1000  # steps without overflow before the scale doubles
    loss_scale_hysteresis: PositiveInt = 2  # overflows tolerated before the scale halves
    min_loss_scale: PositiveInt = 1  # fp16: the dynamic scale stops halving here
    # FP8 matmuls in the decoder layers' linears (trainer/float8.py, torchao float8 training); everything else stays
    # in `dtype`. tensorwise: one dynamic scale per tensor (fastest); rowwise: one per row (closer to bf16);
    # rowwise_with_gw_hp: rowwise, with the weight gradient's matmul in high precision. Under tp > 1 tensorwise only
    # (each rank scales its shard); every linear dimension per rank a multiple of 16 (FP8 tensor cores); pays on
    # H100/H200-class GPUs, emulated (slow) on CPU.
    fp8: Annotated[Literal["off", "tensorwise", "rowwise", "rowwise_with_gw_hp"],
                   BeforeValidator(_on_off_as_text)] = "off"


class NoDecayConfig(_Section):
    """Which parameter kinds are excluded from weight decay."""

    norms: bool = True  # RMSNorm weights
    biases: bool = True  # `*.bias` (the Llama layers have none)
    embeddings: bool = False  # embed_tokens (with tie_embeddings also lm_head, the same tensor)


class OptimConfig(_Section):
    lr: PositiveFloat = 3e-4  # peak learning rate, reached at the end of warmup
    min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1  # floor = lr * min_lr_ratio, reached at max_steps
    warmup_steps: NonNegativeInt = 0  # linear warmup from 0 to lr
    # The decay's shape, lr → lr * min_lr_ratio at max_steps. 1-sqrt: 1 - sqrt(progress), the cooldown of
    # warmup-stable-decay runs (Hägele et al. 2024); constant: lr stays at its peak after warmup.
    decay: Literal["cosine", "linear", "1-sqrt", "constant"] = "cosine"
    # None: the decay spans every step after warmup. N: lr holds at its peak until step max_steps - N, then decays over
    # the last N steps (warmup-stable-decay, WSD): the run can be extended, or a cooldown branched from any
    # stable-phase checkpoint by resuming with a new max_steps, and the LR curve stays the one planned.
    decay_steps: PositiveInt | None = None
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.1  # AdamW's decoupled decay, off for what no_decay_on names
    # Adam's beta1, beta2
    betas: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(default=[0.9, 0.95], min_length=2, max_length=2)
    eps: PositiveFloat = 1e-8  # Adam's epsilon
    grad_clip: Annotated[float, Field(ge=0.0)] = 1.0  # max global grad norm; 0 turns clipping off
    no_decay_on: NoDecayConfig = Field(default_factory=NoDecayConfig)


class BatchRampupConfig(_Section):
    """Batch-size warmup (GPT-3; Megatron-LM's --rampup-batch-size START INCREMENT SAMPLES): the global batch starts
    at `start` samples and grows by `increment` at even intervals of consumed samples, reaching
    train.global_batch_size once `samples` samples have been trained on. Micro-batch size stays; the accumulation
    steps grow."""

    start: PositiveInt  # global batch (samples) of the first step
    increment: PositiveInt  # samples added at each increase
    samples: PositiveInt  # samples consumed until the global batch reaches train.global_batch_size


class TrainConfig(_Section):
    seq_len: PositiveInt  # tokens per sample; a prepared dataset must have been prepared with this --seq-len
    micro_batch_size_per_gpu: PositiveInt  # samples per micro-step per DP rank
    global_batch_size: PositiveInt  # samples per optimizer step, over all DP ranks and micro-steps
    max_steps: PositiveInt  # optimizer steps
    seed: NonNegativeInt = 1234  # weights' init and the data order (with the data's fingerprint)
    log_interval_steps: PositiveInt = 10  # one console line and one metrics.jsonl record every this many steps
    eval_interval_steps: NonNegativeInt = 1000  # 0: no periodic eval
    # Global batches per eval: eval_steps × global_batch_size validation samples, the same set for any tp/pp/dp.
    eval_steps: NonNegativeInt = 20
    # Multiple-choice tasks scored at each eval besides the validation loss (trainer/downstream.py): JSON Lines files
    # of {"context", "choices", "label"}, logged as acc/<file stem> and acc_norm/<file stem> (lm-eval's metrics); or
    # a directory of them (`pretrain convert lm-eval-task` writes one for a group): a group, logged per task as
    # acc/<dir>/<file stem> and as a whole as acc/<dir>.
    eval_tasks: list[str] = Field(default_factory=list)
    # The tokenizer that encodes eval_tasks; None: the first data.datasets entry's (what the model trained on).
    eval_tasks_tokenizer: str | None = None
    # PaLM's auxiliary z-loss: the objective becomes cross entropy + this × mean over tokens of (log Z)², Z the
    # softmax normaliser, which keeps the output logits from drifting (PaLM, OLMo 2: 1e-4; 0: off). The logged `loss`
    # and val_loss stay the cross entropy; the weighted term is logged as `z_loss`.
    z_loss_weight: Annotated[float, Field(ge=0.0)] = 0.0
    # The loss leaves out the positions whose input is the eos: what follows a document's end is the next document's
    # first token, which nothing before it predicts (Megatron-LM's --eod-mask-loss; mostly with
    # model.attention_mask=document). The mean is then over the tokens kept in the whole global batch, however
    # they fall into micro-batches and DP ranks (as HF's model computes it); validation alike.
    mask_eos_loss: bool = False
    # Batch-size warmup (GPT-3; Megatron-LM's --rampup-batch-size): the global batch starts at `start` samples and
    # grows by `increment` until `samples` samples are consumed; None: global_batch_size from the first step. The LR
    # schedule stays in optimizer steps.
    batch_size_rampup: BatchRampupConfig | None = None

    def ramp_batch_sizes(self) -> list[int]:
        """The global batch (samples) of each step before the batch reaches global_batch_size, in step order: empty
        without a rampup. Megatron-LM's rule: after `consumed` samples the batch is start + increment ×
        floor(consumed / (samples / number of increments)), at most global_batch_size."""
        ramp = self.batch_size_rampup
        if ramp is None:
            return []
        samples_per_increment = ramp.samples / ((self.global_batch_size - ramp.start) // ramp.increment)
        sizes: list[int] = []
        consumed = 0
        while (size := ramp.start + ramp.increment * int(consumed / samples_per_increment)) < self.global_batch_size:
            sizes.append(size)
            consumed += size
        return sizes

    def batch_size_at(self, step: int, ramp_sizes: list[int] | None = None) -> int:
        """The global batch (samples) of 0-based optimizer step `step` (pass ramp_batch_sizes() when asking often)."""
        sizes = self.ramp_batch_sizes() if ramp_sizes is None else ramp_sizes
        return sizes[step] if step < len(sizes) else self.global_batch_size

    @property
    def eval_enabled(self) -> bool:
        """Whether the run evaluates at all (either field 0 turns it off)."""
        return self.eval_interval_steps > 0 and self.eval_steps > 0


class DatasetEntry(_Section):
    path: Annotated[str, Field(min_length=1)]  # a prepared dataset directory (holds manifest.json)
    weight: PositiveFloat = 1.0  # relative share of training tokens in the mixture


class DataConfig(_Section):
    synthetic: bool = False  # random tokens, no files: for debugging and benchmarks
    datasets: list[DatasetEntry] = Field(default_factory=list)  # prepared datasets, mixed by weight
    train_split: str = "train"  # the manifest split trained on
    eval_split: str = "val"  # the manifest split validated on
    num_workers: NonNegativeInt = 2  # loader processes per rank (decode and batch shards); 0: in the rank's process
    # Remote shards' local cache; None: $PRETRAIN_CACHE_DIR/shards, else ~/.cache/pretrain/shards.
    cache_dir: str | None = None


class CheckpointConfig(_Section):
    """Format, triggers and resume rules: docs/checkpointing.md."""

    dir: str | None = None  # None: <run_dir>/checkpoints; must be one filesystem that every rank sees
    save_interval_steps: NonNegativeInt = 1000  # 0: off
    save_interval_minutes: Annotated[float, Field(ge=0.0)] = 0.0  # 0: off; whichever interval comes first saves
    keep_last: PositiveInt = 3  # older complete checkpoints are deleted only after a newer one is complete
    # auto: the newest complete checkpoint in `dir` (corrupt ones are skipped), or a fresh start if there is none;
    # none: always start fresh; a path: that checkpoint directory (or a directory of checkpoints: its newest)
    resume: Annotated[str, Field(min_length=1)] = "auto"
    # Weights only, for a fresh run (no checkpoint to resume from; resume always wins): a *.safetensors full state
    # dict (`pretrain convert from-hf` output, save_full_state_dict), one of our checkpoint dirs (or a directory of
    # them: its newest intact one), or an HF Llama directory. Any tp/pp/dp/zero layout
    # (trainer/checkpoint/init_from.py).
    init_from: str | None = None
    # init_from with a larger model.vocab_size than the source's (tokens added to its tokenizer for continued
    # pretraining): refuse, or start each new row of embed_tokens and lm_head at the mean of the source's rows
    # (Hewitt 2021; what transformers' resize_token_embeddings centres its new rows on).
    init_from_new_vocab_rows: Literal["refuse", "mean"] = "refuse"
    async_save: bool = False  # copy the state to CPU memory, write it in a background thread
    save_at_end: bool = True  # also save after the last step (unless that step was just saved)
    verify_on_load: bool = True  # sha256 of every file before a checkpoint is used (split over the ranks)
    # Resume from a checkpoint of other data (manifest fingerprint, seed, sample length): the new data stream
    # starts at sample 0. Without it such a resume is refused.
    allow_data_change: bool = False
    # How long rank 0 waits for the other ranks' files before it declares an (async) save incomplete.
    commit_timeout_s: PositiveFloat = 600.0


class FaultsConfig(_Section):
    """Numerical faults and hangs (trainer/faults.py, docs/checkpointing.md)."""

    # A step whose loss or gradients are NaN/inf is not applied (weights, optimizer moments and LR schedule stay).
    skip_nonfinite: bool = True
    # After this many consecutive skipped steps, reload the newest checkpoint and continue on the data after the bad
    # window (0: never roll back, keep skipping).
    rollback_after_bad_steps: NonNegativeInt = 5
    max_rollbacks: NonNegativeInt = 3  # then stop with the `diverged` exit code: the run needs a person
    # Loss-spike skip: a step whose loss is more than this many standard deviations above the mean of the last
    # `loss_spike_window_steps` applied steps is skipped like a NaN step (0: off).
    loss_spike_zscore: Annotated[float, Field(ge=0.0)] = 0.0
    loss_spike_window_steps: Annotated[int, Field(ge=2)] = 100  # applied steps the spike's mean and deviation cover
    # Watchdog: no finished step (or checkpoint progress) for this long → every rank dumps its Python stacks to its
    # log and exits with the `hang` exit code (0: off). Keep it above the slowest step + save.
    hang_timeout_s: Annotated[float, Field(ge=0.0)] = 1800.0
    # Bound on every collective (torch.distributed timeout): a rank whose peer died fails after this long.
    collective_timeout_s: PositiveFloat = 600.0
    # Straggler check (trainer/stragglers.py): at the first logged step after every this many steps, each rank times
    # the same matmuls on its own device and the ranks compare; also each rank's data-wait share (0: off; a single
    # process has no peers and never checks).
    straggler_check_interval_steps: NonNegativeInt = 100
    # A rank whose probe takes more than this × the median rank's is reported: a warning naming its node and a line
    # in <run_dir>/stragglers.jsonl.
    straggler_ratio: Annotated[float, Field(gt=1.0)] = 1.2
    # report: warn and record. leave_node: when checks in a row name a straggler (straggler_patience_checks), save a
    # checkpoint and exit with the straggler code; the sbatch script submits the job again without that node.
    straggler_action: Literal["report", "leave_node"] = "report"
    straggler_patience_checks: PositiveInt = 3  # leave_node: checks in a row that must name a straggler


class LoggingConfig(_Section):
    run_dir: str | None = None  # None: runs/<name>
    tensorboard: bool = True  # <run_dir>/tb/
    jsonl: bool = True  # <run_dir>/metrics.jsonl (what `pretrain report` reads)
    gpu_peak_tflops: PositiveFloat | None = None  # dense bf16 peak for MFU; None: looked up from the device name
    # Weights & Biases: the metrics TensorBoard gets, against trainer/step, and the resolved config; one W&B run per
    # run directory (its id in <run_dir>/wandb_run_id: a resumed or requeued job continues it). Needs the wandb
    # package (pip install wandb).
    wandb: bool = False
    wandb_project: str = "pretrain"  # the W&B project the run goes to
    wandb_entity: str | None = None  # W&B team or user; None: the logged-in account's default
    # online: needs `wandb login` (or WANDB_API_KEY) on the logging rank's node; offline: nothing leaves the node
    # (compute nodes without internet), `wandb sync <run_dir>/wandb/offline-run-*` uploads it later.
    wandb_mode: Literal["online", "offline"] = "online"


class ProfilingConfig(_Section):
    """torch.profiler over a window of optimizer steps (trainer/profiling.py): a Chrome/Perfetto trace per profiled
    rank and one log line saying where the device time went (GEMMs, attention, fused kernels, optimizer, ...)."""

    # First profiled optimizer step, 1-based as in the logs; 0: off. Start after the compile warm-up (steps 1-2).
    start_step: NonNegativeInt = 0
    num_steps: PositiveInt = 2  # consecutive optimizer steps in the window
    ranks: list[NonNegativeInt] = Field(default_factory=lambda: [0])  # global ranks that profile
    record_shapes: bool = False  # input shapes per op: a larger trace
    with_stack: bool = False  # Python stack per op: a much larger trace and a slower window
    # CUDA allocation history from the first step to the window's end, saved next to the trace as
    # rank<r>_memory_snapshot.pickle (open it in https://pytorch.org/memory_viz): which tensors make the peak. An
    # out-of-memory error on a profiled rank saves rank<r>_memory_snapshot_oom.pickle first. Costs step time.
    memory_snapshot: bool = False
    dir: str | None = None  # None: <run_dir>/profile

    @property
    def enabled(self) -> bool:
        return self.start_step > 0

    @property
    def last_step(self) -> int:
        return self.start_step + self.num_steps - 1


# Slurm --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_SLURM_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}(:\d{1,2}){0,2})$")


def _minutes_as_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class LaunchConfig(_Section):
    nodes: PositiveInt = 1  # Slurm nodes (sbatch --nodes)
    gpus_per_node: PositiveInt = 8  # on CPU: processes per node
    device: Literal["cuda", "cpu"] = "cuda"  # cuda: NCCL, one GPU per rank; cpu: gloo (debugging, tests)
    partition: str | None = None  # sbatch --partition
    account: str | None = None  # sbatch --account
    qos: str | None = None  # sbatch --qos
    # Slurm --time, e.g. "2-00:00:00"; a bare number is minutes (YAML reads `30` as an int: it is kept as "30").
    time_limit: Annotated[str | None, BeforeValidator(_minutes_as_text)] = None
    constraint: str | None = None  # sbatch --constraint (node features)
    exclusive: bool = True  # sbatch --exclusive: whole nodes
    extra_sbatch: list[str] = Field(default_factory=list)  # whole lines: "#SBATCH --mail-type=END"
    env_setup: list[str] = Field(default_factory=list)  # shell lines run before the launcher (module load, source venv)
    container: str | None = None  # container image for srun --container-image (pyxis/enroot)
    container_mounts: list[str] = Field(default_factory=list)  # srun --container-mounts entries, "src:dst"
    # None: data.num_workers + 1 (the rank plus its loader workers), so sites that bind tasks to cores do not put a
    # rank and its workers on one CPU.
    cpus_per_task: PositiveInt | None = None
    # Preemption / time limit: Slurm sends SIGUSR1 this many seconds before the limit; the trainer checkpoints and
    # exits with the requeue exit code, and the batch script requeues the job (resume: auto picks up the checkpoint).
    signal_lead_s: PositiveInt = 180
    requeue: bool = True  # requeue after a checkpoint on signal (exit 75) and after a hang, up to max_hang_requeues
    chain_jobs: NonNegativeInt = 0  # follow-up jobs submitted with --dependency=afterany on the previous one
    # A hung rank (exit 76) ends the whole job step; the batch script then requeues the job at most this many times
    # (per job id), then leaves it failed for a person (docs/operations.md).
    max_hang_requeues: NonNegativeInt = 2
    # Within that budget, a hang in which some rank did not fire its watchdog with its peers submits the job again
    # without that rank's node (a new job id, resuming like a requeue) instead of requeueing it onto it; in place
    # when the partition would keep too few usable nodes, or when no node is suspect (launch/hung_nodes.py,
    # docs/operations.md).
    exclude_hung_nodes: bool = True


class Config(_Section):
    # The run's name: logging.run_dir defaults to runs/<name>.
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] = "run"
    model: ModelConfig
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig
    data: DataConfig
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    profiling: ProfilingConfig = Field(default_factory=ProfilingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    @model_validator(mode="after")
    def _self_consistent(self) -> Config:
        problems = _static_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def run_dir(self) -> str:
        return self.logging.run_dir or os.path.join("runs", self.name)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")

    @property
    def profile_dir(self) -> str:
        return self.profiling.dir or os.path.join(self.run_dir, "profile")

    def validate_for_world(self, world_size: int, device: str | None = None,
                           gpu_capability: tuple[int, int] | None = None) -> Derived:
        """Check that this run plan fits `world_size` processes on `device` (default: launch.device), on GPUs of
        compute capability `gpu_capability` where known (the training processes pass it; None: Ampere or later).

        Raises ConfigError listing every problem; returns the derived values otherwise.
        """
        device = device or self.launch.device
        problems = _world_problems(self, world_size, device, gpu_capability)
        if problems:
            raise ConfigError(f"config does not fit world size {world_size} on {device}:\n" + _bullets(problems))
        return _derive(self, world_size, device, gpu_capability)


@dataclasses.dataclass(frozen=True)
class Derived:
    """Values computed from a Config and a world; never written back into the Config."""

    world_size: int
    device: str
    tp: int
    pp: int
    dp: int
    grad_accum_steps: int  # micro-steps per optimizer step on each DP rank
    micro_batch_size_per_gpu: int
    global_batch_size: int  # samples per optimizer step
    global_batch_size_tokens: int
    head_dim: int
    padded_vocab_size: int  # embedding rows: vocab_size rounded up to a multiple of tp * 128
    stage_layers: tuple[int, ...]  # decoder layers on each pipeline stage, first to last (sum: model.num_layers)
    attention_kernel: str  # what the document mask runs on this device (sdpa or flex); the causal mask: always sdpa
    run_dir: str
    checkpoint_dir: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    multiple = tp * VOCAB_PAD_MULTIPLE
    return math.ceil(vocab_size / multiple) * multiple


def stage_layers(num_layers: int, par: ParallelConfig) -> tuple[int, ...]:
    """Decoder layers per pipeline stage of a validated config: the user's list, else the even split."""
    if par.pipeline_stage_layers is not None:
        return tuple(par.pipeline_stage_layers)
    return (num_layers // par.pp,) * par.pp


def balanced_stage_layers(num_layers: int, pp: int) -> list[int]:
    """`num_layers` over `pp` stages (pp <= num_layers) as evenly as possible: each stage holds ceil(L / pp) or one
    fewer. The stages with one fewer are the end stages first, in the order last, first, second-to-last, second, ...:
    the last stage also runs the final norm, lm_head and the loss, the first the embedding and (under 1F1B) the most
    micro-batches in flight. Llama 3 405B (126 layers, pp 16) → [7, 8 × 14, 7], as published; Megatron-LM sets the
    same with --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers. Even when pp divides L."""
    per_stage = -(-num_layers // pp)
    layers = [per_stage] * pp
    ends_first = [stage for pair in zip(range(pp - 1, -1, -1), range(pp)) for stage in pair]
    for stage in list(dict.fromkeys(ends_first))[: per_stage * pp - num_layers]:
        layers[stage] -= 1
    return layers


def stage_layers_text(layers: Sequence[int]) -> str:
    """A stage list as a CLI override value (no spaces, so it needs no shell quoting): [7,8,8,7]."""
    return "[" + ",".join(str(n) for n in layers) + "]"


# ---------------------------------------------------------------------------------------------------------------------
# Checks


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _set_str(values: Sequence[int]) -> str:
    return "{" + ", ".join(str(v) for v in values) + "}"


def _bullets(lines: Sequence[str]) -> str:
    return "\n".join(f"  - {line}" for line in lines)


def _static_problems(cfg: Config) -> list[str]:
    """Contradictions inside the config itself (no world needed)."""
    return (
        _model_problems(cfg.model)
        + _schedule_problems(cfg)
        + _rampup_problems(cfg)
        + _data_problems(cfg.data)
        + _zero_precision_problems(cfg)
        + _fp8_problems(cfg)
        + _attention_kernel_problems(cfg)
        + _profiling_problems(cfg)
        + _launch_problems(cfg.launch)
    )


def _attention_kernel_problems(cfg: Config) -> list[str]:
    if cfg.parallel.attention_kernel != "flex" or cfg.model.attention_mask == "document":
        return []
    return ["parallel.attention_kernel=flex chooses the kernel of model.attention_mask=document, and the mask is "
            "causal (which always runs SDPA's flash kernel): set model.attention_mask=document, or "
            "parallel.attention_kernel=auto"]


def _model_problems(m: ModelConfig) -> list[str]:
    problems = []
    if m.head_dim is None and m.hidden_size % m.num_heads:
        problems.append(
            f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads}) when "
            f"model.head_dim is unset: set model.head_dim, or num_heads in {_set_str(_divisors(m.hidden_size)[:12])}"
        )
    elif m.resolved_head_dim() % 2:
        problems.append(
            f"model.head_dim ({m.resolved_head_dim()}) must be even (rotary rotates pairs): choose an even head_dim"
        )
    if m.num_heads % m.num_kv_heads:
        problems.append(
            f"model.num_heads ({m.num_heads}) must be divisible by model.num_kv_heads ({m.num_kv_heads}) for "
            f"grouped-query attention: choose num_kv_heads in {_set_str(_divisors(m.num_heads))}"
        )
    return problems


def _schedule_problems(cfg: Config) -> list[str]:
    problems = []
    if cfg.train.seq_len > cfg.model.max_seq_len:
        problems.append(
            f"train.seq_len ({cfg.train.seq_len}) must not exceed model.max_seq_len ({cfg.model.max_seq_len}): "
            f"raise model.max_seq_len or lower train.seq_len"
        )
    if cfg.optim.warmup_steps > cfg.train.max_steps:
        problems.append(
            f"optim.warmup_steps ({cfg.optim.warmup_steps}) must not exceed train.max_steps ({cfg.train.max_steps}): "
            f"lower warmup_steps or raise max_steps"
        )
    return problems + _decay_steps_problems(cfg.optim, cfg.train.max_steps)


def _decay_steps_problems(optim: OptimConfig, max_steps: int) -> list[str]:
    if optim.decay_steps is None:
        return []
    if optim.decay == "constant":
        return [f"optim.decay_steps ({optim.decay_steps}) needs a decay shape, and optim.decay is constant: set "
                f"optim.decay to 1-sqrt, linear or cosine, or remove decay_steps"]
    after_warmup = max_steps - optim.warmup_steps
    if optim.decay_steps > after_warmup:
        return [f"optim.decay_steps ({optim.decay_steps}) is longer than the steps after warmup (train.max_steps - "
                f"optim.warmup_steps = {after_warmup}): lower decay_steps, raise max_steps, or leave decay_steps "
                f"unset to decay over every step after warmup"]
    return []


def _profiling_problems(cfg: Config) -> list[str]:
    prof, problems = cfg.profiling, []
    if not prof.enabled:
        return ["profiling.memory_snapshot is on but profiling.start_step is 0: set profiling.start_step (the "
                "snapshot is saved at the end of that window)"] if prof.memory_snapshot else []
    if prof.last_step > cfg.train.max_steps:
        problems.append(
            f"profiling steps {prof.start_step}-{prof.last_step} end after train.max_steps ({cfg.train.max_steps}): "
            f"lower profiling.start_step or profiling.num_steps (a window inside the run; after the compile warm-up "
            f"of steps 1-2 for steady state)"
        )
    if not prof.ranks:
        problems.append("profiling.ranks is empty while profiling.start_step is set: name the ranks, e.g. [0]")
    return problems


def _data_problems(data: DataConfig) -> list[str]:
    if data.synthetic and data.datasets:
        return [
            "data.synthetic is true but data.datasets is not empty: remove data.datasets or set data.synthetic=false"
        ]
    if not data.synthetic and not data.datasets:
        return [
            "data.datasets is empty: add a prepared dataset (data.datasets=[{path: data/mydata, weight: 1.0}]) "
            "or set data.synthetic=true"
        ]
    return []


def _zero_precision_problems(cfg: Config) -> list[str]:
    z, p, problems = cfg.zero, cfg.precision, []
    if z.offload_param != "none" and z.stage != 3:
        problems.append(
            f"zero.offload_param ({z.offload_param}) needs zero.stage=3 (got {z.stage}): "
            f"set zero.stage=3 or zero.offload_param=none"
        )
    if z.offload_optimizer != "none" and z.stage == 0:
        problems.append(
            f"zero.offload_optimizer ({z.offload_optimizer}) needs zero.stage >= 1: "
            f"set zero.stage=1 (or higher) or zero.offload_optimizer=none"
        )
    if "nvme" in (z.offload_param, z.offload_optimizer) and not z.nvme_path:
        problems.append("zero offload to nvme needs zero.nvme_path: set zero.nvme_path=/local/nvme or offload to cpu")
    if p.loss_scale != "dynamic" and p.dtype != "fp16":
        problems.append(
            f"precision.loss_scale ({p.loss_scale}) only applies to fp16: remove it or set precision.dtype=fp16"
        )
    if p.fp32_grad_accumulation and p.dtype != "fp32" and z.stage == 0:
        # DeepSpeed raises "unsupported mix of model_dtype and grad_accum_dtype" without ZeRO (deepspeed-cpu.md).
        problems.append(
            f"precision.fp32_grad_accumulation with precision.dtype={p.dtype} needs zero.stage >= 1 (DeepSpeed "
            f"rejects it under ZeRO-0): set zero.stage=1 or precision.fp32_grad_accumulation=false"
        )
    return problems


def _fp8_problems(cfg: Config) -> list[str]:
    recipe = cfg.precision.fp8
    if recipe == "off":
        return []
    problems, m = [], cfg.model
    if cfg.precision.dtype == "fp16":
        problems.append(f"precision.fp8={recipe} runs with precision.dtype=bf16 (or fp32 to debug), not fp16: fp16's "
                        f"loss scale and FP8's dynamic scales are not tested together: set precision.dtype=bf16")
    head_dim, tp = m.resolved_head_dim(), cfg.parallel.tp
    if tp > 1 and recipe != "tensorwise":
        # Rowwise scales run along the contraction dimension, which a row-parallel layer splits over the TP ranks:
        # each would scale its part of a row, another quantization than one GPU's (measured: 5.7e-2 of a step apart
        # at tp 2, tests/trainer/test_float8.py; tensorwise: 5e-6).
        problems.append(f"precision.fp8={recipe} with parallel.tp={tp}: a rowwise scale spans a matmul's whole "
                        f"contraction dimension, which tensor parallelism splits over the ranks: use "
                        f"precision.fp8=tensorwise under TP, or parallel.tp=1")
    per_rank = "" if tp == 1 else f" / tp {tp}"  # under TP each rank multiplies its shard
    dims = {"model.hidden_size": (m.hidden_size, 1), f"model.intermediate_size{per_rank}": (m.intermediate_size, tp),
            f"model.num_heads × head_dim{per_rank}": (m.num_heads * head_dim, tp),
            f"model.num_kv_heads × head_dim{per_rank}": (m.num_kv_heads * head_dim, tp),
            "train.micro_batch_size_per_gpu × train.seq_len": (cfg.train.micro_batch_size_per_gpu * cfg.train.seq_len,
                                                                1)}
    odd = [f"{name} ({value // parts if value % parts == 0 else f'{value}/{parts}'})"
           for name, (value, parts) in dims.items() if value % parts or (value // parts) % 16]
    if odd:
        problems.append(f"precision.fp8={recipe} needs every matmul dimension to be a multiple of 16 (FP8 tensor "
                        f"cores; the tokens of a micro-batch are the weight gradient's inner dimension), but "
                        f"{', '.join(odd)} is not: change it{' or parallel.tp' if tp > 1 else ''}, or set "
                        f"precision.fp8=off")
    return problems


def _launch_problems(launch: LaunchConfig) -> list[str]:
    problems = []
    if launch.time_limit is not None and not _SLURM_TIME.match(launch.time_limit):
        problems.append(
            f"launch.time_limit ({launch.time_limit!r}) is not a Slurm time: write e.g. '2-00:00:00' or '04:00:00'"
        )
    for i, line in enumerate(launch.extra_sbatch):
        if not line.startswith("#SBATCH "):
            problems.append(
                f"launch.extra_sbatch.{i} ({line!r}) must be a whole directive line: write '#SBATCH {line.strip()}'"
            )
    return problems


def _world_problems(cfg: Config, world_size: int, device: str,
                    gpu_capability: tuple[int, int] | None = None) -> list[str]:
    """Does the run plan fit `world_size` processes? Each message: dotted path, numbers, the fix."""
    if world_size < 1:
        return [f"world size ({world_size}) must be >= 1: pass --world-size or set launch.nodes and gpus_per_node"]
    problems = (_model_split_problems(cfg) + _pipeline_problems(cfg, device)
                + _flex_problems(cfg.parallel, device, gpu_capability))
    absent = [r for r in cfg.profiling.ranks if r >= world_size] if cfg.profiling.enabled else []
    if absent:
        problems.append(f"profiling.ranks {absent} are not in a world of {world_size}: choose ranks in "
                        f"0..{world_size - 1}")
    if cfg.profiling.memory_snapshot and device != "cuda":
        problems.append(f"profiling.memory_snapshot records CUDA allocations, and this run is on {device}: set "
                        f"profiling.memory_snapshot=false (on CPU, max_rss_gib in metrics.jsonl is the peak)")
    dp, dp_problem = _data_parallel_size(cfg.parallel, world_size)
    if dp_problem:
        problems.append(dp_problem)
    else:
        problems += _batch_problems(cfg.train, dp)
    return problems


def _model_split_problems(cfg: Config) -> list[str]:
    m, par, problems = cfg.model, cfg.parallel, []
    for field, count in (("num_heads", m.num_heads), ("num_kv_heads", m.num_kv_heads)):
        if count % par.tp:
            choices = _set_str(_divisors(math.gcd(m.num_heads, m.num_kv_heads)))
            problems.append(f"parallel.tp ({par.tp}) must divide model.{field} ({count}): choose tp in {choices}")
    stage_problems = _stage_layer_problems(m.num_layers, par)
    problems += stage_problems or _checkpointed_layers_problems(m.num_layers, par)
    if par.sequence_parallel and par.tp == 1:
        problems.append(
            "parallel.sequence_parallel needs parallel.tp > 1 (it shards activations over the TP group): "
            "set parallel.tp=2 (or more) or parallel.sequence_parallel=false"
        )
    elif par.sequence_parallel and cfg.train.seq_len % par.tp:
        problems.append(
            f"train.seq_len ({cfg.train.seq_len}) must be divisible by parallel.tp ({par.tp}) with "
            f"parallel.sequence_parallel: choose a seq_len that is a multiple of {par.tp}"
        )
    return problems


def _checkpointed_layers_problems(num_layers: int, par: ParallelConfig) -> list[str]:
    """parallel.activation_checkpointing_layers against the mode and the (valid) stage split."""
    count = par.activation_checkpointing_layers
    if count is None:
        return []
    if par.activation_checkpointing == "none":
        return [f"parallel.activation_checkpointing_layers ({count}) chooses how many layers per stage a "
                f"checkpointing mode applies to, and parallel.activation_checkpointing is none: set a mode "
                f"(selective, core_attention or full), or parallel.activation_checkpointing_layers=null"]
    most = max(stage_layers(num_layers, par))
    if count <= most:
        return []
    return [f"parallel.activation_checkpointing_layers ({count}) exceeds the {most} decoder layers of the largest "
            f"pipeline stage: choose 1..{most}, or null to checkpoint every layer"]


def _stage_layer_problems(num_layers: int, par: ParallelConfig) -> list[str]:
    """parallel.pipeline_stage_layers against pp and model.num_layers; without it, pp must divide num_layers."""
    layers, pp = par.pipeline_stage_layers, par.pp
    if pp > num_layers:
        return [f"parallel.pp ({pp}) must not exceed model.num_layers ({num_layers}): every pipeline stage needs a "
                f"decoder layer: choose pp <= {num_layers}"]
    example = f"parallel.pipeline_stage_layers={stage_layers_text(balanced_stage_layers(num_layers, pp))}"
    if layers is None:
        if num_layers % pp == 0:
            return []
        return [f"parallel.pp ({pp}) must divide model.num_layers ({num_layers}), or set the decoder layers of each "
                f"stage: {example} (balanced: fewer on the first and last stages, which also hold the embedding and "
                f"lm_head); or choose pp in {_set_str(_divisors(num_layers))}"]
    given = f"parallel.pipeline_stage_layers ({stage_layers_text(layers)})"
    if pp == 1 and layers != [num_layers]:
        return [f"{given} needs parallel.pp > 1 (got 1; one stage holds all {num_layers} layers): remove it, or set "
                f"parallel.pp={len(layers)} to split the model over {len(layers)} stages"]
    if len(layers) != pp:
        return [f"{given} has {len(layers)} entries but parallel.pp is {pp}: give one per stage, e.g. {example}"]
    if min(layers) < 1:
        return [f"{given}: every stage needs at least 1 decoder layer (stage {layers.index(min(layers))} has "
                f"{min(layers)}): e.g. {example}"]
    if sum(layers) != num_layers:
        return [f"{given} sums to {sum(layers)} but model.num_layers is {num_layers}: the entries must add up to it, "
                f"e.g. {example}"]
    return []


def _pipeline_problems(cfg: Config, device: str) -> list[str]:
    problems = []
    if cfg.parallel.pp > 1 and cfg.zero.stage >= 2:
        problems.append(
            f"zero.stage ({cfg.zero.stage}) cannot be combined with parallel.pp ({cfg.parallel.pp}) > 1 (DeepSpeed "
            f"pipeline allows ZeRO <= 1): set zero.stage=1 or parallel.pp=1"
        )
    if cfg.precision.dtype == "fp16" and device == "cpu":
        problems.append(
            "precision.dtype=fp16 cannot run on CPU (DeepSpeed: 'Type fp16 is not supported on your device'): "
            "set precision.dtype=bf16 or fp32"
        )
    return problems


def _flex_problems(par: ParallelConfig, device: str, gpu_capability: tuple[int, int] | None) -> list[str]:
    if par.attention_kernel != "flex":
        return []
    if device != "cuda":
        return [f"parallel.attention_kernel=flex runs on CUDA only (FlexAttention has no backward pass on {device}): "
                f"set parallel.attention_kernel=auto (flex where it is fused on CUDA, SDPA elsewhere) or sdpa"]
    if not flex_suits_gpu(gpu_capability):
        major, minor = gpu_capability  # type: ignore[misc]
        need = ".".join(map(str, FLEX_MIN_CAPABILITY))
        return [f"parallel.attention_kernel=flex needs an Ampere or later GPU (compute capability >= {need}); this "
                f"one is {major}.{minor}, where FlexAttention's Triton kernel runs far slower than SDPA or fails to "
                f"build: set parallel.attention_kernel=auto (SDPA here) or sdpa"]
    if par.flex_is_fused(device):
        return []
    return [f"parallel.attention_kernel=flex with parallel.compile={par.compile} and parallel.activation_checkpointing="
            f"{par.activation_checkpointing} would run FlexAttention's reference math (the full T × T scores of every "
            f"head: slower and larger than SDPA): set parallel.compile=auto (inductor on CUDA), or "
            f"parallel.activation_checkpointing=none or full, or parallel.attention_kernel=auto"]


def _data_parallel_size(par: ParallelConfig, world_size: int) -> tuple[int, str | None]:
    model_parallel = par.tp * par.pp
    if par.dp == "auto":
        if world_size % model_parallel:
            return 0, (
                f"parallel.tp × parallel.pp ({par.tp} × {par.pp} = {model_parallel}) must divide the world size "
                f"({world_size}): choose tp × pp in {_set_str(_divisors(world_size))}"
            )
        return world_size // model_parallel, None
    if model_parallel * par.dp != world_size:
        fix = "set parallel.dp=auto"
        if world_size % model_parallel == 0:
            fix += f" or parallel.dp={world_size // model_parallel}"
        return 0, (
            f"parallel.tp × parallel.pp × parallel.dp ({par.tp} × {par.pp} × {par.dp} = {model_parallel * par.dp}) "
            f"must equal the world size ({world_size}): {fix}"
        )
    return par.dp, None


def _batch_problems(train: TrainConfig, dp: int) -> list[str]:
    per_step = train.micro_batch_size_per_gpu * dp
    if train.global_batch_size % per_step == 0:
        return _rampup_world_problems(train, per_step)
    lower = max(per_step, train.global_batch_size // per_step * per_step)
    fix = f"set train.global_batch_size to a multiple of {per_step} (e.g. {lower} or {lower + per_step})"
    if train.global_batch_size % dp == 0:
        micro_choices = _divisors(train.global_batch_size // dp)
        fix += f", or train.micro_batch_size_per_gpu in {_set_str(micro_choices[:12])}"
    return [
        f"train.global_batch_size ({train.global_batch_size}) must be divisible by "
        f"train.micro_batch_size_per_gpu × dp ({train.micro_batch_size_per_gpu} × {dp} = {per_step}): {fix}"
    ]


def _rampup_world_problems(train: TrainConfig, per_step: int) -> list[str]:
    ramp = train.batch_size_rampup
    if ramp is None or (ramp.start % per_step == 0 and ramp.increment % per_step == 0):
        return []
    return [f"train.batch_size_rampup start ({ramp.start}) and increment ({ramp.increment}) must be multiples of "
            f"train.micro_batch_size_per_gpu × dp ({per_step}): every batch of the ramp is whole micro-batches on "
            f"every DP rank"]


def _rampup_problems(cfg: Config) -> list[str]:
    ramp, train = cfg.train.batch_size_rampup, cfg.train
    if ramp is None:
        return []
    if ramp.start >= train.global_batch_size or (train.global_batch_size - ramp.start) % ramp.increment:
        return [f"train.batch_size_rampup goes from start ({ramp.start}) by increment ({ramp.increment}) to "
                f"train.global_batch_size ({train.global_batch_size}): start must be smaller, and the difference a "
                f"multiple of increment"]
    if cfg.zero.offload_optimizer != "none":
        return ["train.batch_size_rampup with zero.offload_optimizer: DeepSpeed's offloaded ZeRO keeps the "
                "accumulation step count it started with; turn one of them off"]
    return []


def _derive(cfg: Config, world_size: int, device: str, gpu_capability: tuple[int, int] | None = None) -> Derived:
    par, train = cfg.parallel, cfg.train
    dp, _ = _data_parallel_size(par, world_size)
    return Derived(
        world_size=world_size,
        device=device,
        tp=par.tp,
        pp=par.pp,
        dp=dp,
        grad_accum_steps=train.global_batch_size // (train.micro_batch_size_per_gpu * dp),
        micro_batch_size_per_gpu=train.micro_batch_size_per_gpu,
        global_batch_size=train.global_batch_size,
        global_batch_size_tokens=train.global_batch_size * train.seq_len,
        head_dim=cfg.model.resolved_head_dim(),
        padded_vocab_size=padded_vocab_size(cfg.model.vocab_size, par.tp),
        stage_layers=stage_layers(cfg.model.num_layers, par),
        attention_kernel=(par.resolved_attention_kernel(device, gpu_capability)
                          if cfg.model.attention_mask == "document" else "sdpa"),
        run_dir=cfg.run_dir,
        checkpoint_dir=cfg.checkpoint_dir,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Loading: YAML file + dotted overrides → one dict → one pydantic validation


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `3e-4` as a float (YAML 1.1 wants `3.0e-4`; people write lr: 3e-4)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml_value(text: str) -> Any:
    """A CLI override value, typed as YAML types it: `2` int, `3e-4` float, `true` bool, `[a, b]` list."""
    # A copy: the cached list or mapping must not be changed by a later override of one of its items.
    return copy.deepcopy(_parse_yaml_value_cached(text))


@functools.lru_cache(maxsize=4096)
def _parse_yaml_value_cached(text: str) -> Any:
    """`pretrain plan` merges the same few dozen override strings into thousands of layouts: parsing them with
    PyYAML was ~75 % of its run time (70B on 256 GPUs, profiled)."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override value {text!r} is not valid YAML ({err.__class__.__name__}): quote it or fix the syntax"
        ) from None


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply `key.sub=value` overrides, validate. Raises ConfigError with every problem."""
    tree = _read_yaml(Path(path))
    return parse_config(apply_overrides(tree, overrides), source=str(path))


def parse_config(tree: dict[str, Any], source: str = "<dict>") -> Config:
    tree = {key: ({} if value is None and key in Config.model_fields else value) for key, value in tree.items()}
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"invalid config {source}:\n" + _bullets(_describe_errors(err))) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        shipped = sorted(p.name for p in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
        hint = f" (configs/ has: {', '.join(shipped)})" if shipped else ""
        raise ConfigError(f"config file {path} not found: pass --config with an existing YAML file{hint}")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections (model:, train:, ...), got {type(tree).__name__}"
        )
    return tree


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """The one merge: each `a.b.c=value` sets one leaf (list items by index: data.datasets.0.weight=2).

    Unknown keys are not checked here: validation rejects them with the dotted path and a suggestion, the same way it
    rejects unknown keys written in the YAML file.
    """
    tree = copy.deepcopy(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.lr=3e-4")
        _set_dotted(tree, parts, parse_yaml_value(raw))
    return tree


def _set_dotted(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node: Any = tree  # always a dict or a list: checked after each step down
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, here)]
        else:
            if node.get(part) is None:  # a section the YAML leaves out (or writes empty) starts empty
                node[part] = {}
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {'.'.join(parts)}: {here} is a value, not a section: write {here}=<value>")
    if isinstance(node, list):
        node[_list_index(node, parts[-1], ".".join(parts))] = value
    else:
        node[parts[-1]] = value


def _list_index(items: list[Any], part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(
            f"override {path}: {part!r} is not an index of a {len(items)}-item list: "
            f"use 0..{len(items) - 1}, or set the whole list"
        )
    return int(part)


# ---------------------------------------------------------------------------------------------------------------------
# Turning pydantic errors into dotted-path messages with a fix


def _section_type(annotation: Any) -> Any:
    """The config class, or ('list', item type), behind a field annotation; None for a leaf value."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _section_type(get_args(annotation)[0])
    if origin is list:
        return ("list", _section_type(get_args(annotation)[0]))
    if origin in (Union, types.UnionType):
        members = [_section_type(a) for a in get_args(annotation) if a is not type(None)]
        return members[0] if len(members) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _walk_loc(loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None, bool]:
    """(dotted parts naming config keys, section holding the last key, whether the last key is unknown).

    pydantic appends union-member tags (e.g. 'int', "literal['auto']") to a leaf's loc: they are dropped here.
    """
    parts: list[str] = []
    node: Any = Config
    section: type[BaseModel] | None = Config
    for part in loc:
        if isinstance(node, type) and issubclass(node, BaseModel):
            section = node
            parts.append(str(part))
            if part not in node.model_fields:
                return parts, section, True
            node = _section_type(node.model_fields[part].annotation)
        elif isinstance(node, tuple) and isinstance(part, int):
            parts.append(str(part))
            node = node[1]
        else:
            break
    return parts, section, False


def _unknown_key_message(parts: list[str], section: type[BaseModel]) -> str:
    path, parent = ".".join(parts), ".".join(parts[:-1])
    prefix = f"{parent}." if parent else ""
    valid = list(section.model_fields)
    close = difflib.get_close_matches(parts[-1], valid, n=1, cutoff=0.6)
    if close:
        return f"{path}: unknown key: did you mean {prefix}{close[0]}?"
    return f"{path}: unknown key: valid keys{' under ' + parent if parent else ''} are {', '.join(valid)}"


def _describe_errors(err: ValidationError) -> list[str]:
    lines: list[str] = []
    leaf_errors: dict[str, tuple[list[str], Any]] = {}  # path → (messages, offending input)
    for item in err.errors():
        parts, section, unknown = _walk_loc(tuple(item["loc"]))
        path = ".".join(parts)
        if unknown and section is not None:
            lines.append(_unknown_key_message(parts, section))
        elif item["type"] == "value_error":  # our cross-field checks: already "path (value) ...: fix", one per line
            lines.extend(str(item["ctx"]["error"]).split("\n"))
        elif item["type"] == "missing":
            lines.append(f"{path}: required key is missing: add it to the YAML or pass {path}=<value>")
        else:
            # A union field (dp: int | "auto") reports one error per member: they are merged into one line below.
            leaf_errors.setdefault(path, ([], item.get("input")))[0].append(item["msg"])
    for path, (messages, got) in leaf_errors.items():
        lines.append(f"{path}: {' or '.join(messages)} (got {got!r})")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def dump_resolved(cfg: Config, derived: Derived | None = None) -> str:
    """The resolved config as YAML: every user field with defaults filled in; derived values as comments only."""
    header = ["# Resolved config (all defaults filled in). Reproduce the run with: pretrain train --config <this file>"]
    if derived is not None:
        header.append(f"# Derived for world size {derived.world_size} (comments, not read back):")
        # Tuples as lists (stage_layers: [2, 3]): the form an override takes, so it can be pasted back.
        header += [f"#   {key}: {list(value) if isinstance(value, tuple) else value}"
                   for key, value in derived.as_dict().items()]
    body = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def save_resolved(cfg: Config, path: str | os.PathLike[str], derived: Derived | None = None) -> Path:
    """Write the resolved YAML atomically (temp file + rename), so a crash never leaves half a config."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(dump_resolved(cfg, derived), encoding="utf-8")
    os.replace(tmp, target)
    return target
