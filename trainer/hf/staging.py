"""Output directories are written whole or not at all: into a sibling temp directory renamed into place at the end,
so an interrupted conversion never leaves a half directory that transformers (or a resume) would load."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from trainer.hf.errors import HFConversionError


def check_output_dir(target: Path, overwrite: bool, marker: str) -> None:
    """Refuse a non-empty `target` unless overwrite is set *and* it holds `marker` (it is an earlier output of the
    same command): overwrite deletes the old directory, so it must never hit a directory of the user's own."""
    if target.exists() and not target.is_dir():
        raise HFConversionError(f"output {target} exists and is not a directory: choose another output path")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise HFConversionError(f"output directory {target} is not empty: pass overwrite (--overwrite) or choose "
                                f"another directory")
    if not (target / marker).is_file():
        raise HFConversionError(f"output directory {target} is not empty and holds no {marker}, so it is not an "
                                f"earlier output of this command; refusing to replace it: choose another directory")


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield a sibling temp dir; after the block succeeds it replaces `target` (checked by check_output_dir)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)  # only now, when the new output is complete
    os.replace(staging, target)
