"""Choose the parallel layout for a model on a cluster: enumerate, validate, filter by memory, rank by step time.

    cluster = Cluster(nodes=32, gpus_per_node=8, gpu=GPUS["h100-80gb"])
    result = plan(load_config("configs/70b.yaml"), cluster)
    best = result.candidates[0]        # .layout, .memory, .time, .tokens_per_s, .mfu, .cfg (a runnable Config)

Pure Python, no torch: `pretrain plan` must answer in seconds on a laptop. Each layout becomes a real Config and goes
through the same checks as `train --dry-run` (trainer.config.parse_config + Config.validate_for_world); memory comes
from trainer.estimate.estimate_memory. The step-time model and where every constant comes from: docs/planning.md.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.config import (
    Config,
    ConfigError,
    Derived,
    apply_overrides,
    balanced_stage_layers,
    parse_config,
    stage_layers_text,
)
from trainer.estimate import (
    MemoryEstimate,
    activation_element_bytes,
    estimate_memory,
    flops_per_token,
    layer_shape,
    stage_params_per_gpu,
)
from trainer.gpu_specs import GPUS, GpuSpec  # noqa: F401 - re-exported: plan.GPUS

GIB = 2**30
AC_MODES = ("none", "selective", "core_attention", "full")


@dataclasses.dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: GpuSpec
    # Achieved NCCL bus bandwidth / nominal link bandwidth. An assumption (docs/planning.md), not a measurement.
    link_efficiency: float = 0.75

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


GEMM_FLAG = "--gemm-efficiency"


@dataclasses.dataclass(frozen=True)
class GemmEfficiency:
    """How fast a GEMM runs for its per-rank shape, as a factor on the layout-independent rate (peak × compute
    efficiency): a rank's time for a GEMM is its FLOPs / (rate × factor). Narrow GEMMs (a TP shard) and short ones
    (a small micro-batch) reach a lower fraction of peak, on CPUs and GPUs alike.

    factor = width_curve(per-rank width of the dimension TP splits) × tokens_curve(micro · seq), each piecewise linear
    in log2(size) between its points and flat beyond the ends; no points = 1.0. Separable: a first-order model, not a
    full (M, K, N) table. 1.0 should sit at the shapes the compute efficiency was calibrated at.
    Default flat: there is no GPU measurement to draw a curve from (docs/planning.md).
    """

    width: tuple[tuple[int, float], ...] = ()
    tokens: tuple[tuple[int, float], ...] = ()
    source: str = "flat 1.0 (no GPU measurement of a curve)"

    def factor(self, width: float, tokens: int) -> float:
        return _log_interpolate(self.width, width) * _log_interpolate(self.tokens, tokens)

    def tokens_factor(self, tokens: int) -> float:
        return _log_interpolate(self.tokens, tokens)


def _log_interpolate(points: tuple[tuple[int, float], ...], size: float) -> float:
    """Piecewise linear in log2(size) through sorted (size, factor) points; the end value beyond either end."""
    if not points:
        return 1.0
    if size <= points[0][0]:
        return points[0][1]
    for (lo, f_lo), (hi, f_hi) in zip(points, points[1:]):
        if size <= hi:
            return f_lo + (f_hi - f_lo) * math.log2(size / lo) / math.log2(hi / lo)
    return points[-1][1]


def gemm_efficiency_from_dict(raw: Any, origin: str) -> GemmEfficiency:
    """A curve from {"width": {size: factor, ...}, "tokens": {size: factor, ...}, "source": "..."}; ConfigError
    naming `origin` (the flag and file) and the fix for anything else."""
    example = 'e.g. {"width": {"256": 0.8, "1024": 1.0}, "tokens": {"512": 0.9, "4096": 1.0}}'
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a mapping with 'width' and/or 'tokens', got {type(raw).__name__}: "
                          f"write {example}")
    unknown = sorted(set(raw) - {"width", "tokens", "source"})
    if unknown or not ({"width", "tokens"} & set(raw)):
        raise ConfigError(f"{origin}: {'unknown keys ' + ', '.join(map(str, unknown)) if unknown else 'no curve'}: "
                          f"give 'width' and/or 'tokens' (and an optional 'source'), {example}")
    curves = {axis: _curve_points(raw.get(axis, {}), f"{origin}: {axis}", example) for axis in ("width", "tokens")}
    return GemmEfficiency(curves["width"], curves["tokens"], str(raw.get("source", origin)))


def _curve_points(raw: Any, where: str, example: str) -> tuple[tuple[int, float], ...]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping size -> factor, got {raw!r}: write {example}")
    points = []
    for key, value in raw.items():
        try:
            size, factor = int(key), float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key!r}: {value!r} is not size (an integer) -> factor (a number): "
                              f"write {example}") from None
        if size < 1 or not (0 < factor < math.inf):
            raise ConfigError(f"{where}: {key!r}: {value!r}: sizes must be >= 1 and factors > 0 (1.0 = the "
                              f"calibrated rate), {example}")
        points.append((size, factor))
    return tuple(sorted(points))


def load_gemm_efficiency(path: Path) -> GemmEfficiency:
    """A curve from a JSON or YAML file (`pretrain plan --gemm-efficiency`, written by bench/bench_plan.py)."""
    import yaml  # YAML reads JSON too; trainer.config imports it already

    origin = f"{GEMM_FLAG} {path}"
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{origin}: cannot read it ({err}): pass a JSON or YAML file with a 'width' and/or "
                          f"'tokens' curve") from None
    return gemm_efficiency_from_dict(raw, origin)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Measured constants of the compute model (docs/planning.md, "Calibration")."""

    # Model FLOPs / (time × peak) of the trainer with no communication and no recompute: 1B, bf16, seq 2048,
    # micro 8, one H200 (notes/gpu-h200.md: 42.4 % MFU).
    compute_efficiency: float = 0.424
    # Selective AC recomputes elementwise ops (no FLOPs counted): same H200, 42.4 % → ~38 % MFU.
    selective_ac_time_factor: float = 0.424 / 0.38
    source: str = "notes/gpu-h200.md: 1B on one H200, 2026-12-04"
    gemm: GemmEfficiency = GemmEfficiency()  # per-shape factor on compute_efficiency; flat by default


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    sequence_parallel: bool
    zero_stage: int
    micro_batch_size_per_gpu: int
    activation_checkpointing: str
    # Decoder layers per pipeline stage (plan.stage_splits); None: even.
    stage_layers: tuple[int, ...] | None = None
    # parallel.activation_checkpointing_layers: the first N layers of each stage checkpointed; None: all.
    checkpointed_layers: int | None = None

    def overrides(self) -> list[str]:
        """The dotted overrides that turn a run config into this layout (dp stays 'auto' = world / (tp·pp))."""
        stages = "null" if self.stage_layers is None else stage_layers_text(self.stage_layers)
        return [
            f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.pipeline_stage_layers={stages}",
            "parallel.dp=auto", f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
            f"parallel.activation_checkpointing={self.activation_checkpointing}",
            f"parallel.activation_checkpointing_layers={self.checkpointed_layers or 'null'}",
            f"zero.stage={self.zero_stage}", f"train.micro_batch_size_per_gpu={self.micro_batch_size_per_gpu}",
        ]

    def pp_text(self) -> str:
        """pp, with the stage split when uneven, runs written once: 16 [7,8x14,7]."""
        if self.stage_layers is None:
            return str(self.pp)
        runs = [(n, len(list(group))) for n, group in itertools.groupby(self.stage_layers)]
        return f"{self.pp} [" + ",".join(f"{n}x{count}" if count > 1 else str(n) for n, count in runs) + "]"

    def short(self) -> str:
        sp = "+sp" if self.sequence_parallel else ""
        return (f"tp{self.tp}{sp} pp{self.pp_text().replace(' ', '')} dp{self.dp} zero{self.zero_stage} "
                f"micro{self.micro_batch_size_per_gpu} ac={self.ac_label}")

    @property
    def ac_label(self) -> str:
        """The checkpointing mode, with the layers per stage when not all: selective:4 (the first 4 of each stage)."""
        if self.checkpointed_layers is None:
            return self.activation_checkpointing
        return f"{self.activation_checkpointing}:{self.checkpointed_layers}"


@dataclasses.dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step on the busiest pipeline stage; comm terms are the exposed (not overlapped) part."""

    compute_s: float  # model FLOPs + recompute at the calibrated fraction of peak
    tp_comm_s: float  # TP all-reduces (or SP reduce-scatter + all-gather) inside each layer: on the critical path
    pp_comm_s: float  # stage-to-stage sends of activations and their gradients
    dp_comm_s: float  # gradient reduction and parameter gathers that backward/forward do not hide
    bubble_s: float  # 1F1B: (pp - 1) idle micro-batch slots

    @property
    def exposed_comm_s(self) -> float:
        return self.tp_comm_s + self.pp_comm_s + self.dp_comm_s

    @property
    def total_s(self) -> float:
        return self.compute_s + self.exposed_comm_s + self.bubble_s


@dataclasses.dataclass(frozen=True)
class Candidate:
    layout: Layout
    cfg: Config
    derived: Derived
    memory: MemoryEstimate
    time: StepTime
    tokens_per_s: float
    mfu: float

    def as_dict(self) -> dict[str, Any]:
        m, t = self.memory, self.time
        return {
            "layout": dataclasses.asdict(self.layout),
            "grad_accum_steps": self.derived.grad_accum_steps,
            "memory_gib": {"weights": m.weights_bytes / GIB, "grads": m.grads_bytes / GIB,
                           "optimizer": m.optimizer_bytes / GIB, "activations": m.activations_bytes / GIB,
                           "buffers": m.buffers_bytes / GIB, "total": m.total_bytes / GIB},
            "step_time_s": {"compute": t.compute_s, "tp_comm": t.tp_comm_s, "pp_comm": t.pp_comm_s,
                            "dp_comm": t.dp_comm_s, "exposed_comm": t.exposed_comm_s, "bubble": t.bubble_s,
                            "total": t.total_s},
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "overrides": self.layout.overrides(),
        }


@dataclasses.dataclass(frozen=True)
class PlanResult:
    candidates: list[Candidate]  # fitting layouts, fastest first
    enumerated: int  # layouts enumerated: each refused, too big, or fitting (candidates less fewer_checkpointed)
    invalid: int  # rejected by the trainer's own config validation
    too_big: int  # valid, but over the memory budget
    usable_memory_gib: float
    smallest_misfit: Candidate | None  # the valid layout that missed the budget by the least (for the error message)
    given: Candidate | None = None  # the input config's own layout, evaluated the same way (None: not runnable)
    given_problem: str | None = None  # why the input config's layout cannot run on this cluster, or does not fit
    example_refusal: str | None = None  # the most frequent validation message, for the error when nothing fits
    # Candidates added beside a fitting layout that checkpoints every layer: the same with as few layers
    # checkpointed per stage as fit (`_fewest_checkpointed`).
    fewer_checkpointed: int = 0

    def given_rank(self) -> int | None:
        """1-based place of the input config's layout among the fitting ones (None when it does not fit). A layout
        the enumeration does not make (a hand-written uneven stage split) is placed where its step time sorts."""
        if self.given is None or self.given_problem is not None:
            return None
        same = next((i for i, c in enumerate(self.candidates, 1) if c.layout == self.given.layout), None)
        return same or 1 + sum(_rank_key(c) < _rank_key(self.given) for c in self.candidates)


# ---------------------------------------------------------------------------------------------------------------------
# Enumeration and validation


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(cfg: Config, world_size: int) -> Iterator[Layout]:
    """Every tp × pp × sp × ZeRO × micro-batch × AC combination worth asking the validator about.

    Only cheap arithmetic prunes here (tp·pp must divide the world, pp <= num_layers, micro-batches are powers of two
    dividing the per-DP-rank batch); everything the trainer refuses is refused by its own validation in
    `apply_layout`. Each pp gets the splits of `stage_splits`: the balanced one and two with a lighter first stage.
    """
    heads, num_layers = math.gcd(cfg.model.num_heads, cfg.model.num_kv_heads), cfg.model.num_layers
    for tp, pp in itertools.product(_divisors(heads), _divisors(world_size)):
        if world_size % (tp * pp) or pp > num_layers:
            continue
        dp = world_size // (tp * pp)
        for stages, sp, stage, micro, ac in itertools.product(
            stage_splits(num_layers, pp), (False, True) if tp > 1 else (False,), range(4),
            _micro_batches(cfg.train.global_batch_size, dp), AC_MODES
        ):
            yield Layout(tp, pp, dp, sp, stage, micro, ac, stages)


def stage_splits(num_layers: int, pp: int) -> list[tuple[int, ...] | None]:
    """The stage splits worth pricing for `pp` (None: the even split).

    First the balanced split (even when pp divides num_layers, else trainer.config.balanced_stage_layers). Then, for
    pp > 1, the same with 1 and 2 layers taken off the first stage: under 1F1B stage s holds pp - s micro-batches'
    activations, so the first stage is the memory peak, and a layout that misses the memory budget by a little fits
    with a lighter first stage, at the price of a busier stage elsewhere (step time follows the busiest stage; the
    plan weighs both). The layers go one each to the stages with the fewest, the last stages first (they hold the
    fewest micro-batches). Megatron-LM's --decoder-first-pipeline-num-layers does this by hand.
    """
    balanced = None if num_layers % pp == 0 else tuple(balanced_stage_layers(num_layers, pp))
    splits: list[tuple[int, ...] | None] = [balanced]
    layers = list(balanced or [num_layers // pp] * pp)
    for _ in range(2 if pp > 1 else 0):
        if layers[0] <= 1:
            break
        layers[0] -= 1
        lightest = min(range(pp - 1, 0, -1), key=lambda s: layers[s])  # ties: the later stage
        layers[lightest] += 1
        splits.append(tuple(layers))
    return splits


def _micro_batches(global_batch_size: int, dp: int) -> list[int]:
    if global_batch_size % dp:
        return [1]  # let validation say why this dp cannot work
    per_rank = global_batch_size // dp
    return [2**i for i in range(per_rank.bit_length()) if per_rank % 2**i == 0]


def apply_layout(cfg: Config, layout: Layout, cluster: Cluster) -> tuple[Config, Derived]:
    """The run config of `layout`, checked exactly as `train --dry-run` checks it. Raises ConfigError."""
    overrides = layout.overrides() + [f"launch.nodes={cluster.nodes}", f"launch.gpus_per_node={cluster.gpus_per_node}",
                                      "launch.device=cuda"]
    new = parse_config(apply_overrides(cfg.model_dump(mode="json"), overrides), source=f"layout {layout.short()}")
    return new, new.validate_for_world(cluster.world_size, device="cuda")


# ---------------------------------------------------------------------------------------------------------------------
# Step time


def step_time(cfg: Config, derived: Derived, cluster: Cluster, calib: Calibration) -> StepTime:
    """One optimizer step under 1F1B: (m + pp - 1) slots of one micro-batch on the busiest stage, plus DP traffic.

    The busiest stage is the one with the longest slot (its decoder layers, plus lm_head on the last and the
    embedding's TP all-reduce on the first): with uneven stages every stage waits for it, so it sets the pace.
    """
    micro_batches = derived.grad_accum_steps
    per_stage = [(_compute_micro_s(cfg, derived, cluster, calib, stage), _tp_comm_micro_s(cfg, derived, cluster, stage))
                 for stage in range(derived.pp)]
    compute_micro_s, tp_micro_s = max(per_stage, key=sum)
    pp_micro_s = _pp_comm_micro_s(cfg, derived, cluster)
    slot_s = compute_micro_s + tp_micro_s + pp_micro_s
    return StepTime(
        compute_s=micro_batches * compute_micro_s,
        tp_comm_s=micro_batches * tp_micro_s,
        pp_comm_s=micro_batches * pp_micro_s + _tied_embedding_comm_s(cfg, derived, cluster),
        dp_comm_s=_dp_comm_exposed_s(cfg, derived, cluster, compute_micro_s),
        bubble_s=(derived.pp - 1) * slot_s,
    )


def layer_gemms(model: Any) -> list[tuple[str, int, int]]:
    """A decoder layer's matmuls as the trainer builds them (trainer/parallelize.py: q, k, v, gate, up column-parallel,
    o, down row-parallel): (name, weight elements K·N, the dimension TP splits). Their K·N add up to
    LayerShape.linear_params, so a flat curve gives exactly the FLOPs of flops_per_token."""
    shape = layer_shape(model)
    h, q, kv, inter = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate
    return [("q", h * q, q), ("k", h * kv, kv), ("v", h * kv, kv), ("o", q * h, q),
            ("gate", h * inter, inter), ("up", h * inter, inter), ("down", inter * h, inter)]


def _effective_flops(flops: float, width: float, tokens: int, gemm: GemmEfficiency) -> float:
    """FLOPs at the layout-independent rate that take as long as `flops` of this GEMM shape."""
    return flops / gemm.factor(width, tokens)


def _compute_micro_s(cfg: Config, derived: Derived, cluster: Cluster, calib: Calibration, stage: int) -> float:
    """FLOPs of one micro-batch on one pipeline stage (its decoder layers; the last also lm_head), per TP rank, each
    matmul at its shape's factor of the rate (calib.gemm: per-rank width after the TP split, micro·seq tokens)."""
    tp, gemm, model = derived.tp, calib.gemm, cfg.model
    tokens = derived.micro_batch_size_per_gpu * cfg.train.seq_len
    flops = flops_per_token(model, derived.padded_vocab_size, cfg.train.seq_len)
    # The attention core's per-head matrices (seq × head_dim) do not narrow with TP: only the tokens curve applies.
    attention = flops.attention / model.num_layers / tp / gemm.tokens_factor(tokens)
    per_layer = sum(_effective_flops(6 * params / tp, split / tp, tokens, gemm)
                    for _, params, split in layer_gemms(model)) + attention
    layers = per_layer * derived.stage_layers[stage]
    mode = cfg.parallel.activation_checkpointing
    checkpointed = cfg.parallel.checkpointed_layers(derived.stage_layers[stage])
    if mode == "full":
        layers += per_layer * checkpointed / 3  # backward re-runs the layer's forward: 2 of the 6 FLOPs again
    elif mode == "core_attention":
        layers += attention / 3 * checkpointed  # one more attention forward (1 of its 3 passes)
    vocab = derived.padded_vocab_size
    head = _effective_flops(6 * vocab * model.hidden_size / tp, vocab / tp, tokens, gemm)
    per_token = layers + (head if stage == derived.pp - 1 else 0)
    seconds = per_token * tokens / (cluster.gpu.peak_tflops * 1e12 * calib.compute_efficiency)
    if mode != "selective":
        return seconds
    # The factor was measured with every layer selective; a part of the layers costs that part of the extra time.
    return seconds * (1 + (calib.selective_ac_time_factor - 1) * checkpointed / derived.stage_layers[stage])


def _link(cluster: Cluster, stride: int, size: int) -> tuple[float, float]:
    """(bus bandwidth B/s, latency s) of a group of `size` ranks `stride` apart (megatron order: tp, dp, pp).

    Inside a node: NVLink. Across nodes: each member uses its own NIC, so a group with k members per node moves
    k × the per-GPU network bandwidth (NCCL runs one ring per NIC), capped by NVLink.
    """
    gpu, eff = cluster.gpu, cluster.link_efficiency
    if stride * size <= cluster.gpus_per_node:
        return gpu.intra_node_gbps * 1e9 * eff, gpu.intra_latency_s
    per_node = max(1, cluster.gpus_per_node // stride)
    bus = min(gpu.intra_node_gbps, per_node * gpu.inter_node_gbps)
    return bus * 1e9 * eff, gpu.inter_latency_s


def _collective_s(nbytes: float, size: int, link: tuple[float, float], kind: str, count: int = 1) -> float:
    """`nbytes` moved by `count` equal collectives of `kind` over `size` ranks.

    Bandwidth: a ring reduce-scatter or all-gather moves (g-1)/g of the buffer per GPU, an all-reduce twice that.
    Latency, per collective: g-1 hops for reduce-scatter / all-gather (rings), 2·ceil(log2 g) for an all-reduce (NCCL
    switches to trees at scale; never more than the ring's 2(g-1)).
    """
    if size == 1:
        return 0.0
    bandwidth, hop_s = link
    if kind == "all_reduce":
        passes, hops = 2, min(2 * (size - 1), 2 * math.ceil(math.log2(size)))
    else:
        passes, hops = 1, size - 1
    return count * hops * hop_s + passes * (size - 1) / size * nbytes / bandwidth


def _tp_comm_micro_s(cfg: Config, derived: Derived, cluster: Cluster, stage: int) -> float:
    """Per layer: attention and MLP each all-reduce their output in forward and their input gradient in backward
    (SP: a reduce-scatter + all-gather pair instead, the same bytes). Full AC repeats the forward pair. Plus the
    vocab-parallel embedding's all-reduce on the first stage and lm_head's input-gradient all-reduce on the last."""
    tp = derived.tp
    if tp == 1:
        return 0.0
    tokens = derived.micro_batch_size_per_gpu * cfg.train.seq_len
    nbytes = tokens * cfg.model.hidden_size * activation_element_bytes(cfg)
    layers = derived.stage_layers[stage]
    recomputed = cfg.parallel.checkpointed_layers(layers) if cfg.parallel.activation_checkpointing == "full" else 0
    count = layers * 4 + recomputed * 2 + (stage == 0) + (stage == derived.pp - 1)  # full AC: the forward pair again
    return _collective_s(count * nbytes, tp, _link(cluster, 1, tp), "all_reduce", count)


def _pp_comm_micro_s(cfg: Config, derived: Derived, cluster: Cluster) -> float:
    """Each micro-batch sends its activations forward and receives their gradient back: whole tensors, also under
    SP (trainer sets DeepSpeed pipe_partitioned=false). Neighbouring stages are tp·dp ranks apart."""
    if derived.pp == 1:
        return 0.0
    tokens = derived.micro_batch_size_per_gpu * cfg.train.seq_len
    nbytes = tokens * cfg.model.hidden_size * activation_element_bytes(cfg)
    gpu, eff = cluster.gpu, cluster.link_efficiency
    inter = derived.tp * derived.dp >= cluster.gpus_per_node
    bandwidth = (gpu.inter_node_gbps if inter else gpu.intra_node_gbps) * 1e9 * eff
    latency = gpu.inter_latency_s if inter else gpu.intra_latency_s
    return 2 * (latency + nbytes / bandwidth)


def _tied_embedding_comm_s(cfg: Config, derived: Derived, cluster: Cluster) -> float:
    """Tied embeddings over pipeline stages: once per step, after the last backward and before the DP reduction,
    the first and the last stage all-reduce their copies' gradients (the vocabulary shard; DeepSpeed's
    ReduceTiedGrads, nothing overlaps it). The two stages are tp·dp·(pp - 1) ranks apart."""
    if derived.pp == 1 or not cfg.model.tie_embeddings:
        return 0.0
    nbytes = derived.padded_vocab_size * cfg.model.hidden_size // derived.tp * _grad_element_bytes(cfg)
    stride = derived.tp * derived.dp * (derived.pp - 1)
    return _collective_s(nbytes, 2, _link(cluster, stride, 2), "all_reduce")


def _grad_element_bytes(cfg: Config) -> int:
    """Bytes of one gradient element as the collectives move it: fp32 in fp32 runs and with fp32 accumulation."""
    return 4 if cfg.precision.dtype == "fp32" or cfg.precision.fp32_grad_accumulation else 2


def _dp_comm_exposed_s(cfg: Config, derived: Derived, cluster: Cluster, compute_micro_s: float) -> float:
    """Gradient reduce-scatter (all-reduce under ZeRO-0) and parameter all-gather over DP, minus what overlaps.

    What overlaps (DeepSpeed 0.19.8, overlap_comm=true): ZeRO-1 reduces during the last micro-step's backward, ZeRO-2
    during every micro-step's backward, ZeRO-3 gathers and reduces during each micro-step's forward+backward. Not
    hidden: ZeRO-0's all-reduce (after backward), the all-gather of updated weights after the ZeRO-1/2 step, and
    everything under a pipeline (DeepSpeed's pipeline engine reduces after the last micro-batch). ZeRO 0-2 move the
    buffers in buckets of zero.*_bucket_size_elements; ZeRO-3 gathers and reduces layer by layer.
    """
    dp, stage, z = derived.dp, cfg.zero.stage, cfg.zero
    if dp == 1:
        return 0.0
    link = _link(cluster, derived.tp, dp)
    # Each stage reduces its own parameters over its own DP group, all at once: the largest stage finishes last.
    params = max(stage_params_per_gpu(cfg.model, derived, stage) for stage in range(derived.pp))
    grad_bytes = params * _grad_element_bytes(cfg)
    weight_bytes = params * (4 if cfg.precision.dtype == "fp32" else 2)
    reduce_buckets = math.ceil(params / z.reduce_bucket_size_elements)
    if stage == 0:
        return _collective_s(grad_bytes, dp, link, "all_reduce", reduce_buckets)
    backward_s = compute_micro_s * 2 / 3  # backward is 4 of the 6 FLOPs per parameter and token
    overlap = z.overlap_comm and derived.pp == 1
    micro_batches = derived.grad_accum_steps
    if stage == 3:
        layers = max(derived.stage_layers)  # ZeRO-3 runs without a pipeline (pp 1): all layers
        per_micro_s = (_collective_s(2 * weight_bytes, dp, link, "all_gather", 2 * layers)
                       + _collective_s(grad_bytes, dp, link, "reduce_scatter", layers))
        return micro_batches * (max(0.0, per_micro_s - compute_micro_s) if overlap else per_micro_s)
    gather_s = _collective_s(weight_bytes, dp, link, "all_gather",
                             math.ceil(params / z.allgather_bucket_size_elements))
    reduce_s = _collective_s(grad_bytes, dp, link, "reduce_scatter", reduce_buckets)
    exposed_reduce_s = max(0.0, reduce_s - backward_s) if overlap else reduce_s
    return gather_s + (exposed_reduce_s if stage == 1 else micro_batches * exposed_reduce_s)


# ---------------------------------------------------------------------------------------------------------------------
# The plan


def evaluate(cfg: Config, derived: Derived, layout: Layout, cluster: Cluster, calib: Calibration) -> Candidate:
    memory = estimate_memory(cfg, derived)
    time = step_time(cfg, derived, cluster, calib)
    flops = flops_per_token(cfg.model, derived.padded_vocab_size, cfg.train.seq_len).total
    tokens = derived.global_batch_size_tokens
    mfu = flops * tokens / (time.total_s * cluster.world_size * cluster.gpu.peak_tflops * 1e12)
    return Candidate(layout, cfg, derived, memory, time, tokens / time.total_s, mfu)


def plan(cfg: Config, cluster: Cluster, calib: Calibration = Calibration(), headroom: float = 0.15) -> PlanResult:
    """All layouts the trainer accepts that fit `gpu.memory × (1 - headroom)`, fastest first.

    Ties (same predicted time, e.g. micro-batch sizes the model cannot tell apart) go to less model parallelism,
    then to less memory.
    """
    usable_gib = cluster.gpu.memory_gib * (1 - headroom)
    fits, invalid, too_big, misfit, count, fewer_count = [], 0, 0, None, 0, 0
    refusals: collections.Counter[str] = collections.Counter()
    for layout in enumerate_layouts(cfg, cluster.world_size):
        count += 1
        try:
            new, derived = apply_layout(cfg, layout, cluster)
        except ConfigError as err:
            invalid += 1
            refusals.update(line.strip(" -") for line in str(err).splitlines()[1:])
            continue
        cand = evaluate(new, derived, layout, cluster, calib)
        if cand.memory.total_bytes / GIB <= usable_gib:
            fits.append(cand)
            fewer = _fewest_checkpointed(cand, cluster, calib, usable_gib)
            if fewer is not cand:
                fits.append(fewer)
                fewer_count += 1
        else:
            too_big += 1
            if misfit is None or cand.memory.total_bytes < misfit.memory.total_bytes:
                misfit = cand
    fits.sort(key=_rank_key)
    given, problem = _given_layout(cfg, cluster, calib, usable_gib)
    refusal = refusals.most_common(1)[0][0] if refusals else None  # the rule that ruled out the most layouts
    return PlanResult(fits, count, invalid, too_big, usable_gib, misfit, given, problem, refusal, fewer_count)


def _fewest_checkpointed(cand: Candidate, cluster: Cluster, calib: Calibration, usable_gib: float) -> Candidate:
    """A fitting layout that checkpoints every layer, with as few layers per stage checkpointed as still fit
    (parallel.activation_checkpointing_layers): memory falls and recompute time rises with each layer, so the
    smallest count that fits is the fastest of the mode. `cand` itself when every layer must be checkpointed, or when
    none need be (the same layout without checkpointing fits, and is faster)."""
    par = cand.cfg.parallel
    if par.activation_checkpointing == "none" or par.activation_checkpointing_layers is not None:
        return cand

    def fits(count: int) -> bool:  # 0: no checkpointing at all
        update = {"activation_checkpointing_layers": count} if count else {"activation_checkpointing": "none"}
        variant = cand.cfg.model_copy(update={"parallel": par.model_copy(update=update)})
        return estimate_memory(variant, cand.derived).total_bytes / GIB <= usable_gib

    most = max(cand.derived.stage_layers)
    if fits(0):
        return cand
    low, high = 1, most  # every layer (high) fits
    while low < high:
        count = (low + high) // 2
        if fits(count):
            high = count
        else:
            low = count + 1
    if low == most:
        return cand
    layout = dataclasses.replace(cand.layout, checkpointed_layers=low)
    new, derived = apply_layout(cand.cfg, layout, cluster)
    return evaluate(new, derived, layout, cluster, calib)


def _problems_line(err: ConfigError) -> str:
    """A validation error's bullet lines on one line (the first line only names the world)."""
    bullets = [line.strip(" -") for line in str(err).splitlines()[1:]]
    return "; ".join(bullets) or str(err)


def _given_layout(cfg: Config, cluster: Cluster, calib: Calibration,
                  usable_gib: float) -> tuple[Candidate | None, str | None]:
    """The config's own parallel settings on this cluster: what `submit` would run if nothing were changed."""
    par = cfg.parallel
    dp = cluster.world_size // (par.tp * par.pp) if cluster.world_size % (par.tp * par.pp) == 0 else 0
    stages = None if par.pipeline_stage_layers is None else tuple(par.pipeline_stage_layers)
    if stages is not None and len(set(stages)) == 1:
        stages = None  # an even split written out is the even split the enumeration makes
    layout = Layout(par.tp, par.pp, dp, par.sequence_parallel, cfg.zero.stage, cfg.train.micro_batch_size_per_gpu,
                    par.activation_checkpointing, stages, par.activation_checkpointing_layers)
    try:
        new, derived = apply_layout(cfg, layout, cluster)
    except ConfigError as err:
        return None, _problems_line(err)
    cand = evaluate(new, derived, dataclasses.replace(layout, dp=derived.dp), cluster, calib)
    gib = cand.memory.total_bytes / GIB
    return cand, (None if gib <= usable_gib else f"needs {gib:.1f} GiB > {usable_gib:.1f} GiB usable")


def _rank_key(cand: Candidate) -> tuple[float, int, int, int, int]:
    """Fastest first. The model cannot tell some layouts apart (micro-batch size without a pipeline, ZeRO stage when
    its traffic hides behind backward): then less model parallelism, bigger micro-batches (bigger GEMMs, as in the
    calibration run), a lower ZeRO stage (fewer collectives), less memory."""
    lay = cand.layout
    return (float(f"{cand.time.total_s:.6g}"), lay.tp * lay.pp, -lay.micro_batch_size_per_gpu, lay.zero_stage,
            cand.memory.total_bytes)


def why_line(result: PlanResult) -> str:
    """One sentence on why the winner wins: against the best layout of another tp × pp shape (else another AC mode or
    ZeRO stage), the biggest cost gap; and whether less model parallelism was ruled out by memory."""
    win = result.candidates[0]
    rival = _rival(win, result.candidates)
    text = f"{win.layout.short()} wins"
    if rival is not None:
        gaps = {
            "compute (recompute or a bigger pipeline stage)": rival.time.compute_s - win.time.compute_s,
            "exposed communication": rival.time.exposed_comm_s - win.time.exposed_comm_s,
            "pipeline bubble": rival.time.bubble_s - win.time.bubble_s,
        }
        name, gap = max(gaps.items(), key=lambda kv: kv[1])
        speedup = rival.time.total_s / win.time.total_s - 1
        text += (f": {speedup:.1%} faster than the next best different layout ({rival.layout.short()}), which spends "
                 f"{gap:.3g} s/step more on {name}")
    model_parallel = win.layout.tp * win.layout.pp
    if model_parallel > 1 and not any(c.layout.tp * c.layout.pp < model_parallel for c in result.candidates):
        text += f"; no layout with less model parallelism (tp·pp < {model_parallel}) fits in " \
                f"{result.usable_memory_gib:.1f} GiB"
    return text


def _rival(win: Candidate, candidates: list[Candidate]) -> Candidate | None:
    keys = (lambda c: (c.layout.tp, c.layout.pp), lambda c: c.layout.activation_checkpointing,
            lambda c: c.layout.zero_stage)
    for key in keys:
        rival = next((c for c in candidates if key(c) != key(win)), None)
        if rival is not None:
            return rival
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: an HF config.json as the model


def is_hf_config(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() or path.suffix == ".json"


def config_from_hf_json(path: Path, seq_len: int | None, global_batch_tokens: int | None) -> Config:
    """A run config around an HF Llama config.json: the model shape from the file, every other section at its
    default, data and max_steps as placeholders a user edits (docs/planning.md). Only the fields that change cost
    are read; `convert from-hf` does the full field-by-field check when weights are imported."""
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{file}: cannot read an HF config.json ({err}): pass a YAML run config or a valid "
                          f"config.json") from None
    if raw.get("model_type") != "llama":
        raise ConfigError(f"{file}: model_type {raw.get('model_type')!r} is not 'llama': the trainer builds Llama "
                          f"models only; pass a Llama config.json or a YAML run config")
    model = _model_fields_from_hf(raw, file)
    seq = seq_len or min(model["max_seq_len"], 4096)
    tokens = global_batch_tokens or 4 * 2**20
    tree = {
        "name": Path(file).parent.name or "plan",
        "model": model,
        "train": {"seq_len": seq, "micro_batch_size_per_gpu": 1, "global_batch_size": max(1, tokens // seq),
                  "max_steps": 1000},
        "data": {"datasets": [{"path": "data/pretrain-mix", "weight": 1.0}]},
    }
    tree["name"] = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in tree["name"]).lstrip("._-") or "plan"
    return parse_config(tree, source=str(file))


def _model_fields_from_hf(raw: dict[str, Any], file: Path) -> dict[str, Any]:
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in raw]
    if missing:
        raise ConfigError(f"{file}: {', '.join(missing)} missing: an HF Llama config.json has them all")
    rope = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    fields = {
        "vocab_size": raw["vocab_size"], "hidden_size": raw["hidden_size"],
        "intermediate_size": raw["intermediate_size"], "num_layers": raw["num_hidden_layers"],
        "num_heads": raw["num_attention_heads"],
        "num_kv_heads": raw.get("num_key_value_heads") or raw["num_attention_heads"],
        "rope_theta": float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-5)),
        "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "max_seq_len": int(raw.get("max_position_embeddings", 2048)),
    }
    head_dim = raw.get("head_dim")
    if head_dim and head_dim != raw["hidden_size"] // raw["num_attention_heads"]:
        fields["head_dim"] = head_dim
    return fields


def with_batch(cfg: Config, seq_len: int | None, global_batch_tokens: int | None) -> Config:
    """`cfg` with the plan's batch constraints: tokens per step = global_batch_size × seq_len, exactly."""
    seq = seq_len or cfg.train.seq_len
    tokens = global_batch_tokens or cfg.train.global_batch_size * cfg.train.seq_len
    if tokens % seq:
        lower = max(seq, tokens // seq * seq)
        raise ConfigError(f"--global-batch-tokens ({tokens:,}) must be a multiple of the sequence length ({seq}): "
                          f"pass e.g. --global-batch-tokens {lower} or {lower + seq}")
    overrides = [f"train.seq_len={seq}", f"train.global_batch_size={tokens // seq}"]
    return parse_config(apply_overrides(cfg.model_dump(mode="json"), overrides), source="plan constraints")
