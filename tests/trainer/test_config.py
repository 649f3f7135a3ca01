"""The config tree: dotted overrides, unknown keys with suggestions, every impossible combination, round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.config import (
    Config,
    ConfigError,
    apply_overrides,
    dump_resolved,
    load_config,
    balanced_stage_layers,
    padded_vocab_size,
    parse_config,
    save_resolved,
)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def tiny(*overrides: str) -> Config:
    return load_config(TINY, overrides)


def error_of(*overrides: str, source: Path = TINY) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    return str(info.value)


def world_error_of(world_size: int, *overrides: str, device: str | None = None, source: Path = TINY) -> str:
    cfg = load_config(source, overrides)
    with pytest.raises(ConfigError) as info:
        cfg.validate_for_world(world_size, device)
    return str(info.value)


def test_config_error_is_a_user_error() -> None:
    assert ConfigError.user_error is True


def test_overrides_are_yaml_typed() -> None:
    cfg = tiny(
        "optim.lr=3e-4",
        "parallel.tp=2",
        "optim.betas=[0.8, 0.9]",
        "logging.gpu_peak_tflops=989.5",
        "precision.dtype=bf16",
        "checkpoint.dir=/tmp/ck",
        "logging.tensorboard=true",
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.parallel.tp == 2
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.logging.gpu_peak_tflops == 989.5
    assert cfg.precision.dtype == "bf16" and cfg.checkpoint.dir == "/tmp/ck" and cfg.logging.tensorboard is True


def test_yaml_file_reads_exponent_floats(tmp_path: Path) -> None:
    tree = yaml.safe_load(TINY.read_text())
    text = TINY.read_text().replace("lr: 1.0e-2", "lr: 1e-2")
    assert "lr: 1e-2" in text and tree["optim"]["lr"] == 1e-2
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert load_config(path).optim.lr == pytest.approx(1e-2)


def test_override_into_a_list_item_and_whole_list() -> None:
    cfg = load_config(REPO / "configs" / "125m.yaml", ["data.datasets.0.weight=2.5"])
    assert cfg.data.datasets[0].weight == 2.5
    cfg = load_config(REPO / "configs" / "125m.yaml", ["data.datasets=[{path: a, weight: 1}, {path: b, weight: 3}]"])
    assert [(d.path, d.weight) for d in cfg.data.datasets] == [("a", 1.0), ("b", 3.0)]


def test_overrides_do_not_touch_the_input_tree() -> None:
    tree = yaml.safe_load(TINY.read_text())
    apply_overrides(tree, ["optim.lr=0.5", "zero.stage=1"])
    assert tree["optim"]["lr"] == 1e-2 and tree["zero"]["stage"] == 0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lrr=1e-3", "optim.lrr: unknown key: did you mean optim.lr?"),
        ("optimm.lr=1e-3", "optimm: unknown key: did you mean optim?"),
        ("parallel.sequence_paralel=true", "did you mean parallel.sequence_parallel?"),
        ("train.micro_batch_size=2", "did you mean train.micro_batch_size_per_gpu?"),
        ("model.qwerty=1", "model.qwerty: unknown key: valid keys under model are vocab_size, hidden_size"),
    ],
)
def test_unknown_override_key_is_rejected_with_a_suggestion(override: str, expected: str) -> None:
    assert expected in error_of(override)


def test_unknown_key_in_the_yaml_file_is_rejected_with_a_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(TINY.read_text().replace("parallel:", "paralel:").replace("  warmup_steps:", "  warmup_step:"))
    message = error_of(source=path)
    assert "paralel: unknown key: did you mean parallel?" in message
    assert "optim.warmup_step: unknown key: did you mean optim.warmup_steps?" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr", "must look like section.key=value"),
        ("=3", "must look like section.key=value"),
        ("optim..lr=1", "must look like section.key=value"),
        ("optim.lr.x=1", "override optim.lr.x: optim.lr is a value, not a section: write optim.lr=<value>"),
        ("optim.lr=[1", "not valid YAML"),
    ],
)
def test_malformed_overrides(override: str, expected: str) -> None:
    assert expected in error_of(override)


def test_list_index_out_of_range() -> None:
    message = error_of("optim.betas.5=0.1", source=REPO / "configs" / "125m.yaml")
    assert "override optim.betas.5: '5' is not an index of a 2-item list: use 0..1, or set the whole list" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("parallel.tp=true", "parallel.tp: Input should be a valid integer (got True)"),
        ("parallel.tp='2'", "parallel.tp: Input should be a valid integer (got '2')"),
        ("parallel.dp=aut", "parallel.dp: Input should be a valid integer or Input should be 'auto' (got 'aut')"),
        ("parallel.activation_checkpointing=some", "Input should be 'none', 'selective', 'core_attention' or 'full'"),
        ("zero.stage=4", "zero.stage: Input should be less than or equal to 3 (got 4)"),
        ("optim.betas=[0.9]", "optim.betas: List should have at least 2 items"),
        ("optim.betas=[0.9, 1.0]", "optim.betas.1: Input should be less than 1"),
        ("train.seq_len=0", "train.seq_len: Input should be greater than or equal to 1 (got 0)"),
        ("name=my run", "name: String should match pattern"),
        ("model.vocab_size=null", "model.vocab_size: Input should be a valid integer (got None)"),
        ("model.rope_scaling={type: yarn, factor: 4.0}",
         "model.rope_scaling.type: Input should be 'linear' or 'llama3'"),
        ("model.rope_scaling={type: linear, factor: 0.5}", "model.rope_scaling.factor: Input should be greater than"),
        ("model.rope_scaling={type: llama3, factor: 8.0, low_freq_factor: 4.0}",
         "high_freq_factor (4.0) must be greater than low_freq_factor (4.0)"),
        ("model.attention_mask=block", "model.attention_mask: Input should be 'causal' or 'document'"),
    ],
)
def test_bad_values_name_the_dotted_path(override: str, expected: str) -> None:
    assert expected in error_of(override)


def test_missing_required_key(tmp_path: Path) -> None:
    tree = yaml.safe_load(TINY.read_text())
    del tree["model"]["num_kv_heads"]
    del tree["train"]
    with pytest.raises(ConfigError) as info:
        parse_config(tree)
    assert "model.num_kv_heads: required key is missing: add it to the YAML or pass model.num_kv_heads=<value>" in str(
        info.value
    )
    assert "train: required key is missing" in str(info.value)


def test_missing_file_lists_shipped_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=r"configs/nope.yaml not found: pass --config .*tiny.yaml"):
        load_config("configs/nope.yaml")


# Self-consistency problems (no world needed): each message carries the dotted path and the fix.
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["model.hidden_size=66"],
            "model.hidden_size (66) must be divisible by model.num_heads (4) when model.head_dim is unset: set model.head_dim",
        ),
        (["model.head_dim=15"], "model.head_dim (15) must be even (rotary rotates pairs): choose an even head_dim"),
        (
            ["model.num_kv_heads=3"],
            "model.num_heads (4) must be divisible by model.num_kv_heads (3) for grouped-query attention: choose num_kv_heads in {1, 2, 4}",
        ),
        (
            ["train.seq_len=256"],
            "train.seq_len (256) must not exceed model.max_seq_len (128): raise model.max_seq_len or lower train.seq_len",
        ),
        (["optim.warmup_steps=51"], "optim.warmup_steps (51) must not exceed train.max_steps (50)"),
        (
            ["data.datasets=[{path: d}]"],
            "data.synthetic is true but data.datasets is not empty: remove data.datasets or set data.synthetic=false",
        ),
        (["data.synthetic=false"], "data.datasets is empty: add a prepared dataset"),
        (
            ["zero.offload_param=cpu", "zero.stage=2"],
            "zero.offload_param (cpu) needs zero.stage=3 (got 2): set zero.stage=3 or zero.offload_param=none",
        ),
        (["zero.offload_optimizer=cpu"], "zero.offload_optimizer (cpu) needs zero.stage >= 1: set zero.stage=1"),
        (["zero.stage=3", "zero.offload_param=nvme"], "zero offload to nvme needs zero.nvme_path: set zero.nvme_path="),
        (
            ["precision.loss_scale=1024.0"],
            "precision.loss_scale (1024.0) only applies to fp16: remove it or set precision.dtype=fp16",
        ),
        (
            ["precision.dtype=bf16", "precision.fp32_grad_accumulation=true"],
            "precision.fp32_grad_accumulation with precision.dtype=bf16 needs zero.stage >= 1",
        ),
        (["launch.time_limit=2d"], "launch.time_limit ('2d') is not a Slurm time: write e.g. '2-00:00:00'"),
        (
            ["launch.extra_sbatch=[--mail-type=END]"],
            "launch.extra_sbatch.0 ('--mail-type=END') must be a whole directive line: write '#SBATCH --mail-type=END'",
        ),
    ],
)
def test_self_consistency_problems(overrides: list[str], expected: str) -> None:
    assert expected in error_of(*overrides)


def test_all_problems_are_reported_at_once() -> None:
    message = error_of("model.num_kv_heads=3", "optim.warmup_steps=99", "optim.lrr=1")
    assert "optim.lrr: unknown key" in message  # field errors first; cross-field checks need valid fields
    message = error_of("model.num_kv_heads=3", "optim.warmup_steps=99")
    assert "model.num_kv_heads (3)" in message and "optim.warmup_steps (99)" in message


def test_valid_slurm_times_and_sbatch_lines() -> None:
    for value in ("30", "04:00:00", "2-00:00:00", "1-12", "10:00"):
        assert tiny(f"launch.time_limit='{value}'").launch.time_limit == value
    assert tiny("launch.extra_sbatch=['#SBATCH --mail-type=END']").launch.extra_sbatch == ["#SBATCH --mail-type=END"]


# World problems: does the run plan fit the world?
@pytest.mark.parametrize(
    ("world", "overrides", "expected"),
    [
        (
            8,
            ["model.num_heads=12", "model.num_kv_heads=6", "model.hidden_size=96", "parallel.tp=4"],
            "parallel.tp (4) must divide model.num_kv_heads (6): choose tp in {1, 2, 3, 6}",
        ),
        (8, ["parallel.tp=8"], "parallel.tp (8) must divide model.num_heads (4): choose tp in {1, 2}"),
        (3, ["parallel.pp=3"], "parallel.pp (3) must not exceed model.num_layers (2): every pipeline stage needs a "
                               "decoder layer: choose pp <= 2"),
        (2, ["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs parallel.tp > 1"),
        (
            2,
            ["parallel.sequence_parallel=true", "parallel.tp=2", "train.seq_len=63"],
            "train.seq_len (63) must be divisible by parallel.tp (2) with parallel.sequence_parallel",
        ),
        (
            6,
            ["parallel.tp=4"],
            "parallel.tp × parallel.pp (4 × 1 = 4) must divide the world size (6): choose tp × pp in {1, 2, 3, 6}",
        ),
        (
            8,
            ["parallel.tp=2", "parallel.dp=2"],
            "parallel.tp × parallel.pp × parallel.dp (2 × 1 × 2 = 4) must equal the world size (8): set parallel.dp=auto or parallel.dp=4",
        ),
        (
            4,
            ["train.global_batch_size=20"],
            "train.global_batch_size (20) must be divisible by train.micro_batch_size_per_gpu × dp (4 × 4 = 16): set train.global_batch_size to a multiple of 16 (e.g. 16 or 32), or train.micro_batch_size_per_gpu in {1, 5}",
        ),
        (
            2,
            ["parallel.pp=2", "zero.stage=2"],
            "zero.stage (2) cannot be combined with parallel.pp (2) > 1 (DeepSpeed pipeline allows ZeRO <= 1): set zero.stage=1 or parallel.pp=1",
        ),
        (2, ["parallel.pp=2", "zero.stage=3"], "zero.stage (3) cannot be combined with parallel.pp (2) > 1"),
        (
            2,
            ["precision.dtype=fp16"],
            "precision.dtype=fp16 cannot run on CPU (DeepSpeed: 'Type fp16 is not supported on your device'): set precision.dtype=bf16 or fp32",
        ),
        (0, [], "world size (0) must be >= 1"),
        (
            2,
            ["parallel.activation_checkpointing_layers=1"],
            "parallel.activation_checkpointing_layers (1) chooses how many layers per stage a checkpointing mode "
            "applies to, and parallel.activation_checkpointing is none: set a mode",
        ),
        (
            2,
            ["parallel.activation_checkpointing=full", "parallel.activation_checkpointing_layers=3"],
            "parallel.activation_checkpointing_layers (3) exceeds the 2 decoder layers of the largest pipeline stage: "
            "choose 1..2, or null to checkpoint every layer",
        ),
        (
            2,
            ["model.num_layers=5", "parallel.pp=2", "parallel.pipeline_stage_layers=[2,3]",
             "parallel.activation_checkpointing=selective", "parallel.activation_checkpointing_layers=4"],
            "exceeds the 3 decoder layers of the largest pipeline stage: choose 1..3",
        ),
    ],
)
def test_world_problems(world: int, overrides: list[str], expected: str) -> None:
    assert expected in world_error_of(world, *overrides)


def test_fp16_is_fine_on_cuda_and_device_argument_wins() -> None:
    cfg = tiny("precision.dtype=fp16")
    assert cfg.validate_for_world(2, "cuda").device == "cuda"
    with pytest.raises(ConfigError, match="fp16 cannot run on CPU"):
        cfg.validate_for_world(2)  # launch.device of tiny.yaml is cpu


def test_world_errors_list_every_problem() -> None:
    message = world_error_of(8, "parallel.tp=8", "parallel.pp=3", "zero.stage=2")
    assert message.startswith("config does not fit world size 8 on cpu:")
    # tp/heads, tp/kv heads, pp/layers, zero with pp, tp × pp vs world (batch is not checked: dp is unknown)
    assert message.count("\n  - ") == 5


def test_derived_values_are_separate_from_user_fields() -> None:
    cfg = tiny("parallel.tp=2", "train.global_batch_size=32")
    before = cfg.model_dump()
    derived = cfg.validate_for_world(8)
    assert (derived.tp, derived.pp, derived.dp) == (2, 1, 4)
    assert derived.grad_accum_steps == 32 // (4 * 4) == 2
    assert derived.global_batch_size_tokens == 32 * 64
    assert derived.head_dim == 16 and derived.stage_layers == (2,)
    assert derived.padded_vocab_size == 256  # 256 is a multiple of 2 × 128
    assert derived.run_dir == "runs/tiny" and derived.checkpoint_dir == "runs/tiny/checkpoints"
    assert cfg.model_dump() == before and cfg.parallel.dp == "auto"


def test_pipeline_stage_layers_from_a_cli_override() -> None:
    """A list goes through the one override parser as YAML: parallel.pipeline_stage_layers=[3,5]."""
    cfg = tiny("model.num_layers=8", "parallel.pp=2", "parallel.pipeline_stage_layers=[3,5]")
    assert cfg.parallel.pipeline_stage_layers == [3, 5]
    assert cfg.validate_for_world(2).stage_layers == (3, 5)
    assert tiny("model.num_layers=8", "parallel.pp=2").validate_for_world(2).stage_layers == (4, 4)  # even: None
    assert tiny("model.num_layers=5", "parallel.pipeline_stage_layers=[5]").validate_for_world(1).stage_layers == (5,)
    written = tiny("model.num_layers=5", "parallel.pp=2", "parallel.pipeline_stage_layers=[2, 3]")
    assert load_config_text(dump_resolved(written)) == written  # the resolved YAML reads back


def test_a_list_override_is_not_shared_between_merges() -> None:
    """Override values are parsed once and cached (plan merges thousands of layouts): each merge gets its own copy."""
    items = ["data.datasets=[{path: a}]", "data.datasets.0.weight=2.0"]
    first = apply_overrides({}, items)
    second = apply_overrides({}, items[:1])
    assert first["data"]["datasets"] == [{"path": "a", "weight": 2.0}]
    assert second["data"]["datasets"] == [{"path": "a"}]


def load_config_text(text: str) -> Config:
    return parse_config(yaml.safe_load(text))


@pytest.mark.parametrize(
    ("num_layers", "pp", "expected"),
    [(126, 16, [7] + [8] * 14 + [7]), (5, 2, [3, 2]), (5, 3, [2, 2, 1]), (9, 4, [2, 3, 2, 2]), (10, 4, [2, 3, 3, 2]),
     (8, 4, [2, 2, 2, 2]), (7, 7, [1] * 7), (3, 1, [3])],
)
def test_balanced_stage_layers_lighten_the_end_stages_first(num_layers: int, pp: int, expected: list[int]) -> None:
    got = balanced_stage_layers(num_layers, pp)
    assert got == expected and sum(got) == num_layers and max(got) - min(got) <= 1


@pytest.mark.parametrize(
    ("world", "overrides", "expected"),
    [
        (2, ["model.num_layers=5", "parallel.pp=2"],
         "parallel.pp (2) must divide model.num_layers (5), or set the decoder layers of each stage: "
         "parallel.pipeline_stage_layers=[3,2] (balanced: fewer on the first and last stages, which also hold the "
         "embedding and lm_head); or choose pp in {1, 5}"),
        (2, ["model.num_layers=5", "parallel.pp=2", "parallel.pipeline_stage_layers=[1,1,3]"],
         "parallel.pipeline_stage_layers ([1,1,3]) has 3 entries but parallel.pp is 2: give one per stage, e.g. "
         "parallel.pipeline_stage_layers=[3,2]"),
        (2, ["model.num_layers=5", "parallel.pp=2", "parallel.pipeline_stage_layers=[2,2]"],
         "parallel.pipeline_stage_layers ([2,2]) sums to 4 but model.num_layers is 5: the entries must add up to it, "
         "e.g. parallel.pipeline_stage_layers=[3,2]"),
        (3, ["model.num_layers=5", "parallel.pp=3", "parallel.pipeline_stage_layers=[0,3,2]"],
         "parallel.pipeline_stage_layers ([0,3,2]): every stage needs at least 1 decoder layer (stage 0 has 0): e.g. "
         "parallel.pipeline_stage_layers=[2,2,1]"),
        (1, ["model.num_layers=5", "parallel.pipeline_stage_layers=[2,3]"],
         "parallel.pipeline_stage_layers ([2,3]) needs parallel.pp > 1 (got 1; one stage holds all 5 layers): remove "
         "it, or set parallel.pp=2 to split the model over 2 stages"),
        (1, ["model.num_layers=5", "parallel.pipeline_stage_layers=[4]"],
         "parallel.pipeline_stage_layers ([4]) needs parallel.pp > 1 (got 1; one stage holds all 5 layers)"),
    ],
)
def test_pipeline_stage_layer_problems(world: int, overrides: list[str], expected: str) -> None:
    assert expected in world_error_of(world, *overrides)


def test_pipeline_stage_layers_must_be_whole_numbers() -> None:
    assert "parallel.pipeline_stage_layers.1: Input should be a valid integer" in error_of(
        "model.num_layers=5", "parallel.pp=2", "parallel.pipeline_stage_layers=[2, 3.5]")


def test_explicit_dp_is_accepted_when_it_matches() -> None:
    assert tiny("parallel.dp=4").validate_for_world(4).dp == 4


@pytest.mark.parametrize(
    ("vocab", "tp", "padded"),
    [(256, 1, 256), (250, 1, 256), (32000, 1, 32000), (32000, 8, 32768), (50257, 2, 50432), (1, 4, 512)],
)
def test_padded_vocab_size(vocab: int, tp: int, padded: int) -> None:
    assert padded_vocab_size(vocab, tp) == padded
    assert padded % (tp * 128) == 0 and padded >= vocab


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    for source in SHIPPED:
        cfg = load_config(source, ["optim.lr=2e-4"])
        derived = cfg.validate_for_world(cfg.launch.nodes * cfg.launch.gpus_per_node)
        path = save_resolved(cfg, tmp_path / source.stem / "config.yaml", derived)
        assert load_config(path) == cfg, source.name
        text = path.read_text()
        assert f"#   padded_vocab_size: {derived.padded_vocab_size}" in text
        assert f"#   grad_accum_steps: {derived.grad_accum_steps}" in text
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic write leaves no temp file


def test_dump_without_derived_has_no_derived_block() -> None:
    text = dump_resolved(tiny())
    assert "Derived" not in text and yaml.safe_load(text)["parallel"]["dp"] == "auto"


@pytest.mark.parametrize("source", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates_for_its_stated_cluster(source: Path) -> None:
    cfg = load_config(source)
    derived = cfg.validate_for_world(cfg.launch.nodes * cfg.launch.gpus_per_node)
    assert derived.tp * derived.pp * derived.dp == derived.world_size
    assert derived.micro_batch_size_per_gpu * derived.grad_accum_steps * derived.dp == cfg.train.global_batch_size


def test_import_is_light_and_fast() -> None:
    code = (
        "import sys, time; t = time.perf_counter(); import trainer.config, trainer.estimate, trainer.deepspeed_config; "
        "print(time.perf_counter() - t); print(','.join(m for m in ('torch', 'deepspeed', 'megatron') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    seconds, heavy = out.stdout.splitlines()
    assert heavy == "", f"config path imported {heavy}"
    assert float(seconds) < 1.0
