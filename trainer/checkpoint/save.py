"""Writing a checkpoint: snapshot → per-rank files → commit by rank 0 (atomic rename, then `latest`, then pruning).

Who writes what: every rank writes the slices it owns into its own safetensors file. A parameter (weights and both
Adam moments) is owned by one DP rank (its position in the parameter list modulo dp), so the DP replicas share the
writing; each TP rank owns its own TP shard, each PP stage its own parameters. No tensor crosses ranks except
through the collective reads under ZeRO (state.FragmentAccess.read_all: DeepSpeed's fragment getters, small
parameters in buckets).

Commit protocol (the same for synchronous and async saves):
  1. rank 0 empties `.step_N.tmp/`; barrier (before any rank writes into it, because rank 0 just recreated it);
  2. snapshot: this rank's owned slices as CPU fp32 tensors (+ RNG; rank 0 also config and trainer state);
  3. each rank writes and fsyncs its files, then atomically drops a marker `.done/rank-R.ok.json` listing them with
     their sha256 and slice offsets;
  4. rank 0 waits for every marker, merges them into index.json, writes metadata.json last, fsyncs, renames
     `.step_N.tmp` → `step_N`, fsyncs the parent, rewrites `latest`, then deletes checkpoints beyond keep_last.
A crash before the rename leaves only a temp dir (ignored, cleaned by the next save); after it, a complete
checkpoint. Synchronous saves agree on success with an all-reduce before rank 0 commits, so every rank raises the
same error together; async saves run steps 3-4 in a thread and agree at the next `wait()`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.checkpoint.io import (
    FileRecord,
    fsync_dir,
    read_json,
    replace_text_atomically,
    write_json,
    write_safetensors,
    write_text,
)
from trainer.checkpoint.layout import (
    CONFIG,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX,
    LATEST,
    MARKERS,
    METADATA,
    TENSOR_KINDS,
    CheckpointError,
    index_problems,
    list_step_dirs,
    list_tmp_dirs,
    marker_file,
    parse_index,
    rng_file,
    shard_file,
    step_dir_name,
    step_of,
    tensor_key,
    tmp_dir_name,
)
from trainer.checkpoint.state import (
    FragmentAccess,
    engine_counters,
    local_shape,
    loss_scaler_state,
    optimizer_access,
    rng_state,
    scheduler_state,
)
from trainer.parallelize import tp_partition_dim

log = logging.getLogger(__name__)
Progress = Callable[[], None]
_MARKER_POLL_S = 0.05


@dataclass
class Snapshot:
    """What one rank writes for one checkpoint; CPU tensors that training no longer touches (async) or that stay
    untouched until the write returns (sync)."""

    step: int
    rank: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor key → owned slice
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)  # tensor key → global shape, dtype, offset
    rng: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] | None = None  # rank 0: metadata.json without "files"
    config_yaml: str | None = None  # rank 0


def take_snapshot(run: Any, step: int, metadata: dict[str, Any] | None, *, copy: bool, progress: Progress,
                  buffers: dict[str, torch.Tensor] | None = None) -> Snapshot:
    """Collective under ZeRO (every DP rank calls the getters for every parameter, in the same order).
    copy: the tensors must not change after this returns (async); `buffers` are reused for those copies."""
    ctx = run.ctx
    access = optimizer_access(run.engine)
    access.prepare_read()
    collective = isinstance(access, FragmentAccess)
    snap = Snapshot(step, ctx.rank, rng=rng_state(), metadata=metadata)
    if metadata is not None:
        from trainer.config import dump_resolved

        snap.config_yaml = dump_resolved(run.cfg, run.derived)
    named = list(run.model.canonical_named_parameters())
    # The last stage's copy of a tied embedding is read like every parameter (collective) but written by nobody:
    # the first stage writes embed_tokens.weight.
    owners = [_owns(i, tp_partition_dim(param) is not None, ctx) and param is not run.model.tied_replica
              for i, (_, param) in enumerate(named)]
    reads = access.read_all([param for _, param in named], owners)
    for (name, param), owner, values in zip(named, owners, reads, strict=True):
        if owner:
            assert values is not None
            _keep(snap, name, param, values, ctx, copy=copy and not collective, buffers=buffers)
        progress()
    return snap


def _owns(position: int, tp_split: bool, ctx: Any) -> bool:
    """Exactly one rank writes each slice: a TP-split parameter has one slice per TP rank, written by one of its DP
    replicas; a replicated one (norms) has a single slice, written by one (TP, DP) pair. Spreading by position
    shares the writing between the replicas."""
    if tp_split:
        return position % ctx.dp == ctx.dp_rank
    return position % (ctx.dp * ctx.tp) == ctx.dp_rank * ctx.tp + ctx.tp_rank


def _keep(snap: Snapshot, name: str, param: torch.Tensor, values: tuple[torch.Tensor, ...], ctx: Any,
          copy: bool, buffers: dict[str, torch.Tensor] | None) -> None:
    shape = local_shape(param)
    dim = tp_partition_dim(param)
    global_shape, offset = list(shape), [0] * len(shape)
    if dim is not None:
        global_shape[dim] *= ctx.tp
        offset[dim] = ctx.tp_rank * shape[dim]
    for kind, value in zip(TENSOR_KINDS, values):
        key = tensor_key(kind, name)
        cpu = value.detach().reshape(shape).to("cpu", torch.float32)
        if copy and cpu.data_ptr() == value.data_ptr():
            # Async: the next optimizer step must not change what is being written. Copying into the previous
            # save's buffer avoids faulting in fresh pages (1.4 GB for 125M: the bulk of the blocked time).
            staged = buffers.get(key) if buffers is not None else None
            cpu = staged.copy_(cpu) if staged is not None and staged.shape == cpu.shape else cpu.clone()
            if buffers is not None:
                buffers[key] = cpu
        snap.tensors[key] = cpu
        snap.slices[key] = {"shape": global_shape, "dtype": "float32", "offset": offset, "slice_shape": list(shape)}


def write_rank_files(snap: Snapshot, tmp: Path, progress: Progress) -> list[FileRecord]:
    """This rank's files in the temp dir, each fsynced, then its marker (atomically: rank 0 may be polling)."""
    records = []
    if snap.tensors:
        records.append(write_safetensors(tmp / shard_file(snap.rank), snap.tensors, tmp,
                                         metadata={"format": "pt", "step": str(snap.step)}))
        progress()
    records.append(write_json(tmp / rng_file(snap.rank), snap.rng, tmp))
    if snap.config_yaml is not None:
        records.append(write_text(tmp / CONFIG, snap.config_yaml, tmp))
    marker = {"rank": snap.rank, "files": {r.path: r.as_json() for r in records},
              "tensors": {key: {**info, "file": shard_file(snap.rank)} for key, info in snap.slices.items()}}
    _write_marker(tmp, marker_file(snap.rank), marker)
    return records


def write_failure_marker(tmp: Path, rank: int, error: BaseException) -> None:
    """Best effort (the disk may be full): tells rank 0 to stop waiting for this rank."""
    try:
        _write_marker(tmp, marker_file(rank, failed=True), {"rank": rank, "error": f"{type(error).__name__}: {error}"})
    except OSError:
        pass


def _write_marker(tmp: Path, name: str, body: dict[str, Any]) -> None:
    staged = tmp / f"{name}.tmp"
    write_json(staged, body, tmp)
    os.replace(staged, tmp / name)


def wait_for_markers(tmp: Path, world_size: int, timeout_s: float, progress: Progress,
                     abort: threading.Event | None = None) -> list[dict[str, Any]]:
    """Rank 0: every rank's marker, or CheckpointError naming the ranks that failed or never finished."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        if abort is not None and abort.is_set():
            raise CheckpointError("another rank failed to write its files")
        failed = [r for r in range(world_size) if (tmp / marker_file(r, failed=True)).exists()]
        if failed:
            reasons = [read_json(tmp / marker_file(r, failed=True))["error"] for r in failed]
            raise CheckpointError(f"rank(s) {failed} failed to write their files: {'; '.join(reasons)}")
        missing = [r for r in range(world_size) if not (tmp / marker_file(r)).exists()]
        if not missing:
            return [read_json(tmp / marker_file(r)) for r in range(world_size)]
        if time.monotonic() > deadline_s:
            raise CheckpointError(f"rank(s) {missing} did not finish writing within checkpoint.commit_timeout_s "
                                  f"({timeout_s:.0f} s): check their logs; raise the timeout for slow filesystems")
        progress()
        time.sleep(_MARKER_POLL_S)


def commit(root: Path, tmp: Path, step: int, markers: list[dict[str, Any]], metadata: dict[str, Any],
           keep_last: int) -> Path:
    """Rank 0: index + metadata (last), fsync, rename into place, `latest`, prune. Returns the checkpoint dir."""
    files: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for marker in markers:
        files.update(marker["files"])
        for key, info in marker["tensors"].items():
            entry = tensors.setdefault(key, {"shape": info["shape"], "dtype": info["dtype"], "slices": []})
            entry["slices"].append({"file": info["file"], "offset": info["offset"], "shape": info["slice_shape"]})
    index = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tensors": dict(sorted(tensors.items()))}
    problems = index_problems(parse_index(index))
    if problems:  # a bug, not a disk problem: never publish a checkpoint that does not tile its tensors
        raise CheckpointError("the ranks' slices do not form complete tensors: " + "; ".join(problems[:5]))
    files[INDEX] = write_json(tmp / INDEX, index, tmp).as_json()
    shutil.rmtree(tmp / MARKERS)
    write_json(tmp / METADATA, {**metadata, "files": dict(sorted(files.items()))}, tmp)
    for sub in {tmp / Path(name).parent for name in files} | {tmp}:
        fsync_dir(sub)  # before the rename: the directory entries of every file are durable too
    final = root / step_dir_name(step)
    replaced = _move_aside(final)
    os.rename(tmp, final)
    fsync_dir(root)
    replace_text_atomically(root / LATEST, final.name + "\n")  # after the rename: `latest` never names a partial dir
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    prune(root, keep_last, newest_step=step)
    return final


def _move_aside(final: Path) -> Path | None:
    """A step directory that already exists (a corrupt one skipped at resume, or one a rollback went behind) is
    replaced by the new save; it is deleted only after the new one is in place."""
    if not final.exists():
        return None
    aside = final.with_name(f".{final.name}.replaced")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(final, aside)
    return aside


def prune(root: Path, keep_last: int, newest_step: int) -> list[Path]:
    """Delete step dirs older than the `keep_last` newest complete ones up to `newest_step` (newer dirs are left:
    a corrupt one is replaced when that step is saved again)."""
    older = [p for p in list_step_dirs(root) if (step_of(p) or 0) <= newest_step]
    complete = [p for p in older if (p / METADATA).is_file()]
    keep = set(complete[:keep_last])
    removed = [p for p in older if p not in keep]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def clean_stale_tmp_dirs(root: Path) -> None:
    for path in list_tmp_dirs(root):
        log.info("removing %s (an unfinished save)", path)
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Metadata


def build_metadata(run: Any, state: Any, extra_state: dict[str, Any], reason: str) -> dict[str, Any]:
    """Rank 0's metadata.json body (without "files"). The loader state comes from rank 0, a first-stage rank: under
    PP only the first and last stages advance their loader. consumed_samples is the loader's position (resume
    continues there); consumed_tokens the tokens trained (TrainState.consumed_tokens), which differ after a
    rollback or checkpoint.allow_data_change."""
    cfg, ctx, engine = run.cfg, run.ctx, run.engine
    loader_state = run.train_loader.state_dict()
    consumed = int(loader_state.get("consumed_samples", 0))
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "step": state.step, "consumed_samples": consumed, "consumed_tokens": state.consumed_tokens,
        "created_unix_s": round(time.time(), 3), "save_reason": reason,
        "topology": {"world_size": ctx.world_size, "tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp,
                     # Informative: loading reshards by parameter name, whatever the split was.
                     "stage_layers": list(run.derived.stage_layers),
                     "zero_stage": cfg.zero.stage, "dtype": cfg.precision.dtype,
                     "vocab_size": cfg.model.vocab_size, "padded_vocab_size": run.derived.padded_vocab_size},
        "software": software_versions(),
        "data": {"fingerprint": _data_fingerprint(run.train_loader), "tokenizer_fingerprint": _tokenizer(run),
                 "loader_state": loader_state},
        "trainer_state": {"adam_step": optimizer_access(engine).adam_step(), "lr_scheduler": scheduler_state(engine),
                          "loss_scaler": loss_scaler_state(engine), "engine": engine_counters(engine),
                          **extra_state},
    }


def _data_fingerprint(loader: Any) -> str:
    fingerprint = getattr(loader, "fingerprint", None)
    if fingerprint is not None:
        return str(fingerprint)
    state = loader.state_dict()
    return f"synthetic:seed={state.get('seed')}:vocab={state.get('vocab_size')}:seq_len={state.get('seq_len')}"


def _tokenizer(run: Any) -> str | None:
    sources = getattr(run.train_loader, "sources", None)
    return sources[0].manifest.tokenizer.fingerprint if sources else None


_SOFTWARE: dict[str, Any] | None = None


def software_versions() -> dict[str, Any]:
    """Versions and the git commit of this checkout (computed once per process)."""
    global _SOFTWARE
    if _SOFTWARE is None:
        import deepspeed
        import megatron.core

        _SOFTWARE = {"python": sys.version.split()[0], "torch": torch.__version__,
                     "deepspeed": deepspeed.__version__, "megatron_core": megatron.core.__version__,
                     **_git_state(Path(__file__).resolve().parents[2])}
    return _SOFTWARE


def _git_state(repo: Path) -> dict[str, Any]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10,
                             check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {"git_sha": None, "git_dirty": None}
    if sha.returncode != 0:
        return {"git_sha": None, "git_dirty": None}  # not a git checkout (an installed wheel)
    return {"git_sha": sha.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}


# ---------------------------------------------------------------------------------------------------------------------
# The saver: one save in flight, sync or async


@dataclass
class _Outcome:
    written: threading.Event = field(default_factory=threading.Event)  # this rank's write phase is over
    abort: threading.Event = field(default_factory=threading.Event)  # another rank failed: rank 0 stops waiting
    write_error: BaseException | None = None
    commit_error: BaseException | None = None  # rank 0 only
    committed: Path | None = None  # rank 0 only


class CheckpointSaver:
    """Saves checkpoints of one run into `root`. Every method is called by every rank, in the same order."""

    def __init__(self, root: Path, ctx: Any, commit_timeout_s: float, keep_last: int, progress: Progress) -> None:
        self.root = root
        self.ctx = ctx
        self.commit_timeout_s = commit_timeout_s
        self.keep_last = keep_last
        self.progress = progress
        self._thread: threading.Thread | None = None
        self._outcome: _Outcome | None = None
        self._pending_step: int | None = None
        self._buffers: dict[str, torch.Tensor] = {}  # async snapshot copies, reused (one save in flight at a time)

    def save(self, run: Any, state: Any, extra_state: dict[str, Any], reason: str, *,
             background: bool) -> Path | None:
        """Write the checkpoint of `state` (a TrainState: its step and consumed tokens). background: return after the
        snapshot (async save; the outcome is agreed at the next `wait`); else return the committed directory (rank 0;
        None elsewhere). Failures raise CheckpointError on every rank."""
        self.wait()  # one save in flight: the previous one must be complete (or reported) first
        step = state.step
        tmp = self.root / tmp_dir_name(step)
        if self.ctx.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            clean_stale_tmp_dirs(self.root)
            tmp.mkdir()
        dist.barrier()  # before any rank writes: rank 0 has just created the empty temp dir
        metadata = build_metadata(run, state, extra_state, reason) if self.ctx.rank == 0 else None
        snap = take_snapshot(run, step, metadata, copy=background, progress=self.progress, buffers=self._buffers)
        self._outcome, self._pending_step = _Outcome(), step
        if background:
            self._thread = threading.Thread(target=self._write_and_commit, args=(snap, tmp, self._outcome),
                                            name=f"checkpoint-save-{step}", daemon=True)
            self._thread.start()
            return None
        self._write(snap, tmp, self._outcome)
        return self.wait(commit=(snap, tmp))

    def _write(self, snap: Snapshot, tmp: Path, outcome: _Outcome) -> None:
        try:
            write_rank_files(snap, tmp, self.progress)
        except Exception as err:  # noqa: BLE001 - agreed on and raised by wait()
            outcome.write_error = err
            write_failure_marker(tmp, snap.rank, err)
        finally:
            outcome.written.set()

    def _write_and_commit(self, snap: Snapshot, tmp: Path, outcome: _Outcome) -> None:
        """Background thread: no collectives here (they would interleave with training's)."""
        self._write(snap, tmp, outcome)
        if snap.rank == 0 and outcome.write_error is None:
            self._commit(snap, tmp, outcome)

    def _commit(self, snap: Snapshot, tmp: Path, outcome: _Outcome) -> None:
        try:
            markers = wait_for_markers(tmp, self.ctx.world_size, self.commit_timeout_s, self.progress, outcome.abort)
            assert snap.metadata is not None
            outcome.committed = commit(self.root, tmp, snap.step, markers, snap.metadata, self.keep_last)
            log.info("checkpoint %s saved", outcome.committed)
        except Exception as err:  # noqa: BLE001 - agreed on and raised by wait()
            outcome.commit_error = err

    def wait(self, commit: tuple[Snapshot, Path] | None = None) -> Path | None:
        """Finish the save in flight (if any) and agree on its outcome; raises CheckpointError on every rank if any
        rank failed. Collective. `commit`: a blocking save's snapshot, committed here by rank 0."""
        outcome = self._outcome
        if outcome is None:
            return None
        outcome.written.wait()
        # Before rank 0 commits (or finishes its wait for the markers): it must not publish a checkpoint another rank
        # failed to write, and must not wait for markers a failed rank (maybe with a full disk) never wrote.
        failed = _failed_ranks(outcome.write_error is None, self.ctx)
        if failed:
            outcome.abort.set()
        elif commit is not None and self.ctx.rank == 0:
            self._commit(*commit, outcome)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        # Rank 0's commit result, to every rank: they raise (or go on) together.
        commit_failed = _failed_ranks(outcome.commit_error is None, self.ctx, src_only=True)
        return self._finish(failed, commit_failed)

    def _finish(self, write_failed: list[int], commit_failed: list[int]) -> Path | None:
        outcome, step = self._outcome, self._pending_step
        self._outcome = self._pending_step = None
        assert outcome is not None and step is not None
        if not write_failed and not commit_failed:
            return outcome.committed
        if self.ctx.rank == 0:
            shutil.rmtree(self.root / tmp_dir_name(step), ignore_errors=True)
        latest = (self.root / LATEST).read_text().strip() if (self.root / LATEST).is_file() else None
        if outcome.write_error is not None:
            cause = f"{type(outcome.write_error).__name__}: {outcome.write_error}"
        elif write_failed:
            cause = f"rank(s) {write_failed} failed to write their files (see logs/rank{write_failed[0]}.log)"
        elif outcome.commit_error is not None:
            cause = f"{type(outcome.commit_error).__name__}: {outcome.commit_error}"
        else:
            cause = "rank 0 failed to commit it (see logs/rank0.log)"
        kept = f"the previous checkpoint {latest} is intact and still `latest`" if latest else "no earlier checkpoint"
        raise CheckpointError(f"checkpoint {step_dir_name(step)} in {self.root} was not saved: {cause}; {kept}. Free "
                              f"space or fix the filesystem (or set checkpoint.dir elsewhere), then restart: resume "
                              f"picks up the newest complete checkpoint")


def _failed_ranks(ok: bool, ctx: Any, src_only: bool = False) -> list[int]:
    """All-reduce of per-rank failure flags (src_only: rank 0's flag, i.e. its commit, broadcast to all)."""
    flags = torch.zeros(ctx.world_size, dtype=torch.int32, device=ctx.device)
    if not ok and (not src_only or ctx.rank == 0):
        flags[ctx.rank] = 1
    dist.all_reduce(flags)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]
