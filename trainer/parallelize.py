"""Turn the plain Llama (trainer.model) into this rank's part of the parallel model.

    model = build_model_on_meta(cfg.model, derived.padded_vocab_size)   # shapes only, no memory
    pmodel = parallelize(model, cfg, derived, ctx)                       # this rank's TP shards of its PP stage

The steps run in one fixed order (each constraint is commented where it is applied in `parallelize`):
  1. pick this pipeline stage's parts      (so the other stages' layers are never allocated: they stay on meta)
  2. tensor-parallel swap                  q/k/v/gate/up → ColumnParallelLinear, o/down → RowParallelLinear,
                                           embed_tokens → VocabParallelEmbedding, lm_head → ColumnParallelLinear
  3. materialise + deterministic init      full weights drawn per parameter, this rank's slice copied in
  3b. FP8 linears                          precision.fp8: decoder-layer nn.Linear → torchao Float8Linear;
                                           under TP the megatron layers' local matmul → torchao's FP8 one
  4. sequence-parallel gradient hooks
  5. activation checkpointing              none | selective | core_attention | full, per decoder layer (the
                                           stage's first activation_checkpointing_layers, default all)
  6. attention kernel, torch.compile       parallel.attention_kernel (the document mask's: SDPA or FlexAttention);
                                           parallel.compile of each decoder layer (trainer/compile.py), in place:
                                           names unchanged
  7. pipeline partition                    DeepSpeed PipelineModule over [embed, layer 0..L-1, head], split into
                                           Derived.stage_layers decoder layers per stage (even or uneven)

Names: every parameter keeps the name it has in the plain model (`layers.0.self_attn.q_proj.weight`). The TP layers
are megatron's classes subclassed to return only the output tensor (megatron's return `(output, bias)`), not wrapped,
and activation checkpointing replaces a layer's `forward` instead of wrapping the layer. Under pipeline parallelism
DeepSpeed names a stage's parameters `<index in the layer list>.<name inside the part>`; `canonical_name` maps them
back. Checkpoints and HF export key on the canonical names.

Tied embeddings (model.tie_embeddings) are one Parameter where pp is 1. Over pipeline stages, the first stage's
embedding and the last stage's lm_head are two copies, drawn alike and kept alike as Megatron-LM does: the pipeline
engine sums both copies' gradients over the first and last stage (ctx.embedding_group) before the DP reduction, so
both take the same update. The last stage's copy is `ParallelModel.tied_replica`: named embed_tokens.weight, counted
once in gradient norms, and not saved.

Weights are TP- and PP-invariant: each parameter is drawn in full from a generator seeded by (seed, canonical name),
one parameter at a time (memory bounded by the largest single tensor), and each rank keeps its slice. TP=2 or PP=2
therefore starts from exactly the TP=1 weights (with the same padded vocabulary).

Why DeepSpeed's PipelineModule and not megatron-core's 1F1B schedules: the optimizer, ZeRO partitioning, gradient
accumulation and loss scaling all live in the DeepSpeed engine, and only DeepSpeed's PipelineEngine runs a 1F1B
schedule *inside* that engine (`engine.train_batch`). megatron's schedules drive megatron's own optimizer and DDP
wrapper, and need three more CUDA shims on CPU (notes/megatron-core-cpu.md). The topology passed to PipelineModule is
`deepspeed_topology(ctx)`, whose rank layout equals megatron's groups (tests/trainer/test_bootstrap.py), so the TP
collectives inside a stage and DeepSpeed's pipeline/data groups agree rank by rank.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from trainer.bootstrap import ParallelContext, deepspeed_topology
from trainer.compile import compile_layers
from trainer.loss import ZLoss, chunked_lm_loss, chunked_vocab_parallel_lm_loss, fused_linear_lm_loss
from trainer.config import Config, Derived, ModelConfig
from trainer.float8 import convert_to_float8
from trainer.model import EMBED_WEIGHT, LM_HEAD_WEIGHT, VOCAB_PARAM_NAMES, Llama, document_ids, init_std_for

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------------
# The result


@dataclass
class ParallelModel:
    """This rank's model: the Llama itself (pp == 1) or a DeepSpeed PipelineModule holding this stage's parts."""

    module: nn.Module
    loss_fn: LossFn  # (logits (B, T, V/tp) or, under lm_loss=fused_linear, hidden (B, T, H); labels (B, T)) → mean
    num_layers: int
    is_pipeline: bool
    compile_backend: str | None = None  # the torch.compile backend of this rank's decoder layers; None: eager
    layers_compiled: int = 0
    fp8_linears: int = 0  # this rank's linears with FP8 matmuls (precision.fp8)
    z_loss: ZLoss | None = None  # train.z_loss_weight > 0: what loss_fn recorded of it (on the stage with the head)
    # Tied embeddings over pipeline stages: the last stage's lm_head weight, a copy of the first stage's embedding
    # kept equal by summing both gradients over ctx.embedding_group (Megatron's method). It is named
    # embed_tokens.weight (loaded from that tensor) and is never saved: the first stage saves the weight.
    tied_replica: nn.Parameter | None = None

    def canonical_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name in the unsharded, unpipelined model, this rank's parameter (a TP shard where `tp_partition_dim`))."""
        for name, param in self.module.named_parameters():
            if param is self.tied_replica:
                yield EMBED_WEIGHT, param
            else:
                yield (canonical_name(name, self.num_layers) if self.is_pipeline else name), param


def tp_partition_dim(param: torch.Tensor) -> int | None:
    """The dim along which `param` is split over the TP group (megatron's attributes), or None when replicated.
    The full tensor is the TP ranks' shards concatenated in TP-rank order along that dim."""
    return int(param.partition_dim) if getattr(param, "tensor_model_parallel", False) else None


def canonical_name(pipeline_name: str, num_layers: int) -> str:
    """PipelineModule name → plain-model name: `0.embed_tokens.weight` → `embed_tokens.weight`,
    `3.mlp.up_proj.weight` → `layers.2.mlp.up_proj.weight`, `<num_layers + 1>.norm.weight` → `norm.weight`."""
    index, _, rest = pipeline_name.partition(".")
    position = int(index)
    if position == 0 or position == num_layers + 1:
        return rest  # EmbedStage / HeadStage keep the plain model's attribute names
    return f"layers.{position - 1}.{rest}"


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def build_model_on_meta(model_cfg: ModelConfig, padded_vocab_size: int, eos_token_id: int | None = None) -> Llama:
    """The whole model's structure on the meta device: no memory; `parallelize` allocates only this rank's part.
    `eos_token_id`: the data's (trainer.data_check.document_eos_id), where ModelConfig.uses_documents."""
    with torch.device("meta"):
        return Llama(model_cfg, padded_vocab_size, eos_token_id)


def parallelize(model: Llama, cfg: Config, derived: Derived, ctx: ParallelContext) -> ParallelModel:
    """Shard `model` (built by `build_model_on_meta`) for this rank; see the module docstring for the order."""
    if (derived.tp, derived.pp) != (ctx.tp, ctx.pp):
        raise ValueError(f"config plans tp={derived.tp} pp={derived.pp} but the process groups are tp={ctx.tp} "
                         f"pp={ctx.pp}: pass the same config to init_parallel and parallelize")
    if cfg.model.uses_documents:
        model.require_eos_token_id()  # before any allocation: the stages need it to find the documents
    # 1. Before anything allocates: only this stage's parts leave the meta device.
    parts = StageParts.for_stage(derived.stage_layers, ctx.pp_rank)
    # 2. Before init, because init copies each rank's slice into the shard shapes the TP layers allocate.
    if ctx.tp > 1:
        _swap_tensor_parallel(model, parts, cfg, ctx)
    # 3. Before activation checkpointing and the pipeline (both only wrap what exists), and before
    #    deepspeed.initialize, which copies these weights into its fp32 master / ZeRO partitions.
    _materialize(model, parts, ctx.device)
    if cfg.model.tie_embeddings and ctx.pp == 1:  # after the swap and materialisation, which replaced both modules
        model.lm_head.weight = model.embed_tokens.weight
    init_weights_deterministic(model, cfg.model, cfg.train.seed, ctx.tp_rank, ctx.tp)
    # 3b. After init (the FP8 linears keep the initialised Parameters), before checkpointing and compile, which wrap
    #     and trace the FP8 matmuls.
    fp8_linears = convert_to_float8([model.layers[i] for i in parts.layers], cfg.precision.fp8, ctx.device.type)
    # 4. After materialisation, because the hooks attach to the final Parameter objects.
    if cfg.parallel.sequence_parallel:
        _all_reduce_sequence_parallel_grads(model, ctx.tp_group)
    # 5. After the TP swap, so the swap always walks the plain module tree (a wrapper-based checkpoint, as in
    #    torchtitan, would hide the projections from it); ours only replaces each layer's forward.
    #    Only the stage's first parallel.activation_checkpointing_layers layers (Megatron's block method).
    checkpointed = cfg.parallel.checkpointed_layers(len(parts.layers))
    _apply_activation_checkpointing([model.layers[i] for i in parts.layers[:checkpointed]],
                                    cfg.parallel.activation_checkpointing)
    # 6. After TP and checkpointing, so the compiled graph holds the TP collectives and the recompute policy
    #    (torchtitan's order); before the pipeline and deepspeed.initialize, which then call the compiled layers.
    #    The attention kernel before the first forward, which the compiled graph is traced from.
    _set_document_kernel([model.layers[i] for i in parts.layers], derived.attention_kernel)
    backend = cfg.parallel.compile_backend(ctx.device.type)
    compiled = compile_layers([model.layers[i] for i in parts.layers], backend)
    z_loss = ZLoss(cfg.train.z_loss_weight) if cfg.train.z_loss_weight else None
    loss_fn = _loss_fn(cfg, ctx, model.lm_head if parts.head else None, z_loss)
    model.head_in_loss = cfg.parallel.lm_loss == "fused_linear"  # the model stops at the norm; the loss calls lm_head
    if cfg.train.mask_eos_loss:
        loss_fn = _token_weighted(loss_fn, z_loss)
    if ctx.pp == 1:
        return ParallelModel(model, loss_fn, cfg.model.num_layers, False, backend, compiled, fp8_linears, z_loss)
    # 7. Last: PipelineModule registers the finished parts as opaque callables in a flat list.
    pipe = _pipeline(model, parts, derived.stage_layers, loss_fn, ctx)
    tied_replica = _tie_over_stages(pipe, model, parts, ctx) if cfg.model.tie_embeddings else None
    return ParallelModel(pipe, loss_fn, cfg.model.num_layers, True, backend, compiled, fp8_linears, z_loss,
                         tied_replica)


@dataclass(frozen=True)
class StageParts:
    """Which parts of [embed, layer 0..L-1, head] one pipeline stage owns: the first stage also holds the embedding,
    the last also the final norm and lm_head; stage s holds stage_layers[s] decoder layers (Derived.stage_layers:
    parallel.pipeline_stage_layers, or num_layers / pp each)."""

    embed: bool
    layers: range
    head: bool

    @classmethod
    def for_stage(cls, stage_layers: Sequence[int], stage: int) -> StageParts:
        start = sum(stage_layers[:stage])
        return cls(stage == 0, range(start, start + stage_layers[stage]), stage == len(stage_layers) - 1)

    def list_bounds(self) -> tuple[int, int]:
        """[start, stop) of these parts in the PipelineModule layer list [embed, layers..., head]."""
        start = 0 if self.embed else 1 + self.layers.start
        return start, 1 + self.layers.stop + (1 if self.head else 0)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Tensor parallelism


def _noop_init(weight: torch.Tensor) -> None:
    """megatron's init_method slot: unused, `init_weights_deterministic` fills the weights (TP- and PP-invariant)."""


def _megatron_config(cfg: Config, ctx: ParallelContext) -> Any:
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=ctx.tp,
        sequence_parallel=cfg.parallel.sequence_parallel,
        # CPU: allocate with torch.empty on the host; GPU: on torch.cuda.current_device() (set by init_parallel).
        use_cpu_initialization=ctx.device.type == "cpu",
        perform_initialization=False,  # we copy our own deterministic weights in (step 3)
        params_dtype=torch.float32,  # fp32 master weights; DeepSpeed casts the module for bf16/fp16 runs
    )


def _tp_layer_classes() -> tuple[type, type, type]:
    """megatron's TP layers, subclassed so they drop in for nn.Linear / nn.Embedding without renaming anything."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    class _SameNames:
        # megatron adds an empty `<layer>._extra_state` entry to state dicts (for Transformer Engine compatibility)
        # and a load pre-hook that expects it. Restore nn.Module's defaults: state-dict keys = the plain model's.
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

        def _drop_extra_state_hook(self) -> None:
            self._load_state_dict_pre_hooks.clear()

    class ColumnParallel(_SameNames, ColumnParallelLinear):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._drop_extra_state_hook()

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, B, H) → (T, B, out/tp); SP: gathers (T/tp, ...)
            return super().forward(x)[0]

    class RowParallel(_SameNames, RowParallelLinear):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._drop_extra_state_hook()

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, B, in/tp) → (T, B, H) summed; SP: (T/tp, B, H)
            return super().forward(x)[0]

    class VocabParallel(VocabParallelEmbedding):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) → (B, T, H)
            out = super().forward(input_ids)
            # Under SP megatron reduce-scatters over the sequence and returns sequence-first (T/tp, B, H). Hand it
            # back batch-first like nn.Embedding, as a view: Llama.forward's transpose then restores (T/tp, B, H)
            # without a copy.
            return out.transpose(0, 1) if self.reduce_scatter_embeddings else out

    return ColumnParallel, RowParallel, VocabParallel


def _swap_tensor_parallel(model: Llama, parts: StageParts, cfg: Config, ctx: ParallelContext) -> None:
    column_cls, row_cls, vocab_cls = _tp_layer_classes()
    config, sp = _megatron_config(cfg, ctx), cfg.parallel.sequence_parallel

    def column(old: nn.Linear) -> nn.Module:
        return _mark_tp(column_cls(old.in_features, old.out_features, config=config, init_method=_noop_init,
                                   bias=False, gather_output=False, tp_group=ctx.tp_group), dim=0)

    def row(old: nn.Linear) -> nn.Module:
        return _mark_tp(row_cls(old.in_features, old.out_features, config=config, init_method=_noop_init, bias=False,
                                input_is_parallel=True, skip_bias_add=False, tp_group=ctx.tp_group), dim=1)

    if parts.embed:
        old = model.embed_tokens
        model.embed_tokens = _mark_tp(vocab_cls(old.num_embeddings, old.embedding_dim, init_method=_noop_init,
                                                reduce_scatter_embeddings=sp, config=config, tp_group=ctx.tp_group),
                                      dim=0)
    for index in parts.layers:
        attn, mlp = model.layers[index].self_attn, model.layers[index].mlp
        attn.q_proj, attn.k_proj, attn.v_proj = column(attn.q_proj), column(attn.k_proj), column(attn.v_proj)
        attn.o_proj = row(attn.o_proj)
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = column(mlp.gate_proj), column(mlp.up_proj), row(mlp.down_proj)
    if parts.head:
        # Vocab-parallel logits (gather_output=False): the loss is computed on the shards (vocab_parallel_lm_loss).
        model.lm_head = column(model.lm_head)


def _mark_tp(module: nn.Module, dim: int) -> nn.Module:
    """Tag the weight as split along `dim` (megatron's attributes). DeepSpeed counts such weights on every TP rank
    in the grad norm and replicated ones once; our init and the checkpointer read the split dim from it. megatron
    sets these only when it initialises the weight itself, which we skip."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(module.weight, is_parallel=True, dim=dim, stride=1)
    return module


def _loss_fn(cfg: Config, ctx: ParallelContext, lm_head: nn.Module | None, z_loss: ZLoss | None) -> LossFn:
    """The loss over the tokenizer's `vocab_size` columns only: padded columns never enter the softmax. Chunked over
    tokens (trainer.loss), so no fp32 copy of a whole micro-batch's logits exists; the same numbers as `lm_loss` /
    `vocab_parallel_lm_loss`, which stay as the unchunked references (tests/trainer/test_loss.py). With
    parallel.lm_loss=fused_linear the loss also applies lm_head (this stage's, None where there is none). A z-loss
    adds its gradient (trainer.loss.ZLoss)."""
    vocab_size = cfg.model.vocab_size
    if cfg.parallel.lm_loss == "fused_linear":
        return _fused_linear_loss_fn(lm_head, vocab_size, ctx, cfg.parallel.sequence_parallel, z_loss)
    if ctx.tp == 1:
        return functools.partial(chunked_lm_loss, vocab_size=vocab_size, z_loss=z_loss)
    return functools.partial(chunked_vocab_parallel_lm_loss, vocab_size=vocab_size, tp_rank=ctx.tp_rank,
                             tp_group=ctx.tp_group, z_loss=z_loss)


def _token_weighted(loss_fn: LossFn, z_loss: ZLoss | None) -> LossFn:
    """The loss of a micro-batch whose labels come as (labels, scale): its mean over the tokens kept, times `scale`
    (trainer.fit.token_weighted: its share of the tokens kept in the global batch), so that the engine's mean over
    micro-batches and DP ranks is the mean over every token kept. Plain labels: the loss unchanged."""

    def loss(outputs: torch.Tensor, labels: Any) -> torch.Tensor:
        if not isinstance(labels, tuple):
            return loss_fn(outputs, labels)
        labels, scale = labels
        if z_loss is not None and torch.is_grad_enabled():
            z_loss.next_scale = scale  # the logged z term is weighted like the loss
        return loss_fn(outputs, labels) * scale

    return loss


def _fused_linear_loss_fn(lm_head: nn.Module | None, vocab_size: int, ctx: ParallelContext,
                          sequence_parallel: bool, z_loss: ZLoss | None) -> LossFn:
    """lm_head stays in the module tree (DeepSpeed optimises its weight, checkpoints save it under its name, tied
    embeddings share it), but the model stops at the final norm (Llama.head_in_loss / HeadStage) and returns (B, T,
    H) where it returned logits. The loss then calls lm_head with the labels, and lm_head's forward is the fused loss
    (trainer.loss.fused_linear_lm_loss): its weight is applied chunk by chunk with the cross entropy. The loss calls
    the module, not its weight, because ZeRO-3's hooks on the module gather the weight for that forward and again
    for its backward, whose gradient lands on the whole weight and is reduce-scattered from there.
    Under TP the hidden states enter the way megatron's ColumnParallelLinear takes its input: gathered over the
    sequence under SP (backward: reduce-scatter), else as they are (backward: all-reduce of the partial gradients)."""
    if lm_head is None:  # a pipeline stage without the head never computes the loss
        return _no_loss_here

    def head_loss(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The weight is read at each call: DeepSpeed casts it (bf16/fp16), and ZeRO-3 gathers it for this call.
        return fused_linear_lm_loss(hidden, lm_head.weight, labels, vocab_size, ctx.tp_rank,
                                    ctx.tp_group if ctx.tp > 1 else None, z_loss=z_loss)

    lm_head.forward = head_loss  # type: ignore[method-assign]

    def loss(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if ctx.tp > 1:
            hidden = _into_column_parallel(hidden, ctx.tp_group, sequence_parallel)
        return lm_head(hidden, labels)

    return loss


def _into_column_parallel(hidden: torch.Tensor, tp_group: Any, sequence_parallel: bool) -> torch.Tensor:
    """hidden (B, T or T/tp under SP, H), a view of (T, B, H) → (B, T, H), with megatron's TP region mappings."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    sequence_first = hidden.transpose(0, 1)
    if sequence_parallel:
        sequence_first = gather_from_sequence_parallel_region(sequence_first, tensor_parallel_output_grad=True,
                                                              group=tp_group)
    else:
        sequence_first = copy_to_tensor_model_parallel_region(sequence_first, group=tp_group)
    return sequence_first.transpose(0, 1)


def _no_loss_here(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("the loss is computed on the last pipeline stage only: this stage holds no lm_head")


def vocab_parallel_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, tp_rank: int,
                           ignore_index: int = -100) -> torch.Tensor:
    """`lm_loss` for vocab-parallel logits: (B, T, V/tp) on each TP rank → the same mean loss on every TP rank.

    megatron's vocab_parallel_cross_entropy reduces over the TP group that bootstrap.init_parallel registered in
    parallel_state (it takes no group argument); that is the same group as ctx.tp_group. It has no ignore_index, so
    ignored positions get a valid dummy label and are masked out of the mean. It assumes equal shards, so the
    padded columns (global index >= vocab_size, on the last ranks) cannot be sliced off as in `lm_loss`: they are
    set to -inf, which gives them probability exactly 0 and gradient exactly 0 (the TP-reduced max stays finite
    because column 0 is always real).
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits_tbv = logits.transpose(0, 1).float()  # (T, B, V/tp): Llama's native layout, so no copy in fp32
    shard_size = logits_tbv.shape[-1]
    real_in_shard = min(max(vocab_size - tp_rank * shard_size, 0), shard_size)
    if real_in_shard < shard_size:  # out of place: in fp32 training .float() returned the lm_head output itself
        padded = torch.arange(shard_size, device=logits_tbv.device) >= real_in_shard
        logits_tbv = logits_tbv.masked_fill(padded, float("-inf"))
    labels_tb = labels.transpose(0, 1)  # (T, B)
    keep = labels_tb != ignore_index
    per_token = vocab_parallel_cross_entropy(logits_tbv, labels_tb.masked_fill(~keep, 0))  # (T, B)
    return (per_token * keep).sum() / keep.sum()


# ---------------------------------------------------------------------------------------------------------------------
# 3. Materialise and initialise


def _materialize(model: Llama, parts: StageParts, device: torch.device) -> None:
    """Allocate (uninitialised) every meta parameter of this stage's parts on `device`; other stages stay on meta."""
    local: list[nn.Module] = [model.layers[i] for i in parts.layers]
    if parts.embed:
        local.append(model.embed_tokens)
    if parts.head:
        local += [model.norm, model.lm_head]
    for part in local:
        for module in part.modules():
            if any(p.is_meta for p in module.parameters(recurse=False)):
                module.to_empty(device=device, recurse=False)


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def init_weights_deterministic(model: nn.Module, model_cfg: ModelConfig, seed: int, tp_rank: int = 0,
                               tp: int = 1) -> None:
    """Draw each full parameter from a generator seeded by (seed, name) and keep this rank's TP slice.

    `model` carries plain-model names (a Llama, before any pipeline wrapping). Meta parameters (other pipeline
    stages) are skipped. The draw happens on the parameter's device, so GPU runs do not pay for CPU sampling; CPU and
    GPU generators give different (equally valid) numbers.
    """
    for name, param in model.named_parameters():
        if param.is_meta:
            continue
        if name == LM_HEAD_WEIGHT and model_cfg.tie_embeddings:  # the last stage's copy of a tied embedding (pp > 1)
            name = EMBED_WEIGHT
        std = init_std_for(name, model_cfg)
        if std is None:  # a norm weight
            param.fill_(1.0)
            continue
        dim = tp_partition_dim(param)
        full_shape = list(param.shape)
        if dim is not None:
            full_shape[dim] *= tp
        full = _draw_full(name, full_shape, std, model_cfg.vocab_size, seed, param.device)
        param.copy_(full if dim is None else full.chunk(tp, dim=dim)[tp_rank])
        del full  # one full tensor alive at a time


def _draw_full(name: str, full_shape: list[int], std: float, vocab_size: int, seed: int,
               device: torch.device) -> torch.Tensor:
    """The full parameter, normal(0, std) from a generator seeded by (seed, name). Vocabulary tensors draw only the
    tokenizer's rows and get zero padding rows: the real rows are then the same whatever tp pads to, and the padding
    rows (which no loss gradient reaches) stay exactly zero through training."""
    generator = torch.Generator(device=device).manual_seed(_param_seed(seed, name))
    drawn_shape = [vocab_size, *full_shape[1:]] if name in VOCAB_PARAM_NAMES else full_shape
    drawn = torch.empty(drawn_shape, device=device, dtype=torch.float32).normal_(0.0, std, generator=generator)
    if drawn_shape == full_shape:
        return drawn
    full = drawn.new_zeros(full_shape)
    full[:vocab_size] = drawn
    return full


# ---------------------------------------------------------------------------------------------------------------------
# 4. Sequence parallelism


def _is_norm(name: str) -> bool:
    return name.endswith("layernorm.weight") or name == "norm.weight"


def _all_reduce_sequence_parallel_grads(model: Llama, tp_group: Any) -> None:
    """Under SP a norm sees only this rank's sequence shard, so its weight gradient is a partial sum over the TP
    group. A tensor hook sums it before the gradient is accumulated, i.e. before DeepSpeed's own gradient hooks and
    once per micro-step, so accumulation stays linear. (megatron does the same sum in finalize_model_grads.)"""
    for name, param in model.named_parameters():
        if _is_norm(name) and not param.is_meta:
            param.sequence_parallel = True  # megatron's marker, for readers of the parameter
            param.register_hook(functools.partial(_sum_over_group, group=tp_group))


def _sum_over_group(grad: torch.Tensor, group: Any) -> torch.Tensor:
    grad = grad.clone()  # autograd may still own `grad`: reduce a copy
    dist.all_reduce(grad, group=group)
    return grad


# ---------------------------------------------------------------------------------------------------------------------
# 5. Activation checkpointing


def _ops(*names: str) -> frozenset[Any]:
    aten = torch.ops.aten
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


# Selective: keep what is expensive to recompute (matmuls, attention); recompute elementwise work (norms, rotary,
# SiLU·mul, residual adds), whose saved inputs cost as much memory as the matmul outputs but little compute.
# FlexAttention (parallel.attention_kernel=flex) is a higher-order op; checkpointing's policy sees it as such.
_ATTENTION_CORE_OPS = _ops("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                           "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu") | {
                               torch.ops.higher_order.flex_attention}
# FP8 linears (precision.fp8): in eager mode this policy sees aten.mm on torchao's float8 tensors (a dispatch mode runs
# before the tensor subclass), so they are kept like other matmuls (tests/trainer/test_float8.py counts them);
# _scaled_mm is the op under it, listed for traces that show it directly.
_SAVE_OPS = _ops("mm", "addmm", "bmm", "_scaled_mm") | _ATTENTION_CORE_OPS


# Buffers made and filled in place, which core_attention makes again rather than keeps: uninitialised memory and the
# copies into it. Under sequence parallelism megatron's reduce-scatter allocates its output and fills it in place (on
# gloo: a copy, then the collective's write), so a kept copy_ result reads as mutated by the next write; making the
# buffer again costs no compute (selective recomputes them too).
_REMADE_OPS = _ops("empty_like", "empty_strided", "copy_") | {torch.ops.aten.empty.memory_format}


def _collective_policy(op: Any) -> CheckpointPolicy | None:
    """Both selective modes: what to do with a TP collective (None: not a collective)."""
    if getattr(op, "namespace", "") not in ("c10d", "_c10d_functional"):
        return None
    # Row-parallel's all-reduce sums in place into a saved matmul output: running it again in the recompute would
    # sum twice, so its (cached) result is reused. Sequence-parallel all-gathers and reduce-scatters are run again:
    # their outputs are megatron's reused global buffer or finish after the op returns, so a cached copy would be
    # stale (torch refuses it as "mutated"); their inputs are saved matmul outputs, so the recompute costs
    # communication, not matmuls.
    return CheckpointPolicy.MUST_SAVE if "allreduce" in op.__name__ else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op in _SAVE_OPS:
        return CheckpointPolicy.MUST_SAVE
    return _collective_policy(op) or CheckpointPolicy.PREFER_RECOMPUTE


def _core_attention_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Megatron's selective recompute (Korthikanti et al. 2022, `--recompute-granularity selective`): only the
    attention core (softmax(QK^T)V) runs again in backward; every other output, matmuls and elementwise alike, is
    kept. Its inputs q, k, v are kept, so the recompute is one attention forward per layer and nothing else that
    computes: views are taken again too (free, and a kept view shares its base's version counter: under sequence
    parallelism megatron all-gathers each layer's input into one reused buffer, so a kept view of it would read as
    mutated once the next layer gathers)."""
    if op in _ATTENTION_CORE_OPS or op in _REMADE_OPS or getattr(op, "is_view", False):
        return CheckpointPolicy.PREFER_RECOMPUTE
    return _collective_policy(op) or CheckpointPolicy.MUST_SAVE


def _selective_context() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_selective_policy)


def _core_attention_context() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_core_attention_policy)


_CONTEXTS = {"selective": _selective_context, "core_attention": _core_attention_context, "full": noop_context_fn}


def _apply_activation_checkpointing(layers: list[nn.Module], mode: str) -> None:
    """Replace each layer's `forward` by a non-reentrant checkpointed call of the original; no wrapper module, so
    parameter names are unchanged. full: keep only the layer input; selective: see `_SAVE_OPS`; core_attention:
    see `_core_attention_policy`."""
    if mode == "none":
        return
    context_fn = _CONTEXTS[mode]
    for layer in layers:
        layer.forward = functools.partial(_checkpointed_forward, layer.forward, context_fn)


def _checkpointed_forward(forward: Callable[..., torch.Tensor], context_fn: Callable[[], Any], x: torch.Tensor,
                          doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    if context_fn is noop_context_fn:
        # Not passed explicitly: dynamo (parallel.compile) traces checkpoint's default context but refuses an
        # explicit noop_context_fn ("checkpoint not implemented for ... context_fn").
        return checkpoint(forward, x, doc_ids, use_reentrant=False)
    return checkpoint(forward, x, doc_ids, use_reentrant=False, context_fn=context_fn)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Attention kernel


def _set_document_kernel(layers: list[nn.Module], kernel: str) -> None:
    """Derived.attention_kernel (sdpa or flex) for each layer's document mask; a causal model ignores it."""
    for layer in layers:
        layer.self_attn.document_kernel = kernel


# ---------------------------------------------------------------------------------------------------------------------
# 7. Pipeline


# Between pipeline parts: the hidden states (T, B, H), or (hidden, document ids (B, T)) where the model uses documents
# (ModelConfig.uses_documents).
# DeepSpeed sends a tuple as it is and sends back gradients for its floating-point tensors only.
StageActivations = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class EmbedStage(nn.Module):
    """First pipeline part: ids (B, T) → hidden (T, B, H) (Llama.forward's first lines), with the document ids when
    the model uses them: later stages never see the ids they are computed from."""

    def __init__(self, embed_tokens: nn.Module, eos_token_id: int | None) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.eos_token_id = eos_token_id  # Llama.eos_token_id: None unless the model uses documents

    def forward(self, input_ids: torch.Tensor) -> StageActivations:
        hidden = self.embed_tokens(input_ids).transpose(0, 1).contiguous()  # (T, B, H); SP: (T/tp, B, H)
        if self.eos_token_id is None:
            return hidden
        return hidden, document_ids(input_ids, self.eos_token_id)


class HeadStage(nn.Module):
    """Last pipeline part: hidden (T, B, H) → logits (B, T, V/tp) (Llama.forward's last lines); with `head_in_loss`
    (parallel.lm_loss=fused_linear) → the normed hidden states (B, T, H), which the loss turns into logits."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, head_in_loss: bool) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        self.head_in_loss = head_in_loss

    def forward(self, activations: StageActivations) -> torch.Tensor:
        hidden = self.norm(activations[0] if isinstance(activations, tuple) else activations)
        return (hidden if self.head_in_loss else self.lm_head(hidden)).transpose(0, 1)


def _take_stage_tuples(layer: nn.Module) -> None:
    """A decoder layer called with (hidden, doc_ids) as its one argument, as PipelineModule calls its parts, returns
    the same pair: `forward` is replaced, like activation checkpointing does, so parameter names stay."""
    layer.forward = functools.partial(_tuple_forward, layer.forward)


def _tuple_forward(forward: Callable[..., torch.Tensor],
                   activations: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, doc_ids = activations
    return forward(hidden, doc_ids), doc_ids


def pipeline_bounds(stage_layers: Sequence[int]) -> list[int]:
    """Stage boundaries in the PipelineModule layer list [embed, layers..., head] (DeepSpeed's `parts`: stage s owns
    [bounds[s], bounds[s + 1])): the embedding goes with the first stage, the head with the last."""
    starts = [StageParts.for_stage(stage_layers, stage).list_bounds()[0] for stage in range(len(stage_layers))]
    return [*starts, sum(stage_layers) + 2]  # + 2: the embedding and the head


_BOUNDS_METHOD = "bounds:"  # partition_method of _StageListPipelineModule: "bounds:0,3,7" (pipeline_bounds)


@functools.cache
def _stage_list_pipeline_class() -> type:
    """DeepSpeed's PipelineModule, placing the stage bounds it is given. DeepSpeed 0.19.8 has no such partition
    method (`_partition_layers` knows uniform, parameters and type:<regex>, all computed by its own balancing), and
    uneven stages (parallel.pipeline_stage_layers) need an exact split. Built on first use: deepspeed loads lazily."""
    from deepspeed.pipe import PipelineModule

    class StageListPipelineModule(PipelineModule):
        # (this stage's copy of the tied embedding, its group) where model.tie_embeddings; set by `parallelize`.
        # DeepSpeed's own tying (TiedLayerSpec) builds the modules itself; ours are built and sharded already.
        tied_embedding: tuple[nn.Parameter, Any] | None = None

        def get_tied_weights_and_groups(self) -> list[tuple[nn.Parameter, Any]]:
            # The pipeline engine sums these gradients over their group after the last backward (ReduceTiedGrads).
            return [self.tied_embedding] if self.tied_embedding is not None else []

        def _partition_layers(self, method: str = "uniform") -> None:
            # DeepSpeed passes partition_method through; _pipeline always gives "bounds:...".
            self.parts = [int(bound) for bound in method.removeprefix(_BOUNDS_METHOD).split(",")]
            if len(self.parts) != self.num_stages + 1 or self.parts[-1] != len(self._layer_specs):
                raise ValueError(f"pipeline bounds {self.parts} do not split {len(self._layer_specs)} parts into "
                                 f"{self.num_stages} stages")
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    return StageListPipelineModule


def _tie_over_stages(pipe: nn.Module, model: Llama, parts: StageParts, ctx: ParallelContext) -> nn.Parameter | None:
    """Tied embeddings over pipeline stages: hand the pipeline this stage's copy and the group of the first and last
    stage (the engine sums the copies' gradients over it after the last backward, before the DP reduction). Returns
    the last stage's copy (ParallelModel.tied_replica), marked with DeepSpeed's attribute for a parameter that
    another stage also holds, so gradient norms count it once. After PipelineModule, which clears that mark on
    every parameter it is given."""
    if parts.embed:
        pipe.tied_embedding = (model.embed_tokens.weight, ctx.embedding_group)
        return None
    if not parts.head:
        return None
    replica = model.lm_head.weight
    replica.ds_pipe_replicated = True  # type: ignore[attr-defined]
    pipe.tied_embedding = (replica, ctx.embedding_group)
    return replica


def _pipeline(model: Llama, parts: StageParts, stage_layers: Sequence[int], loss_fn: LossFn,
              ctx: ParallelContext) -> nn.Module:
    if model.cfg.uses_documents:
        for index in parts.layers:
            _take_stage_tuples(model.layers[index])
    layers = [EmbedStage(model.embed_tokens, model.eos_token_id), *model.layers,
              HeadStage(model.norm, model.lm_head, model.head_in_loss)]
    bounds = pipeline_bounds(stage_layers)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints the partition table on rank 0
        pipe = _stage_list_pipeline_class()(
            layers=layers,
            loss_fn=loss_fn,
            topology=deepspeed_topology(ctx),  # DeepSpeed's pipe/data groups = megatron's (same rank layout)
            # Exactly Derived.stage_layers decoder layers per stage; embed goes with the first, head with the last.
            # This is the split StageParts assumed when it chose which parts to allocate (checked below: DeepSpeed's
            # stage coordinate of this rank must be ctx.pp_rank).
            partition_method=_BOUNDS_METHOD + ",".join(str(bound) for bound in bounds),
            activation_checkpoint_interval=0,  # ours is per layer (step 5), the same with and without a pipeline
        )
    if (pipe._local_start, pipe._local_stop) != parts.list_bounds():
        raise RuntimeError(f"DeepSpeed placed layers [{pipe._local_start}, {pipe._local_stop}) on stage "
                           f"{ctx.pp_rank} but parallelize allocated {parts.list_bounds()}: check partition_method")
    return pipe
