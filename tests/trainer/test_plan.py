"""trainer.plan: enumeration, the reuse of the trainer's validation, the memory filter, the step-time model, ranking."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from trainer.config import ConfigError, load_config
from trainer.estimate import estimate_memory, flops_per_token
from trainer.plan import (
    GIB,
    GPUS,
    Calibration,
    Cluster,
    GemmEfficiency,
    Layout,
    apply_layout,
    config_from_hf_json,
    enumerate_layouts,
    evaluate,
    gemm_efficiency_from_dict,
    layer_gemms,
    load_gemm_efficiency,
    plan,
    step_time,
    why_line,
    with_batch,
)

REPO = Path(__file__).resolve().parents[2]
H100 = GPUS["h100-80gb"]


def config(name: str, *overrides: str):
    return load_config(REPO / "configs" / f"{name}.yaml", overrides)


def layout(**fields) -> Layout:
    base = dict(tp=1, pp=1, dp=1, sequence_parallel=False, zero_stage=1, micro_batch_size_per_gpu=1,
                activation_checkpointing="none")
    return Layout(**{**base, **fields})


def candidate(name: str, lay: Layout, cluster: Cluster, *overrides: str):
    cfg, derived = apply_layout(config(name, *overrides), lay, cluster)
    return evaluate(cfg, derived, lay, cluster, Calibration())


def test_enumeration_covers_every_axis_and_only_world_divisors() -> None:
    layouts = list(enumerate_layouts(config("70b"), 256))
    assert {lay.tp for lay in layouts} == {1, 2, 4, 8}  # divisors of gcd(64 heads, 8 kv heads)
    assert {lay.pp for lay in layouts} == {1, 2, 4, 8, 16, 32, 64}  # divisors of 256 / tp up to 80 layers
    # pp 32 and 64 do not divide 80 layers: the balanced uneven split first; the others the even one; for pp > 1
    # also up to two layers off the first stage (stage_splits), while it has a layer to spare.
    splits: dict[int, list] = {}
    for lay in layouts:
        splits.setdefault(lay.pp, [])
        if lay.stage_layers not in splits[lay.pp]:
            splits[lay.pp].append(lay.stage_layers)
    assert splits[32][0] == (2,) * 8 + (3,) * 16 + (2,) * 8 and splits[64] == [(1,) * 24 + (2,) * 16 + (1,) * 24]
    # pp 32: one layer off the first stage goes to the last (the lightest, latest); then the first has none to spare.
    assert splits[32][1:] == [(1,) + (2,) * 7 + (3,) * 16 + (2,) * 7 + (3,)]
    assert splits[1] == [None] and all(splits[pp][0] is None for pp in (2, 4, 8, 16))
    assert splits[4] == [None, (19, 20, 20, 21), (18, 20, 21, 21)]
    assert {lay.zero_stage for lay in layouts} == {0, 1, 2, 3}
    assert {lay.activation_checkpointing for lay in layouts} == {"none", "selective", "core_attention", "full"}
    assert {lay.sequence_parallel for lay in layouts if lay.tp == 1} == {False}
    assert all(lay.tp * lay.pp * lay.dp == 256 for lay in layouts)
    assert all(1024 % (lay.micro_batch_size_per_gpu * lay.dp) == 0 for lay in layouts)


def test_layouts_are_checked_by_the_dry_run_validation() -> None:
    cluster = Cluster(32, 8, H100)
    with pytest.raises(ConfigError, match=r"zero.stage \(2\) cannot be combined with parallel.pp"):
        apply_layout(config("70b"), layout(pp=4, dp=64, zero_stage=2), cluster)
    with pytest.raises(ConfigError, match=r"fp32_grad_accumulation .* needs zero.stage >= 1"):
        apply_layout(config("70b"), layout(tp=8, dp=32, zero_stage=0), cluster)
    cfg, derived = apply_layout(config("70b"), layout(tp=8, pp=4, dp=8, sequence_parallel=True), cluster)
    assert (derived.tp, derived.pp, derived.dp, derived.grad_accum_steps) == (8, 4, 8, 128)
    assert cfg.validate_for_world(256) == derived  # what `train --dry-run` on the written config computes


def test_every_planned_layout_passes_validation_and_fits_memory() -> None:
    cluster = Cluster(32, 8, H100)
    result = plan(config("70b"), cluster, headroom=0.15)
    assert result.enumerated == result.invalid + result.too_big + len(result.candidates) - result.fewer_checkpointed
    assert result.invalid > 0 and result.too_big > 0 and result.candidates
    budget_bytes = H100.memory_gib * 0.85 * GIB
    for cand in result.candidates:
        assert cand.cfg.validate_for_world(256) == cand.derived
        assert estimate_memory(cand.cfg, cand.derived).total_bytes == cand.memory.total_bytes <= budget_bytes
    times = [c.time.total_s for c in result.candidates]
    # Ties (times equal to 6 significant digits: up to 1e-5 apart) go to the tie-breakers.
    assert all(a <= b * (1 + 1e-5) for a, b in zip(times, times[1:]))
    # Less headroom admits more layouts; all the old ones stay.
    looser = plan(config("70b"), cluster, headroom=0.05)
    assert len(looser.candidates) > len(result.candidates)


def test_70b_does_not_fit_one_node_without_model_parallel_sharding() -> None:
    cluster = Cluster(1, 8, H100)
    result = plan(config("70b"), cluster)
    # 69B params: weights + grads + Adam over 8 GPUs need ~140 GiB each even with ZeRO-3: nothing fits.
    assert not result.candidates and result.smallest_misfit is not None
    assert result.smallest_misfit.memory.total_bytes > 0.85 * H100.memory_gib * GIB


def test_pipeline_bubble_is_the_1f1b_fraction() -> None:
    cluster = Cluster(32, 8, H100)
    cand = candidate("70b", layout(tp=8, pp=4, dp=8, sequence_parallel=True), cluster)
    t, m, pp = cand.time, cand.derived.grad_accum_steps, 4
    pipeline_s = t.compute_s + t.tp_comm_s + t.pp_comm_s + t.bubble_s
    assert t.bubble_s / pipeline_s == pytest.approx((pp - 1) / (m + pp - 1))


def test_communication_rules() -> None:
    cluster = Cluster(32, 8, H100)
    tp8 = candidate("70b", layout(tp=8, pp=4, dp=8, sequence_parallel=True), cluster)
    tp8_full = candidate("70b", layout(tp=8, pp=4, dp=8, sequence_parallel=True, activation_checkpointing="full"),
                         cluster)
    # Full AC repeats the forward all-reduce pair: 6 instead of 4 per layer (+1 for lm_head on the busiest, last
    # stage; the embedding's all-reduce is on the first).
    assert tp8_full.time.tp_comm_s / tp8.time.tp_comm_s == pytest.approx((20 * 6 + 1) / (20 * 4 + 1))
    assert tp8_full.time.compute_s > tp8.time.compute_s
    # TP across nodes (tp 16 does not divide the heads, so compare tp 8 on 4-GPU nodes): slower links.
    small_nodes = Cluster(64, 4, H100)
    assert candidate("70b", layout(tp=8, pp=4, dp=8, sequence_parallel=True), small_nodes).time.tp_comm_s > \
        2 * tp8.time.tp_comm_s
    # No pipeline, no bubble and no p2p; one GPU, no communication at all.
    solo = candidate("tiny", layout(), Cluster(1, 1, H100))
    assert solo.time.exposed_comm_s == 0 and solo.time.bubble_s == 0


def test_tied_embeddings_over_stages_add_one_all_reduce_of_the_vocabulary_shard() -> None:
    """The first and last stage sum their copies' gradients once per step: 2 ranks, across nodes here (tp 2 × dp 4
    × 3 stages apart on 8-GPU nodes), the bf16 gradient of the (32,000 × 2,048) / tp shard, twice over as an
    all-reduce, plus 2 hops of latency. The stages' memory: the last one holds its own copy."""
    cluster = Cluster(4, 8, H100)
    lay = layout(tp=2, pp=4, dp=4, micro_batch_size_per_gpu=2)
    untied, tied = (candidate("1b", lay, cluster, f"model.tie_embeddings={t}") for t in ("false", "true"))
    shard_bytes = 32_000 * 2048 // 2 * 2
    bandwidth = H100.inter_node_gbps * 1e9 * cluster.link_efficiency
    want_s = 2 * H100.inter_latency_s + 2 * (1 / 2) * shard_bytes / bandwidth
    assert tied.time.pp_comm_s - untied.time.pp_comm_s == pytest.approx(want_s)
    assert tied.time.compute_s == untied.time.compute_s and tied.time.dp_comm_s == untied.time.dp_comm_s
    single = candidate("1b", layout(tp=2, dp=16, micro_batch_size_per_gpu=2), cluster, "model.tie_embeddings=true")
    assert single.time.pp_comm_s == 0


def test_zero_stage_changes_only_what_it_moves() -> None:
    cluster = Cluster(2, 8, H100)
    by_stage = {s: candidate("1b", layout(dp=16, zero_stage=s, micro_batch_size_per_gpu=4), cluster)
                for s in range(4)}
    assert len({c.time.compute_s for c in by_stage.values()}) == 1
    # ZeRO-0 all-reduces after backward (exposed); ZeRO-1 reduces during the last backward, then gathers weights.
    assert by_stage[0].time.dp_comm_s > by_stage[1].time.dp_comm_s > 0
    # ZeRO-2 reduces on every micro-step: never less exposed than ZeRO-1.
    assert by_stage[2].time.dp_comm_s >= by_stage[1].time.dp_comm_s
    no_overlap = candidate("1b", layout(dp=16, zero_stage=1, micro_batch_size_per_gpu=4), cluster,
                           "zero.overlap_comm=false")
    assert no_overlap.time.dp_comm_s > by_stage[1].time.dp_comm_s


def test_calibration_point_reproduces_the_measured_h200_mfu() -> None:
    """1B, bf16, seq 2048, micro 8, no AC on one H200 measured 42.4 % MFU (notes/gpu-h200.md): the calibration."""
    cluster = Cluster(1, 1, GPUS["h200"])
    cfg = with_batch(config("1b"), 2048, 65536)
    lay = layout(zero_stage=2, micro_batch_size_per_gpu=8)
    new, derived = apply_layout(cfg, lay, cluster)
    cand = evaluate(new, derived, lay, cluster, Calibration())
    assert cand.mfu == pytest.approx(0.424, rel=1e-6)
    assert cand.time.total_s == pytest.approx(1.099, rel=0.01)  # measured 1.099 s/step


def test_ranking_and_why_line() -> None:
    result = plan(config("70b"), Cluster(32, 8, H100))
    top = result.candidates[:10]
    assert all(a.time.total_s <= b.time.total_s for a, b in zip(top, top[1:]))
    line = why_line(result)
    assert line.startswith(top[0].layout.short() + " wins: ") and "faster than the next best" in line


def test_with_batch_constraints() -> None:
    cfg = with_batch(config("7b"), 2048, 2**20)
    assert (cfg.train.seq_len, cfg.train.global_batch_size) == (2048, 512)
    with pytest.raises(ConfigError, match=r"--global-batch-tokens \(1,000,000\) must be a multiple of"):
        with_batch(config("7b"), 2048, 1_000_000)
    with pytest.raises(ConfigError, match=r"train.seq_len \(8192\) must not exceed model.max_seq_len"):
        with_batch(config("7b"), 8192, 2**22)


def test_hf_config_json_as_the_model(tmp_path: Path) -> None:
    raw = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False}
    (tmp_path / "Meta-Llama-3-8B").mkdir()
    (tmp_path / "Meta-Llama-3-8B" / "config.json").write_text(json.dumps(raw))
    cfg = config_from_hf_json(tmp_path / "Meta-Llama-3-8B", 8192, 2**22)
    assert (cfg.model.num_layers, cfg.model.num_kv_heads, cfg.model.rope_theta) == (32, 8, 500000.0)
    assert (cfg.train.seq_len, cfg.train.global_batch_size, cfg.name) == (8192, 512, "Meta-Llama-3-8B")
    (tmp_path / "mistral.json").write_text(json.dumps({**raw, "model_type": "mistral"}))
    with pytest.raises(ConfigError, match="model_type 'mistral' is not 'llama'"):
        config_from_hf_json(tmp_path / "mistral.json", None, None)


def test_gpu_overrides_change_the_answer() -> None:
    slow_net = Cluster(32, 8, dataclasses.replace(H100, inter_node_gbps=5.0))
    fast = step_time(*apply_layout(config("70b"), layout(tp=8, pp=4, dp=8), Cluster(32, 8, H100)),
                     Cluster(32, 8, H100), Calibration())
    slow = step_time(*apply_layout(config("70b"), layout(tp=8, pp=4, dp=8), slow_net), slow_net, Calibration())
    assert slow.dp_comm_s > 5 * fast.dp_comm_s and slow.compute_s == fast.compute_s


def test_the_configs_own_layout_is_placed_among_the_candidates() -> None:
    result = plan(config("70b"), Cluster(32, 8, H100))
    given = result.given
    assert given is not None and result.given_problem is None
    assert (given.layout.tp, given.layout.pp, given.layout.dp, given.layout.zero_stage) == (8, 4, 8, 1)
    rank = result.given_rank()
    assert rank is not None and result.candidates[rank - 1].layout == given.layout
    too_big = plan(config("70b", "train.micro_batch_size_per_gpu=8"), Cluster(32, 8, H100))
    assert too_big.given_rank() is None and "GiB usable" in too_big.given_problem
    invalid = plan(config("70b", "parallel.pp=3"), Cluster(32, 8, H100))
    assert invalid.given is None and "parallel.pp (3) must divide model.num_layers (80)" in invalid.given_problem


def test_uneven_stages_step_time_is_the_busiest_stage() -> None:
    """78 layers on pp 4 as [19, 20, 20, 19]: the busiest slot is a middle stage's 20 layers (the last stage's 19 +
    lm_head is less); 80 layers even is 20 layers + lm_head on the last. Same per-layer cost, so the two compute
    times differ by exactly lm_head's compute."""
    cluster = Cluster(32, 8, H100)
    lay = layout(tp=8, pp=4, dp=8, sequence_parallel=True)
    uneven = candidate("70b", dataclasses.replace(lay, stage_layers=(19, 20, 20, 19)), cluster, "model.num_layers=78")
    even = candidate("70b", lay, cluster)
    assert uneven.derived.stage_layers == (19, 20, 20, 19) and even.derived.stage_layers == (20,) * 4
    head_flops = 6 * even.derived.padded_vocab_size * even.cfg.model.hidden_size / 8  # per token, per TP rank
    tokens = even.derived.micro_batch_size_per_gpu * even.cfg.train.seq_len * even.derived.grad_accum_steps
    head_s = head_flops * tokens / (H100.peak_tflops * 1e12 * Calibration().compute_efficiency)
    assert even.time.compute_s - uneven.time.compute_s == pytest.approx(head_s)
    # A lopsided split is slower: its 29-layer middle stage sets the pace for all four.
    lopsided = candidate("70b", dataclasses.replace(lay, stage_layers=(17, 29, 15, 17)), cluster,
                         "model.num_layers=78")
    assert lopsided.time.compute_s == pytest.approx(uneven.time.compute_s * 29 / 20, rel=1e-9)
    assert lopsided.time.total_s > uneven.time.total_s


def test_plan_offers_uneven_stages_and_places_a_hand_written_split() -> None:
    """Llama 3 405B's published layout (TP 8, PP 16 as [7, 8 x 14, 7], DP 64) is runnable now: the plan evaluates it,
    and a hand-written split that the enumeration does not make still gets a rank."""
    shape = ["model.vocab_size=128256", "model.hidden_size=16384", "model.intermediate_size=53248",
             "model.num_layers=126", "model.num_heads=128", "model.num_kv_heads=8", "model.max_seq_len=8192",
             "parallel.tp=8", "parallel.pp=16"]
    cfg = with_batch(config("70b", *shape, "parallel.pipeline_stage_layers=[7,8,8,8,8,8,8,8,8,8,8,8,8,8,8,7]"),
                     8192, 2**24)
    result = plan(cfg, Cluster(1024, 8, H100))
    assert result.given is not None and result.given_problem is None, result.given_problem
    assert result.given.layout.stage_layers == (7,) + (8,) * 14 + (7,)
    assert result.given.layout.short().startswith("tp8+sp pp16[7,8x14,7] dp64")
    assert result.candidates[result.given_rank() - 1].layout == result.given.layout  # the enumeration made it
    hand = with_batch(config("70b", *shape, "parallel.pipeline_stage_layers=[7,7,8,8,8,8,8,8,8,8,8,8,8,8,8,8]"),
                      8192, 2**24)
    placed = plan(hand, Cluster(1024, 8, H100))
    rank = placed.given_rank()
    assert rank is not None and placed.candidates[rank - 1].time.total_s >= placed.given.time.total_s
    if rank > 1:
        assert placed.candidates[rank - 2].time.total_s <= placed.given.time.total_s


def test_core_attention_recomputes_one_attention_forward() -> None:
    cluster = Cluster(32, 8, H100)
    none = candidate("70b", layout(tp=8, pp=4, dp=8, sequence_parallel=True), cluster)
    core = candidate("70b", layout(tp=8, pp=4, dp=8, sequence_parallel=True, activation_checkpointing="core_attention"),
                     cluster)
    # The extra: one attention forward (a third of the training attention FLOPs) of the stage's layers.
    flops = flops_per_token(none.cfg.model, none.derived.padded_vocab_size, none.cfg.train.seq_len)
    per_token = flops.attention / 3 / 4 / 8  # pp 4, tp 8
    tokens = none.derived.micro_batch_size_per_gpu * 4096 * none.derived.grad_accum_steps
    attention_s = per_token * tokens / (H100.peak_tflops * 1e12 * Calibration().compute_efficiency)
    assert core.time.compute_s - none.time.compute_s == pytest.approx(attention_s)
    assert core.memory.activations_bytes < none.memory.activations_bytes


# ---------------------------------------------------------------------------------------------------------------------
# GEMM efficiency by per-rank shape (Calibration.gemm)

# 1B: kv_width = 8 heads × 64 = 512 is its narrowest matmul at tp 1, so this curve is 1.0 for every tp-1 GEMM and
# slows only TP shards: k and v at 256 (tp 2) run at 0.75, at 128 (tp 4) at 0.5.
NARROW_IS_SLOW = GemmEfficiency(width=((128, 0.5), (512, 1.0)), source="test")


def test_layer_gemms_add_up_to_the_flop_count() -> None:
    model = config("1b").model
    per_token = flops_per_token(model, 32000, 2048)
    linear = sum(params for _, params, _ in layer_gemms(model))
    assert 6 * (linear * model.num_layers + 32000 * model.hidden_size) == per_token.matmul
    assert {split for _, _, split in layer_gemms(model)} == {2048, 512, 8192}  # q/o, k/v, gate/up/down


def test_flat_curve_changes_nothing() -> None:
    """Explicit 1.0 points price every GEMM as the default does, to the last bit of the step time."""
    cluster = Cluster(2, 8, H100)
    explicit = Calibration(gemm=gemm_efficiency_from_dict({"width": {64: 1.0, 8192: 1.0}, "tokens": {1: 1.0}}, "t"))
    for lay in (layout(dp=16, micro_batch_size_per_gpu=4), layout(tp=4, dp=4, sequence_parallel=True, micro_batch_size_per_gpu=2)):
        cfg, derived = apply_layout(config("1b"), lay, cluster)
        assert step_time(cfg, derived, cluster, explicit) == step_time(cfg, derived, cluster, Calibration())
    assert Calibration().gemm.factor(1, 1) == Calibration().gemm.factor(10**6, 10**6) == 1.0


def test_curve_is_log_linear_between_points_and_flat_beyond() -> None:
    curve = GemmEfficiency(width=((256, 0.6), (1024, 1.0)), tokens=((512, 0.5), (2048, 1.0)))
    assert curve.factor(512, 4096) == pytest.approx(0.8)  # halfway in log2 between 256 and 1024
    assert curve.factor(64, 4096) == 0.6 and curve.factor(10**5, 4096) == 1.0
    assert curve.factor(1024, 1024) == pytest.approx(0.75) and curve.factor(1024, 1) == 0.5


def test_narrow_gemms_slow_tp_relative_to_dp_and_leave_dp_unchanged() -> None:
    cluster = Cluster(1, 8, H100)
    slow = Calibration(gemm=NARROW_IS_SLOW)

    def times(lay: Layout):
        cfg, derived = apply_layout(config("1b"), lay, cluster)
        return step_time(cfg, derived, cluster, Calibration()), step_time(cfg, derived, cluster, slow)

    dp_flat, dp_curve = times(layout(dp=8, micro_batch_size_per_gpu=4))
    tp2_flat, tp2_curve = times(layout(tp=2, dp=4, micro_batch_size_per_gpu=4))
    tp4_flat, tp4_curve = times(layout(tp=4, dp=2, micro_batch_size_per_gpu=4))
    assert dp_curve == dp_flat  # every tp-1 GEMM is at 1.0
    assert tp2_curve.tp_comm_s == tp2_flat.tp_comm_s and tp2_curve.compute_s > tp2_flat.compute_s
    assert tp2_curve.total_s / dp_curve.total_s > tp2_flat.total_s / dp_flat.total_s
    # tp 4 narrows k and v further (0.5): it loses more of its compute than tp 2 (0.75).
    assert tp4_curve.compute_s / tp4_flat.compute_s > tp2_curve.compute_s / tp2_flat.compute_s > 1
    # The extra time is exactly k and v at their factors: 2 × 6·h·kv FLOPs per token per layer, per TP rank.
    cfg, derived = apply_layout(config("1b"), layout(tp=2, dp=4, micro_batch_size_per_gpu=4), cluster)
    tokens = 4 * cfg.train.seq_len * derived.grad_accum_steps
    kv_flops = 2 * 6 * cfg.model.hidden_size * 512 / 2 * cfg.model.num_layers * tokens * (1 / 0.75 - 1)
    extra_s = kv_flops / (H100.peak_tflops * 1e12 * 0.424)
    assert tp2_curve.compute_s - tp2_flat.compute_s == pytest.approx(extra_s)


def test_tokens_curve_slows_small_micro_batches() -> None:
    cluster = Cluster(1, 8, H100)
    short_is_slow = Calibration(gemm=GemmEfficiency(tokens=((2048, 0.5), (8192, 1.0))))
    cfg, derived = apply_layout(config("1b"), layout(dp=8, micro_batch_size_per_gpu=1), cluster)  # 2048 tokens
    assert step_time(cfg, derived, cluster, short_is_slow).compute_s == pytest.approx(
        2 * step_time(cfg, derived, cluster, Calibration()).compute_s)  # every matmul and the attention core
    cfg, derived = apply_layout(config("1b"), layout(dp=8, micro_batch_size_per_gpu=4), cluster)  # 8192 tokens
    assert step_time(cfg, derived, cluster, short_is_slow) == step_time(cfg, derived, cluster, Calibration())


@pytest.mark.parametrize("raw, message", [
    ([0.5, 1.0], "expected a mapping with 'width' and/or 'tokens', got list"),
    ({"source": "x"}, "no curve: give 'width' and/or 'tokens'"),
    ({"widths": {256: 0.5}}, "unknown keys widths"),
    ({"width": [[256, 0.5]]}, "width: expected a mapping size -> factor"),
    ({"width": {"wide": 0.5}}, "width: 'wide': 0.5 is not size \\(an integer\\) -> factor"),
    ({"tokens": {512: 0}}, "tokens: 512: 0: sizes must be >= 1 and factors > 0"),
    ({"width": {0: 0.5}}, "width: 0: 0.5: sizes must be >= 1"),
])
def test_bad_curve_input_names_the_flag(raw, message: str) -> None:
    with pytest.raises(ConfigError, match="^--gemm-efficiency c.json: " + message):
        gemm_efficiency_from_dict(raw, "--gemm-efficiency c.json")


def test_curve_file_json_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"width": {"256": 0.8, "1024": 1.0}, "source": "bench"}))
    assert load_gemm_efficiency(tmp_path / "c.json") == GemmEfficiency(((256, 0.8), (1024, 1.0)), (), "bench")
    (tmp_path / "c.yaml").write_text("tokens: {4096: 1.0, 1024: 0.7}\n")
    assert load_gemm_efficiency(tmp_path / "c.yaml").tokens == ((1024, 0.7), (4096, 1.0))  # sorted
    with pytest.raises(ConfigError, match=r"^--gemm-efficiency .*missing.json: cannot read it"):
        load_gemm_efficiency(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{width: [")
    with pytest.raises(ConfigError, match=r"^--gemm-efficiency .*bad.json: cannot read it"):
        load_gemm_efficiency(tmp_path / "bad.json")


def test_a_lighter_first_stage_fits_where_the_balanced_split_does_not() -> None:
    """70B, tp 8 + SP, pp 4, micro 1, no AC: under 1F1B the first stage holds 4 micro-batches' activations, so it is the
    memory peak (29.7 GiB even; 26.8 GiB as [18, 20, 21, 21]) and the busiest stage sets the step time (21 layers:
    +4.8 %). With 28 GiB usable only the lighter first stage fits; with 80 GiB both do and the even split ranks ahead."""
    lay = layout(tp=8, pp=4, dp=8, sequence_parallel=True)
    same = {dataclasses.replace(lay, stage_layers=split) for split in (None, (19, 20, 20, 21), (18, 20, 21, 21))}

    def offered(memory_gib: float) -> dict:
        gpu = dataclasses.replace(H100, memory_gib=memory_gib)
        result = plan(config("70b"), Cluster(32, 8, gpu))
        return {c.layout.stage_layers: c for c in result.candidates if c.layout in same}

    tight = offered(28.0 / 0.85)  # 15 % headroom
    assert sorted(tight, key=str) == [(18, 20, 21, 21)]
    roomy = offered(80.0)
    assert set(roomy) == {None, (19, 20, 20, 21), (18, 20, 21, 21)}
    assert roomy[None].time.total_s < roomy[(18, 20, 21, 21)].time.total_s
    assert roomy[None].memory.total_bytes > roomy[(18, 20, 21, 21)].memory.total_bytes


def test_a_layout_that_needs_checkpointing_also_comes_with_the_fewest_layers_that_fit() -> None:
    """1B on one H200: micro-batches that do not fit without checkpointing fit with it on every layer, and with it on
    only the first N layers (parallel.activation_checkpointing_layers), N the smallest that fits: N - 1 does not.
    Fewer recomputed layers are faster; a layout that fits without checkpointing gets no partial twin."""
    cluster = Cluster(1, 1, GPUS["h200"])
    result = plan(config("1b"), cluster)
    budget_bytes = result.usable_memory_gib * GIB
    partial = [c for c in result.candidates if c.layout.checkpointed_layers is not None]
    assert partial and len(partial) == result.fewer_checkpointed
    by_layout = {c.layout: c for c in result.candidates}
    for cand in partial:
        count = cand.layout.checkpointed_layers
        assert 0 < count < cand.cfg.model.num_layers and cand.layout.ac_label.endswith(f":{count}")
        assert cand.cfg.parallel.activation_checkpointing_layers == count
        fewer = apply_layout(cand.cfg, dataclasses.replace(cand.layout, checkpointed_layers=count - 1 or None,
                                                           activation_checkpointing="none" if count == 1 else
                                                           cand.layout.activation_checkpointing), cluster)
        assert estimate_memory(*fewer).total_bytes > budget_bytes >= cand.memory.total_bytes
        every_layer = by_layout[dataclasses.replace(cand.layout, checkpointed_layers=None)]
        assert cand.time.total_s < every_layer.time.total_s and cand.memory.total_bytes > every_layer.memory.total_bytes
    assert not any(dataclasses.replace(c.layout, activation_checkpointing="none", checkpointed_layers=None) in by_layout
                   for c in partial)
    # The written overrides carry the count: what `plan --write` saves, `submit` runs.
    assert f"parallel.activation_checkpointing_layers={partial[0].layout.checkpointed_layers}" in \
        partial[0].layout.overrides()
