"""The explicit key map between our parameter names and transformers' LlamaForCausalLM, with every shape.

Our names are HF's without the `model.` prefix (trainer.model.to_hf_key), so the map is a prefix; it is still
spelled out key by key so that a renamed or missing parameter fails here, by name, instead of loading silently.
Shapes are [out, in] (nn.Linear); nh / nkv query / key-value heads, hd head dim, H hidden, I intermediate.
"""

from __future__ import annotations

from trainer.config import ModelConfig

HF_PREFIX = "model."
EMBED = "embed_tokens.weight"
LM_HEAD = "lm_head.weight"  # HF keeps it outside `model.`
FINAL_NORM = "norm.weight"
# Per decoder layer, in HF's module order. One entry per tensor: q, k, v are separate (no fused QKV to split) and
# gate (the silu input) is separate from up, in our model as in HF.
LAYER_PARAMS: tuple[str, ...] = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
VOCAB_PARAMS = (EMBED, LM_HEAD)  # the tensors whose rows are the vocabulary (padded in our runs, trimmed in HF)


def our_keys(cfg: ModelConfig) -> list[str]:
    """Every parameter of trainer.model.Llama in module order, once: no lm_head when tied (it *is* embed_tokens,
    so `named_parameters()` lists it once and safetensors could not store the alias anyway)."""
    keys = [EMBED]
    for i in range(cfg.num_layers):
        keys += [f"layers.{i}.{name}" for name in LAYER_PARAMS]
    keys.append(FINAL_NORM)
    if not cfg.tie_embeddings:
        keys.append(LM_HEAD)
    return keys


def hf_key(our_key: str) -> str:
    return our_key if our_key == LM_HEAD else HF_PREFIX + our_key


def our_key(key_in_hf: str) -> str:
    if key_in_hf == LM_HEAD:
        return key_in_hf
    if not key_in_hf.startswith(HF_PREFIX):
        raise KeyError(key_in_hf)
    return key_in_hf[len(HF_PREFIX) :]


def key_map(cfg: ModelConfig) -> dict[str, str]:
    """Our name → HF name, in module order."""
    return {key: hf_key(key) for key in our_keys(cfg)}


def expected_shapes(cfg: ModelConfig, vocab_rows: int) -> dict[str, tuple[int, ...]]:
    """Our name → shape. `vocab_rows`: padded_vocab_size for our state dicts, vocab_size for HF's."""
    H, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim()
    q_rows, kv_rows = cfg.num_heads * hd, cfg.num_kv_heads * hd
    per_layer = {
        "input_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (q_rows, H),
        "self_attn.k_proj.weight": (kv_rows, H),  # GQA: nkv heads, not nh
        "self_attn.v_proj.weight": (kv_rows, H),
        "self_attn.o_proj.weight": (H, q_rows),
        "post_attention_layernorm.weight": (H,),
        "mlp.gate_proj.weight": (inter, H),
        "mlp.up_proj.weight": (inter, H),
        "mlp.down_proj.weight": (H, inter),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for key in our_keys(cfg):
        if key in VOCAB_PARAMS:
            shapes[key] = (vocab_rows, H)
        elif key == FINAL_NORM:
            shapes[key] = (H,)
        else:
            shapes[key] = per_layer[key.split(".", 2)[2]]
    return shapes
