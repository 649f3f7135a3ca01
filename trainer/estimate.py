"""Parameter count, FLOPs per token and memory per GPU from a config alone (pure Python, no torch): `--dry-run`.

The parameter count is exact for trainer.model.Llama (tested against sum(p.numel())). FLOPs and memory are
estimates with the assumptions stated next to each formula.
"""

from __future__ import annotations

import dataclasses

from trainer.config import Config, Derived, ModelConfig

# trainer.loss.DEFAULT_CHUNK_BYTES, repeated here because this module imports no torch (`pretrain plan` runs without
# it); tests/trainer/test_estimate.py checks that the two agree.
LOSS_CHUNK_BYTES = 128 * 2**20


@dataclasses.dataclass(frozen=True)
class ParamCount:
    embedding: int  # embed_tokens, padded rows included
    per_layer: int
    layers: int  # per_layer * num_layers
    final_norm: int
    lm_head: int  # 0 when tied to the embedding

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.final_norm + self.lm_head

    @property
    def non_embedding(self) -> int:
        return self.layers + self.final_norm


@dataclasses.dataclass(frozen=True)
class LayerShape:
    hidden: int
    q_width: int  # num_heads * head_dim
    kv_width: int  # num_kv_heads * head_dim
    intermediate: int

    @property
    def linear_params(self) -> int:
        attention = self.hidden * self.q_width * 2 + self.hidden * self.kv_width * 2  # q, o + k, v
        return attention + 3 * self.hidden * self.intermediate  # gate, up, down

    @property
    def norm_params(self) -> int:
        return 2 * self.hidden  # input_layernorm, post_attention_layernorm


def layer_shape(model: ModelConfig) -> LayerShape:
    hd = model.resolved_head_dim()
    return LayerShape(model.hidden_size, model.num_heads * hd, model.num_kv_heads * hd, model.intermediate_size)


def count_parameters(model: ModelConfig, padded_vocab_size: int) -> ParamCount:
    shape = layer_shape(model)
    per_layer = shape.linear_params + shape.norm_params
    vocab_rows = padded_vocab_size * model.hidden_size
    return ParamCount(
        embedding=vocab_rows,
        per_layer=per_layer,
        layers=per_layer * model.num_layers,
        final_norm=model.hidden_size,
        lm_head=0 if model.tie_embeddings else vocab_rows,
    )


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
    matmul: int  # 6 × (parameters that take part in a matmul): forward 2N, backward 4N
    attention: int  # QKᵀ and AV, which no parameter counts

    @property
    def total(self) -> int:
        return self.matmul + self.attention


def flops_per_token(model: ModelConfig, padded_vocab_size: int, seq_len: int) -> FlopsPerToken:
    """Training FLOPs per token (forward + backward), the numerator of MFU.

    Matmul parameters: every linear plus lm_head (a matmul even when tied); the embedding lookup and norms are free.
    Attention: forward QKᵀ + AV is 4 · T · nh·hd per token per layer, ×3 for training; the causal mask is not halved
    (PaLM/Megatron MFU convention). Recomputation for activation checkpointing is not counted (it is not model work).
    """
    shape = layer_shape(model)
    matmul_params = shape.linear_params * model.num_layers + padded_vocab_size * model.hidden_size
    attention = 12 * model.num_layers * seq_len * shape.q_width
    return FlopsPerToken(matmul=6 * matmul_params, attention=attention)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU on the busiest pipeline stage. Excludes the CUDA context, NCCL's buffers and the allocator's
    fragmentation: keep ~10-20 % of the device free on top of `total_bytes`."""

    params_per_gpu: int  # this rank's model-parallel shard, before ZeRO partitioning
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int  # fp32 master copy (mixed precision) + Adam m and v
    activations_bytes: int
    cpu_offload_bytes: int  # optimizer state / weights that ZeRO offload keeps in host memory instead
    in_flight_micro_batches: int
    buffers_bytes: int = 0  # DeepSpeed's gradient buckets and ZeRO-3's gathered parameters (sized by config)
    stage: int = 0  # the pipeline stage these numbers are for: the one with the largest total

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes
                + self.buffers_bytes)


def estimate_memory(cfg: Config, derived: Derived) -> MemoryEstimate:
    """The busiest pipeline stage's memory: every stage is estimated (its decoder layers from Derived.stage_layers,
    the embedding on the first, final norm + lm_head + logits on the last, 1F1B's in-flight micro-batches) and the
    largest total is returned; the first stage wins ties."""
    stages = [_stage_memory(cfg, derived, stage) for stage in range(derived.pp)]
    return max(stages, key=lambda memory: memory.total_bytes)  # max keeps the first of equal totals


def _stage_memory(cfg: Config, derived: Derived, stage: int) -> MemoryEstimate:
    params = stage_params_per_gpu(cfg.model, derived, stage)
    weights, grads, optimizer, offloaded = _state_bytes(cfg, derived, params)
    activations, in_flight = _activation_bytes(cfg, derived, stage)
    buffers = _buffer_bytes(cfg, derived)
    return MemoryEstimate(params, weights, grads, optimizer, activations, offloaded, in_flight, buffers, stage)


def stage_params_per_gpu(model: ModelConfig, derived: Derived, stage: int) -> int:
    """Parameters of one pipeline stage, per TP rank. Linears and vocab rows split over tp; norms replicate.

    The first stage holds the embedding, the last the final norm and lm_head (with tied embeddings and pp > 1 the last
    stage holds a copy of the embedding as its lm_head, kept in sync by an extra all-reduce).
    """
    shape, tp = layer_shape(model), derived.tp
    vocab_shard = derived.padded_vocab_size * model.hidden_size // tp
    params = derived.stage_layers[stage] * (shape.linear_params // tp + shape.norm_params)
    if stage == 0:
        params += vocab_shard
    if stage == derived.pp - 1:
        params += model.hidden_size + (0 if model.tie_embeddings and derived.pp == 1 else vocab_shard)
    return params


def _state_bytes(cfg: Config, derived: Derived, params: int) -> tuple[int, int, int, int]:
    """(weights, grads, optimizer, offloaded) bytes. ZeRO-1 partitions optimizer state over dp, ZeRO-2 also grads,
    ZeRO-3 also weights. Mixed precision: 2-byte weights and grads (4 with fp32 grad accumulation) and 12 bytes of
    optimizer state (fp32 master, m, v); fp32: 4 + 4 + 8, and 12 under ZeRO: DeepSpeed's partition of the master
    weights is a copy even when the model is fp32 (stage_1_and_2: `.clone().to(master dtype)`)."""
    mixed = cfg.precision.dtype != "fp32"
    weight_b = 2 if mixed else 4
    grad_b = 4 if (not mixed or cfg.precision.fp32_grad_accumulation) else 2
    optim_b = 12 if (mixed or cfg.zero.stage >= 1) else 8
    stage, dp = cfg.zero.stage, derived.dp
    weights = params * weight_b // (dp if stage >= 3 else 1)
    grads = params * grad_b // (dp if stage >= 2 else 1)
    optimizer = params * optim_b // (dp if stage >= 1 else 1)
    offloaded = 0
    if cfg.zero.offload_optimizer != "none":
        offloaded, optimizer = offloaded + optimizer, 0
    if cfg.zero.offload_param != "none":
        offloaded, weights = offloaded + weights, 0
    return weights, grads, optimizer, offloaded


def _buffer_bytes(cfg: Config, derived: Derived) -> int:
    """Buffers DeepSpeed allocates whole, whatever the model size (so they matter most for small models).

    ZeRO-1/2 (stage_1_and_2.setup_buckets, on the first backward, also with dp 1): a gradient bucket of
    zero.reduce_bucket_size_elements in the model dtype, two with overlap_comm. Not with bf16 + fp32 gradient
    accumulation under ZeRO-1: DeepSpeed then runs its BF16_Optimizer, whose fp32 gradients are counted as grads.
    ZeRO-3: one reduce bucket, the prefetch bucket and the largest module gathered whole (its TP shard): a decoder
    layer, or lm_head (the embedding's rows) where the vocabulary is larger (Llama 3's 128K rows at hidden 4096: 2.4×
    a layer of the 8B).
    On the H200 (1B, ZeRO-2, bf16) the estimate without these was 2.06 GiB under max_memory_allocated; two 5e8-element
    bf16 buckets are 1.86 GiB.
    """
    z, p = cfg.zero, cfg.precision
    elem_b = 4 if p.dtype == "fp32" else 2
    if z.stage in (1, 2):
        if z.stage == 1 and p.dtype == "bf16" and p.fp32_grad_accumulation and z.offload_optimizer == "none":
            return 0
        return (2 if z.overlap_comm else 1) * z.reduce_bucket_size_elements * elem_b
    if z.stage == 3:
        layer = layer_shape(cfg.model).linear_params // derived.tp
        vocab_shard = derived.padded_vocab_size * cfg.model.hidden_size // derived.tp
        gathered = max(layer, vocab_shard)
        return (z.reduce_bucket_size_elements + z.stage3_prefetch_bucket_size_elements + gathered) * elem_b
    return 0


def _activation_bytes(cfg: Config, derived: Derived, stage: int) -> tuple[int, int]:
    """Activations one pipeline stage keeps for backward, and its micro-batches in flight.

    With 1F1B stage s holds min(pp - s, grad_accum) micro-batches (the first the most, the last one); the last stage
    also holds the final norm's input and the logits. Layers past parallel.activation_checkpointing_layers keep what
    a layer without checkpointing keeps.
    """
    tokens = cfg.train.seq_len * derived.micro_batch_size_per_gpu
    layers = derived.stage_layers[stage]
    checkpointed = cfg.parallel.checkpointed_layers(layers)  # the first ones; the rest keep everything
    per_layer = _layer_activation_bytes_per_token(cfg, derived) * tokens
    whole_layer = _layer_activation_bytes_per_token(cfg, derived, mode="none") * tokens
    working = 0
    if cfg.parallel.activation_checkpointing == "full" and checkpointed:
        # Backward recomputes one layer at a time: that layer's full activations exist on top of the saved inputs.
        working = whole_layer
    in_flight = min(derived.pp - stage, derived.grad_accum_steps)
    total = in_flight * (checkpointed * per_layer + (layers - checkpointed) * whole_layer) + working
    if stage == derived.pp - 1:
        total += _head_activation_bytes(cfg, derived, tokens)
    return total, in_flight


def _head_activation_bytes(cfg: Config, derived: Derived, tokens: int) -> int:
    """The last stage's final norm as in a layer, and what lm_head + loss hold at the loss' backward: the stage's
    peak, as every layer's activations are still saved then."""
    sp = derived.tp if cfg.parallel.sequence_parallel else 1
    final_norm = tokens * (4 + activation_element_bytes(cfg)) * cfg.model.hidden_size // sp
    return final_norm + loss_bytes(cfg, derived, tokens, cfg.parallel.lm_loss)


def activation_element_bytes(cfg: Config) -> int:
    """Bytes per activation element: fp32 runs keep fp32, mixed precision bf16/fp16."""
    return 4 if cfg.precision.dtype == "fp32" else 2


def loss_bytes(cfg: Config, derived: Derived, tokens: int, loss: str) -> int:
    """lm_head's output and the loss' working set at the loss' backward, for one micro-batch of `tokens`.
    loss: "chunked" | "fused_linear" (parallel.lm_loss), or "plain" (trainer.model.lm_loss, which training used
    until 2026-12-04: the one GPU measurement, tests/trainer/test_estimate.py, ran it)."""
    act_b = activation_element_bytes(cfg)
    vocab_shard = derived.padded_vocab_size // derived.tp
    logits = tokens * vocab_shard
    if loss == "plain":  # the logits, their fp32 copy (mixed precision) and the fp32 log-softmax cross entropy saves
        return logits * (act_b + 4 + (4 if act_b < 4 else 0))
    chunk = min(LOSS_CHUNK_BYTES, logits * 4)  # one chunk of fp32 logits (trainer.loss); all of them if fewer
    if loss == "chunked":  # the logits (kept for backward) and their gradient, made in the loss' backward; a chunk
        return 2 * logits * act_b + 2 * chunk  # in fp32 and its working copy
    if loss == "fused_linear":  # no logits: the weight's and the hidden states' fp32 gradients, one chunk's
        weight = vocab_shard * cfg.model.hidden_size  # fp32 temporaries and gradient, one chunk's (V, H) product
        return weight * (4 + act_b) + tokens * cfg.model.hidden_size * 4 + 2 * chunk + chunk * act_b // 4
    raise ValueError(f"unknown loss {loss!r}: chunked, fused_linear or plain")


def _layer_activation_bytes_per_token(cfg: Config, derived: Derived, mode: str | None = None) -> int:
    """Bytes one decoder layer saves for backward, per token, on one GPU.

    H-wide tensors (residual stream, norm outputs) are replicated over TP unless sequence parallel shards them;
    head- and intermediate-wide tensors are split by TP. Attention is flash/memory-efficient SDPA (no T×T matrix;
    native GQA, so K and V stay nkv wide), saving q, k, v, its output and a fp32 log-sum-exp per head.
    - none: each RMSNorm saves its fp32 input and its output; attention saves q, k, v, out and o_proj's input;
      SwiGLU saves gate, silu(gate), up and down_proj's input.
    - selective: matmul and attention outputs are kept, elementwise ops (norms, rotary, SiLU·mul) recomputed.
    - core_attention: as none, less what the attention core saves for itself (its output and log-sum-exp): it runs
      again in backward from the kept q, k, v.
    - full: only the layer input is kept (the recompute working set is added by the caller).
    model.attention_mask=document: SDPA takes a (B, 1, T, T) mask, turned into an additive one in the activation
    dtype that the attention keeps for backward (T elements per token) in none and core_attention (selective
    recomputes it); with a mask CUDA runs the memory-efficient kernel, which has no native GQA, so the attention keeps
    K and V repeated to the query heads (none, core_attention). FlexAttention (parallel.attention_kernel=flex) keeps
    what flash keeps: q, k and v unrepeated, its output and the log-sum-exp; its block mask is O((T / 128)²).
    """
    mode = mode or cfg.parallel.activation_checkpointing
    shape, tp = layer_shape(cfg.model), derived.tp
    sp = tp if cfg.parallel.sequence_parallel else 1
    a = activation_element_bytes(cfg)
    lse = 4 * cfg.model.num_heads // tp
    h, q, kv, inter = shape.hidden, shape.q_width // tp, shape.kv_width // tp, shape.intermediate // tp
    if mode == "full":
        return a * h // sp
    if mode == "selective":
        return a * 3 * h // sp + a * (2 * q + 2 * kv + 2 * inter) + lse
    dense_mask = cfg.model.attention_mask == "document" and derived.attention_kernel == "sdpa"
    document = a * (cfg.train.seq_len + 2 * (q - kv)) if dense_mask else 0
    if mode == "core_attention":
        return 2 * (4 + a) * h // sp + a * (2 * q + 2 * kv + 4 * inter) + document
    return 2 * (4 + a) * h // sp + a * (3 * q + 2 * kv + 4 * inter) + lse + document
