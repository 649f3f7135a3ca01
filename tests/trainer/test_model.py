"""The Llama model: logits parity with transformers, exact parameter count, rotary, TP-readiness, loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ModelConfig, load_config, padded_vocab_size
from trainer.estimate import count_parameters
from trainer.model import (
    MLP,
    Attention,
    Llama,
    apply_rotary,
    causal_attention,
    init_std_for,
    lm_loss,
    rotary_cos_sin,
    to_hf_key,
)

REPO = Path(__file__).resolve().parents[2]


def tiny_model_config(**changes: object) -> ModelConfig:
    fields = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_seq_len=128,
    )
    fields.update(changes)
    return ModelConfig(**fields)


def hf_twin(cfg: ModelConfig, ours: Llama) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with the same shape, holding our weights (padding rows dropped)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.resolved_head_dim(),
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_seq_len,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    state = {to_hf_key(name): tensor for name, tensor in ours.state_dict().items()}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][: cfg.vocab_size]  # the named transform "drop vocab padding rows"
    if cfg.tie_embeddings:
        del state["lm_head.weight"]  # HF ties it to the embedding on load
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if cfg.tie_embeddings else [])
    return hf


@pytest.mark.parametrize(
    ("num_kv_heads", "tie", "vocab"),
    [(2, False, 256), (2, True, 256), (4, False, 256), (1, True, 256), (2, False, 250)],
    ids=["gqa-untied", "gqa-tied", "mha-untied", "mqa-tied", "gqa-padded-vocab"],
)
def test_logits_match_transformers(num_kv_heads: int, tie: bool, vocab: int) -> None:
    torch.manual_seed(0)
    cfg = tiny_model_config(num_kv_heads=num_kv_heads, tie_embeddings=tie, vocab_size=vocab)
    ours = Llama(cfg, padded_vocab_size(vocab, 1)).eval()
    hf = hf_twin(cfg, ours)
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, vocab, (3, 37))
    with torch.no_grad():
        ours_logits = ours(ids)[..., :vocab]
        hf_logits = hf(ids).logits
    assert ours_logits.shape == hf_logits.shape == (3, 37, vocab)
    assert (ours_logits - hf_logits).abs().max().item() < 1e-5
    labels = torch.randint(0, vocab, (3, 37))
    assert lm_loss(ours_logits, labels).item() == pytest.approx(
        F.cross_entropy(hf_logits.reshape(-1, vocab), labels.reshape(-1)).item(), abs=1e-5
    )


def test_parity_with_explicit_head_dim_and_odd_shapes() -> None:
    torch.manual_seed(1)
    cfg = tiny_model_config(
        hidden_size=48, num_heads=6, num_kv_heads=3, head_dim=12, intermediate_size=100, num_layers=3
    )
    ours = Llama(cfg, 256).eval()
    ids = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        assert (ours(ids) - hf_twin(cfg, ours)(ids).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_matches_estimate(tie: bool) -> None:
    cfg = load_config(
        REPO / "configs" / "tiny.yaml", [f"model.tie_embeddings={str(tie).lower()}", "model.vocab_size=250"]
    )
    derived = cfg.validate_for_world(1)
    model = Llama(cfg.model, derived.padded_vocab_size)
    assert derived.padded_vocab_size == 256
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg.model, derived.padded_vocab_size).total


@pytest.mark.parametrize("name", ["7b", "70b"])
def test_parameter_count_of_big_configs_on_meta_device(name: str) -> None:
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    padded = padded_vocab_size(cfg.model.vocab_size, cfg.parallel.tp)
    with torch.device("meta"):  # the way a big model is built before parallelize: no memory, no init cost
        model = Llama(cfg.model, padded)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg.model, padded).total


def test_hf_key_map_is_a_prefix() -> None:
    model = Llama(tiny_model_config(), 256)
    keys = set(model.state_dict())
    assert {
        "embed_tokens.weight",
        "norm.weight",
        "lm_head.weight",
        "layers.1.self_attn.k_proj.weight",
        "layers.0.mlp.gate_proj.weight",
        "layers.0.post_attention_layernorm.weight",
    } <= keys
    assert to_hf_key("layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert to_hf_key("lm_head.weight") == "lm_head.weight"


def test_no_biases_and_every_linear_is_separately_replaceable() -> None:
    model = Llama(tiny_model_config(), 256)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    layer = model.layers[0]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(getattr(layer.self_attn, proj), torch.nn.Linear)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert isinstance(getattr(layer.mlp, proj), torch.nn.Linear)


def test_init() -> None:
    torch.manual_seed(0)
    cfg = tiny_model_config(
        hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=4, num_layers=8, init_std=0.02
    )
    model = Llama(cfg, 256)
    layer = model.layers[3]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(256)) and torch.equal(
        model.norm.weight, torch.ones(256)
    )
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert init_std_for("layers.3.mlp.down_proj.weight", cfg) == pytest.approx(scaled)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_tied_embeddings_share_one_parameter() -> None:
    model = Llama(tiny_model_config(tie_embeddings=True), 256)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert [name for name, _ in model.named_parameters()].count("embed_tokens.weight") == 1
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_padded_vocab_must_cover_the_vocab() -> None:
    with pytest.raises(ValueError, match="padded_vocab_size"):
        Llama(tiny_model_config(vocab_size=300), 256)


# Rotary embeddings (half-split layout, as HF)


def test_rotary_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_theta=500000.0))
    x = torch.zeros(1, 50, 16)
    hf_cos, hf_sin = hf_rope(x, torch.arange(50)[None])
    cos, sin = rotary_cos_sin(50, 16, 500000.0, torch.device("cpu"), torch.float32)
    assert torch.allclose(cos, hf_cos[0], atol=1e-6) and torch.allclose(sin, hf_sin[0], atol=1e-6)


def test_rotary_identity_at_zero_norm_preserving_and_relative() -> None:
    torch.manual_seed(0)
    T, hd = 40, 16
    cos, sin = rotary_cos_sin(T, hd, 10000.0, torch.device("cpu"), torch.float32)
    q, k = torch.randn(hd), torch.randn(hd)
    q_rot = apply_rotary(q.expand(1, 1, T, hd), cos, sin)[0, 0]  # (T, hd): q placed at every position
    k_rot = apply_rotary(k.expand(1, 1, T, hd), cos, sin)[0, 0]
    assert torch.allclose(q_rot[0], q)  # position 0: no rotation
    assert torch.allclose(q_rot.norm(dim=-1), q.norm().expand(T), atol=1e-5)  # a rotation keeps the norm
    # The score depends only on the distance between positions: <q@m, k@n> == <q@(m+s), k@(n+s)>.
    scores = q_rot @ k_rot.T  # (T, T)
    assert torch.allclose(scores[5, 2], scores[25, 22], atol=1e-4) and torch.allclose(
        scores[3, 9], scores[30, 36], atol=1e-4
    )
    assert not torch.allclose(scores[5, 2], scores[5, 3], atol=1e-3)
    # Half-split pairing: frequency i rotates dims (i, i + hd/2); the first frequency is 1 rad per position.
    assert torch.allclose(cos[1, 0], torch.tensor(math.cos(1.0))) and torch.allclose(
        cos[1, hd // 2], torch.tensor(math.cos(1.0))
    )


def test_rotary_theta_changes_frequencies() -> None:
    cos_small, _ = rotary_cos_sin(8, 16, 100.0, torch.device("cpu"), torch.float32)
    cos_big, _ = rotary_cos_sin(8, 16, 1e6, torch.device("cpu"), torch.float32)
    assert torch.allclose(cos_small[:, 0], cos_big[:, 0])  # frequency 0 is theta-independent
    assert not torch.allclose(cos_small[:, 5], cos_big[:, 5])


# Attention


def test_gqa_equals_repeat_interleave_of_kv_heads() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
    assert torch.allclose(causal_attention(q, k, v), expected, atol=1e-6)


def test_model_is_causal() -> None:
    torch.manual_seed(0)
    model = Llama(tiny_model_config(), 256).eval()
    ids = torch.randint(0, 256, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def _shard_linear(full: torch.nn.Linear, rows: slice | None = None, cols: slice | None = None) -> torch.nn.Linear:
    weight = full.weight[rows or slice(None), cols or slice(None)]
    shard = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    shard.weight.data.copy_(weight)
    return shard


def test_attention_and_mlp_work_on_tensor_parallel_shards() -> None:
    """Split like megatron's Column/RowParallelLinear at TP=2: the module derives its local head count from the
    projections, and the two partial outputs sum to the unsplit output (RowParallel's all-reduce)."""
    torch.manual_seed(0)
    cfg = tiny_model_config(num_heads=4, num_kv_heads=2)
    attn, mlp = Attention(cfg), MLP(cfg)
    x = torch.randn(11, 3, 64)  # (T, B, H)
    hd, tp = 16, 2
    attn_parts, mlp_parts = [], []
    for rank in range(tp):
        q_rows = slice(rank * 2 * hd, (rank + 1) * 2 * hd)  # 2 of 4 query heads
        kv_rows = slice(rank * hd, (rank + 1) * hd)  # the 1 of 2 kv heads those query heads read
        shard = Attention(cfg)
        shard.q_proj, shard.o_proj = _shard_linear(attn.q_proj, rows=q_rows), _shard_linear(attn.o_proj, cols=q_rows)
        shard.k_proj, shard.v_proj = _shard_linear(attn.k_proj, rows=kv_rows), _shard_linear(attn.v_proj, rows=kv_rows)
        attn_parts.append(shard(x))
        inter = slice(rank * 88, (rank + 1) * 88)
        mlp_shard = MLP(cfg)
        mlp_shard.gate_proj, mlp_shard.up_proj = (
            _shard_linear(mlp.gate_proj, rows=inter),
            _shard_linear(mlp.up_proj, rows=inter),
        )
        mlp_shard.down_proj = _shard_linear(mlp.down_proj, cols=inter)
        mlp_parts.append(mlp_shard(x))
    with torch.no_grad():
        assert torch.allclose(sum(attn_parts), attn(x), atol=1e-6)
        assert torch.allclose(sum(mlp_parts), mlp(x), atol=1e-6)


# Loss and training basics


def test_lm_loss_ignores_minus_100_and_accepts_any_layout() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50)  # contiguous (B, T, V), as HF returns
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = -100
    keep = labels != -100
    expected = F.cross_entropy(logits[keep], labels[keep])
    assert lm_loss(logits, labels).item() == pytest.approx(expected.item(), abs=1e-6)
    seq_first = logits.transpose(0, 1).contiguous().transpose(0, 1)  # the model's layout: a view of (T, B, V)
    assert lm_loss(seq_first, labels).item() == pytest.approx(expected.item(), abs=1e-6)


def test_lm_loss_leaves_padded_vocabulary_columns_out_of_the_softmax() -> None:
    """Columns >= vocab_size are padding: the loss is HF's over the real columns and they get no gradient."""
    torch.manual_seed(0)
    padded = (torch.randn(2, 6, 512) * 3).requires_grad_()  # vocab 500 padded to 512
    labels = torch.randint(0, 500, (2, 6))
    loss = lm_loss(padded, labels, vocab_size=500)
    expected = F.cross_entropy(padded[..., :500].reshape(-1, 500), labels.reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert lm_loss(padded, labels).item() != pytest.approx(expected.item(), abs=1e-3)  # the padding does matter
    loss.backward()
    assert not padded.grad[..., 500:].any() and padded.grad[..., :500].abs().sum() > 0


def test_padding_rows_start_at_zero() -> None:
    model = Llama(tiny_model_config(), 384)  # vocab 256 padded to 384
    for weight in (model.embed_tokens.weight, model.lm_head.weight):
        assert not weight[256:].any() and weight[:256].all()  # real rows drawn, padding rows zero


def test_lm_loss_is_fp32_for_bf16_logits() -> None:
    logits = torch.randn(2, 5, 300).to(torch.bfloat16)
    labels = torch.randint(0, 300, (2, 5))
    loss = lm_loss(logits, labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(
        F.cross_entropy(logits.float().reshape(-1, 300), labels.reshape(-1)).item(), abs=1e-6
    )


def test_backward_reaches_every_parameter_and_loss_decreases() -> None:
    torch.manual_seed(0)
    model = Llama(tiny_model_config(tie_embeddings=True), 256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 256, (4, 33))
    losses = []
    for _ in range(5):
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(256), abs=0.1)  # small init: near-uniform predictions
    assert losses[-1] < losses[0] - 0.1


def test_bf16_forward_is_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = Llama(tiny_model_config(), 256).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        reference = model(ids)
        low = model.to(torch.bfloat16)(ids)
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max().item() < 0.05
