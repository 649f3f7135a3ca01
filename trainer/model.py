"""Llama-style decoder in plain torch, with Hugging Face Llama parameter names.

Our names are HF's without the `model.` prefix (see `to_hf_key`), so export is a key map plus the named transforms
that trainer.hf applies (vocab-padding rows dropped, lm_head omitted when tied).

    embed_tokens → layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
                             mlp.{gate,up,down}_proj} → norm → lm_head

The model holds no parallelism state. A later `parallelize` step swaps q/k/v/gate/up for megatron-core
ColumnParallelLinear, o/down for RowParallelLinear, embed_tokens for VocabParallelEmbedding; for that:
- every linear is its own submodule, called as `proj(x)`;
- attention derives its local head counts from the projection outputs (`q.shape[-1] // head_dim`), never from the
  config, so a TP shard simply sees fewer heads;
- hidden states between layers are sequence-first, (T, B, H): megatron's sequence-parallel layers split and gather
  activations along dim 0 and expect that layout. Input ids are (B, T) and logits come back as (B, T, V).

Conventions: B batch, T sequence, H hidden, nh / nkv query / key-value heads (local), hd head dim, V (padded) vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig, RopeScalingConfig
from trainer.document_attention import document_attention

# The tensors whose rows are the vocabulary: padded beyond model.vocab_size (Derived.padded_vocab_size), and those
# rows are kept at exactly zero (init_weights; no gradient reaches them through lm_loss). Tied embeddings are the
# first alone (named_parameters() lists the shared tensor once, under its first name).
EMBED_WEIGHT, LM_HEAD_WEIGHT = "embed_tokens.weight", "lm_head.weight"
VOCAB_PARAM_NAMES = (EMBED_WEIGHT, LM_HEAD_WEIGHT)


class RMSNorm(nn.Module):
    """w * x / rms(x), the reduction in fp32 even for bf16 inputs (HF LlamaRMSNorm, bit for bit)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(
    positions: torch.Tensor | int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype,
    scaling: RopeScalingConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for the half-split layout (frequency i sits at columns i and i + hd/2): of shape (T, hd) for
    `positions` = T (0 .. T-1), or (B, 1, T, hd) for per-row positions (B, T) (model.reset_position_ids), which
    broadcast over the heads of (B, n, T, hd).

    Computed in fp32 on the fly (T * hd/2 products per layer, negligible next to the matmuls): no buffer that a
    `.to(bf16)` could round, nothing to shard or checkpoint.
    """
    inv_freq = rope_inv_freq(head_dim, theta, device, scaling)  # (hd/2,)
    if isinstance(positions, int):
        positions = torch.arange(positions, device=device)
    freqs = positions.float()[..., None] * inv_freq  # (..., T, hd/2); elementwise so autocast cannot lower it
    angles = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd)
    if angles.dim() == 3:
        angles = angles.unsqueeze(1)  # (B, 1, T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device,
                  scaling: RopeScalingConfig | None = None) -> torch.Tensor:
    """(hd/2,) fp32 rotation frequencies theta^(-2i/hd), then model.rope_scaling's rule (see RopeScalingConfig);
    the same float ops as HF's, so the angles match bit for bit."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim  # (hd/2,)
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    # llama3: by wavelength 2π/f, measured in tokens against the original context. Short wavelengths (local
    # patterns, seen whole many times in the original context) keep their frequency; wavelengths longer than that
    # context are slowed by `factor` (interpolated); in between, the mix moves linearly in original / wavelength.
    wavelen = 2 * math.pi / inv_freq
    original = scaling.original_max_seq_len
    smooth = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    between = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    slowed = torch.where(wavelen > original / scaling.low_freq_factor, inv_freq / scaling.factor, between)
    return torch.where(wavelen < original / scaling.high_freq_factor, inv_freq, slowed)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, n, T, hd); cos, sin: (T, hd) or (B, 1, T, hd), broadcast over batch and heads."""
    return x * cos + rotate_half(x) * sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal SDPA with grouped-query attention. q: (B, nh, T, hd); k, v: (B, nkv, T, hd) → (B, nh, T, hd).
    `mask` (B, 1, T, T) bool, True where a query may attend, replaces the causal mask (`document_mask`).

    Query head i reads kv head i // (nh / nkv), i.e. repeat_interleave (HF's repeat_kv). SDPA's `enable_gqa` does the
    same without copying K/V, but only the CUDA flash kernel implements it; on CPU, in fp32, with a mask, or on GPUs
    flash cannot serve, it would drop to the math kernel (O(T²) memory). So: native GQA where flash takes it, an
    explicit repeat elsewhere (every backend accepts that). With a mask, CUDA runs the memory-efficient kernel.
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1 and mask is None and q.is_cuda and _flash_takes_gqa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)  # (B, nh, T, hd)
        v = v.repeat_interleave(n_rep, dim=1)  # (B, nh, T, hd)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def document_ids(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, T) → (B, T) int64: which packed document of its row each token belongs to, 0, 1, ... from the row's
    start. The packer writes every document's tokens followed by eos, so an eos ends its document and the next
    token starts a new one. (The row's first document may have begun in the previous sample; it is still one.)"""
    is_eos = (input_ids == eos_token_id).long()
    return is_eos.cumsum(-1) - is_eos  # documents ended strictly before each token


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids → (B, 1, T, T) bool: query t attends to key s iff s <= t in the same document. The
    diagonal is always True, so no row is fully masked (no NaN from an empty softmax)."""
    T = doc_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & causal  # (B, 1, T, T)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids → (B, T) int64: each token's position inside its document (0 at a document's start)."""
    t = torch.arange(doc_ids.shape[-1], device=doc_ids.device).expand_as(doc_ids)
    # No in-place writes here: under selective activation checkpointing a tensor cached by the policy must not change.
    starts_here = torch.cat((torch.ones_like(doc_ids[:, :1], dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]), 1)
    start = torch.where(starts_here, t, 0).cummax(dim=-1).values  # the index where each token's document began
    return t - start


def _flash_takes_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    # SDPAParams(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    return bool(can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, True, True), False))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hd = cfg.resolved_head_dim()
        self.head_dim = hd
        self.rope_theta = cfg.rope_theta
        self.rope_scaling = cfg.rope_scaling
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, cfg.hidden_size, bias=False)
        self.mask_documents = cfg.attention_mask == "document"
        self.reset_position_ids = cfg.reset_position_ids
        # The document mask's kernel: "sdpa" (a dense mask; runs anywhere) or "flex" (trainer.document_attention;
        # CUDA training). A kernel choice, not part of the model: trainer.parallelize sets it per
        # parallel.attention_kernel; a model built here (HF parity, export) computes the same with SDPA.
        self.document_kernel = "sdpa"

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: (T, B, H); doc_ids: (B, T) from `document_ids`, given when ModelConfig.uses_documents (full T, also under
        sequence parallelism)."""
        hd = self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (T, B, nh*hd), (T, B, nkv*hd) x2
        # T comes from the projections, not from x: under sequence parallelism x is this rank's (T/tp, B, H) shard and
        # the column-parallel projections all-gather it back to the full sequence. Head counts come from the
        # projections too: under tensor parallelism each rank holds nh/tp and nkv/tp heads.
        T, B, _ = q.shape
        q = q.view(T, B, -1, hd).permute(1, 2, 0, 3)  # (B, nh, T, hd)
        k = k.view(T, B, -1, hd).permute(1, 2, 0, 3)  # (B, nkv, T, hd)
        v = v.view(T, B, -1, hd).permute(1, 2, 0, 3)  # (B, nkv, T, hd)
        positions = document_positions(doc_ids) if self.reset_position_ids else T  # (B, T) or T
        cos, sin = rotary_cos_sin(positions, hd, self.rope_theta, x.device, q.dtype,  # (T, hd) or (B, 1, T, hd)
                                  self.rope_scaling)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.mask_documents and self.document_kernel == "flex":
            y = document_attention(q, k, v, doc_ids)  # (B, nh, T, hd)
        else:
            mask = document_mask(doc_ids) if self.mask_documents else None  # (B, 1, T, T)
            y = causal_attention(q, k, v, mask)  # (B, nh, T, hd)
        y = y.permute(2, 0, 1, 3).reshape(T, B, -1)  # (T, B, nh*hd)
        return self.o_proj(y)  # (T, B, H); (T/tp, B, H) under sequence parallelism (o_proj reduce-scatters)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: hidden (T, B, H) in and out, plus the document ids (B, T) where the model uses them (they
    pass through every layer unchanged; a pipeline stage sends them on with the hidden states)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), doc_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Input ids (B, T) → logits (B, T, padded_vocab_size), or the final norm's output (B, T, hidden) with
    `head_in_loss`. Padding rows are real rows that no label ever selects.
    `eos_token_id`: where documents end in a packed sample; needed to run when ModelConfig.uses_documents, else
    unused."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, eos_token_id: int | None = None) -> None:
        super().__init__()
        if padded_vocab_size < cfg.vocab_size:
            raise ValueError(f"padded_vocab_size ({padded_vocab_size}) must be >= model.vocab_size ({cfg.vocab_size})")
        self.cfg = cfg
        self.eos_token_id = check_eos_token_id(cfg, eos_token_id)
        self.embed_tokens = nn.Embedding(padded_vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = (
                self.embed_tokens.weight
            )  # one Parameter; named_parameters() lists embed_tokens.weight
        # parallel.lm_loss=fused_linear (trainer.parallelize): forward stops at the final norm and the loss calls
        # lm_head, which then computes the logits chunk by chunk with the loss (trainer.loss.fused_linear_lm_loss).
        self.head_in_loss = False
        self.init_weights()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # (B, T, H)
        h = h.transpose(0, 1).contiguous()  # (T, B, H): sequence-first from here on (see module docstring)
        doc_ids = self.document_ids(input_ids)
        for layer in self.layers:
            h = layer(h, doc_ids)
        h = self.norm(h)
        logits = h if self.head_in_loss else self.lm_head(h)  # (T, B, V), or (T, B, H) for the fused loss
        # A view, no copy: lm_loss flattens it back in (T, B) order for free.
        return logits.transpose(0, 1)  # (B, T, V)

    def document_ids(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, T) document ids for the layers, or None when the model does not use them (plain causal attention)."""
        return document_ids(input_ids, self.require_eos_token_id()) if self.cfg.uses_documents else None

    def require_eos_token_id(self) -> int:
        """The eos id, for a model that uses documents (a model built only for its names may lack it)."""
        if self.eos_token_id is None:
            raise ValueError("model.attention_mask=document and model.reset_position_ids find documents at the eos "
                             "token, but the model was built without the data's eos id (Llama(..., eos_token_id))")
        return self.eos_token_id

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, std) per `init_std_for`; norms to 1; vocabulary padding rows to 0 (they never receive a
        gradient, so they stay 0). Safe on the meta device (a no-op there)."""
        for name, param in self.named_parameters():
            std = init_std_for(name, self.cfg)
            if std is None:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std)
                if name in VOCAB_PARAM_NAMES:
                    param[self.cfg.vocab_size:] = 0.0


def check_eos_token_id(cfg: ModelConfig, eos_token_id: int | None) -> int | None:
    """The eos id the model splits documents at: None unless ModelConfig.uses_documents; a given id must be a token."""
    if not cfg.uses_documents:
        return None
    if eos_token_id is not None and not 0 <= eos_token_id < cfg.vocab_size:
        raise ValueError(f"eos_token_id {eos_token_id} is not a token of model.vocab_size {cfg.vocab_size}: pass the "
                         f"data's tokenizer eos id")
    return eos_token_id


def init_std_for(param_name: str, cfg: ModelConfig) -> float | None:
    """Init std of a parameter by name (None: a norm weight, initialised to 1). `parallelize` reuses this for the
    megatron layers' init_method so a TP run starts from the same distribution.

    Output projections (o_proj, down_proj) write into the residual stream once per layer, so the stream's variance
    grows with depth; GPT-2/Megatron scale their std by 1/sqrt(2 * num_layers) to keep it O(1) at init.
    """
    if param_name.endswith("layernorm.weight") or param_name == "norm.weight":
        return None
    if param_name.endswith(("o_proj.weight", "down_proj.weight")):
        return cfg.init_std / math.sqrt(2 * cfg.num_layers)
    return cfg.init_std


def to_hf_key(name: str) -> str:
    """Our state-dict key → the key in transformers' LlamaForCausalLM."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None,
            ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross entropy over labels != ignore_index, computed in fp32.

    logits: (B, T, V_padded); labels: (B, T), already shifted by the data loader (labels[t] is the token after
    input[t]). Only the first `vocab_size` columns (the tokenizer's vocabulary; None: all) enter the softmax: the
    padding columns are not tokens, so they must neither take probability mass nor get a gradient (HF's model has
    no such columns, and the padding depends on tp). The slice is a view: no copy of the logits.
    Flattening in (T, B) order matches Llama's output layout, so this reshape is free; the mean is order-independent.
    All labels ignored gives NaN (0/0), like torch's cross_entropy.
    """
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[..., :vocab_size]
    V = logits.shape[-1]
    flat_logits = logits.transpose(0, 1).reshape(-1, V).float()  # (T*B, V)
    flat_labels = labels.transpose(0, 1).reshape(-1)  # (T*B,)
    return F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index)
