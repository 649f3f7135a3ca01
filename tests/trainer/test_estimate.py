"""Estimates used by --dry-run: exact counts, FLOPs formula, memory accounting under each ZeRO stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.estimate import (LOSS_CHUNK_BYTES, count_parameters, estimate_memory, flops_per_token, loss_bytes,
                              stage_params_per_gpu)

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


def setup(name: str, *overrides: str, world: int | None = None):
    cfg = load_config(REPO / "configs" / f"{name}.yaml", overrides)
    return cfg, cfg.validate_for_world(world or cfg.launch.nodes * cfg.launch.gpus_per_node)


def test_llama2_7b_parameter_count_is_the_published_one() -> None:
    cfg, derived = setup("7b")
    assert count_parameters(cfg.model, derived.padded_vocab_size).total == 6_738_415_616  # Llama-2-7b-hf


def test_llama2_70b_parameter_count_is_the_published_one() -> None:
    cfg, _ = setup("70b")
    assert count_parameters(cfg.model, cfg.model.vocab_size).total == 68_976_648_192  # Llama-2-70b-hf, vocab 32000
    assert count_parameters(cfg.model, 32768).total == 68_976_648_192 + 2 * 768 * 8192  # + padding rows, untied


def test_flops_per_token_formula() -> None:
    cfg, derived = setup("7b")
    flops = flops_per_token(cfg.model, derived.padded_vocab_size, cfg.train.seq_len)
    counts = count_parameters(cfg.model, derived.padded_vocab_size)
    norms = cfg.model.num_layers * 2 * 4096 + 4096
    assert flops.matmul == 6 * (
        counts.total - counts.embedding - norms
    )  # untied: lm_head is a matmul, embedding is not
    assert flops.attention == 12 * 32 * 4096 * 4096
    tied_cfg, tied = setup("1b")
    tied_counts = count_parameters(tied_cfg.model, tied.padded_vocab_size)
    tied_flops = flops_per_token(tied_cfg.model, tied.padded_vocab_size, 2048)
    assert (
        tied_counts.lm_head == 0 and tied_flops.matmul > 6 * tied_counts.non_embedding
    )  # the tied head still multiplies


def test_single_gpu_state_is_the_whole_model() -> None:
    cfg, derived = setup("tiny", world=1)
    memory = estimate_memory(cfg, derived)
    total = count_parameters(cfg.model, derived.padded_vocab_size).total
    assert memory.params_per_gpu == total
    assert (memory.weights_bytes, memory.grads_bytes, memory.optimizer_bytes) == (4 * total, 4 * total, 8 * total)


@pytest.mark.parametrize(
    ("stage", "weights_div", "grads_div", "optim_div"), [(0, 1, 1, 1), (1, 1, 1, 16), (2, 1, 16, 16), (3, 16, 16, 16)]
)
def test_zero_stages_partition_over_dp(stage: int, weights_div: int, grads_div: int, optim_div: int) -> None:
    cfg, derived = setup("1b", f"zero.stage={stage}")
    memory = estimate_memory(cfg, derived)
    params = memory.params_per_gpu
    assert derived.dp == 16
    assert memory.weights_bytes == 2 * params // weights_div
    assert memory.grads_bytes == 2 * params // grads_div
    assert memory.optimizer_bytes == 12 * params // optim_div


def test_offload_moves_state_to_host() -> None:
    cfg, derived = setup("1b", "zero.stage=3", "zero.offload_optimizer=cpu", "zero.offload_param=cpu")
    memory = estimate_memory(cfg, derived)
    assert memory.optimizer_bytes == 0 and memory.weights_bytes == 0
    assert memory.cpu_offload_bytes == (12 + 2) * memory.params_per_gpu // 16


def test_tensor_and_pipeline_split_the_weights() -> None:
    cfg, derived = setup("70b")
    memory = estimate_memory(cfg, derived)
    counts = count_parameters(cfg.model, derived.padded_vocab_size)
    # 20 of 80 layers per stage, 1/8 of each per TP rank, plus the embedding or head shard: about total / 32.
    assert memory.params_per_gpu == pytest.approx(counts.total / 32, rel=0.05)
    assert memory.in_flight_micro_batches == 4  # 1F1B: pp micro-batches live on the first stage


def four_stages(split: list[int]):
    """70b on 4 GPUs as pp 4 (tp 1) with the given decoder layers per stage."""
    return setup("70b", "parallel.tp=1", "parallel.sequence_parallel=false", "parallel.pp=4",
                 f"parallel.pipeline_stage_layers={split}", world=4)


def test_stage_parameters_add_up_to_the_model() -> None:
    cfg, derived = four_stages([19, 21, 22, 18])
    stages = [stage_params_per_gpu(cfg.model, derived, stage) for stage in range(4)]
    counts = count_parameters(cfg.model, derived.padded_vocab_size)
    assert sum(stages) == counts.total
    assert stages[1] == 21 * counts.per_layer and stages[2] == 22 * counts.per_layer  # no embedding or head there


@pytest.mark.parametrize(
    ("split", "busiest", "in_flight"),
    [
        ([1, 1, 1, 77], 3, 1),  # nearly all layers on the last stage: it wins despite one micro-batch in flight
        ([77, 1, 1, 1], 0, 4),  # ... on the first: 4 micro-batches of 77 layers
        ([2, 75, 2, 1], 1, 3),  # a middle stage: 1F1B holds pp - 1 = 3 micro-batches there
        ([20, 20, 20, 20], 0, 4),  # even: the first stage (most micro-batches in flight) is the busiest
    ],
)
def test_memory_is_the_busiest_pipeline_stage(split: list[int], busiest: int, in_flight: int) -> None:
    cfg, derived = four_stages(split)
    memory = estimate_memory(cfg, derived)
    counts = count_parameters(cfg.model, derived.padded_vocab_size)
    assert (memory.stage, memory.in_flight_micro_batches) == (busiest, in_flight)
    embed = counts.embedding if busiest == 0 else 0
    head = counts.final_norm + counts.lm_head if busiest == 3 else 0
    assert memory.params_per_gpu == split[busiest] * counts.per_layer + embed + head
    # Moving one layer from the busiest stage to another lightens the estimate by at least that layer's state.
    lighter = list(split)
    lighter[busiest] -= 1
    lighter[(busiest + 1) % 4] += 1
    if split != [20, 20, 20, 20]:
        assert estimate_memory(*four_stages(lighter)).total_bytes < memory.total_bytes


def test_activation_checkpointing_and_sequence_parallel_shrink_activations() -> None:
    def activations(*overrides: str) -> int:
        cfg, derived = setup("7b", *overrides)
        return estimate_memory(cfg, derived).activations_bytes

    none, selective, core, full = (
        activations(f"parallel.activation_checkpointing={m}") for m in ("none", "selective", "core_attention", "full")
    )
    assert full < selective < core < none
    assert activations("parallel.sequence_parallel=false") > activations("parallel.sequence_parallel=true")


def test_the_document_mask_adds_what_the_attention_keeps_for_it() -> None:
    """Measured: the bytes a decoder layer saves for backward (autograd's saved-tensor hooks, each storage once), with
    and without model.attention_mask=document, against the estimate's difference. Multi-head attention, because on
    CPU K and V are repeated to the query heads with or without a mask (the GQA term is a CUDA one)."""
    import torch

    from trainer.estimate import _layer_activation_bytes_per_token
    from trainer.model import DecoderLayer, document_ids

    batch, seq = 4, 64

    def saved_bytes_per_token(*overrides: str) -> tuple[float, int]:
        cfg, derived = setup("tiny", "model.num_kv_heads=4", f"train.seq_len={seq}", *overrides)
        layer = DecoderLayer(cfg.model)
        ids = torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
        ids[:, ::7] = 2
        storages: dict[int, int] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            layer(torch.randn(seq, batch, 64, requires_grad=True),
                  document_ids(ids, 2) if cfg.model.uses_documents else None)
        return sum(storages.values()) / (batch * seq), _layer_activation_bytes_per_token(cfg, derived)

    causal_measured, causal_estimated = saved_bytes_per_token()
    document_measured, document_estimated = saved_bytes_per_token("model.attention_mask=document")
    assert document_measured - causal_measured == document_estimated - causal_estimated == 4 * seq  # fp32 mask row


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_fewer_layers_keeps_one_whole_layer_more_per_layer_left_out(mode: str) -> None:
    """parallel.activation_checkpointing_layers=2 of 3: measured on CPU (the bytes the parallelized model saves in a
    forward, each storage once), the third layer saves what a layer without checkpointing saves, one third of the
    gap between no checkpointing and all layers; the estimate moves by one layer's difference, exactly."""
    import torch

    from test_parallelize import single_rank_context
    from trainer.estimate import _layer_activation_bytes_per_token
    from trainer.parallelize import build_model_on_meta, parallelize

    three = ["model.num_layers=3", "train.micro_batch_size_per_gpu=2", "train.global_batch_size=4"]

    def saved_bytes(*overrides: str) -> tuple[int, int]:
        cfg, derived = setup("tiny", *three, *overrides, world=1)
        model = parallelize(build_model_on_meta(cfg.model, derived.padded_vocab_size), cfg, derived,
                            single_rank_context()).module
        storages: dict[int, int] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 256, (2, cfg.train.seq_len), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(ids)
        return sum(storages.values()), estimate_memory(cfg, derived).activations_bytes

    none_measured, none_estimated = saved_bytes()
    all_measured, all_estimated = saved_bytes(f"parallel.activation_checkpointing={mode}")
    two_measured, two_estimated = saved_bytes(f"parallel.activation_checkpointing={mode}",
                                              "parallel.activation_checkpointing_layers=2")
    assert all_measured < two_measured < none_measured
    assert 3 * (two_measured - all_measured) == none_measured - all_measured
    cfg, derived = setup("tiny", *three, world=1)
    layer_gap = (_layer_activation_bytes_per_token(cfg, derived, "none")
                 - _layer_activation_bytes_per_token(cfg, derived, mode)) * 2 * cfg.train.seq_len
    assert two_estimated - all_estimated == layer_gap and all_estimated < two_estimated < none_estimated


@pytest.mark.parametrize("name", ["125m", "1b", "7b", "70b"])
def test_shipped_gpu_configs_fit_an_80gb_gpu(name: str) -> None:
    cfg, derived = setup(name)
    total = estimate_memory(cfg, derived).total_bytes
    assert total < 0.8 * 80e9, f"{name}: {total / GIB:.1f} GiB leaves too little headroom on an 80 GB GPU"


def test_one_h200_measurement_and_deepspeed_buffers() -> None:
    """1B, bf16, ZeRO-2, selective AC, micro 8 × seq 2048 on one H200 peaked at 36.16 GiB max_memory_allocated
    (notes/gpu-h200.md); two 5e8-element bf16 gradient buckets (overlap_comm) are part of it. That run used the plain
    loss (fp32 copies of the whole micro-batch's logits); the estimate of the same run is the chunked-loss estimate
    with the plain loss' bytes in place of the chunked loss' (2.7 GiB less: not measured on a GPU yet)."""
    cfg, derived = setup("1b", "train.global_batch_size=32", "data.synthetic=true", "data.datasets=[]", world=1)
    memory = estimate_memory(cfg, derived)
    assert memory.buffers_bytes == 2 * 500_000_000 * 2
    tokens = cfg.train.seq_len * derived.micro_batch_size_per_gpu
    as_measured = memory.total_bytes - loss_bytes(cfg, derived, tokens, "chunked") + loss_bytes(cfg, derived, tokens,
                                                                                                   "plain")
    assert as_measured / GIB == pytest.approx(36.16, rel=0.03)
    cfg, derived = setup("1b", "zero.overlap_comm=false")
    assert estimate_memory(cfg, derived).buffers_bytes == 500_000_000 * 2
    # bf16 + fp32 accumulation under ZeRO-1 runs DeepSpeed's BF16_Optimizer: no buckets, fp32 grads instead.
    cfg, derived = setup("70b")
    assert estimate_memory(cfg, derived).buffers_bytes == 0


def test_zero3_counts_the_largest_module_gathered_whole() -> None:
    """ZeRO-3 gathers one module's weight whole at a time: a decoder layer, or lm_head where the vocabulary outweighs
    a layer (Llama 3 8B: 128,256 × 4,096 rows against a 218M-parameter layer)."""
    zero3 = ["zero.stage=3", "parallel.pp=1", "parallel.tp=2"]
    buckets = 500_000_000 + 50_000_000
    for vocab, gathered in ((32_000, 218_103_808 // 2), (128_256, 128_256 * 4096 // 2)):
        cfg, derived = setup("7b", *zero3, f"model.vocab_size={vocab}", "model.num_kv_heads=8",
                             "model.intermediate_size=14336", world=8)
        assert estimate_memory(cfg, derived).buffers_bytes == (buckets + gathered) * 2, vocab


def test_fp32_zero_keeps_a_master_copy() -> None:
    cfg, derived = setup("tiny", "zero.stage=1", world=2)
    memory = estimate_memory(cfg, derived)
    assert memory.optimizer_bytes == 12 * memory.params_per_gpu // 2  # master copy + m + v, partitioned over dp 2


def test_the_estimate_follows_the_configured_loss() -> None:
    """At the 1B micro-batch (8 × 2048 tokens, vocab 32,000, bf16) on CPU, bench/bench_loss_memory.py measured
    lm_head + loss peaks of 6,000 (plain), 2,256 (chunked) and 945 MiB (fused_linear) (docs/benchmarks.md); the
    estimate's loss bytes: 5,000, 2,256 and 823 MiB (plain: the saved tensors only, not its backward temporaries)."""
    from trainer.loss import DEFAULT_CHUNK_BYTES

    assert LOSS_CHUNK_BYTES == DEFAULT_CHUNK_BYTES
    cfg, derived = setup("1b", "train.global_batch_size=32", "data.synthetic=true", "data.datasets=[]", world=1)
    tokens = cfg.train.seq_len * derived.micro_batch_size_per_gpu
    mib = {loss: loss_bytes(cfg, derived, tokens, loss) / 2**20 for loss in ("plain", "chunked", "fused_linear")}
    assert mib["chunked"] == pytest.approx(2256, rel=0.01) and mib["fused_linear"] == pytest.approx(945, rel=0.15)
    assert mib["fused_linear"] < mib["chunked"] < mib["plain"]
    fused_cfg, fused_derived = setup("1b", "train.global_batch_size=32", "data.synthetic=true", "data.datasets=[]",
                                     "parallel.lm_loss=fused_linear", world=1)
    saved = estimate_memory(cfg, derived).total_bytes - estimate_memory(fused_cfg, fused_derived).total_bytes
    assert saved == (mib["chunked"] - mib["fused_linear"]) * 2**20
