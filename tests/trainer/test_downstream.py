"""`pretrain eval --task FILE`: multiple-choice accuracy by log-likelihood, equal to lm-evaluation-harness's in every
layout.

The reference is lm-evaluation-harness itself (`lm_eval.simple_evaluate`, its HF model class on the same folder of
weights and tokenizer, the task as a local JSON Lines task): its per-choice log-likelihoods, acc and acc_norm. The
task has what tells encodings apart: contexts with trailing spaces and one empty, short ones (the tokenizer's bos
first, as lm-eval encodes) and ones longer than the sequence, choices with non-ASCII characters (acc_norm divides by
characters, not bytes). Ours runs the same weights through `evaluate_weights` in 1 process, TP 2 with the fused
lm_head + loss, PP 2 and ZeRO-3 DP 2: rows spread over DP ranks, through the pipeline, with vocab-parallel losses.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

# Imported once here so the forked ranks start fast (notes/megatron-core-cpu.md).
import deepspeed  # noqa: F401
import megatron.core.tensor_parallel  # noqa: F401
import pytest
import torch
from hf_fixtures import corpus_documents
from llama3_tokenizer import write_llama3_like_tokenizer

from trainer.config import load_config
from trainer.testing import run_distributed

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
# The tiny config's shape for the HF model; synthetic validation data (the tasks are what is compared).
OVERRIDES = ["model.vocab_size=402", "train.eval_steps=1"]
SEQ_LEN = 64  # configs/tiny.yaml train.seq_len: lm-eval gets it as max_length


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A released-looking model folder (weights + Llama-3-like tokenizer) and a task file of 10 examples."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("downstream")
    docs = corpus_documents(300, seed=2)
    write_llama3_like_tokenizer(root / "model", docs)
    cfg = load_config(TINY).model
    hf_cfg = LlamaConfig(vocab_size=402, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                         max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False, initializer_range=0.1)
    torch.manual_seed(0)
    LlamaForCausalLM(hf_cfg).save_pretrained(root / "model")
    rng = random.Random(0)
    with (root / "task.jsonl").open("w") as f:
        for i in range(10):
            # Some overflow the sequence (600 characters), some end in spaces, one is empty.
            context = "" if i == 3 else docs[i][: rng.choice((40, 120, 600))] + rng.choice(("", " ", "  "))
            choices = [docs[100 + 4 * i + j][:rng.randint(5, 60)] for j in range(rng.randint(2, 4))]
            if i % 2:  # 2 bytes a character: per-byte and per-character normalisation pick differently
                choices = [choice + "é" * (7 * j) for j, choice in enumerate(choices)]
            if i == 4:  # the bos as text already: lm-eval adds no second one
                context = "<|begin_of_text|>" + context
            f.write(json.dumps({"context": context, "choices": choices, "label": rng.randrange(len(choices))}) + "\n")
    return {"root": root, "hf": root / "model", "task": root / "task.jsonl"}


# Run in its own process: lm-eval seeds the global RNGs and sets up logging; the test process forks ranks afterwards.
LM_EVAL_SCRIPT = textwrap.dedent("""
    import json, sys
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    model_dir, tasks_dir, name = sys.argv[1:4]
    seq_len, shots = int(sys.argv[4]), int(sys.argv[5])
    lm = HFLM(pretrained=model_dir, max_length=seq_len, batch_size=1, device="cpu", dtype="float32")
    out = simple_evaluate(model=lm, tasks=[name], task_manager=TaskManager(include_path=tasks_dir), log_samples=True,
                          num_fewshot=shots)
    samples = sorted(out["samples"][name], key=lambda sample: sample["doc_id"])
    metrics = out["results"][name]
    print(json.dumps({"logliks": [[resp[0] for resp in s["filtered_resps"]] for s in samples],
                      "acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"]}))
""")


def lm_eval(model_dir: Path, task: Path, work_dir: Path) -> dict[str, Any]:
    """lm-eval's per-choice log-likelihoods, acc and acc_norm for our task file `task` on the HF folder `model_dir`:
    the task as lm-eval's own YAML (the context and the choice joined with no delimiter, as in our task file)."""
    tasks_dir = work_dir / "lm_eval_tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    (tasks_dir / "task.yaml").write_text(textwrap.dedent(f"""\
        task: task
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {task}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{context}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{label}}}}"
        target_delimiter: ""
        metric_list:
          - metric: acc
          - metric: acc_norm
        """))
    return run_lm_eval(model_dir, tasks_dir, "task", work_dir)


def run_lm_eval(model_dir: Path, tasks_dir: Path, name: str, work_dir: Path, num_fewshot: int = 0) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work_dir / "datasets_cache"), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", LM_EVAL_SCRIPT, str(model_dir), str(tasks_dir), name, str(SEQ_LEN),
                          str(num_fewshot)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lm_eval_scores(setup: dict[str, Any]) -> dict[str, Any]:
    return lm_eval(setup["hf"], setup["task"], setup["root"])


def _score(rank: int, world_size: int, hf_dir: str, task: str, overrides: list[str],
           tokenizer: str | None = None) -> tuple:
    from trainer.eval_checkpoint import evaluate_weights

    cfg = load_config(TINY, [*overrides, f"train.eval_tasks=[{task}]",
                             f"train.eval_tasks_tokenizer={tokenizer or hf_dir}"])
    (evaluated,) = evaluate_weights(cfg, [Path(hf_dir)])
    result, *group = evaluated.result.tasks  # a directory of one task: that task, then its group
    assert [(g.acc, g.acc_norm) for g in group] in ([], [(result.acc, result.acc_norm)])
    return result.logliks, result.acc, result.acc_norm


LAYOUTS = {"1proc": (1, []), "tp2-fused": (2, ["parallel.tp=2", "parallel.lm_loss=fused_linear"]),
           "pp2": (2, ["parallel.pp=2"]), "zero3-dp2": (2, ["zero.stage=3"]),
           # lm_head partitioned too, and gathered at each row's loss (the fused loss calls it once per row)
           "zero3-dp2-fused": (2, ["zero.stage=3", "parallel.lm_loss=fused_linear",
                                   "zero.stage3_param_persistence_threshold_elements=0"])}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_choice_scores_and_accuracy_equal_lm_evaluation_harness(setup: dict[str, Any], lm_eval_scores: dict[str, Any],
                                                                layout: str) -> None:
    want_logliks = lm_eval_scores["logliks"]
    world_size, overrides = LAYOUTS[layout]
    for logliks, acc, acc_norm in run_distributed(_score, world_size, str(setup["hf"]), str(setup["task"]),
                                                  [*OVERRIDES, *overrides], timeout_s=240):  # every rank's
        assert [len(s) for s in logliks] == [len(s) for s in want_logliks]
        worst = max(abs(a - b) for got, want in zip(logliks, want_logliks) for a, b in zip(got, want))
        assert worst <= 1e-4, worst  # fp32 sums of a few dozen log-probabilities, ~-5 each: measured 3.1e-5
        assert (acc, acc_norm) == (lm_eval_scores["acc"], lm_eval_scores["acc_norm"])


def test_a_sentencepiece_model_exported_to_hf_scores_as_lm_eval_scores_the_export(setup: dict[str, Any],
                                                                                  tmp_path: Path) -> None:
    """Our own tokenizer: the run scores with the sentencepiece model, lm-eval with the HF tokenizer that
    `convert to-hf` wrote next to the weights (it prepends the bos, as the training data has it)."""
    from hf_fixtures import VOCAB, write_corpus

    from data_pipeline.tokenizer import TokenizerTrainConfig, train_tokenizer
    from launch.cli import main
    from trainer.config import padded_vocab_size
    from trainer.hf import save_full_state_dict, state_dict_of
    from trainer.model import Llama

    corpus = write_corpus(tmp_path / "corpus.jsonl", corpus_documents(120, seed=0))
    train_tokenizer(TokenizerTrainConfig(inputs=(str(corpus),), output_dir=str(tmp_path / "spm"), vocab_size=VOCAB,
                                         input_sentence_size=0, num_threads=2))
    overrides = [f"model.vocab_size={VOCAB}", "model.init_std=0.1", "train.eval_steps=1"]
    torch.manual_seed(0)
    cfg = load_config(TINY, overrides).model
    save_full_state_dict(state_dict_of(Llama(cfg, padded_vocab_size(cfg.vocab_size, 1))), tmp_path / "w.safetensors")
    assert main(["convert", "to-hf", "--state-dict", str(tmp_path / "w.safetensors"), "--config", str(TINY),
                 *overrides[:2], "--tokenizer", str(tmp_path / "spm"), "--output", str(tmp_path / "hf")]) == 0
    want = lm_eval(tmp_path / "hf", setup["task"], tmp_path)
    [(logliks, acc, acc_norm)] = run_distributed(_score, 1, str(tmp_path / "hf"), str(setup["task"]), overrides,
                                                 str(tmp_path / "spm"), timeout_s=240)
    worst = max(abs(a - b) for got, w in zip(logliks, want["logliks"]) for a, b in zip(got, w))
    assert worst <= 1e-4, worst
    assert (acc, acc_norm) == (want["acc"], want["acc_norm"])


def write_lm_eval_task(tasks_dir: Path, docs: list[str]) -> None:
    """An lm-eval task as its YAML files are written (HellaSwag-like: a question, endings, the right ending's text,
    a space between context and choice, few-shot examples from a train split) and a generation task."""
    rng = random.Random(1)
    for split, offset in (("train", 0), ("test", 50)):
        with (tasks_dir / f"{split}.jsonl").open("w") as f:
            for i in range(offset, offset + 8):
                endings = [docs[150 + 4 * i + j][:rng.randint(5, 40)].strip() or "x" for j in range(3)]
                if i % 2:
                    endings = [ending + "é" * (5 * j) for j, ending in enumerate(endings)]
                f.write(json.dumps({"question": docs[i][:rng.choice((30, 80))].strip(), "endings": endings,
                                    "answer": endings[rng.randrange(3)]}) + "\n")
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {tasks_dir}/train.jsonl\n" \
           f"    test: {tasks_dir}/test.jsonl\ntraining_split: train\ntest_split: test\n"
    (tasks_dir / "mc.yaml").write_text(f"task: mc\n{data}output_type: multiple_choice\n"
                                       'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_choice: "{{endings}}"\n'
                                       'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'
                                       "  - metric: acc_norm\n")
    (tasks_dir / "gen.yaml").write_text(f"task: gen\n{data}output_type: generate_until\n"
                                        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
                                        "metric_list:\n  - metric: exact_match\n")


def test_an_lm_eval_task_converted_to_a_task_file_scores_as_lm_eval_scores_it(
        setup: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`pretrain convert lm-eval-task` with 2 few-shot examples: lm-eval builds the contexts, we score the file."""
    from launch.cli import main

    tasks_dir = tmp_path / "lm_eval_tasks"
    tasks_dir.mkdir()
    write_lm_eval_task(tasks_dir, corpus_documents(400, seed=3))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    assert main(["convert", "lm-eval-task", "mc", "--output", str(tmp_path / "tasks"), "--include-path",
                 str(tasks_dir), "--num-fewshot", "2"]) == 0
    assert "mc: 8 examples, 2-shot" in capsys.readouterr().out
    converted = [json.loads(line) for line in (tmp_path / "tasks" / "mc.jsonl").open()]
    assert converted[0]["context"].count("Q: ") == 3 and converted[0]["context"].endswith("A: ")  # 2 shots + itself
    want = run_lm_eval(setup["hf"], tasks_dir, "mc", tmp_path, num_fewshot=2)
    [(logliks, acc, acc_norm)] = run_distributed(_score, 1, str(setup["hf"]), str(tmp_path / "tasks"),  # the dir
                                                 OVERRIDES, timeout_s=240)
    worst = max(abs(a - b) for got, w in zip(logliks, want["logliks"]) for a, b in zip(got, w))
    assert worst <= 1e-4, worst
    assert (acc, acc_norm) == (want["acc"], want["acc_norm"])

    refusals = {"gen": "lm-eval task gen is generate_until, not multiple_choice",
                "mc": "mc.jsonl exists: pass --overwrite", "no_such_task": "is not a registered task/group/tag name"}
    for name, message in refusals.items():
        capsys.readouterr()
        assert main(["convert", "lm-eval-task", name, "--output", str(tmp_path / "tasks"), "--include-path",
                     str(tasks_dir)]) == 2
        assert message in capsys.readouterr().err
    # A refused task refuses the whole command: the good task before it is not written either.
    assert main(["convert", "lm-eval-task", "mc", "gen", "--output", str(tmp_path / "fresh"), "--include-path",
                 str(tasks_dir)]) == 2
    assert not (tmp_path / "fresh").exists()


def test_a_task_directory_is_each_of_its_task_files(tmp_path: Path) -> None:
    from trainer.config import ConfigError
    from trainer.downstream import task_files

    (tmp_path / "mmlu").mkdir()
    for name in ("mmlu_b.jsonl", "mmlu_a.jsonl", "notes.txt"):
        (tmp_path / "mmlu" / name).write_text("")
    assert task_files([str(tmp_path / "one.jsonl"), str(tmp_path / "mmlu")]) == [
        (tmp_path / "one.jsonl", None), (tmp_path / "mmlu" / "mmlu_a.jsonl", "mmlu"),
        (tmp_path / "mmlu" / "mmlu_b.jsonl", "mmlu")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no \\*.jsonl task files"):
        task_files([str(tmp_path / "empty")])


def test_a_group_scores_the_accuracy_over_all_its_examples_and_the_console_shows_only_that() -> None:
    from trainer.downstream import TaskResult, group_results
    from trainer.hooks import format_metrics

    results = [TaskResult("mmlu/a", 1.0, 0.5, 2, []), TaskResult("mmlu/b", 0.0, 0.5, 6, []),
               TaskResult("hellaswag", 0.3, 0.4, 10, [])]
    (group,) = group_results(results)
    assert (group.name, group.acc, group.acc_norm, group.num_examples) == ("mmlu", 0.25, 0.5, 8)
    record = {"kind": "eval", "val_loss": 2.0, "val_ppl": 7.39, "acc/mmlu/a": 1.0, "acc/mmlu": 0.25,
              "acc/hellaswag": 0.3}
    line = format_metrics(10, 20, record)
    assert "acc/mmlu 0.2500" in line and "acc/hellaswag 0.3000" in line and "mmlu/a" not in line


def test_rows_lose_only_the_padding_columns_after_the_last_scored_token() -> None:
    from trainer.downstream import IGNORE, _trim_columns

    tokens = torch.arange(2 * 512).view(2, 512)
    labels = torch.full((2, 512), IGNORE)
    labels[0, 20:30], labels[1, 5:9] = 7, 8  # the last scored position of any row: 29
    for tp, length in ((1, 64), (2, 64), (3, 192)):
        cut_tokens, cut_labels = _trim_columns(tokens, labels, tp)
        assert cut_tokens.shape == cut_labels.shape == (2, length)
        assert torch.equal(cut_tokens, tokens[:, :length]) and torch.equal(cut_labels, labels[:, :length])
    labels[1, 500] = 9
    assert _trim_columns(tokens, labels, 1)[0].shape == (2, 512)  # never longer than the sequence


def _train_losses(rank: int, world_size: int, overrides: list[str], run_dir: str) -> tuple[dict, list]:
    from trainer.train import train

    train(load_config(TINY, [*OVERRIDES, "train.max_steps=4", "optim.warmup_steps=1", "train.log_interval_steps=1",
                             "checkpoint.save_interval_steps=0", f"logging.run_dir={run_dir}", *overrides]))
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["loss"] for r in records if r["kind"] == "train"},
            [r.get("acc/short") for r in records if r["kind"] == "eval"])


@pytest.mark.parametrize("layout", ["1proc", "pp2"])
def test_short_task_rows_between_training_steps_change_no_training_loss(setup: dict[str, Any], tmp_path: Path,
                                                                        layout: str) -> None:
    """Task rows cut to 64 of the 128-token sequence at the evals of steps 2 and 4: under PP the stages exchange
    the new activation shapes and go back to the training ones, so every loss equals a run without tasks."""
    docs = corpus_documents(60, seed=5)
    with (tmp_path / "short.jsonl").open("w") as f:
        for i in range(6):
            f.write(json.dumps({"context": docs[i][:30] + " ", "choices": [docs[20 + i][:12], docs[40 + i][:15]],
                                "label": i % 2}) + "\n")
    world_size, layout_overrides = LAYOUTS[layout]
    common = ["train.seq_len=128", "train.eval_interval_steps=2", f"checkpoint.init_from={setup['hf']}",
              *layout_overrides]
    tasks = [f"train.eval_tasks=[{tmp_path / 'short.jsonl'}]", f"train.eval_tasks_tokenizer={setup['hf']}"]
    with_tasks = run_distributed(_train_losses, world_size, [*common, *tasks], str(tmp_path / "a"), timeout_s=240)
    without = run_distributed(_train_losses, world_size, common, str(tmp_path / "b"), timeout_s=240)
    (losses, accuracies), (reference_losses, _) = with_tasks[0], without[0]
    assert losses == reference_losses and sorted(losses) == [1, 2, 3, 4]
    assert len(accuracies) == 2 and all(acc is not None and 0 <= acc <= 1 for acc in accuracies)


def test_the_cli_prints_and_writes_task_accuracy(setup: dict[str, Any], lm_eval_scores: dict[str, Any],
                                                tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    base = [sys.executable, "-m", "launch", "eval", "--weights", str(setup["hf"]), "--config", str(TINY),
            *OVERRIDES]
    out = subprocess.run([*base, "--task", str(setup["task"]), "--tokenizer", str(setup["hf"]), "--json",
                          str(tmp_path / "e.json")], capture_output=True, text=True, cwd=REPO, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[0].split()[3:5] == ["task", "acc"]  # "task acc", "task acc_norm" columns
    (summary,) = json.loads((tmp_path / "e.json").read_text())
    assert summary["tasks"]["task"]["num_examples"] == 10
    assert summary["tasks"]["task"]["acc"] == lm_eval_scores["acc"]
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "choices": ["b"], "label": 0}\n')
    bad = subprocess.run([*base, "--task", str(tmp_path / "bad.jsonl"), "--tokenizer", str(setup["hf"])],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=240)
    assert bad.returncode == 2 and f"{tmp_path / 'bad.jsonl'}:1: an example needs" in bad.stderr
    no_tokenizer = subprocess.run([*base, "--task", str(setup["task"])], capture_output=True, text=True, cwd=REPO,
                                  env=env, timeout=240)
    assert no_tokenizer.returncode == 2 and "(pretrain eval: --tokenizer DIR)" in no_tokenizer.stderr


def test_a_run_scores_its_eval_tasks_at_each_eval(setup: dict[str, Any], tmp_path: Path) -> None:
    """train.eval_tasks: acc/<task> and acc_norm/<task> in every eval record; at the start (the imported weights
    before any update would give HF's accuracy) and after training alike."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-m", "launch", "train", "--config", str(TINY), *OVERRIDES,
                          "train.max_steps=4", "optim.warmup_steps=1", "train.eval_interval_steps=2",
                          f"train.eval_tasks=[{setup['task']}]", f"train.eval_tasks_tokenizer={setup['hf']}",
                          f"checkpoint.init_from={setup['hf']}", f"logging.run_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        assert 0 <= record["acc/task"] <= 1 and 0 <= record["acc_norm/task"] <= 1, record
    assert "acc/task" in out.stderr  # the console line too
    report = subprocess.run([sys.executable, "-m", "launch", "report", str(tmp_path / "run"), "--output",
                             str(tmp_path / "report.png")], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=240)
    assert report.returncode == 0, report.stderr[-3000:]
    row = next(line for line in report.stdout.splitlines() if line.strip().startswith("acc/task"))
    assert row.split()[-1] == f"{evals[-1]['acc/task']:.4f}"  # the summary table: the last eval's accuracy
