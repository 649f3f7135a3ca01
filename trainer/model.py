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

from trainer.config import ModelConfig

# The tensors whose rows are the vocabulary: padded beyond model.vocab_size (Derived.padded_vocab_size), and those
# rows are kept at exactly zero (init_weights; no gradient reaches them through lm_loss).
VOCAB_PARAM_NAMES = ("embed_tokens.weight", "lm_head.weight")


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
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, hd) for the half-split layout: frequency i sits at columns i and i + hd/2.

    Computed in fp32 on the fly (T * hd/2 products per layer, negligible next to the matmuls): no buffer that a
    `.to(bf16)` could round, nothing to shard or checkpoint.
    """
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim  # (hd/2,)
    inv_freq = 1.0 / (theta**exponents)  # (hd/2,), the same float ops as HF so the angles match bit for bit
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # (T, hd/2); elementwise so autocast cannot lower it
    angles = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, n, T, hd); cos, sin: (T, hd) broadcast over batch and heads."""
    return x * cos + rotate_half(x) * sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA with grouped-query attention. q: (B, nh, T, hd); k, v: (B, nkv, T, hd) → (B, nh, T, hd).

    Query head i reads kv head i // (nh / nkv), i.e. repeat_interleave (HF's repeat_kv). SDPA's `enable_gqa` does the
    same without copying K/V, but only the CUDA flash kernel implements it; on CPU, in fp32, or on GPUs flash cannot
    serve, it would drop to the math kernel (O(T²) memory). So: native GQA where flash takes it, an explicit repeat
    elsewhere (every backend accepts that).
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if q.is_cuda and _flash_takes_gqa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    k = k.repeat_interleave(n_rep, dim=1)  # (B, nh, T, hd)
    v = v.repeat_interleave(n_rep, dim=1)  # (B, nh, T, hd)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


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
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hd = self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (T, B, nh*hd), (T, B, nkv*hd) x2
        # T comes from the projections, not from x: under sequence parallelism x is this rank's (T/tp, B, H) shard and
        # the column-parallel projections all-gather it back to the full sequence. Head counts come from the
        # projections too: under tensor parallelism each rank holds nh/tp and nkv/tp heads.
        T, B, _ = q.shape
        q = q.view(T, B, -1, hd).permute(1, 2, 0, 3)  # (B, nh, T, hd)
        k = k.view(T, B, -1, hd).permute(1, 2, 0, 3)  # (B, nkv, T, hd)
        v = v.view(T, B, -1, hd).permute(1, 2, 0, 3)  # (B, nkv, T, hd)
        cos, sin = rotary_cos_sin(T, hd, self.rope_theta, x.device, q.dtype)  # (T, hd) each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = causal_attention(q, k, v)  # (B, nh, T, hd)
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
    """Pre-norm block. One tensor in, one out (T, B, H): pipeline stages and checkpoint wrappers take it whole."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Input ids (B, T) → logits (B, T, padded_vocab_size). Padding rows are real rows that no label ever selects."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int) -> None:
        super().__init__()
        if padded_vocab_size < cfg.vocab_size:
            raise ValueError(f"padded_vocab_size ({padded_vocab_size}) must be >= model.vocab_size ({cfg.vocab_size})")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(padded_vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = (
                self.embed_tokens.weight
            )  # one Parameter; named_parameters() lists embed_tokens.weight
        self.init_weights()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # (B, T, H)
        h = h.transpose(0, 1).contiguous()  # (T, B, H): sequence-first from here on (see module docstring)
        for layer in self.layers:
            h = layer(h)
        logits = self.lm_head(self.norm(h))  # (T, B, V)
        # A view, no copy: lm_loss flattens it back in (T, B) order for free.
        return logits.transpose(0, 1)  # (B, T, V)

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
