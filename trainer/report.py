"""`pretrain report`: read the metrics.jsonl of one or more run directories, print a summary table and draw the
curves of every run, overlaid, into one PNG.

No torch here: a report runs anywhere a run directory was copied to. matplotlib is imported only to draw, through
its Agg canvas directly (no pyplot, so no global backend state and no display needed).

What trainer.hooks.MetricsHook writes (one JSON object per line, through JsonlSink):
  every train.log_interval_steps and at the last step:
    {"step", "time_s", "kind": "train", "loss", "lr", "grad_norm", "loss_scale", "tokens_per_s", "tflops_per_gpu",
     "mfu", "step_time_s", "data_wait_s", "max_rss_gib" | "max_memory_allocated_gib", "global_batch_size",
     "consumed_tokens", "z_loss" (with a z-loss), and at straggler checks "device_slowdown_max",
     "device_slowdown_rank", "data_wait_share_max", "data_wait_share_rank"}
  after each evaluation:
    {"step", "time_s", "kind": "eval", "val_loss", "val_ppl", "val_loss/<dataset>" (several validation datasets),
     "acc/<task>", "acc_norm/<task>" (train.eval_tasks; a directory of tasks also "acc/<group>/<task>" per task
     and "acc/<group>" for the group)}
`loss` is the mean over the steps since the previous log line; `tokens_per_s`, `step_time_s` and `data_wait_s` cover
the same interval. grad_norm, loss_scale and mfu may be null (no norm computed / no fp16 / CPU or unknown GPU).
The file is appended to, so a resumed run logs the steps after its checkpoint again: the later lines win.
A run's stragglers.jsonl (trainer/stragglers.py), when there is one, becomes the summary row "stragglers (checks)".
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, TextIO

XAxis = Literal["step", "tokens", "time"]
X_AXES: tuple[str, ...] = ("step", "tokens", "time")

Record = dict[str, Any]  # one parsed metrics line, plus "segment" and "elapsed_s" added by load_run

# Keys whose value, when present, must be a number or null; anything else means the line is corrupt.
NUMERIC_KEYS: tuple[str, ...] = (
    "time_s", "loss", "lr", "grad_norm", "loss_scale", "tokens_per_s", "tflops_per_gpu", "mfu", "step_time_s",
    "data_wait_s", "val_loss", "val_ppl", "z_loss", "global_batch_size", "consumed_tokens", "device_slowdown_max",
    "device_slowdown_rank", "data_wait_share_max", "data_wait_share_rank",
)
REQUIRED_KEY = {"train": "loss", "eval": "val_loss"}
MAX_WARNINGS_PER_FILE = 5  # a file cut by a full disk can have thousands of bad lines: name a few, count the rest


class ReportError(Exception):
    user_error = True  # launch/cli.py prints the message (which says what to do) without a traceback


class MalformedLineError(ValueError):
    """One metrics line that cannot be used; read_metrics skips and counts it."""


@dataclass
class RunMetrics:
    run_dir: Path
    config_name: str | None  # `name` in the run's config.yaml
    train: list[Record]  # kind "train", step order, one line per logged step (a resume's repeats removed)
    eval: list[Record]  # kind "eval", likewise
    malformed_lines: list[int]  # 1-based line numbers that were skipped
    restarts: int  # how often the step went back: the run was resumed from an earlier checkpoint
    wall_time_s: float | None  # training time summed over restarts (None: lines without time_s)
    tokens_per_step: int | None  # global batch in tokens
    resumes: list[Resume] = field(default_factory=list)  # one per restart, in order
    description: str = ""  # model, batch, lr from config.yaml: the legend says what the run was, not only its name
    label: str = ""  # legend / table name, unique among the runs of one report (set by load_runs)
    profile_dir: Path | None = None  # where profiling.* writes its windows (trainer/profiling.py)
    stragglers: list[Record] = field(default_factory=list)  # <run_dir>/stragglers.jsonl (trainer/stragglers.py)


@dataclass(frozen=True)
class Resume:
    """Where a restarted process took over: the last step logged before its first line (its checkpoint's step when
    checkpoints land on log steps, as the configs arrange) and the training seconds before it (downtime excluded)."""

    step: int
    elapsed_s: float | None


@dataclass(frozen=True)
class RunSummary:
    label: str
    steps: int | None  # last logged optimizer step
    tokens_seen: int | None
    first_loss: tuple[int, float] | None  # (step, loss)
    last_loss: tuple[int, float] | None
    min_loss: tuple[int, float] | None  # over finite losses
    last_val_loss: tuple[int, float] | None
    last_val_ppl: float | None
    last_val_loss_per_dataset: dict[str, float]  # several validation datasets: each one's, from the last eval line
    last_task_accuracy: dict[str, float]  # "acc/<task>", "acc_norm/<task>" of the last eval line (train.eval_tasks)
    mean_tokens_per_s: float | None  # first log line after each (re)start left out: it includes warm-up
    mean_tflops_per_gpu: float | None  # same lines
    mean_mfu: float | None  # fraction of peak, same lines; None when the run recorded no MFU
    wall_time_s: float | None
    nonfinite_loss_steps: tuple[int, ...]  # logged steps whose loss is NaN or inf
    loss_scale_drops: int | None  # fp16 only: each drop means an overflow, so at least one skipped step
    restarts: int
    malformed_lines: int
    stragglers: dict[str, int] = field(default_factory=dict)  # "rank 3 on gpu-041 (device)" → checks that named it


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def load_runs(paths: list[str | Path], warn: TextIO | None = None) -> list[RunMetrics]:
    runs = [load_run(path, warn) for path in paths]
    _assign_labels(runs)
    return runs


def load_run(path: str | Path, warn: TextIO | None = None) -> RunMetrics:
    run_dir = resolve_run_dir(Path(path))
    records, malformed = read_metrics(run_dir / "metrics.jsonl", warn)
    segments = _split_segments(records)
    wall_time_s = _add_elapsed_s(segments)
    train, evals = _latest_per_step(segments)
    config = _read_config(run_dir / "config.yaml", sys.stderr if warn is None else warn)
    resumes = _resumes(segments)
    return RunMetrics(
        run_dir=run_dir,
        config_name=config.get("name") if isinstance(config.get("name"), str) else None,
        train=train,
        eval=evals,
        malformed_lines=malformed,
        restarts=len(segments) - 1,
        wall_time_s=wall_time_s,
        tokens_per_step=_tokens_per_step(train, config),
        resumes=resumes,
        description=_describe(config, train, len(resumes)),
        profile_dir=_profile_dir(config, run_dir),
        stragglers=_read_stragglers(run_dir / "stragglers.jsonl"),
    )


def _read_stragglers(path: Path) -> list[Record]:
    """The straggler check's records; a torn or foreign line is passed over (they only inform the summary)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and {"rank", "node"} <= record.keys():
            records.append(record)
    return records


def _profile_dir(config: dict[str, Any], run_dir: Path) -> Path:
    """profiling.dir of the run's config when set and still there, else <run_dir>/profile (the default, and where a
    copied run directory keeps it)."""
    profiling = config.get("profiling")
    configured = profiling.get("dir") if isinstance(profiling, dict) else None
    return Path(configured) if isinstance(configured, str) and Path(configured).is_dir() else run_dir / "profile"


def resolve_run_dir(path: Path) -> Path:
    if path.is_file() and path.name == "metrics.jsonl":
        return path.parent  # the file itself was given: accept it
    if not path.exists():
        raise ReportError(f"run directory {path} does not exist: pass the directory a run wrote "
                          f"(logging.run_dir, default runs/<config name>), e.g. `pretrain report runs/tiny`")
    if not path.is_dir():
        raise ReportError(f"{path} is not a run directory: pass the directory that holds metrics.jsonl")
    if not (path / "metrics.jsonl").is_file():
        raise ReportError(f"{path} has no metrics.jsonl: has this run logged a step yet? metrics are written every "
                          f"train.log_interval_steps (and only with logging.jsonl: true)")
    return path


def read_metrics(path: Path, warn: TextIO | None = None) -> tuple[list[Record], list[int]]:
    """Parsed lines in file order and the line numbers of malformed ones (skipped with a warning: a run killed
    mid-write leaves a torn last line, which must not hide everything logged before it)."""
    warn = sys.stderr if warn is None else warn
    records: list[Record] = []
    malformed: list[int] = []
    with path.open(encoding="utf-8", errors="replace") as file:
        for line_no, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                records.append(parse_record(line))
            except ValueError as err:  # json.JSONDecodeError and MalformedLineError
                malformed.append(line_no)
                if len(malformed) <= MAX_WARNINGS_PER_FILE:
                    print(f"warning: {path}:{line_no}: skipped malformed line ({err})", file=warn)
    if len(malformed) > MAX_WARNINGS_PER_FILE:
        print(f"warning: {path}: {len(malformed) - MAX_WARNINGS_PER_FILE} more malformed lines skipped", file=warn)
    if not records:
        raise _no_records_error(path, len(malformed))
    return records, malformed


def _no_records_error(path: Path, malformed: int) -> ReportError:
    if malformed:
        return ReportError(f"{path}: none of its {malformed} lines is a metrics record (JSON objects with 'step' "
                           f"and 'kind'): is it a metrics.jsonl written by `pretrain train`?")
    return ReportError(f"{path} is empty: the run has not logged a step yet; the first line is written after "
                       f"train.log_interval_steps steps")


def parse_record(line: str) -> Record:
    record = json.loads(line)  # NaN and Infinity parse: json.dumps writes a diverged loss that way
    if not isinstance(record, dict):
        raise MalformedLineError("not a JSON object")
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise MalformedLineError(f"'step' must be a non-negative integer, got {step!r}")
    kind = record.get("kind")
    if kind not in REQUIRED_KEY:
        raise MalformedLineError(f"'kind' must be 'train' or 'eval', got {kind!r}")
    for key in NUMERIC_KEYS:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise MalformedLineError(f"{key!r} must be a number or null, got {value!r}")
    if record.get(REQUIRED_KEY[kind]) is None:
        raise MalformedLineError(f"a {kind} line needs {REQUIRED_KEY[kind]!r}")
    return record


def _split_segments(records: list[Record]) -> list[list[Record]]:
    """One segment per process lifetime. A resumed run restarts from its checkpoint's step, so a step below the
    segment's last one (or a train step logged twice) starts a new segment. Tags each record with its segment."""
    segments: list[list[Record]] = [[]]
    last_step, last_train_step = -1, -1
    for record in records:
        step = record["step"]
        if segments[-1] and (step < last_step or (record["kind"] == "train" and step == last_train_step)):
            segments.append([])
            last_step, last_train_step = -1, -1
        record["segment"] = len(segments) - 1
        segments[-1].append(record)
        last_step = max(last_step, step)
        if record["kind"] == "train":
            last_train_step = step
    return segments


def _add_elapsed_s(segments: list[list[Record]]) -> float | None:
    """Sets record["elapsed_s"]: seconds of training before the line was written, counting each segment from its
    first step (start-up before it is not in the file) and not counting the gap between a crash and its resume.
    Returns the total, or None when a line has no time_s."""
    if any(record.get("time_s") is None for segment in segments for record in segment):
        return None
    offset_s = 0.0
    earlier_train_steps: list[int] = []
    for segment in segments:
        start_s = _segment_start_s(segment, earlier_train_steps)
        for record in segment:
            record["elapsed_s"] = offset_s + record["time_s"] - start_s
        offset_s = segment[-1]["elapsed_s"]
        earlier_train_steps += [record["step"] for record in segment if record["kind"] == "train"]
    return offset_s


def _segment_start_s(segment: list[Record], earlier_train_steps: list[int]) -> float:
    """A segment's first train line is written one log interval after its first step began: step back by that
    interval. The interval starts at the last step logged before (0 for a fresh run; the checkpoint's step for a
    resume, as long as checkpoints land on log steps, which the configs arrange)."""
    first_train = next((record for record in segment if record["kind"] == "train"), None)
    if first_train is None or first_train.get("step_time_s") is None:
        return segment[0]["time_s"]
    previous_step = max((step for step in earlier_train_steps if step < first_train["step"]), default=0)
    return first_train["time_s"] - first_train["step_time_s"] * (first_train["step"] - previous_step)


def _resumes(segments: list[list[Record]]) -> list[Resume]:
    resumes = []
    for previous, segment in pairwise(segments):
        first_train = next((record["step"] for record in segment if record["kind"] == "train"), segment[0]["step"])
        earlier = [record["step"] for record in previous if record["kind"] == "train" and record["step"] < first_train]
        resumes.append(Resume(max(earlier, default=0), previous[-1].get("elapsed_s")))
    return resumes


def _latest_per_step(segments: list[list[Record]]) -> tuple[list[Record], list[Record]]:
    """Lines of a resumed segment supersede the earlier segments' lines from its first step on."""
    train: list[Record] = []
    evals: list[Record] = []
    for segment in segments:
        first_step = segment[0]["step"]
        train = [record for record in train if record["step"] < first_step]
        evals = [record for record in evals if record["step"] < first_step]
        train += [record for record in segment if record["kind"] == "train"]
        evals += [record for record in segment if record["kind"] == "eval"]
    return train, evals


def _read_config(path: Path, warn: TextIO) -> dict[str, Any]:
    """The resolved config.yaml beside the metrics, or {} (a bare copied metrics.jsonl still gets a report)."""
    if not path.is_file():
        return {}
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        print(f"warning: {path}: unreadable ({err}); the run is named after its directory", file=warn)
        return {}
    return config if isinstance(config, dict) else {}


def _tokens_per_step(train: list[Record], config: dict[str, Any]) -> int | None:
    """Global batch in tokens: train.global_batch_size × train.seq_len of the resolved config.yaml (exact integers).
    Without config.yaml (a copied metrics.jsonl), from the metrics: the hook writes tokens_per_s = steps × batch
    tokens / interval_s and step_time_s = interval_s / steps, so their product is the batch in tokens."""
    train_cfg = config.get("train")
    if isinstance(train_cfg, dict):
        batch, seq_len = train_cfg.get("global_batch_size"), train_cfg.get("seq_len")
        if isinstance(batch, int) and isinstance(seq_len, int):
            return batch * seq_len
    for record in train:
        tokens_per_s, step_time_s = record.get("tokens_per_s"), record.get("step_time_s")
        if tokens_per_s and step_time_s and math.isfinite(tokens_per_s * step_time_s):
            return round(tokens_per_s * step_time_s)
    return None


def _describe(config: dict[str, Any], train: list[Record], restarts: int) -> str:
    """'4 layers × 128 hidden, batch 16 × 128 tokens, lr 0.003, 300 steps, resumed 1×' from what is recorded."""
    model, train_cfg, optim = (config.get(key) if isinstance(config.get(key), dict) else {}
                               for key in ("model", "train", "optim"))
    parts = []
    if model.get("num_layers") and model.get("hidden_size"):
        parts.append(f"{model['num_layers']} layers × {model['hidden_size']} hidden")
    if train_cfg.get("global_batch_size") and train_cfg.get("seq_len"):
        parts.append(f"batch {train_cfg['global_batch_size']} × {train_cfg['seq_len']} tokens")
    if isinstance(optim.get("lr"), (int, float)):
        parts.append(f"lr {optim['lr']:g}")
    if train:
        parts.append(f"{train[-1]['step']:,} steps")
    if restarts:
        parts.append(f"resumed {restarts}×")
    return ", ".join(parts)


def _assign_labels(runs: list[RunMetrics]) -> None:
    """'<config name> (<dir name>)', or the full path where two runs would otherwise share a label."""
    def short(run: RunMetrics) -> str:
        dir_name = run.run_dir.name or str(run.run_dir)
        if run.config_name and run.config_name != dir_name:
            return f"{run.config_name} ({dir_name})"
        return dir_name

    labels = [short(run) for run in runs]
    for run, label in zip(runs, labels):
        run.label = label if labels.count(label) == 1 else str(run.run_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Summary


def summarize(run: RunMetrics) -> RunSummary:
    losses = [(record["step"], float(record["loss"])) for record in run.train]
    finite_losses = [point for point in losses if math.isfinite(point[1])]
    last_eval = run.eval[-1] if run.eval else None
    last_step = run.train[-1]["step"] if run.train else None
    steady = _steady_train_records(run.train)
    return RunSummary(
        label=run.label,
        steps=last_step,
        tokens_seen=_tokens_at(run, run.train[-1]) if run.train else None,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        min_loss=min(finite_losses, key=lambda point: point[1]) if finite_losses else None,
        last_val_loss=None if last_eval is None else (last_eval["step"], float(last_eval["val_loss"])),
        last_val_ppl=None if last_eval is None else _perplexity(last_eval),
        last_val_loss_per_dataset={} if last_eval is None else {
            key.removeprefix("val_loss/"): float(value) for key, value in last_eval.items()
            if key.startswith("val_loss/") and isinstance(value, (int, float))},
        last_task_accuracy={} if last_eval is None else {
            key: float(value) for key, value in last_eval.items()
            if key.startswith(("acc/", "acc_norm/")) and not is_group_member(key.partition("/")[2])
            and isinstance(value, (int, float))},
        mean_tokens_per_s=_mean(steady, "tokens_per_s"),
        mean_tflops_per_gpu=_mean(steady, "tflops_per_gpu"),
        mean_mfu=_mean(steady, "mfu"),
        wall_time_s=run.wall_time_s,
        nonfinite_loss_steps=tuple(step for step, loss in losses if not math.isfinite(loss)),
        loss_scale_drops=_loss_scale_drops(run.train),
        restarts=run.restarts,
        malformed_lines=len(run.malformed_lines),
        stragglers=_straggler_counts(run.stragglers),
    )


def _straggler_counts(records: list[Record]) -> dict[str, int]:
    """How many checks named each straggler (a rank, its node and why), most named first."""
    counts: dict[str, int] = {}
    for record in records:
        name = f"rank {record['rank']} on {record['node']} ({record.get('kind', 'device')})"
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def _steady_train_records(train: list[Record]) -> list[Record]:
    """Train lines without each segment's first one, whose interval holds warm-up (allocator, caches, first
    collectives) and would bias throughput low. A run with one line per segment keeps them all."""
    first_of_segment: set[int] = set()
    steady = []
    for record in train:
        if record["segment"] in first_of_segment:
            steady.append(record)
        first_of_segment.add(record["segment"])
    return steady or train


def _mean(records: list[Record], key: str) -> float | None:
    values = [record[key] for record in records if record.get(key) is not None and math.isfinite(record[key])]
    return sum(values) / len(values) if values else None


def _perplexity(record: Record) -> float:
    if record.get("val_ppl") is not None:
        return float(record["val_ppl"])
    return math.exp(record["val_loss"]) if record["val_loss"] < 700 else math.inf  # exp overflows past ~709


def _loss_scale_drops(train: list[Record]) -> int | None:
    scales = [record["loss_scale"] for record in train if record.get("loss_scale") is not None]
    if not scales:
        return None  # bf16 / fp32: no loss scaling, no overflow-skipped steps
    return sum(1 for before, after in pairwise(scales) if after < before)


def format_summary_table(summaries: list[RunSummary]) -> str:
    """One column per run, one row per quantity; rows that no run has (MFU on CPU, fp16 drops) are left out."""
    rows: list[tuple[str, list[str]]] = [
        ("run", [s.label for s in summaries]),
        ("steps", [_fmt(s.steps, "{:,}") for s in summaries]),
        ("tokens seen", [_fmt_tokens(s.tokens_seen) for s in summaries]),
        ("first loss", [_fmt_at_step(s.first_loss) for s in summaries]),
        ("last loss", [_fmt_at_step(s.last_loss) for s in summaries]),
        ("min loss", [_fmt_at_step(s.min_loss) for s in summaries]),
        ("last val loss", [_fmt_at_step(s.last_val_loss) for s in summaries]),
        ("last val perplexity", [_fmt(s.last_val_ppl, "{:.2f}") for s in summaries]),
        *_per_dataset_val_rows(summaries),
        *[(f"  {key}", [_fmt(s.last_task_accuracy.get(key), "{:.4f}") for s in summaries])
          for key in sorted({key for s in summaries for key in s.last_task_accuracy})],
        ("mean tokens/s", [_fmt(s.mean_tokens_per_s, "{:,.0f}") for s in summaries]),
        ("mean TFLOP/s per GPU", [_fmt_3_digits(s.mean_tflops_per_gpu) for s in summaries]),
    ]
    if any(s.mean_mfu is not None for s in summaries):
        mfu_percent = [None if s.mean_mfu is None else 100 * s.mean_mfu for s in summaries]
        rows.append(("mean MFU", [_fmt(value, "{:.1f}%") for value in mfu_percent]))
    rows.append(("wall time (h:mm:ss)", [_fmt_duration(s.wall_time_s) for s in summaries]))
    rows.append(("NaN/inf loss steps", [_fmt_steps(s.nonfinite_loss_steps) for s in summaries]))
    if any(s.loss_scale_drops is not None for s in summaries):
        rows.append(("fp16 loss-scale drops", [_fmt(s.loss_scale_drops, "{}") for s in summaries]))
    if any(s.restarts for s in summaries):
        rows.append(("restarts (resumed)", [str(s.restarts) for s in summaries]))
    if any(s.malformed_lines for s in summaries):
        rows.append(("malformed lines skipped", [str(s.malformed_lines) for s in summaries]))
    if any(s.stragglers for s in summaries):
        rows.append(("stragglers (checks)", [_fmt_stragglers(s.stragglers) for s in summaries]))
    return _render_table(rows)


def dataset_labels(names: list[str]) -> list[str]:
    """Short names for validation datasets logged by their configured paths: each path's last part when those are
    unique, else the paths."""
    short = [Path(name).name or name for name in names]
    return short if len(set(short)) == len(short) else names


def _per_dataset_val_rows(summaries: list[RunSummary]) -> list[tuple[str, list[str]]]:
    """One row per validation dataset any run logged, named by the dataset directory's last part when those are
    unique (the logged names are the configured paths)."""
    names = sorted({name for s in summaries for name in s.last_val_loss_per_dataset})
    labels = dataset_labels(names)
    return [(f"  val loss: {label}", [_fmt(s.last_val_loss_per_dataset.get(name), "{:.4f}") for s in summaries])
            for name, label in zip(names, labels, strict=True)]


def _render_table(rows: list[tuple[str, list[str]]]) -> str:
    name_width = max(len(name) for name, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(rows[0][1]))]
    lines = []
    for name, cells in rows:
        lines.append("  ".join([name.ljust(name_width)] + [cell.rjust(width) for cell, width in zip(cells, widths)]))
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _fmt_stragglers(counts: dict[str, int], shown: int = 2) -> str:
    """The most named stragglers with their check counts: `rank 1 on n1 (device) ×3`, then how many more."""
    if not counts:
        return "-"
    named = ", ".join(f"{name} ×{count}" for name, count in list(counts.items())[:shown])
    return named + (f", +{len(counts) - shown} more" if len(counts) > shown else "")


def _fmt_3_digits(value: float | None) -> str:
    """Three significant digits without exponents: 2,934 and 0.0166, not 2.93e+03."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _fmt_at_step(point: tuple[int, float] | None) -> str:
    return "-" if point is None else f"{point[1]:.4f} @ step {point[0]:,}"


def _fmt_tokens(tokens: int | None) -> str:
    return "-" if tokens is None else f"{tokens:,} ({_si(tokens)})"


def _fmt_steps(steps: tuple[int, ...]) -> str:
    if not steps:
        return "0"
    shown = ", ".join(str(step) for step in steps[:5])
    return f"{len(steps)} (at {shown}{', ...' if len(steps) > 5 else ''})"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _si(value: float) -> str:
    """61440 -> '61.4K'; the suffixes LLM people use for token counts (B, not G)."""
    for divisor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= divisor:
            return f"{value / divisor:.3g}{suffix}"
    return f"{value:.3g}"


# ---------------------------------------------------------------------------------------------------------------------
# Plot


@dataclass(frozen=True)
class Panel:
    key: str
    title: str
    ylabel: str
    scale: float = 1.0  # plotted value = logged value × scale (fraction → %, s → ms)
    log_y: bool = False
    log_base: int = 10  # 2 for the fp16 loss scale, which DeepSpeed halves and doubles
    si_ticks: bool = False  # 30000 -> 30K
    records: Literal["train", "eval"] = "train"  # the lines the key is read from


# Drawn in this order, each only when some run logged its key (mfu: GPU with a known peak; loss_scale: fp16).
PANELS: tuple[Panel, ...] = (
    Panel("lr", "Learning rate", "learning rate"),
    Panel("grad_norm", "Gradient norm (before clipping)", "global L2 norm (log scale)", log_y=True),
    Panel("tokens_per_s", "Throughput", "tokens/s (all GPUs)", si_ticks=True),
    Panel("tflops_per_gpu", "Model FLOPs throughput", "TFLOP/s per GPU"),
    Panel("mfu", "Model FLOPs utilization", "MFU (% of bf16 peak)", scale=100.0),
    Panel("loss_scale", "fp16 loss scale (drop = skipped step)", "loss scale (log₂ scale)", log_y=True,
          log_base=2),
    Panel("data_wait_s", "Data loader wait", "wait (ms per step)", scale=1000.0),
    Panel("z_loss", "z-loss (weighted, not in loss)", "weight × mean (log Z)²", log_y=True),
)
PANEL_COLUMNS = 3


@dataclass(frozen=True)
class XScale:
    label: str
    divisor: float  # axis value = raw value / divisor (seconds → minutes)


def plot_runs(runs: list[RunMetrics], output: Path, *, smooth_points: int = 1, x_axis: XAxis = "step") -> Path:
    import logging

    # matplotlib logs the one-time build of its font cache at INFO; in a process whose root logger is at INFO (the
    # quickstart, after training) that line would reach the console. Left alone when someone set a level.
    if logging.getLogger("matplotlib").level == logging.NOTSET:
        logging.getLogger("matplotlib").setLevel(logging.WARNING)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x_scale = _x_scale(runs, x_axis)
    panels = drawn_panels(runs)
    rows = math.ceil((len(panels) + 1) / PANEL_COLUMNS)  # + 1: the loss panel
    figure = Figure(figsize=(6.0 * PANEL_COLUMNS, 4.2 * rows + 0.8), layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas renders without a display, whatever matplotlib's default backend is
    axes = figure.subplots(rows, PANEL_COLUMNS, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    _draw_loss(axes[0], runs, colors, smooth_points, x_axis, x_scale)
    for ax, panel in zip(axes[1:], panels):
        _draw_panel(ax, runs, colors, panel, x_axis, x_scale)
    for ax in axes[len(panels) + 1:]:
        ax.set_visible(False)
    _decorate(figure, axes[: len(panels) + 1], runs, colors, x_axis, x_scale)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    return output


def _x_scale(runs: list[RunMetrics], x_axis: XAxis) -> XScale:
    if x_axis == "step":
        return XScale("optimizer step", 1.0)
    for run in runs:
        if x_axis == "tokens" and run.tokens_per_step is None:
            raise ReportError(f"--x tokens: {run.run_dir} records no batch size (tokens_per_s and step_time_s in "
                              f"metrics.jsonl, or train.global_batch_size and train.seq_len in config.yaml); "
                              f"use --x step")
        if x_axis == "time" and run.wall_time_s is None:
            raise ReportError(f"--x time: {run.run_dir}/metrics.jsonl has lines without time_s; use --x step")
    if x_axis == "tokens":
        return XScale("tokens seen", 1.0)  # tick labels carry K/M/B
    longest_s = max(run.wall_time_s or 0.0 for run in runs)
    if longest_s >= 2 * 3600:
        return XScale("wall time (h)", 3600.0)
    return XScale("wall time (min)", 60.0) if longest_s >= 120 else XScale("wall time (s)", 1.0)


def _x_values(run: RunMetrics, records: list[Record], x_axis: XAxis, x_scale: XScale) -> list[float]:
    if x_axis == "tokens":
        return [float(_tokens_at(run, record) or 0) for record in records]  # _x_scale checked that it is known
    if x_axis == "time":
        return [record["elapsed_s"] / x_scale.divisor for record in records]
    return [float(record["step"]) for record in records]


def _tokens_at(run: RunMetrics, record: Record) -> int | None:
    """Training tokens at a record: logged (`consumed_tokens`, exact through a batch-size rampup), else step ×
    the batch (metrics written before it was logged), else None."""
    if isinstance(record.get("consumed_tokens"), int):
        return int(record["consumed_tokens"])
    return None if run.tokens_per_step is None else record["step"] * run.tokens_per_step


def _has_values(records: list[Record], key: str) -> bool:
    return any(record.get(key) is not None for record in records)


def _values(records: list[Record], key: str, scale: float = 1.0) -> list[float]:
    """null becomes NaN, which matplotlib draws as a gap in the line."""
    return [math.nan if record.get(key) is None else record[key] * scale for record in records]


def smooth(values: list[float], window_points: int) -> list[float]:
    """Trailing mean over the last `window_points` log points, ignoring non-finite values (one NaN would otherwise
    blank the whole window); trailing, so the last point shows the current state rather than a lookahead."""
    smoothed = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - window_points + 1): i + 1] if math.isfinite(v)]
        smoothed.append(sum(window) / len(window) if window else math.nan)
    return smoothed


def _draw_loss(ax: Any, runs: list[RunMetrics], colors: list[str], smooth_points: int, x_axis: XAxis,
               x_scale: XScale) -> None:
    for run, color in zip(runs, colors):
        x_train = _x_values(run, run.train, x_axis, x_scale)
        losses = _values(run.train, "loss")
        if smooth_points > 1:
            ax.plot(x_train, losses, color=color, alpha=0.3, linewidth=1.0)
            ax.plot(x_train, smooth(losses, smooth_points), color=color, linewidth=1.8)
        else:
            ax.plot(x_train, losses, color=color, linewidth=1.8)
        if run.eval:
            x_eval = _x_values(run, run.eval, x_axis, x_scale)
            ax.plot(x_eval, _values(run.eval, "val_loss"), color=color, linestyle="--", linewidth=1.0, marker="o",
                    markersize=5)
            for key, marker in zip(validation_datasets(runs), DATASET_MARKERS):
                if _has_values(run.eval, key):
                    ax.plot(x_eval, _values(run.eval, key), color=color, linestyle=":", linewidth=0.8,
                            marker=marker, markersize=4)
        _mark_nonfinite(ax, [x for x, loss in zip(x_train, losses) if not math.isfinite(loss)], color)
    ax.set_title("Loss" + (f" (train smoothed over {smooth_points} log points)" if smooth_points > 1 else ""))
    ax.set_ylabel("cross-entropy (nats/token)")
    any_nonfinite = any(not math.isfinite(loss) for run in runs for loss in _values(run.train, "loss"))
    any_resume = any(run.resumes for run in runs)
    handles = _loss_style_handles(smooth_points, any_nonfinite, any_resume) + _dataset_handles(runs)
    ax.legend(handles=handles, loc="upper right", fontsize="small")


# Each validation dataset of a mixture (val_loss/<dataset>) gets a marker, the same in every run.
DATASET_MARKERS = ("s", "^", "v", "D", "P", "X", "*", "h")


def validation_datasets(runs: list[RunMetrics]) -> list[str]:
    """The val_loss/<dataset> keys any run logged, sorted; at most one per marker (the summary table has them all)."""
    keys = sorted({key for run in runs for record in run.eval for key in record if key.startswith("val_loss/")})
    return keys[:len(DATASET_MARKERS)]


def _dataset_handles(runs: list[RunMetrics]) -> list[Any]:
    from matplotlib.lines import Line2D

    names = dataset_labels([key.removeprefix("val_loss/") for key in validation_datasets(runs)])
    return [Line2D([], [], color="0.3", linestyle=":", marker=marker, markersize=4, label=f"validation: {name}")
            for name, marker in zip(names, DATASET_MARKERS)]


def _mark_nonfinite(ax: Any, x_values: list[float], color: str) -> None:
    """A NaN/inf loss is only a gap in the line, easy to miss: mark it with an × along the bottom edge."""
    if x_values:
        ax.plot(x_values, [0.03] * len(x_values), transform=ax.get_xaxis_transform(), linestyle="none", marker="x",
                markersize=9, markeredgewidth=2, color=color)


def _mark_resumes(ax: Any, run: RunMetrics, color: str, x_axis: XAxis, x_scale: XScale) -> None:
    """A dotted vertical line where a restarted process took over: a kink or a jump in a curve there is the resume
    (a different node, a changed layout, a data-order boundary), not the model."""
    for resume in run.resumes:
        if x_axis == "time" and resume.elapsed_s is None:
            continue
        at_step = next((r for r in run.train if r["step"] == resume.step), {"step": resume.step})
        x = {"step": float(resume.step), "tokens": float(_tokens_at(run, at_step) or 0),
             "time": (resume.elapsed_s or 0.0) / x_scale.divisor}[x_axis]
        ax.axvline(x, color=color, linestyle=":", linewidth=1.2, alpha=0.8)


def _loss_style_handles(smooth_points: int, any_nonfinite: bool, any_resume: bool = False) -> list[Any]:
    """A legend of line styles (the run colours are in the figure legend)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.3", linewidth=1.8,
                      label="train" + (f" (mean of {smooth_points} logs)" if smooth_points > 1 else ""))]
    if smooth_points > 1:
        handles.append(Line2D([], [], color="0.3", alpha=0.3, label="train (raw)"))
    handles.append(Line2D([], [], color="0.3", linestyle="--", marker="o", markersize=5, label="validation"))
    if any_nonfinite:
        handles.append(Line2D([], [], color="0.3", linestyle="none", marker="x", markersize=8, markeredgewidth=2,
                              label="NaN/inf train loss"))
    if any_resume:
        handles.append(Line2D([], [], color="0.3", linestyle=":", linewidth=1.2, label="resumed from checkpoint"))
    return handles


def is_group_member(task: str) -> bool:
    """A task of a directory of tasks (named <group>/<task>): logged on its own, but shown on the console, in
    `pretrain eval`'s table and in the report only through its group's accuracy."""
    return "/" in task


def drawn_panels(runs: list[RunMetrics]) -> list[Panel]:
    """PANELS that some run logged, then one accuracy panel per multiple-choice task (train.eval_tasks)."""
    panels = [panel for panel in PANELS if any(_has_values(run.train, panel.key) for run in runs)]
    tasks = sorted({key.removeprefix("acc/") for run in runs for record in run.eval for key in record
                    if key.startswith("acc/") and not is_group_member(key.removeprefix("acc/"))})
    return panels + [Panel(f"acc/{task}", f"{task}: multiple-choice accuracy", "acc (%)", scale=100.0,
                           records="eval") for task in tasks]


def _draw_panel(ax: Any, runs: list[RunMetrics], colors: list[str], panel: Panel, x_axis: XAxis,
                x_scale: XScale) -> None:
    for run, color in zip(runs, colors):
        records = getattr(run, panel.records)
        if _has_values(records, panel.key):
            ax.plot(_x_values(run, records, x_axis, x_scale), _values(records, panel.key, panel.scale),
                    color=color, linewidth=1.5, marker="." if len(records) < 50 else None)
    ax.set_title(panel.title)
    ax.set_ylabel(panel.ylabel)
    if panel.log_y:
        ax.set_yscale("log", base=panel.log_base)
        _plain_log_ticks(ax, panel.log_base)
    if panel.si_ticks:
        ax.yaxis.set_major_formatter(_si_formatter())
    if panel.key == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))  # 1e-4 scale: an offset beats 0.0001 ticks


def _plain_log_ticks(ax: Any, base: int) -> None:
    """'0.7' instead of '7 × 10⁻¹'. A decade holds at most one labelled power of ten, so within two decades the
    2× and 5× ticks get labels too (all of them within one); across more they would crowd and stay unlabelled."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    low, high = ax.get_ylim()
    if base != 10 or low <= 0 or high / low > 100:
        ax.yaxis.set_minor_formatter(NullFormatter())
        return
    labelled = set(range(1, 10)) if high / low <= 10 else {2, 5}

    def minor_label(value: float, _pos: int) -> str:
        mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9))
        return f"{value:g}" if mantissa in labelled else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor_label))


def _si_formatter() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _pos: _si(value) if value else "0")


def _decorate(figure: Any, axes: list[Any], runs: list[RunMetrics], colors: list[str], x_axis: XAxis,
              x_scale: XScale) -> None:
    from matplotlib.lines import Line2D

    for ax in axes:
        ax.set_xlabel(x_scale.label)
        ax.grid(True, alpha=0.3)
        if x_axis == "tokens":
            ax.xaxis.set_major_formatter(_si_formatter())
        for run, color in zip(runs, colors):
            _mark_resumes(ax, run, color, x_axis, x_scale)
    handles = [Line2D([], [], color=color, linewidth=2.5, label=legend_label(run)) for run, color in zip(runs, colors)]
    figure.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 2), fontsize="medium",
                  title="run (config name and directory): model, batch, learning rate, steps")


def legend_label(run: RunMetrics) -> str:
    return f"{run.label}: {run.description}" if run.description else run.label


# ---------------------------------------------------------------------------------------------------------------------
# Entry


def write_report(run_dirs: list[str | Path], output: str | Path | None = None, *, smooth_points: int = 1,
                 x_axis: XAxis = "step", out: TextIO | None = None, warn: TextIO | None = None) -> Path:
    """Prints the summary table to `out`, writes the PNG (default <first run dir>/report.png) and returns its path."""
    # Looked up per call, not bound as defaults at import: a caller (or pytest) may have replaced sys.stdout since.
    out, warn = sys.stdout if out is None else out, sys.stderr if warn is None else warn
    if not run_dirs:
        raise ReportError("give at least one run directory, e.g. `pretrain report runs/tiny`")
    if smooth_points < 1:
        raise ReportError(f"--smooth must be at least 1 (1 = no smoothing), got {smooth_points}")
    if x_axis not in X_AXES:
        raise ReportError(f"--x must be one of {', '.join(X_AXES)}, got {x_axis!r}")
    runs = load_runs(run_dirs, warn)
    print(format_summary_table([summarize(run) for run in runs]), file=out)
    profiles = format_profile_table(runs, warn)
    if profiles:
        print(f"\n{profiles}", file=out)
    png = _output_path(output, runs[0].run_dir)
    plot_runs(runs, png, smooth_points=smooth_points, x_axis=x_axis)
    print(f"\nwrote {png}", file=out)
    return png


def format_profile_table(runs: list[RunMetrics], warn: TextIO) -> str | None:
    """The runs' newest profiled windows side by side, milliseconds per step by category (the table bench_gpu
    --profile prints), or None when no run was profiled."""
    from trainer.profile_summary import comparison_table, newest_summary

    found = {}
    for run in runs:
        try:
            summary = newest_summary(run.profile_dir) if run.profile_dir is not None else None
        except (OSError, ValueError, TypeError) as err:  # a cut or hand-edited summary JSON: say so, report the rest
            print(f"warning: {run.profile_dir}: profile summary unreadable ({err}); left out", file=warn)
            continue
        if summary is not None:
            found[run.label] = summary
    if not found:
        return None
    windows = "; ".join(f"{label}: steps {s.first_step}-{s.last_step}, rank {s.rank}, "
                        f"{'kernel time' if s.device == 'cuda' else 'CPU op time'}" for label, s in found.items())
    lines = [f"where the step time goes (profiling.*; {windows})", comparison_table(found)]
    missing = [run.label for run in runs if run.label not in found]
    if missing:
        lines.append(f"not profiled: {', '.join(missing)} (profiling.start_step=N profiles steps N and N+1)")
    return "\n".join(lines)


def _output_path(output: str | Path | None, first_run_dir: Path) -> Path:
    if output is None:
        return first_run_dir / "report.png"
    path = Path(output)
    return path / "report.png" if path.is_dir() else path
