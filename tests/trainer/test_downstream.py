"""`pretrain eval --task FILE`: multiple-choice accuracy by log-likelihood, equal to transformers' own in every layout.

The reference is `transformers.LlamaForCausalLM` scoring each choice itself (the summed log-softmax of the choice's
tokens after the context, the context and choice encoded by AutoTokenizer on the same folder), then lm-eval's acc and
acc_norm. Ours runs the same weights through `evaluate_weights` in 1 process, TP 2 with the fused lm_head + loss,
PP 2 and ZeRO-3 DP 2: rows spread over DP ranks, through the pipeline, with vocab-parallel losses.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
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


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A released-looking model folder (weights + Llama-3-like tokenizer) and a task file of 10 examples, some with
    a context longer than the sequence (64 tokens)."""
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
            f.write(json.dumps({"context": context, "choices": choices, "label": rng.randrange(len(choices))}) + "\n")
    return {"root": root, "hf": root / "model", "task": root / "task.jsonl"}


def _hf_scores(setup: dict[str, Any], seq_len: int) -> tuple[list[list[float]], float, float]:
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(setup["hf"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(setup["hf"]), local_files_only=True)
    logliks, right, right_norm, examples = [], 0, 0, [json.loads(line) for line in setup["task"].open()]
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    for example in examples:
        scores = []
        for choice in example["choices"]:
            # lm-evaluation-harness's pair encoding: trailing spaces move to the continuation, the pair is encoded
            # whole, the continuation is what follows the context's own encoding; an empty context is the bos.
            context, continuation = example["context"].rstrip(), example["context"][len(example["context"].rstrip()):]
            continuation += choice
            if example["context"]:
                context_ids = encode(context)
                choice_ids = encode(context + continuation)[len(context_ids):]
            else:
                context_ids, choice_ids = [tokenizer.bos_token_id], encode(choice)
            ids = (context_ids + choice_ids)[-(seq_len + 1):]
            with torch.no_grad():
                log_probs = model(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)
            positions = range(len(ids) - 1 - len(choice_ids), len(ids) - 1)
            scores.append(sum(log_probs[t, ids[t + 1]].item() for t in positions))
        logliks.append(scores)
        right += max(range(len(scores)), key=scores.__getitem__) == example["label"]
        norm = [s / len(c.encode("utf-8")) for s, c in zip(scores, example["choices"], strict=True)]
        right_norm += max(range(len(norm)), key=norm.__getitem__) == example["label"]
    return logliks, right / len(examples), right_norm / len(examples)


def _score(rank: int, world_size: int, hf_dir: str, task: str, overrides: list[str]) -> tuple:
    from trainer.eval_checkpoint import evaluate_weights

    cfg = load_config(TINY, [*overrides, f"train.eval_tasks=[{task}]", f"train.eval_tasks_tokenizer={hf_dir}"])
    (evaluated,) = evaluate_weights(cfg, [Path(hf_dir)])
    (result,) = evaluated.result.tasks
    return result.logliks, result.acc, result.acc_norm


LAYOUTS = {"1proc": (1, []), "tp2-fused": (2, ["parallel.tp=2", "parallel.lm_loss=fused_linear"]),
           "pp2": (2, ["parallel.pp=2"]), "zero3-dp2": (2, ["zero.stage=3"])}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_choice_scores_and_accuracy_equal_transformers(setup: dict[str, Any], layout: str) -> None:
    want_logliks, want_acc, want_acc_norm = _hf_scores(setup, seq_len=64)
    world_size, overrides = LAYOUTS[layout]
    for logliks, acc, acc_norm in run_distributed(_score, world_size, str(setup["hf"]), str(setup["task"]),
                                                  [*OVERRIDES, *overrides], timeout_s=240):  # every rank's
        assert [len(s) for s in logliks] == [len(s) for s in want_logliks]
        worst = max(abs(a - b) for got, want in zip(logliks, want_logliks) for a, b in zip(got, want))
        assert worst <= 1e-4, worst  # fp32 sums of a few dozen log-probabilities, ~-5 each: measured 2.1e-5
        assert (acc, acc_norm) == (want_acc, want_acc_norm)


def test_the_cli_prints_and_writes_task_accuracy(setup: dict[str, Any], tmp_path: Path) -> None:
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
    _, want_acc, _ = _hf_scores(setup, seq_len=64)
    assert summary["tasks"]["task"]["acc"] == want_acc
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
