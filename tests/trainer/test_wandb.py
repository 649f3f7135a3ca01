"""logging.wandb: the real wandb package in offline mode (no network here), read back from the run file it writes;
and a W&B that cannot start ends every rank at once with what to do, instead of a hang."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
wandb = pytest.importorskip("wandb")  # the dev extra installs it (.ci/run): CI runs these

REPO = Path(__file__).resolve().parents[2]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
BASE = ["--config", "configs/tiny.yaml", "train.log_interval_steps=1", "train.eval_interval_steps=2",
        "checkpoint.save_interval_steps=2", "logging.tensorboard=false", "optim.warmup_steps=1", "logging.wandb=true"]


def pretrain(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    # No W&B login anywhere: a fresh HOME, no key, no mode from the environment.
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("WANDB_")}
    return subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, cwd=REPO,
                          env={**env, "HOME": str(home)}, timeout=300)


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a .wandb run file: a 7-byte header (":W&B", magic, version), then LevelDB's log
    format (32 KiB blocks; records of checksum, length, type; FULL or FIRST/MIDDLE/LAST pieces)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the zero padding at a block's end
            pos += left
            continue
        piece, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = piece if kind in (1, 2) else pending + piece
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history(run_file: Path) -> list[dict[str, Any]]:
    rows = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item if not (item.key or item.nested_key[0]).startswith("_")})
    return rows


def config_keys(run_file: Path) -> dict[str, Any]:
    keys = {}
    for record in wandb_records(run_file):  # the config given to wandb.init is in the run record
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            update = record.run.config.update if kind == "run" else record.config.update
            keys.update({item.key: json.loads(item.value_json) for item in update})
    return keys


def test_offline_run_logs_what_metrics_jsonl_has_and_a_resume_continues_the_same_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", *BASE, "logging.wandb_mode=offline", f"logging.run_dir={run_dir}"]
    first = pretrain([*args, "train.max_steps=4"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (run_file,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    rows = history(run_file)
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["trainer/step"], r["train/loss"]) for r in rows if "train/loss" in r] == \
        [(r["step"], r["loss"]) for r in jsonl if r["kind"] == "train"]
    assert [(r["trainer/step"], r["eval/val_loss"]) for r in rows if "eval/val_loss" in r] == \
        [(r["step"], r["val_loss"]) for r in jsonl if r["kind"] == "eval"]
    assert all("train/tokens_per_s" in r and "train/lr" in r for r in rows if "train/loss" in r)
    config = config_keys(run_file)
    assert config["name"] == "tiny" and config["optim"]["warmup_steps"] == 1

    # Resumed from step_2 (steps 3 and 4 again, then 5 and 6): the same W&B run, and the repeated steps are kept.
    resumed = pretrain([*args, "train.max_steps=6", f"checkpoint.resume={run_dir / 'checkpoints' / 'step_2'}"],
                       tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one per job, both with the run's id: `wandb sync` puts them into one W&B run
    again = [r["trainer/step"] for r in history(files[-1]) if "train/loss" in r]
    assert again == [3, 4, 5, 6]


def test_wandb_that_cannot_start_ends_every_rank_at_once_with_the_fix(tmp_path: Path) -> None:
    """Online without a login: the logging rank's wandb.init fails; the other rank must not wait in its first
    collective for faults.collective_timeout_s (600 s)."""
    start_s = time.monotonic()
    out = pretrain(["launch", "local", "--nproc", "2", *BASE, "train.max_steps=4", f"logging.run_dir={tmp_path / 'r'}"],
                   tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "logging.wandb: W&B did not start" in out.stderr and "logging.wandb_mode=offline" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - start_s < 120
