"""Engine pieces that need no process group: LR schedule, weight-decay groups, the fp16 path, metric reporting."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trainer.config import ConfigError, OptimConfig, load_config
from trainer.deepspeed_config import build_deepspeed_config
from trainer.engine import exempt_from_weight_decay, loss_scale, lr_multiplier, param_groups
from trainer.hooks import GPU_PEAK_BF16_TFLOPS, format_metrics
from trainer.model import Llama

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def optim(**fields: object) -> OptimConfig:
    return OptimConfig(**{"lr": 1.0, "warmup_steps": 4, "min_lr_ratio": 0.1, **fields})


def test_warmup_reaches_the_peak_at_its_last_step() -> None:
    factors = [lr_multiplier(step, optim(), max_steps=20) for step in range(5)]
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_decay_goes_from_peak_to_floor_at_max_steps(decay: str) -> None:
    o = optim(decay=decay)
    assert lr_multiplier(4, o, max_steps=20) == 1.0  # first step after warmup: the peak
    halfway = lr_multiplier(12, o, max_steps=20)
    assert halfway == pytest.approx(0.55)  # both shapes cross the middle at the same point
    assert lr_multiplier(20, o, max_steps=20) == pytest.approx(0.1)  # the floor, after the last step
    assert lr_multiplier(500, o, max_steps=20) == pytest.approx(0.1)  # never below it
    if decay == "cosine":
        assert lr_multiplier(6, o, max_steps=20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 16)))
    else:
        assert lr_multiplier(6, o, max_steps=20) == pytest.approx(0.1 + 0.9 * (1 - 2 / 16))


def test_one_minus_sqrt_decay() -> None:
    o = optim(decay="1-sqrt")
    assert lr_multiplier(4, o, max_steps=20) == 1.0
    assert lr_multiplier(8, o, max_steps=20) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(4 / 16)))  # 0.55
    assert lr_multiplier(20, o, max_steps=20) == pytest.approx(0.1)


@pytest.mark.parametrize("decay", ["cosine", "linear", "1-sqrt"])
def test_warmup_stable_decay_holds_the_peak_until_the_last_decay_steps(decay: str) -> None:
    wsd = optim(decay=decay, decay_steps=6)
    factors = [lr_multiplier(step, wsd, max_steps=20) for step in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4:15] == [1.0] * 11  # stable until step max_steps - decay_steps = 14
    assert 0.1 < factors[16] < factors[15] < 1.0
    assert factors[20] == pytest.approx(0.1)
    # The decay over the last 6 steps is the whole-run decay of a run whose warmup ends where it starts.
    spanning = optim(decay=decay, warmup_steps=14)
    assert factors[14:] == pytest.approx([lr_multiplier(step, spanning, max_steps=20) for step in range(14, 21)])
    # decay_steps = every step after warmup is the default schedule
    assert [lr_multiplier(s, optim(decay=decay, decay_steps=16), 20) for s in range(21)] == pytest.approx(
        [lr_multiplier(s, optim(decay=decay), 20) for s in range(21)])


def test_a_wsd_run_extended_before_its_decay_keeps_its_lr_curve() -> None:
    wsd = optim(decay="1-sqrt", decay_steps=5)
    short = [lr_multiplier(step, wsd, max_steps=20) for step in range(15)]
    assert short == [lr_multiplier(step, wsd, max_steps=40) for step in range(15)]
    cosine = optim(decay="cosine")  # what decays over the whole run changes under an extended max_steps
    assert [lr_multiplier(s, cosine, 20) for s in range(15)] != [lr_multiplier(s, cosine, 40) for s in range(15)]


@pytest.mark.parametrize(("overrides", "message"), [
    (["optim.decay=constant", "optim.decay_steps=4"], "needs a decay shape, and optim.decay is constant"),
    (["optim.warmup_steps=3", "optim.decay_steps=8", "train.max_steps=10"],
     "longer than the steps after warmup (train.max_steps - optim.warmup_steps = 7)"),
])
def test_decay_steps_that_cannot_run_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY, overrides)


def test_batch_size_rampup_follows_megatrons_rule() -> None:
    """From 4 by 4 to 16 over 48 samples: 3 increases, one every 16 consumed samples (Megatron-LM's
    --rampup-batch-size 4 4 48): 4 until 16 samples are consumed, 8 until 32, 12 until 48, then 16."""
    train = load_config(TINY, ["train.batch_size_rampup={start: 4, increment: 4, samples: 48}"]).train
    assert train.ramp_batch_sizes() == [4, 4, 4, 4, 8, 8, 12, 12]
    assert [train.batch_size_at(step) for step in (0, 4, 7, 8, 1000)] == [4, 8, 12, 16, 16]
    assert load_config(TINY).train.ramp_batch_sizes() == [] and load_config(TINY).train.batch_size_at(0) == 16


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.batch_size_rampup={start: 16, increment: 4, samples: 48}"], "start must be smaller"),
    (["train.batch_size_rampup={start: 4, increment: 8, samples: 48}"], "the difference a multiple of increment"),
    (["train.batch_size_rampup={start: 4, increment: 4, samples: 48}", "zero.stage=1",
      "zero.offload_optimizer=cpu"], "with zero.offload_optimizer"),
])
def test_rampups_that_cannot_run_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY, overrides)


def test_a_rampup_batch_must_be_whole_micro_batches_on_every_rank() -> None:
    cfg = load_config(TINY, ["train.batch_size_rampup={start: 4, increment: 4, samples: 48}"])
    cfg.validate_for_world(1)  # micro 4 x dp 1
    with pytest.raises(ConfigError, match=re.escape("must be multiples of train.micro_batch_size_per_gpu × dp (8)")):
        cfg.validate_for_world(2)


def test_constant_and_no_warmup() -> None:
    assert [lr_multiplier(s, optim(decay="constant", warmup_steps=0), 10) for s in (0, 9)] == [1.0, 1.0]
    assert lr_multiplier(0, optim(warmup_steps=0), 10) == 1.0


def testlr_schedule_drives_the_group_lr() -> None:
    from trainer.engine import lr_schedule

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = lr_schedule(opt, optim(lr=0.5), max_steps=10)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5])


def test_weight_decay_groups_follow_no_decay_on() -> None:
    cfg = load_config(TINY)
    model = Llama(cfg.model, 256)
    groups = param_groups(model.named_parameters(), cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == cfg.optim.weight_decay and groups[1]["weight_decay"] == 0.0
    assert no_decay == {"norm.weight"} | {f"layers.{i}.{n}_layernorm.weight" for i in (0, 1)
                                          for n in ("input", "post_attention")}
    assert "embed_tokens.weight" in decay and "lm_head.weight" in decay  # no_decay_on.embeddings defaults to false
    with_embeddings = load_config(TINY, ["optim.no_decay_on.embeddings=true"]).optim
    assert exempt_from_weight_decay("embed_tokens.weight", with_embeddings.no_decay_on)
    assert exempt_from_weight_decay("layers.0.mlp.up_proj.bias", with_embeddings.no_decay_on)
    everything = load_config(TINY, ["optim.no_decay_on.norms=false"]).optim
    assert len(param_groups(model.named_parameters(), everything)) == 1  # an empty group is left out


def test_fp16_config_path() -> None:
    """fp16 cannot run on this CPU (DeepSpeed refuses it), so its path is checked up to the engine: the config is
    rejected on CPU with the fix, generates dynamic loss scaling for GPUs, and the loss scale is reported."""
    cfg = load_config(TINY, ["precision.dtype=fp16", "zero.stage=1"])
    with pytest.raises(ConfigError, match="set precision.dtype=bf16 or fp32"):
        cfg.validate_for_world(2, "cpu")
    ds = build_deepspeed_config(cfg, cfg.validate_for_world(2, "cuda"))
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    assert "bf16" not in ds
    fp16_engine = SimpleNamespace(fp16_enabled=lambda: True, _get_optimizer_loss_scale=lambda: 65536.0)
    assert loss_scale(fp16_engine) == 65536.0
    assert loss_scale(SimpleNamespace(fp16_enabled=lambda: False)) is None
    line = format_metrics(3, 10, {"kind": "train", "loss": 5.0, "lr": 1e-3, "grad_norm": 0.5, "loss_scale": 65536.0,
                                  "tokens_per_s": 1e5, "tflops_per_gpu": 300.0, "mfu": 0.3, "step_time_s": 1.0,
                                  "data_wait_s": 0.001, "max_memory_allocated_gib": 40.0})
    assert "loss_scale 65536" in line and "MFU 30.0%" in line and "ETA 0:00:07" in line
    assert "z_loss" not in line
    with_z = format_metrics(3, 10, {"kind": "train", "loss": 5.0, "z_loss": 0.0123, "lr": 1e-3, "grad_norm": None,
                                    "loss_scale": None, "tokens_per_s": 1e5, "tflops_per_gpu": 3.0, "mfu": None,
                                    "step_time_s": 1.0, "data_wait_s": 0.0, "max_rss_gib": 1.0})
    assert with_z.startswith("step 3/10 | loss 5.0000 | z_loss 0.0123 | lr")


def test_peak_table_prefers_specific_names() -> None:
    def peak(device_name: str) -> float | None:
        return next((tflops for pattern, tflops in GPU_PEAK_BF16_TFLOPS if pattern in device_name), None)

    assert peak("NVIDIA H100 80GB HBM3") == 989.0
    assert peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA GH200 480GB") == 989.0
    assert peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak("NVIDIA A10") == 125.0
    assert peak("NVIDIA L40S") == 362.0 and peak("NVIDIA L4") == 121.0
    assert peak("Some Future GPU") is None


def test_pipeline_with_sequence_parallel_sends_whole_shards() -> None:
    sp = load_config(REPO / "configs" / "70b.yaml")
    ds = build_deepspeed_config(sp, sp.validate_for_world(256, "cuda"))
    assert ds["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    plain = load_config(TINY, ["parallel.pp=2"])
    assert build_deepspeed_config(plain, plain.validate_for_world(2))["pipeline"] == {
        "pipe_partitioned": True, "grad_partitioned": True}
    assert "pipeline" not in build_deepspeed_config(load_config(TINY), load_config(TINY).validate_for_world(2))
