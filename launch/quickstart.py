"""The main job: the whole system end to end on a laptop CPU, in minutes, with no download.

    corpus (this Python's standard library sources, or --input) → tokenizer (sentencepiece BPE) → prepare (shards)
    → train configs/quickstart.yaml (checkpoints every 100 steps and at the end) → export the last checkpoint to a
    Hugging Face directory → sample from it through transformers → report.png + summary

Each stage is the same code the individual commands run; this module only chains them and says where things are.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from launch.quickstart_inputs import QuickstartError, claim_run_dir, default_run_dir, recipe, unused_run_dir

T = TypeVar("T")

QUICKSTART_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
DEFAULT_PROMPT = "def __init__(self"


@dataclass(frozen=True)
class QuickstartPlan:
    run_dir: Path
    inputs: tuple[str, ...]  # files or directories
    include_globs: tuple[str, ...]
    corpus_mb: float | None  # cap on the default corpus; None for user inputs
    config_path: Path
    overrides: tuple[str, ...]
    prompt: str

    @property
    def tokenizer_dir(self) -> Path:
        return self.run_dir / "tokenizer"

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    @property
    def hf_dir(self) -> Path:
        return self.run_dir / "hf"


def stdlib_corpus(max_bytes: int) -> list[str]:
    """The .py files of the running interpreter's standard library, in a fixed order, up to `max_bytes`.

    Every machine with Python has them, so the default job needs no download; the sorted walk (test suites and
    vendored packages excluded, they are mostly data) makes the corpus the same on every run of one Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "ensurepip"}
    files: list[str] = []
    total_bytes = 0
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in skip and not d.startswith("."))
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(directory, name)
            size = os.path.getsize(path)
            if total_bytes + size > max_bytes:
                continue
            files.append(path)
            total_bytes += size
    if not files:
        raise QuickstartError(f"found no .py files under the standard library at {root}: pass --input PATH "
                              "(a .jsonl/.parquet file or a folder of .txt files)")
    return files


def run_quickstart(plan: QuickstartPlan) -> int:
    started_s = time.perf_counter()
    inputs = _resolve_inputs(plan)
    data_kept = _claim_run_dir(plan, inputs)  # before anything is written: refuses another input's run directory
    stage = _Stages(started_s)
    if data_kept:
        _refuse_other_model(plan)
        print(f"\n{plan.run_dir} holds this input's tokenizer and shards already: stages 1-2 kept, training continues "
              f"from its newest checkpoint")
    else:
        stage("1/6 tokenizer", lambda: _train_tokenizer(plan, inputs))
        stage("2/6 prepare", lambda: _prepare(plan, inputs))
    cfg = stage("3/6 train", lambda: _train(_fit_to_data(plan), started_s))
    stage("4/6 export", lambda: _export(plan, cfg))
    stage("5/6 generate", lambda: _generate(plan))
    stage("6/6 report", lambda: _report(plan))
    _print_where(plan, time.perf_counter() - started_s)
    return 0


def prepare_corpus(plan: QuickstartPlan) -> Path:
    """Stages 1-2 alone, quietly kept from a previous call: the tokenizer and shards in plan.run_dir, for tools that
    train on the quickstart's data (bench/bench_fp8_loss.py). Returns the prepared dataset directory."""
    if not (plan.data_dir / "manifest.json").exists():
        inputs = _resolve_inputs(plan)
        _train_tokenizer(plan, inputs)
        _prepare(plan, inputs)
    return plan.data_dir


def _claim_run_dir(plan: QuickstartPlan, inputs: list[str]) -> bool:
    """True when the run directory already holds this very input's finished tokenizer and shards."""
    cfg = _config(plan)
    wanted = recipe(plan.inputs, inputs, plan.include_globs, plan.corpus_mb, cfg.model.vocab_size, cfg.train.seq_len)
    same_recipe = claim_run_dir(plan.run_dir, wanted, unused_run_dir(default_run_dir(plan.inputs)))
    return same_recipe and (plan.data_dir / "manifest.json").is_file() and plan.tokenizer_dir.is_dir()


def _refuse_other_model(plan: QuickstartPlan) -> None:
    """Continuing needs the run's own model shape: say so before anything runs (the checkpoint load would refuse it
    only after the model is built), with the way out that keeps the run."""
    from trainer.checkpoint.load import model_shape_changes
    from trainer.config import load_config

    saved_path = plan.run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    changes = model_shape_changes(load_config(saved_path).model, _config(_fit_to_data(plan, announce=False)).model)
    if changes:
        shown = ", ".join(f"{key} {old} → {new}" for key, old, new in changes)
        raise QuickstartError(
            f"{plan.run_dir} holds a run of another model shape ({shown}); continuing it needs its own shape. Nothing "
            f"was changed. Train the new shape in a directory of its own with --run-dir, e.g. --run-dir "
            f"{unused_run_dir(plan.run_dir)}, or drop the model overrides to continue this run")


def _resolve_inputs(plan: QuickstartPlan) -> list[str]:
    if plan.inputs:
        missing = [p for p in plan.inputs if not os.path.exists(p)]
        if missing:
            raise QuickstartError(f"--input {missing[0]} does not exist: give a .jsonl/.jsonl.gz/.jsonl.zst/.parquet "
                                  "file or a folder of text files (with --include to pick file names)")
        return list(plan.inputs)
    assert plan.corpus_mb is not None
    files = stdlib_corpus(int(plan.corpus_mb * 1e6))
    print(f"corpus: {len(files)} .py files of the Python standard library ({Path(files[0]).parents[0]}...)")
    return files


class _Stages:
    """Runs one stage under a header that says how long the whole job has run so far."""

    def __init__(self, job_started_s: float) -> None:
        self.job_started_s = job_started_s

    def __call__(self, title: str, fn: Callable[[], T]) -> T:
        start_s = time.perf_counter()
        header = f"== {title} ({clock(start_s - self.job_started_s)} elapsed) "
        print("\n" + header + "=" * max(3, 64 - len(header)), flush=True)
        result = fn()
        print(f"   ({title.split(' ', 1)[1]} took {time.perf_counter() - start_s:.1f} s)", flush=True)
        return result


def clock(seconds: float) -> str:
    """'1:05' (m:ss), or '1:02:05' from an hour on."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def _train_tokenizer(plan: QuickstartPlan, inputs: Sequence[str]) -> None:
    """model.vocab_size pieces, or as many as a small corpus has merges for (sentencepiece names the most it can
    make): _fit_to_data then gives the model the tokenizer's size, which the HF export requires."""
    from data_pipeline.errors import DataPipelineError

    vocab_size = _config(plan).model.vocab_size
    try:
        result = _run_tokenizer_training(plan, inputs, vocab_size)
    except DataPipelineError as err:
        most = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(err))
        if most is None:
            raise QuickstartError(f"{str(err).splitlines()[0]}: give more text, or a smaller vocabulary with the "
                                  f"override model.vocab_size=N") from None
        print(f"   note: the input has too little text for {vocab_size} pieces: the tokenizer gets {most.group(1)} "
              f"(the most sentencepiece can make here) and so does the model (model.vocab_size={most.group(1)})")
        result = _run_tokenizer_training(plan, inputs, int(most.group(1)))
    print(f"   {result.tokenizer.model_type} tokenizer, {result.tokenizer.vocab_size} pieces → {plan.tokenizer_dir}")


def _run_tokenizer_training(plan: QuickstartPlan, inputs: Sequence[str], vocab_size: int) -> Any:
    from data_pipeline.tokenizer import TokenizerTrainConfig, train_tokenizer

    return train_tokenizer(TokenizerTrainConfig(
        inputs=tuple(inputs), output_dir=str(plan.tokenizer_dir), vocab_size=vocab_size, model_type="bpe",
        include_globs=plan.include_globs, input_sentence_size=300_000, overwrite=True))


def _prepare(plan: QuickstartPlan, inputs: Sequence[str]) -> None:
    from data_pipeline.prepare import PrepareConfig, prepare

    cfg = _config(plan)
    result = prepare(PrepareConfig(
        inputs=tuple(inputs), tokenizer=str(plan.tokenizer_dir), output_dir=str(plan.data_dir),
        seq_len=cfg.train.seq_len, samples_per_shard=1000, val_fraction=0.05, include_globs=plan.include_globs,
        overwrite=True))
    print("   " + result.summary().replace("\n", "\n   "))


def _fit_to_data(plan: QuickstartPlan, announce: bool = True) -> QuickstartPlan:
    """A small corpus still trains: one batch of training samples is enough. Evaluation gets a smaller micro batch
    (the global batch stays, gradient accumulation makes up the rest) when the validation split is smaller than one
    micro batch, and is turned off with a note when it is smaller than a quarter of one. The user's own overrides
    come after these, so they win."""
    from data_pipeline.manifest import Manifest

    cfg = _config(plan)
    manifest = Manifest.load(plan.data_dir)
    _check_one_training_batch(plan, cfg, manifest.splits["train"].num_samples)
    val_samples = manifest.splits["val"].num_samples if "val" in manifest.splits else 0
    extra = _eval_overrides(cfg.train, val_samples, print if announce else lambda _: None)
    if manifest.tokenizer.vocab_size < cfg.model.vocab_size:  # a small corpus's tokenizer (_train_tokenizer)
        extra.insert(0, f"model.vocab_size={manifest.tokenizer.vocab_size}")
    return replace(plan, overrides=(*extra, *plan.overrides)) if extra else plan


def _check_one_training_batch(plan: QuickstartPlan, cfg: Any, train_samples: int) -> None:
    batch = cfg.train.global_batch_size
    if train_samples >= batch:
        return
    raise QuickstartError(
        f"the input gives {train_samples} training samples of {cfg.train.seq_len + 1} tokens "
        f"({plan.data_dir}/manifest.json), fewer than one training batch of {batch} (train.global_batch_size): "
        f"give more text (about {batch / max(train_samples, 1):.0f}x as much), or a smaller batch, e.g. "
        f"train.global_batch_size={max(1, train_samples)} train.micro_batch_size_per_gpu={max(1, train_samples)}")


def _eval_overrides(train: Any, val_samples: int, say: Callable[[str], None]) -> list[str]:
    """The quickstart trains in this one process (dp 1), so an eval micro-step takes micro_batch_size samples."""
    micro = train.micro_batch_size_per_gpu
    if not train.eval_enabled or val_samples >= micro:
        return []
    fitting = max((size for size in range(1, micro) if train.global_batch_size % size == 0 and size <= val_samples),
                  default=0)
    if fitting >= max(1, micro // 4):
        say(f"   note: the validation split has {val_samples} samples, fewer than the micro batch of {micro}: "
              f"training with micro batch {fitting} × {train.global_batch_size // fitting} accumulation steps (the "
              f"same global batch of {train.global_batch_size}) so that evaluation fits")
        return [f"train.micro_batch_size_per_gpu={fitting}"]
    say(f"   note: the validation split has {val_samples} samples, too few to evaluate on: evaluation is off "
          f"(train.eval_interval_steps=0); give more text to get a validation loss")
    return ["train.eval_interval_steps=0"]


def _config(plan: QuickstartPlan) -> Any:
    from trainer.config import load_config

    overrides = [f"logging.run_dir={plan.run_dir}", f"data.datasets=[{{path: '{plan.data_dir}'}}]",
                 *plan.overrides]
    return load_config(plan.config_path, overrides)


def _train(plan: QuickstartPlan, job_started_s: float) -> Any:
    from launch.quickstart_progress import whole_job_eta
    from trainer.train import train

    cfg = _config(plan)
    print(f"   {cfg.model.num_layers} layers × hidden {cfg.model.hidden_size}, {cfg.train.max_steps} steps of "
          f"{cfg.train.global_batch_size} × {cfg.train.seq_len} tokens; metrics every "
          f"{cfg.train.log_interval_steps} steps in {plan.run_dir / 'metrics.jsonl'}")
    state = train(cfg, extra_hooks=whole_job_eta(job_started_s))
    if state.stop_reason not in (None, "max_steps"):
        raise QuickstartError(f"training stopped early ({state.stop_reason}); see {plan.run_dir / 'logs'}")
    return cfg


def _export(plan: QuickstartPlan, cfg: Any) -> None:
    from trainer.hf import export_hf, load_full_state_dict

    checkpoints = Path(cfg.checkpoint_dir)
    result = export_hf(load_full_state_dict(checkpoints), cfg.model, plan.hf_dir,
                       tokenizer_model=plan.tokenizer_dir, dtype="fp32", overwrite=True)
    print(f"   newest checkpoint in {checkpoints} → {plan.hf_dir} ({result.num_parameters:,} parameters, "
          f"{', '.join(result.files)})")


def _generate(plan: QuickstartPlan) -> None:
    from trainer.hf import generate_text

    generation = generate_text(plan.hf_dir, plan.prompt, max_new_tokens=48, temperature=0.8, top_p=0.95, seed=0)
    print("   transformers.AutoModelForCausalLM, sampled (temperature 0.8, top_p 0.95):\n")
    print("   " + (plan.prompt + generation.text).replace("\n", "\n   "))


def _report(plan: QuickstartPlan) -> None:
    from trainer.report import write_report

    write_report([plan.run_dir], output=plan.run_dir / "report.png")


def _print_where(plan: QuickstartPlan, elapsed_s: float) -> None:
    rows = [
        ("tokenizer", plan.tokenizer_dir), ("shards + manifest", plan.data_dir),
        ("resolved config", plan.run_dir / "config.yaml"), ("metrics", plan.run_dir / "metrics.jsonl"),
        ("TensorBoard", plan.run_dir / "tb"), ("checkpoints", plan.run_dir / "checkpoints"),
        ("Hugging Face model", plan.hf_dir), ("curves", plan.run_dir / "report.png"),
    ]
    print(f"\nquickstart finished in {elapsed_s / 60:.1f} min. Everything is under {plan.run_dir}:")
    for label, path in rows:
        print(f"  {label:<19} {path}")
    # One command per line: joined on one line they would read (and paste) as a shell pipe.
    print("\nnext:")
    for command in (f"pretrain generate --hf {plan.hf_dir} --prompt 'import os'",
                    f"tensorboard --logdir {plan.run_dir / 'tb'}", f"pretrain report {plan.run_dir}"):
        print(f"  {command}", file=sys.stdout)
