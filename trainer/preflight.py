"""What `train` settles before it builds the model and the engine (seconds, instead of minutes of start-up lost):

1. the run directory's owner lock (trainer.run_lock): a second job refuses before it writes anything there;
2. a run already at train.max_steps has nothing to do: say so, and how to train longer, and exit 0;
3. the datasets are there and every shard has its manifest size (trainer.data_check);
4. the profiler's directory can be written, when profiling.* is on (else the run would fail after its window).

Rank 0 decides and broadcasts the verdict (one small collective), so every rank stops with the same message and
the same exit code instead of some ranks waiting for a peer that already left.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer import exit_codes
from trainer.checkpoint.layout import read_metadata, shallow_problems
from trainer.checkpoint.load import broadcast_json, candidates, find_resume_checkpoint
from trainer.config import Config
from trainer.data_check import check_datasets
from trainer.run_lock import RunDirBusy, RunDirLock

log = logging.getLogger(__name__)


class PreflightError(RuntimeError):
    """Raised on every rank with rank 0's message; `exit_code` is what the CLI exits with."""

    user_error = True

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class DataCorruptError(RuntimeError):
    """A shard failed its integrity check while training: not a config error (docs/operations.md)."""

    user_error = True
    exit_code = exit_codes.DATA_CORRUPT


@contextlib.contextmanager
def owned_run_dir(run_dir: Path, ctx: Any) -> Iterator[None]:
    """Hold the run directory's lock (rank 0) while the body runs; refuse on every rank if another job has it."""
    lock, refusal = None, ""
    if ctx.rank == 0:
        try:
            lock = RunDirLock.acquire(run_dir)
        except RunDirBusy as err:
            refusal = str(err)
    refusal = broadcast_json(refusal, ctx)
    if refusal:
        raise PreflightError(refusal, exit_codes.CONFIG_ERROR)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def finished_step(cfg: Config) -> int | None:
    """The step of the newest checkpoint that looks complete, if it is already at train.max_steps; else None.
    Reads metadata.json and index.json only (cheap, rank 0): check_before_build then verifies a "finished"."""
    if cfg.checkpoint.resume == "none" or cfg.checkpoint.init_from:
        return None
    target = Path(cfg.checkpoint_dir if cfg.checkpoint.resume == "auto" else cfg.checkpoint.resume)
    for path in candidates(target):
        meta, problems = shallow_problems(path)
        if meta is not None and not problems:
            step = int(meta["step"])
            return step if step >= cfg.train.max_steps else None
    return None


def nothing_to_do_message(cfg: Config, step: int) -> str:
    more = max(2 * cfg.train.max_steps, step + 1)
    return (f"already at train.max_steps={cfg.train.max_steps} (checkpoint step_{step} in {cfg.checkpoint_dir}): "
            f"nothing to do. To train longer, run the same command with train.max_steps={more} (it resumes from "
            f"step_{step}{_schedule_hint(cfg)}); to start over, use another logging.run_dir or "
            f"checkpoint.resume=none")


def _schedule_hint(cfg: Config) -> str:
    if cfg.optim.decay == "constant":
        return ""
    return "; the LR schedule is recomputed for the new length, so a decayed LR rises again: docs/training.md"


def check_before_build(cfg: Config, ctx: Any) -> int | None:
    """Collective. Returns the finished step when there is nothing to train; raises PreflightError on every rank
    when the data is not there or damaged."""
    step = broadcast_json(finished_step(cfg) if ctx.rank == 0 else None, ctx)
    if step is not None and cfg.checkpoint.verify_on_load:
        # Only when the cheap check says "finished": the same checksum pass a resume makes (split over the ranks),
        # so a final checkpoint with a flipped bit is skipped and the run goes on from the one before.
        step = _verified_finished_step(cfg, ctx)
    if step is not None:
        return step  # the data is not checked: a finished run may have moved it
    verdict = broadcast_json(_data_verdict(cfg) or _profile_dir_verdict(cfg) if ctx.rank == 0 else {}, ctx)
    if verdict:
        raise PreflightError(verdict["error"], int(verdict["exit_code"]))
    return None


def _verified_finished_step(cfg: Config, ctx: Any) -> int | None:
    chosen = find_resume_checkpoint(cfg, ctx)  # collective; logs each damaged checkpoint it skips
    if chosen is None:
        return None
    step = int(read_metadata(chosen)["step"])
    return step if step >= cfg.train.max_steps else None


def _data_verdict(cfg: Config) -> dict[str, Any]:
    check = check_datasets(cfg.data, cfg.train.eval_enabled)
    if check.missing_datasets:
        return {"error": check.message(), "exit_code": exit_codes.CONFIG_ERROR}
    if check.bad_shards:
        return {"error": check.message(), "exit_code": exit_codes.DATA_CORRUPT}
    return {}


def _profile_dir_verdict(cfg: Config) -> dict[str, Any]:
    """Rank 0 creates the directory the profiled ranks write into (one filesystem every rank sees, like the run
    directory)."""
    if not cfg.profiling.enabled:
        return {}
    where = Path(cfg.profile_dir)
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as err:
        return {"error": f"profiling directory {where} cannot be written ({type(err).__name__}: {err.strerror}): set "
                         f"profiling.dir to a writable directory every profiled rank sees, or leave it unset for "
                         f"<run_dir>/profile", "exit_code": exit_codes.CONFIG_ERROR}
    return {}


@contextlib.contextmanager
def errors_in_rank_log() -> Iterator[None]:
    """Every error that ends a rank also goes to its logs/rank<N>.log (not only to stderr), and a shard that fails
    its integrity check mid-run becomes DataCorruptError (exit 74) instead of a config error."""
    from data_pipeline.errors import ShardIntegrityError

    try:
        yield
    except ShardIntegrityError as err:
        corrupt = DataCorruptError(f"{err}. Training stopped: copy the dataset again or re-run `pretrain prepare`, "
                                   f"then restart (it resumes from the newest checkpoint)")
        _to_rank_log_files(corrupt, with_traceback=False)
        raise corrupt from err
    except Exception as err:
        _to_rank_log_files(err, with_traceback=not getattr(err, "user_error", False))
        raise


def _to_rank_log_files(err: BaseException, with_traceback: bool) -> None:
    """Write to the rank's log file only: the console handler would print what the CLI prints anyway."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, f"{type(err).__name__}: {err}", None,
                            (type(err), err, err.__traceback__) if with_traceback else None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and getattr(handler, "_pretrain", False):
            handler.handle(record)
            # The CLI prints a whole message only on rank 0 and points the other ranks' one line here.
            with contextlib.suppress(AttributeError):
                err.rank_log_path = handler.baseFilename  # type: ignore[attr-defined]
