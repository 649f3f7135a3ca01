"""docs/config.md is generated from trainer/config.py (trainer/config_reference.py): it must be current, name every
key a resolved config has, and carry each field's comment from the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from trainer.config import load_config
from trainer.config_reference import DOC, field_comments, keys, render, type_text

REPO = Path(__file__).resolve().parents[2]


def test_docs_config_md_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/config.md is stale: run `python -m trainer.config_reference --write` and commit it")


def flattened(value: Any, prefix: str = "") -> list[str]:
    """Dotted leaf paths of a dumped config; list entries that are sections become `.N.`."""
    if isinstance(value, dict):
        return [path for key, item in value.items() for path in flattened(item, f"{prefix}{key}.")]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [prefix[:-1], *sorted({p for item in value for p in flattened(item, f"{prefix}N.")})]
    return [prefix[:-1]]


def test_every_key_of_a_resolved_config_is_documented_once() -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["data.synthetic=false", "data.datasets=[{path: d, weight: 2}]"])
    # Optional sections (train.batch_size_rampup, model.rope_scaling) are a leaf while null and their keys once set:
    # both are documented.
    ramped = load_config(REPO / "configs" / "tiny.yaml",
                         ["train.batch_size_rampup={start: 4, increment: 4, samples: 48}",
                          "model.rope_scaling={type: llama3, factor: 8.0}"])
    documented = [key.path for key in keys()]
    assert len(documented) == len(set(documented))
    assert sorted(set(flattened(cfg.model_dump())) | set(flattened(ramped.model_dump()))) == sorted(documented)
    assert all(key.meaning for key in keys()), [key.path for key in keys() if not key.meaning]


def test_comments_above_and_beside_a_field_are_both_its_meaning() -> None:
    from trainer.config import CheckpointConfig, OptimConfig

    optim = field_comments(OptimConfig)
    assert optim["grad_clip"] == "max global grad norm; 0 turns clipping off"  # beside
    assert optim["betas"] == "Adam's beta1, beta2"  # above
    resume = field_comments(CheckpointConfig)["resume"]  # two lines above
    assert resume.startswith("auto: the newest complete checkpoint") and resume.endswith("(or a directory of "
                                                                                         "checkpoints: its newest)")
    assert "init_from" not in resume  # the next field's block is the next field's


def test_types_read_as_a_user_writes_them() -> None:
    by_path = {key.path: key for key in keys()}
    assert by_path["parallel.activation_checkpointing"].type == "none | selective | core_attention | full"
    assert by_path["optim.betas"].type == "list of (float ≥ 0.0, < 1.0), length 2"
    assert by_path["launch.cpus_per_task"].type == "int ≥ 1 or null"
    assert by_path["data.datasets"].type == "list of {path, weight}"
    assert (by_path["train.seq_len"].default, by_path["zero.reduce_bucket_size_elements"].default) == (
        "required", "500_000_000")
    assert type_text(bool) == "bool"
    table_rows = [line for line in DOC.read_text().splitlines() if re.match(r"^\| `", line)]
    assert len(table_rows) == len(by_path)  # one row per key, every row a key
