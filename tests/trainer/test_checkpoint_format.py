"""trainer.checkpoint without a training run: the file writer, the index and region reads, integrity checks, choosing
a checkpoint offline, compatibility rules, save triggers, and that loading never unpickles anything."""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.checkpoint import io as ckpt_io
from trainer.checkpoint.hooks import SaveSchedule
from trainer.checkpoint.layout import (
    INDEX,
    LATEST,
    METADATA,
    CheckpointCompatibilityError,
    CheckpointError,
    parse_index,
    read_region,
    verify_checkpoint,
)
from trainer.checkpoint.load import check_compatible, read_full_state_dict, resolve_offline
from trainer.checkpoint.save import Snapshot, commit, prune, write_rank_files
from trainer.config import load_config
from trainer.faults import SpikeDetector

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def test_streamed_safetensors_reads_back_with_the_reference_reader(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(4, 2).to(torch.bfloat16), "empty": torch.zeros(0, 3)}
    record = ckpt_io.write_safetensors(tmp_path / "x.safetensors", tensors, tmp_path, metadata={"k": "v"})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    assert record.path == "x.safetensors" and record.bytes == (tmp_path / "x.safetensors").stat().st_size
    assert record.sha256 == ckpt_io.sha256_file(tmp_path / "x.safetensors")


class _OsWithFullDisk:
    """The os module as trainer.checkpoint.io sees it, except that every write fails with ENOSPC."""

    def write(self, fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_a_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt_io, "os", _OsWithFullDisk())
    with pytest.raises(OSError, match="No space left"):
        ckpt_io.write_safetensors(tmp_path / "x.safetensors", {"a": torch.ones(4)}, tmp_path)
    assert not (tmp_path / "x.safetensors").exists()


def _fake_checkpoint(root: Path, step: int, world_size: int = 2, keep_last: int = 3) -> dict[str, torch.Tensor]:
    """A checkpoint as two "TP ranks" would write it: w split along dim 0, n replicated (written by rank 0)."""
    full = {"w": torch.randn(6, 4), "n": torch.randn(4)}
    tmp = root / f".step_{step}.tmp"
    tmp.mkdir(parents=True)
    markers = []
    for rank in range(world_size):
        snap = Snapshot(step, rank, rng={"rank": rank})
        rows = slice(3 * rank, 3 * rank + 3)
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            snap.tensors[f"{kind}/w"] = full["w"][rows].clone()
            snap.slices[f"{kind}/w"] = {"shape": [6, 4], "dtype": "float32", "offset": [3 * rank, 0],
                                        "slice_shape": [3, 4]}
            if rank == 0:
                snap.tensors[f"{kind}/n"] = full["n"].clone()
                snap.slices[f"{kind}/n"] = {"shape": [4], "dtype": "float32", "offset": [0], "slice_shape": [4]}
        if rank == 0:
            snap.config_yaml = TINY.read_text()
        write_rank_files(snap, tmp, progress=lambda: None)
        markers.append(json.loads((tmp / f".done/rank-{rank:05d}.ok.json").read_text()))
    commit(root, tmp, step, markers, {"format": "pretrain-checkpoint", "format_version": 1, "step": step},
           keep_last=keep_last)
    return full


def test_commit_publishes_a_complete_verified_checkpoint_and_latest(tmp_path: Path) -> None:
    full = _fake_checkpoint(tmp_path, step=5)
    ckpt = tmp_path / "step_5"
    assert (tmp_path / LATEST).read_text() == "step_5\n"
    assert verify_checkpoint(ckpt) == []
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir() if p.name != ".latest")
    index = parse_index(json.loads((ckpt / INDEX).read_text()))
    assert [s.offset for s in index["param/w"].slices] == [(0, 0), (3, 0)]
    state, found = read_full_state_dict(tmp_path)
    assert found == ckpt and torch.equal(state["w"], full["w"]) and torch.equal(state["n"], full["n"])


def test_region_reads_cross_slices_and_zero_fill_a_larger_vocabulary(tmp_path: Path) -> None:
    full = _fake_checkpoint(tmp_path, step=1)
    index = parse_index(json.loads((tmp_path / "step_1" / INDEX).read_text()))
    with ckpt_io.tensor_files(tmp_path / "step_1") as files:
        middle = read_region(files, index["param/w"], "param/w", (2, 1), (2, 3))  # rows 2-3 span both slices
        assert torch.equal(middle, full["w"][2:4, 1:4])
        padded = read_region(files, index["param/w"], "param/w", (4, 0), (4, 4))  # rows 6, 7 do not exist: zeros
        assert torch.equal(padded[:2], full["w"][4:6]) and torch.equal(padded[2:], torch.zeros(2, 4))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_shard", "delete_metadata", "bad_metadata_json"])
def test_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path, damage: str) -> None:
    older = _fake_checkpoint(tmp_path, step=2)
    _fake_checkpoint(tmp_path, step=4)
    shard = tmp_path / "step_4" / "shards" / "rank-00001.safetensors"
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "delete_shard":
        shard.unlink()
    elif damage == "delete_metadata":
        (tmp_path / "step_4" / METADATA).unlink()
    else:
        (tmp_path / "step_4" / METADATA).write_text("{not json")
    assert verify_checkpoint(tmp_path / "step_4")  # the problem is found ...
    assert resolve_offline(tmp_path) == tmp_path / "step_2"  # ... and the previous checkpoint is used
    state, _ = read_full_state_dict(tmp_path)
    assert torch.equal(state["w"], older["w"])
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        resolve_offline(tmp_path / "step_4")  # asked for by name: an error, not a silent fallback


def test_keep_last_deletes_only_older_complete_checkpoints(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_3", "step_4"]
    (tmp_path / "step_9").mkdir()  # a newer, incomplete directory is not the pruner's business
    assert prune(tmp_path, keep_last=1, newest_step=4) == [tmp_path / "step_3"]
    assert (tmp_path / "step_9").exists()


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pickle planted in a checkpoint is never executed, and no unpickler runs while loading: pickle.load(s),
    pickle.Unpickler and torch.load all raise if anything calls them."""
    full = _fake_checkpoint(tmp_path, step=3)
    ckpt = tmp_path / "step_3"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    evil = pickle.dumps(Payload())
    (ckpt / "rng" / "evil.pt").write_bytes(evil)  # an extra file: not listed in metadata, never opened
    forbidden = {"pickle.load": pickle, "pickle.loads": pickle, "pickle.Unpickler": pickle, "torch.load": torch}

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a checkpoint load tried to unpickle")

    for dotted, module in forbidden.items():
        monkeypatch.setattr(module, dotted.split(".")[1], refuse)
    state, _ = read_full_state_dict(tmp_path)
    assert torch.equal(state["w"], full["w"])
    shard = ckpt / "shards" / "rank-00000.safetensors"
    shard.write_bytes(evil)  # a shard replaced by a pickle: refused by its checksum, not executed
    with pytest.raises(CheckpointError):
        read_full_state_dict(ckpt)
    assert not marker.exists()


def test_compatibility_names_the_field_and_allows_a_deliberate_data_change() -> None:
    saved = load_config(TINY)
    with pytest.raises(CheckpointCompatibilityError, match=r"model\.hidden_size=64 .* model\.hidden_size=128"):
        check_compatible(saved, load_config(TINY, ["model.hidden_size=128"]))
    with pytest.raises(CheckpointCompatibilityError, match=r"train\.seed.*checkpoint\.allow_data_change=true"):
        check_compatible(saved, load_config(TINY, ["train.seed=7"]))
    changed, notes = check_compatible(saved, load_config(TINY, ["train.seed=7", "checkpoint.allow_data_change=true"]))
    assert changed and notes == []
    changed, notes = check_compatible(saved, load_config(TINY, ["parallel.tp=2", "optim.lr=0.005"]))
    assert not changed and notes == ["optim.lr: 0.01 -> 0.005", "parallel.tp: 1 -> 2"]


def test_save_schedule() -> None:
    schedule = SaveSchedule(interval_steps=10, interval_minutes=0.5, last_save_s=100.0)
    assert schedule.step_due(20) and not schedule.step_due(21)
    assert not schedule.time_due(129.0) and schedule.time_due(130.0)
    assert not SaveSchedule(0, 0.0).step_due(10) and not SaveSchedule(0, 0.0).time_due(1e9)


def test_spike_detector_waits_for_a_full_window() -> None:
    detector = SpikeDetector(window=4)
    for loss in (2.0, 2.1, 1.9, 2.0):
        assert detector.zscore(loss) is None or len(detector.losses) == 4
        detector.add(loss)
    assert detector.zscore(2.05) < 1.0 and detector.zscore(5.0) > 30
