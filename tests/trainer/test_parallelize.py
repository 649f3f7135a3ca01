"""parallelize in one process (tp = pp = 1): names, deterministic init, activation checkpointing, pipeline bookkeeping.

The multi-rank properties (TP/PP shards are slices of the same full weights, names survive the TP swap) are proven in
test_parallel_training.py; here is what needs no process group.
"""

from __future__ import annotations

import collections
import functools
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.bootstrap import ParallelContext
from trainer.config import load_config
from trainer.model import Llama, lm_loss
from trainer.parallelize import (
    StageParts,
    build_model_on_meta,
    canonical_name,
    init_weights_deterministic,
    parallelize,
    pipeline_bounds,
)
from trainer.testing import run_distributed

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def single_rank_context() -> ParallelContext:
    """A 1-rank grid; tp = pp = 1 needs no process group (nothing is communicated)."""
    return ParallelContext(rank=0, world_size=1, local_rank=0, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0,
                           tp_group=None, pp_group=None, dp_group=None, model_parallel_group=None,
                           device=torch.device("cpu"))


def build(*overrides: str) -> tuple[torch.nn.Module, object]:
    cfg = load_config(TINY, list(overrides))
    derived = cfg.validate_for_world(1)
    pmodel = parallelize(build_model_on_meta(cfg.model, derived.padded_vocab_size), cfg, derived,
                         single_rank_context())
    return pmodel, cfg


def test_names_and_state_dict_keys_equal_the_plain_model() -> None:
    pmodel, cfg = build()
    plain = Llama(cfg.model, 256)
    assert not pmodel.is_pipeline
    assert [n for n, _ in pmodel.canonical_named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(pmodel.module.state_dict()) == list(plain.state_dict())
    assert not any(p.is_meta for p in pmodel.module.parameters())


def test_init_is_deterministic_per_name_and_independent_of_other_parameters() -> None:
    first, cfg = build()
    second, _ = build()
    for (name, a), (_, b) in zip(first.module.named_parameters(), second.module.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    # A model holding only some of the parameters (as a pipeline stage does) draws the same values for them.
    partial = build_model_on_meta(cfg.model, 256)
    partial.layers[1].to_empty(device="cpu")
    init_weights_deterministic(partial, cfg.model, cfg.train.seed)
    assert torch.equal(partial.layers[1].mlp.up_proj.weight, first.module.layers[1].mlp.up_proj.weight)
    assert partial.layers[0].mlp.up_proj.weight.is_meta
    # Distribution: norms 1, output projections scaled down by sqrt(2 * num_layers).
    model = first.module
    assert torch.equal(model.norm.weight, torch.ones(64))
    std_q = model.layers[0].self_attn.q_proj.weight.std().item()
    std_o = model.layers[0].self_attn.o_proj.weight.std().item()
    assert std_q == pytest.approx(0.02, rel=0.1) and std_o == pytest.approx(0.01, rel=0.1)
    other_seed, _ = build("train.seed=7")
    assert not torch.equal(other_seed.module.embed_tokens.weight, model.embed_tokens.weight)


def test_tied_embeddings_stay_one_parameter() -> None:
    pmodel, _ = build("model.tie_embeddings=true")
    assert pmodel.module.lm_head.weight is pmodel.module.embed_tokens.weight
    assert "lm_head.weight" not in dict(pmodel.canonical_named_parameters())


class _CountMatmuls(TorchDispatchMode):
    """Counts matmuls (`count`) and every op by name (`ops`) dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.count += 1
        self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def _loss_grads_and_backward_matmuls(mode: str, counts: dict | None = None,
                                     *overrides: str) -> tuple[float, dict[str, torch.Tensor], int]:
    pmodel, cfg = build(f"parallel.activation_checkpointing={mode}", *overrides)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    loss = lm_loss(pmodel.module(tokens[:, :-1]), tokens[:, 1:])
    with _CountMatmuls() as counter:
        loss.backward()
    grads = {name: p.grad.clone() for name, p in pmodel.module.named_parameters()}
    if counts is not None:
        counts.update(counter.ops)
    return loss.item(), grads, counter.count


def computing_ops_added(before: dict, after: dict) -> set[str]:
    """The ops `after` ran more often than `before`, less views (which compute nothing: core_attention takes them
    again rather than keeping them) other than the checkpoint's own detaches."""
    added = {name for name, n in (collections.Counter(after) - collections.Counter(before)).items() if n}

    def is_view(name: str) -> bool:  # names are "<op>.<overload>"
        op, _, overload = name.partition(".")
        return getattr(getattr(torch.ops.aten, op), overload).is_view

    return {name for name in added if name == "detach.default" or not is_view(name)}


def test_core_attention_checkpointing_recomputes_only_the_attention_core() -> None:
    """Megatron's selective recompute: one attention forward per layer runs again in backward, no matmul, no
    elementwise op; the numbers are those of no checkpointing, to the bit."""
    none_counts: dict = {}
    core_counts: dict = {}
    loss_none, grads_none, matmuls_none = _loss_grads_and_backward_matmuls("none", none_counts)
    loss_core, grads_core, matmuls_core = _loss_grads_and_backward_matmuls("core_attention", core_counts)
    assert loss_core == loss_none
    for name, grad in grads_none.items():
        assert torch.equal(grad, grads_core[name]), name
    assert matmuls_core == matmuls_none
    # What the backward runs on top of no checkpointing: the attention forward once per layer (tiny has 2), plus
    # the checkpoint's own detaches (bookkeeping on cached outputs, no compute) and views taken again (metadata, no
    # compute). No norm, rotary or SiLU.
    assert computing_ops_added(none_counts, core_counts) == {"_scaled_dot_product_flash_attention_for_cpu.default",
                                                             "detach.default"}
    assert core_counts["_scaled_dot_product_flash_attention_for_cpu.default"] == 2


def test_activation_checkpointing_recomputes_what_its_mode_says_and_changes_no_number() -> None:
    loss_none, grads_none, matmuls_none = _loss_grads_and_backward_matmuls("none")
    loss_sel, grads_sel, matmuls_sel = _loss_grads_and_backward_matmuls("selective")
    loss_full, grads_full, matmuls_full = _loss_grads_and_backward_matmuls("full")
    assert loss_none == loss_sel == loss_full
    for name, grad in grads_none.items():
        assert torch.equal(grad, grads_sel[name]), name
        assert torch.equal(grad, grads_full[name]), name
    # full re-runs each layer's forward in backward, up to the last tensor backward needs (non-reentrant checkpoint
    # stops early, before down_proj, whose output nothing saves): 6 projections per layer. selective keeps every
    # matmul output, so its backward runs exactly the matmuls of the model without checkpointing.
    assert matmuls_full == matmuls_none + 2 * 6
    assert matmuls_sel == matmuls_none


def test_checkpointing_only_the_first_layers_recomputes_only_those() -> None:
    """parallel.activation_checkpointing_layers=2 of 3 layers: full recompute runs the 6 projections of 2 layers again,
    not 3; the third layer keeps its activations. The numbers are those of no checkpointing, to the bit."""
    three = "model.num_layers=3"
    loss_none, grads_none, matmuls_none = _loss_grads_and_backward_matmuls("none", None, three)
    loss_all, _, matmuls_all = _loss_grads_and_backward_matmuls("full", None, three)
    loss_two, grads_two, matmuls_two = _loss_grads_and_backward_matmuls(
        "full", None, three, "parallel.activation_checkpointing_layers=2")
    assert loss_none == loss_all == loss_two
    for name, grad in grads_none.items():
        assert torch.equal(grad, grads_two[name]), name
    assert (matmuls_all, matmuls_two) == (matmuls_none + 3 * 6, matmuls_none + 2 * 6)
    pmodel, _ = build("parallel.activation_checkpointing=full", three, "parallel.activation_checkpointing_layers=2")
    checkpointed = [isinstance(layer.forward, functools.partial) for layer in pmodel.module.layers]
    assert checkpointed == [True, True, False]  # the first ones (Megatron's block method)


def test_activation_checkpointing_keeps_names() -> None:
    pmodel, _ = build("parallel.activation_checkpointing=selective")
    assert "layers.0.self_attn.q_proj.weight" in dict(pmodel.canonical_named_parameters())


@pytest.mark.parametrize(("num_layers", "pp"), [(2, 2), (4, 2), (4, 4), (80, 4), (3, 3), (2, 1)])
def test_even_stages_match_deepspeed_type_partition(num_layers: int, pp: int) -> None:
    """The even split places layers where DeepSpeed's own partition_method="type:DecoderLayer" did before uneven
    stages existed, so runs and checkpoints of that time see the same stages."""
    from deepspeed.runtime.utils import partition_balanced

    parts = partition_balanced(weights=[0] + [1] * num_layers + [0], num_parts=pp)
    even = [num_layers // pp] * pp
    assert pipeline_bounds(even) == parts
    for stage in range(pp):
        assert StageParts.for_stage(even, stage).list_bounds() == (parts[stage], parts[stage + 1])


def test_uneven_stage_parts_and_pipeline_bounds() -> None:
    # [embed, l0, l1, l2, l3, l4, head] as [1, 3, 1]: stage 0 = embed + l0, stage 1 = l1..l3, stage 2 = l4 + head.
    assert pipeline_bounds([1, 3, 1]) == [0, 2, 5, 7]
    first, middle, last = (StageParts.for_stage([1, 3, 1], stage) for stage in range(3))
    assert (first.embed, first.layers, first.head, first.list_bounds()) == (True, range(0, 1), False, (0, 2))
    assert (middle.embed, middle.layers, middle.head, middle.list_bounds()) == (False, range(1, 4), False, (2, 5))
    assert (last.embed, last.layers, last.head, last.list_bounds()) == (False, range(4, 5), True, (5, 7))
    assert pipeline_bounds([5]) == [0, 7]


def test_canonical_names_of_pipeline_parameters() -> None:
    assert canonical_name("0.embed_tokens.weight", 4) == "embed_tokens.weight"
    assert canonical_name("1.self_attn.q_proj.weight", 4) == "layers.0.self_attn.q_proj.weight"
    assert canonical_name("4.mlp.down_proj.weight", 4) == "layers.3.mlp.down_proj.weight"
    assert canonical_name("5.norm.weight", 4) == "norm.weight"
    assert canonical_name("5.lm_head.weight", 4) == "lm_head.weight"


def _vocab_parallel_loss_and_grad(rank: int, world_size: int, vocab_size: int) -> tuple[float, torch.Tensor]:
    from trainer.bootstrap import init_parallel
    from trainer.parallelize import vocab_parallel_lm_loss

    ctx = init_parallel(world_size, 1, backend="gloo")
    logits, labels = _padded_logits_and_labels(vocab_size)
    # This rank's lm_head output as the model produces it: (T, B, V/tp) contiguous, handed on as a (B, T) view.
    shard_tbv = logits.transpose(0, 1).chunk(world_size, dim=-1)[ctx.tp_rank].contiguous().requires_grad_()
    loss = vocab_parallel_lm_loss(shard_tbv.transpose(0, 1), labels, vocab_size=vocab_size, tp_rank=ctx.tp_rank)
    loss.backward()
    return loss.item(), shard_tbv.grad.transpose(0, 1)


def _padded_logits_and_labels(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 512, generator=generator) * 3  # (B, T, V padded to 512)
    return logits, torch.randint(0, vocab_size, (2, 5), generator=generator)


@pytest.mark.slow
def test_vocab_parallel_loss_leaves_padding_out_even_when_a_whole_shard_is_padding() -> None:
    """vocab 384 at tp 4: shards of 128 columns, the last one all padding. Every rank's loss equals the cross
    entropy over the 384 real columns, and no padding column gets a gradient."""
    results = run_distributed(_vocab_parallel_loss_and_grad, 4, 384, timeout_s=120)
    logits, labels = _padded_logits_and_labels(384)
    expected = torch.nn.functional.cross_entropy(logits[..., :384].reshape(-1, 384), labels.reshape(-1)).item()
    assert [loss for loss, _ in results] == pytest.approx([expected] * 4, abs=1e-6)
    grads = torch.cat([grad for _, grad in results], dim=-1)
    assert not grads[..., 384:].any() and grads[..., :384].abs().sum() > 0
