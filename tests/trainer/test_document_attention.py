"""parallel.attention_kernel=flex: the document mask through FlexAttention (trainer/document_attention.py).

On CPU FlexAttention runs forward only (no backward pass), so here: the block mask against torch's own
`create_block_mask` tile by tile, the attention and a whole model against the SDPA path without gradients, the
compiled trace, and the config. Training with it (forward and backward, every checkpointing mode) is the GPU tier's
(tests/trainer/test_gpu.py).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from test_model import tiny_model_config
from trainer.config import ConfigError, load_config
from trainer.document_attention import TILE, document_attention, document_block_mask, same_document_causal
from trainer.estimate import _layer_activation_bytes_per_token
from trainer.model import Llama, causal_attention, document_ids, document_mask
from trainer.parallelize import _ATTENTION_CORE_OPS, _core_attention_policy, _selective_policy
from torch.utils.checkpoint import CheckpointPolicy

EOS = 2
TINY = "configs/tiny.yaml"


def _packed_ids(seq: int, seed: int) -> torch.Tensor:
    """Rows of packed documents, one layout per row: short random documents; one document; an eos on every tile's
    first and last token (documents that end and start exactly at tile boundaries); eos first and last."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(EOS + 1, 300, (4, seq), generator=generator)
    ids[0, torch.rand(seq, generator=generator) < 0.02] = EOS
    ids[2, ::TILE] = EOS
    ids[2, TILE - 1::TILE] = EOS
    ids[3, [0, seq - 1]] = EOS
    return ids


@pytest.mark.parametrize("seq", [64, 128, 200, 384, 1000])
def test_the_block_mask_is_torchs_tile_for_tile(seq: int) -> None:
    """Empty, partial and full tiles as `create_block_mask` finds them by calling the mask on every (query, key)
    pair: counts and ordered indices alike, including a short last tile (200, 1000)."""
    docs = document_ids(_packed_ids(seq, seed=seq), EOS)
    ours = document_block_mask(docs)
    torchs = create_block_mask(same_document_causal(docs), docs.shape[0], None, seq, seq, device="cpu")
    for field in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, field), getattr(torchs, field)), field
    for count, index in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        counts = getattr(ours, count)
        for b, q_tile in torch.nonzero(counts[:, 0] > 0).tolist():
            n = int(counts[b, 0, q_tile])
            assert torch.equal(getattr(ours, index)[b, 0, q_tile, :n], getattr(torchs, index)[b, 0, q_tile, :n])
    assert ours.seq_lengths == (seq, seq)


def test_short_documents_leave_most_tiles_empty() -> None:
    """What the kernel gains: 64-token documents in a 1024-token row touch only the diagonal tiles and their
    neighbours (a document crossing a tile boundary); one document spanning the row makes every earlier tile full."""
    ids = torch.randint(EOS + 1, 300, (2, 1024), generator=torch.Generator().manual_seed(0))
    ids[0, 63::64] = EOS
    mask = document_block_mask(document_ids(ids, EOS))
    tiles = 1024 // TILE
    assert mask.kv_num_blocks[0, 0].tolist() == [1] * tiles  # short documents: the diagonal only (64 | 128)
    assert mask.full_kv_num_blocks[0, 0].sum() == 0
    assert mask.kv_num_blocks[1, 0].tolist() == [1] * tiles  # one document: the diagonal is the only partial
    assert mask.full_kv_num_blocks[1, 0].tolist() == list(range(tiles))  # everything before it is full


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("seq", [64, 200])
def test_flex_attention_equals_sdpa_with_the_dense_mask(seq: int, kv_heads: int) -> None:
    generator = torch.Generator().manual_seed(seq + kv_heads)
    docs = document_ids(_packed_ids(seq, seed=seq), EOS)
    q = torch.randn(4, 4, seq, 16, generator=generator)
    k, v = (torch.randn(4, kv_heads, seq, 16, generator=generator) for _ in range(2))
    with torch.no_grad():
        flex = document_attention(q, k, v, docs)
        sdpa = causal_attention(q, k, v, document_mask(docs))
        plain_causal = causal_attention(q, k, v)
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=2e-6)  # fp32, two kernels: measured <= 7.2e-7
    assert (plain_causal - sdpa).abs().max() > 0.1  # the mask matters in these rows: a comparison that can fail


def _models(**overrides: object) -> tuple[Llama, Llama]:
    torch.manual_seed(0)
    cfg = tiny_model_config(attention_mask="document", reset_position_ids=True, **overrides)
    sdpa = Llama(cfg, 256, eos_token_id=EOS).eval()
    flex = Llama(cfg, 256, eos_token_id=EOS).eval()
    flex.load_state_dict(sdpa.state_dict())
    for layer in flex.layers:
        layer.self_attn.document_kernel = "flex"
    return sdpa, flex


def test_a_model_with_flex_gives_the_logits_of_sdpa_eager_and_compiled() -> None:
    """The whole model, document ids computed inside; then each layer through dynamo (aot_eager: the trace the
    inductor build starts from), which must capture the block mask's construction from the ids."""
    sdpa, flex = _models()
    ids = _packed_ids(200, seed=1) % 256
    with torch.no_grad():
        want = sdpa(ids)
        torch.testing.assert_close(flex(ids), want, rtol=0, atol=1e-5)
        for layer in flex.layers:
            layer.compile(backend="aot_eager", fullgraph=True)  # fullgraph: a graph break would raise here
        torch.testing.assert_close(flex(ids), want, rtol=0, atol=1e-5)


def test_the_compiled_kernel_is_inlined_into_a_compiled_layer() -> None:
    """On CUDA the layer calls the module's torch.compile'd flex_attention; inside a compiled decoder layer dynamo must
    inline it into the layer's graph (fullgraph: a graph break raises), not stop at it. Traced here on CPU tensors."""
    from trainer import document_attention

    docs = document_ids(_packed_ids(256, seed=3), EOS)
    q, k, v = torch.randn(4, 4, 256, 16), torch.randn(4, 2, 256, 16), torch.randn(4, 2, 256, 16)

    def layer_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        mask = document_attention.document_block_mask(docs)
        return document_attention._compiled_flex_attention(q, k, v, block_mask=mask, enable_gqa=True)

    with torch.no_grad():
        got = torch.compile(layer_core, backend="aot_eager", fullgraph=True)(q, k, v, docs)
        torch.testing.assert_close(got, causal_attention(q, k, v, document_mask(docs)), rtol=0, atol=2e-6)


def test_checkpointing_policies_treat_flex_as_the_attention_core() -> None:
    """selective keeps its output, core_attention recomputes it, as for SDPA's kernels."""
    flex_op = torch.ops.higher_order.flex_attention
    assert flex_op in _ATTENTION_CORE_OPS
    assert _selective_policy(None, flex_op) == CheckpointPolicy.MUST_SAVE
    assert _core_attention_policy(None, flex_op) == CheckpointPolicy.PREFER_RECOMPUTE


def test_auto_is_flex_on_cuda_and_sdpa_on_cpu() -> None:
    cfg = load_config(TINY, ["model.attention_mask=document"])
    assert cfg.validate_for_world(2, "cuda").attention_kernel == "flex"
    assert cfg.validate_for_world(2, "cpu").attention_kernel == "sdpa"
    forced = load_config(TINY, ["model.attention_mask=document", "parallel.attention_kernel=sdpa"])
    assert forced.validate_for_world(2, "cuda").attention_kernel == "sdpa"
    assert load_config(TINY).validate_for_world(2, "cuda").attention_kernel == "sdpa"  # causal: flash, always


@pytest.mark.parametrize(("capability", "auto_kernel"), [
    ((7, 0), "sdpa"), ((7, 5), "sdpa"), ((8, 0), "flex"), ((8, 6), "flex"), ((9, 0), "flex"), ((10, 0), "flex"),
    (None, "flex"),  # unknown (a dry run on a login node): an Ampere or later GPU is assumed
])
def test_auto_keeps_sdpa_before_ampere_and_flex_is_refused_there(capability: tuple[int, int] | None,
                                                                 auto_kernel: str) -> None:
    """FlexAttention's Triton kernel ran ~10× slower than SDPA on a V100 (7.0) and failed to build on a 2080 Ti
    (7.5)."""
    cfg = load_config(TINY, ["model.attention_mask=document"])
    assert cfg.validate_for_world(2, "cuda", gpu_capability=capability).attention_kernel == auto_kernel
    forced = load_config(TINY, ["model.attention_mask=document", "parallel.attention_kernel=flex"])
    if auto_kernel == "flex":
        assert forced.validate_for_world(2, "cuda", gpu_capability=capability).attention_kernel == "flex"
    else:
        with pytest.raises(ConfigError, match=rf"needs an Ampere or later GPU .* this one is {capability[0]}\.\d.* "
                                              r"set parallel.attention_kernel=auto \(SDPA here\) or sdpa"):
            forced.validate_for_world(2, "cuda", gpu_capability=capability)


@pytest.mark.parametrize("compile_mode", ["auto", "off", "aot_eager"])
@pytest.mark.parametrize("checkpointing", ["none", "selective", "core_attention", "full"])
def test_auto_picks_flex_only_where_inductor_builds_its_kernel(compile_mode: str, checkpointing: str) -> None:
    """Unfused, FlexAttention is reference math over the full T × T scores: worse than SDPA. It is fused inside
    inductor-compiled layers (compile auto on CUDA), or compiling itself in eager layers, which torch.compile skips
    under selective/core_attention checkpointing (a dispatch mode; torch._dynamo.config.inline_torch_dispatch_
    torch_compile); aot_eager runs it eagerly. An explicit flex there is refused with the ways out."""
    overrides = ["model.attention_mask=document", f"parallel.compile={compile_mode}",
                 f"parallel.activation_checkpointing={checkpointing}"]
    fused = compile_mode == "auto" or (compile_mode == "off" and checkpointing in ("none", "full"))
    cfg = load_config(TINY, overrides)
    assert cfg.parallel.flex_is_fused("cuda") == fused
    assert cfg.validate_for_world(2, "cuda").attention_kernel == ("flex" if fused else "sdpa")
    forced = load_config(TINY, [*overrides, "parallel.attention_kernel=flex"])
    if fused:
        assert forced.validate_for_world(2, "cuda").attention_kernel == "flex"
    else:
        with pytest.raises(ConfigError, match="would run FlexAttention's reference math"):
            forced.validate_for_world(2, "cuda")


def test_flex_is_refused_on_cpu_and_without_the_document_mask() -> None:
    cfg = load_config(TINY, ["model.attention_mask=document", "parallel.attention_kernel=flex"])
    with pytest.raises(ConfigError, match=r"attention_kernel=flex runs on CUDA only .* set parallel.attention_kernel="
                                          r"auto"):
        cfg.validate_for_world(2, "cpu")
    assert cfg.validate_for_world(2, "cuda").attention_kernel == "flex"
    with pytest.raises(ConfigError, match="set model.attention_mask=document, or parallel.attention_kernel=auto"):
        load_config(TINY, ["parallel.attention_kernel=flex"])


def test_the_estimate_drops_the_dense_mask_under_flex() -> None:
    """Flex keeps what flash keeps: the document mask then costs no activation memory (the dense mask's row of T and
    the repeated K/V are gone)."""
    def saved_bytes_per_token(*overrides: str) -> int:
        cfg = load_config(TINY, ["train.seq_len=128", *overrides])
        return _layer_activation_bytes_per_token(cfg, cfg.validate_for_world(1, "cuda"))

    causal = saved_bytes_per_token()
    document = ["model.attention_mask=document"]
    assert saved_bytes_per_token(*document) == causal
    assert saved_bytes_per_token(*document, "parallel.attention_kernel=sdpa") - causal == 4 * (128 + 2 * (64 - 32))
