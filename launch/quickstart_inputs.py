"""Which run directory a quickstart may use: its own per input, never one that another input's run already fills.

A quickstart writes tokenizer/, data/ and checkpoints/ into its run directory. Replacing the first two under a
finished run with another input's would leave its checkpoints trained on data that is gone (and the resume would stop
on a data-fingerprint mismatch). So:
- the default run directory follows the input: runs/quickstart for the standard library, runs/quickstart-<name of
  the first --input> otherwise;
- the run directory records what it was made from (quickstart.json: inputs with their sizes and modification times,
  file patterns, corpus cap, vocabulary size, sequence length) before anything is written;
- a run directory that holds another recipe's run (or a run without a record) is refused before anything is touched,
  with the --run-dir to use instead. The same recipe again continues the run (checkpoint.resume=auto).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any



class QuickstartError(RuntimeError):
    user_error = True  # launch/cli.py prints the message (which says what to do) without a traceback


RECORD_FILE = "quickstart.json"
RECORD_VERSION = 1
# What a quickstart writes into its run directory: any of them present means a run is there.
RUN_CONTENTS = ("tokenizer", "data", "checkpoints", "metrics.jsonl")
_COMPRESSED_SUFFIXES = (".gz", ".zst")


def default_run_dir(inputs: tuple[str, ...]) -> Path:
    """runs/quickstart for the standard-library corpus; runs/quickstart-<first input's name> for --input."""
    if not inputs:
        return Path("runs/quickstart")
    name = Path(inputs[0].rstrip("/\\")).name or "input"
    for suffix in _COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    stem = Path(name).stem or name
    return Path("runs") / f"quickstart-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)}"


def recipe(user_inputs: tuple[str, ...], corpus_files: list[str], include_globs: tuple[str, ...],
           corpus_mb: float | None, vocab_size: int, seq_len: int) -> dict[str, Any]:
    """Everything that decides the tokenizer and the shards. --input paths are identified by absolute path, size and
    modification time (a stat each, no hashing: an edited file counts as other input); the standard-library corpus
    by its file count and bytes."""
    if user_inputs:
        described = [_describe_path(Path(path)) for path in user_inputs]
    else:
        described = [{"path": "the Python standard library", "files": len(corpus_files),
                      "bytes": sum(os.path.getsize(path) for path in corpus_files)}]
    return {
        "version": RECORD_VERSION,
        "inputs": described,
        "include_globs": list(include_globs),
        "corpus_mb": corpus_mb,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
    }


def _describe_path(path: Path) -> dict[str, Any]:
    if path.is_file():
        stat = path.stat()
        return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    stats = [os.stat(os.path.join(directory, name)) for directory, _subdirs, names in os.walk(path) for name in names]
    return {"path": str(path.resolve()), "files": len(stats), "bytes": sum(stat.st_size for stat in stats),
            "mtime_ns": max((stat.st_mtime_ns for stat in stats), default=0)}


def claim_run_dir(run_dir: Path, wanted: dict[str, Any], suggested_dir: Path) -> bool:
    """Before anything is written: True when run_dir already holds this recipe's run (continue it), False when it is
    new or empty (the record is written now). Raises when it holds another run."""
    record_path = run_dir / RECORD_FILE
    recorded = _read_record(record_path)
    if recorded == wanted:
        return True
    present = [name for name in RUN_CONTENTS if (run_dir / name).exists()]
    if present:
        what = "a run made from other input" if recorded else "a run this quickstart did not record"
        raise QuickstartError(
            f"{run_dir} already holds {what} ({', '.join(present)}; {_difference(recorded, wanted)}): its tokenizer, "
            f"data and checkpoints would be replaced. Nothing was changed. Choose a directory of its own with "
            f"--run-dir, e.g. --run-dir {suggested_dir}, or delete {run_dir} to start over")
    run_dir.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
    return False


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _difference(recorded: dict[str, Any] | None, wanted: dict[str, Any]) -> str:
    if recorded is None:
        return f"no {RECORD_FILE}"
    changed = [key for key in wanted if recorded.get(key) != wanted[key]]
    if "inputs" in changed and _paths(recorded) == _paths(wanted):
        return "its input has changed since: other size or modification time"
    if "inputs" in changed:
        before = ", ".join(str(entry.get("path", "?")) for entry in recorded.get("inputs", [])[:3])
        return f"it was made from {before or 'unknown input'}"
    return "it was made with other " + ", ".join(changed)


def _paths(record: dict[str, Any]) -> list[str]:
    return [str(entry.get("path")) for entry in record.get("inputs", [])]


def unused_run_dir(base: Path) -> Path:
    """base itself when it is free, else base-2, base-3, ...: a directory to suggest in the refusal."""
    if not base.exists():
        return base
    counter = 2
    while base.with_name(f"{base.name}-{counter}").exists():
        counter += 1
    return base.with_name(f"{base.name}-{counter}")
