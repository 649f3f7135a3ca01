"""The main job: the whole system end to end on a laptop CPU, in minutes, with no download.

    corpus (this Python's standard library sources, or --input) → tokenizer (sentencepiece BPE) → prepare (shards)
    → train configs/quickstart.yaml (checkpoints every 100 steps and at the end) → export the last checkpoint to a
    Hugging Face directory → sample from it through transformers → report.png + summary

Each stage is the same code the individual commands run; this module only chains them and says where things are.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

QUICKSTART_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
DEFAULT_PROMPT = "def __init__(self"


class QuickstartError(RuntimeError):
    user_error = True


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
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    inputs = _resolve_inputs(plan)
    _stage("1/6 tokenizer", lambda: _train_tokenizer(plan, inputs))
    _stage("2/6 prepare", lambda: _prepare(plan, inputs))
    cfg = _stage("3/6 train", lambda: _train(plan))
    _stage("4/6 export", lambda: _export(plan, cfg))
    _stage("5/6 generate", lambda: _generate(plan))
    _stage("6/6 report", lambda: _report(plan))
    _print_where(plan, time.perf_counter() - started_s)
    return 0


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


def _stage(title: str, fn: Callable[[], T]) -> T:
    print(f"\n== {title} " + "=" * (60 - len(title)), flush=True)
    start_s = time.perf_counter()
    result = fn()
    print(f"   ({title.split(' ', 1)[1]} took {time.perf_counter() - start_s:.1f} s)", flush=True)
    return result


def _train_tokenizer(plan: QuickstartPlan, inputs: Sequence[str]) -> None:
    from data_pipeline.tokenizer import TokenizerTrainConfig, train_tokenizer

    vocab_size = _config(plan).model.vocab_size
    result = train_tokenizer(TokenizerTrainConfig(
        inputs=tuple(inputs), output_dir=str(plan.tokenizer_dir), vocab_size=vocab_size, model_type="bpe",
        include_globs=plan.include_globs, input_sentence_size=300_000, overwrite=True))
    print(f"   {result.tokenizer.model_type} tokenizer, {result.tokenizer.vocab_size} pieces → {plan.tokenizer_dir}")


def _prepare(plan: QuickstartPlan, inputs: Sequence[str]) -> None:
    from data_pipeline.prepare import PrepareConfig, prepare

    cfg = _config(plan)
    result = prepare(PrepareConfig(
        inputs=tuple(inputs), tokenizer=str(plan.tokenizer_dir), output_dir=str(plan.data_dir),
        seq_len=cfg.train.seq_len, samples_per_shard=1000, val_fraction=0.05, include_globs=plan.include_globs,
        overwrite=True))
    print("   " + result.summary().replace("\n", "\n   "))


def _config(plan: QuickstartPlan) -> Any:
    from trainer.config import load_config

    overrides = [f"logging.run_dir={plan.run_dir}", f"data.datasets=[{{path: '{plan.data_dir}'}}]",
                 *plan.overrides]
    return load_config(plan.config_path, overrides)


def _train(plan: QuickstartPlan) -> Any:
    from trainer.train import train

    cfg = _config(plan)
    print(f"   {cfg.model.num_layers} layers × hidden {cfg.model.hidden_size}, {cfg.train.max_steps} steps of "
          f"{cfg.train.global_batch_size} × {cfg.train.seq_len} tokens; metrics every "
          f"{cfg.train.log_interval_steps} steps in {plan.run_dir / 'metrics.jsonl'}")
    state = train(cfg)
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
    print(f"\nnext: pretrain generate --hf {plan.hf_dir} --prompt 'import os' | tensorboard --logdir "
          f"{plan.run_dir / 'tb'} | pretrain report {plan.run_dir}", file=sys.stdout)
