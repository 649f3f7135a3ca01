"""Continued pretraining of a released model, as a user runs it, every step a `pretrain` command in a subprocess:

    pretrain convert from-hf --hf MODEL --output imported           # weights, model.yaml, tokenizer/ (tokenizer.json)
    pretrain prepare --input corpus --tokenizer imported/tokenizer  # the model's own tokenizer, eos after documents
    pretrain eval --weights MODEL --config run.yaml                 # the baseline: the released model on this data
    pretrain train --config run.yaml checkpoint.init_from=imported/model.safetensors
    pretrain convert to-hf --checkpoint run/checkpoints --tokenizer data/tokenizer --output export

The model is a transformers LlamaForCausalLM shaped like Llama 3.2 in miniature: tied embeddings, llama3 RoPE
scaling, and a Llama-3-like HF tokenizer (byte-level BPE, special tokens after the vocabulary) that no sentencepiece
model describes. Proved: the first logged loss equals HF's own loss on the same first batch (the weights, the RoPE
scaling and the tokenization all arrived intact), and the export loads in transformers with the source's tokenizer
files and rope parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hf_fixtures import corpus_documents, load_hf, write_corpus
from llama3_tokenizer import write_llama3_like_tokenizer

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # Llama 3.2's, with a tiny original context


def pretrain(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    out = subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=240)
    assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-3000:])
    return out


def _released_model(out: Path, docs: list[str]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    write_llama3_like_tokenizer(out, docs)
    config = LlamaConfig(vocab_size=402, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_parameters=ROPE, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, max_position_embeddings=128, initializer_range=0.1,
                         bos_token_id=400, eos_token_id=401)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))


def _first_batch_loss_under_hf(hf_dir: Path, data: Path, global_batch: int) -> float:
    """HF's loss on the first global batch of the prepared data, read by our loader in one process."""
    from data_pipeline.loader import SourceSpec, TokenLoader

    loader = TokenLoader([SourceSpec(str(data), 1.0)], micro_batch_size=global_batch, seed=1234, dp_rank=0,
                         dp_size=1, split="train", num_workers=0)
    tokens, labels = next(iter(loader))
    with torch.no_grad():
        logits = load_hf(hf_dir)(tokens).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()


def _val_loss_under_hf(hf_dir: Path, data: Path, num_microbatches: int) -> float:
    """HF's mean loss over the validation micro-batches `pretrain eval` reads (4 samples each, tiny.yaml)."""
    from data_pipeline.loader import EvalLoader

    model = load_hf(hf_dir)
    losses = []
    for tokens, labels in EvalLoader(str(data), micro_batch_size=4, dp_rank=0, dp_size=1, split="val",
                                     max_microbatches=num_microbatches):
        with torch.no_grad():
            logits = model(tokens).logits
        losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)))
    assert len(losses) == num_microbatches
    return torch.stack(losses).mean().item()


def test_continued_pretraining_of_a_released_model_end_to_end(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    docs = corpus_documents(400, seed=1)
    _released_model(tmp_path / "released", docs)
    out = pretrain("convert", "from-hf", "--hf", str(tmp_path / "released"), "--output", str(tmp_path / "imported"))
    assert "tokenizer/ (the HF tokenizer.json and its config files)" in out.stdout
    pretrain("prepare", "--input", str(write_corpus(tmp_path / "corpus.jsonl", docs)), "--tokenizer",
             str(tmp_path / "imported" / "tokenizer"), "--output", str(tmp_path / "data"), "--seq-len", "64",
             "--val-fraction", "0.05", "--samples-per-shard", "64")

    run_config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    run_config["model"] = yaml.safe_load((tmp_path / "imported" / "model.yaml").read_text())["model"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config))
    data = ["data.synthetic=false", f"data.datasets=[{{path: {tmp_path / 'data'}}}]", "data.num_workers=0"]
    # The baseline before training: the released model's validation loss on this data, from the HF directory and
    # from the imported weights alike, and equal to HF's own loss on the same validation micro-batches.
    for weights in (tmp_path / "released", tmp_path / "imported" / "model.safetensors"):
        pretrain("eval", "--weights", str(weights), "--config", str(tmp_path / "run.yaml"), *data,
                 "--json", str(tmp_path / f"{weights.name}.json"))
    baselines = [json.loads((tmp_path / f"{name}.json").read_text())[0] for name in ("released", "model.safetensors")]
    assert baselines[0]["val_loss"] == baselines[1]["val_loss"] and baselines[0]["step"] == 0
    assert baselines[0]["val_loss"] == pytest.approx(_val_loss_under_hf(tmp_path / "released", tmp_path / "data",
                                                                        baselines[0]["num_microbatches_per_rank"]),
                                                     rel=1e-5)

    pretrain("train", "--config", str(tmp_path / "run.yaml"), *data, "train.max_steps=3",
             "optim.warmup_steps=1", "train.log_interval_steps=1", "train.eval_interval_steps=0",
             f"checkpoint.init_from={tmp_path / 'imported' / 'model.safetensors'}",
             f"logging.run_dir={tmp_path / 'run'}")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r["loss"] for r in records if r["kind"] == "train" and r["step"] == 1)
    want = _first_batch_loss_under_hf(tmp_path / "released", tmp_path / "data",
                                      run_config["train"]["global_batch_size"])
    assert first == pytest.approx(want, rel=1e-5)  # fp32 both sides; the loss before the first update

    out = pretrain("convert", "to-hf", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--tokenizer",
                   str(tmp_path / "data" / "tokenizer"), "--output", str(tmp_path / "export"))
    assert "warning" not in out.stdout and "special token ids: bos=400 eos=401" in out.stdout
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "export" / name).read_bytes() == (tmp_path / "released" / name).read_bytes()
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["rope_parameters"] == ROPE and exported["tie_word_embeddings"] is True
    load_hf(tmp_path / "export")  # every weight found, none invented
    text = docs[3]
    assert (AutoTokenizer.from_pretrained(str(tmp_path / "export"), local_files_only=True)(text).input_ids
            == AutoTokenizer.from_pretrained(str(tmp_path / "released"), local_files_only=True)(text).input_ids)
    # Sampling straight from the checkpoint finds the training data's HF tokenizer through the run's manifest.
    out = pretrain("generate", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--prompt", "def main():",
                   "--max-new-tokens", "8", "--greedy")
    assert out.stdout.startswith("def main():")


def _loss_under_hf(hf_dir: Path, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        logits = load_hf(hf_dir)(tokens).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()


def test_context_extension_resumes_with_longer_samples_and_scaled_rope(tmp_path: Path) -> None:
    """Llama 3.1's long-context stage in miniature: a run trained at seq_len 64 continues from its checkpoint at
    seq_len 128 with llama3 RoPE scaling (new data, `checkpoint.allow_data_change`). The first step after the change
    (its loss is taken before its update) equals HF's loss for the checkpoint's weights under the new RoPE on the new
    first batch; under the old RoPE HF's loss is another."""
    from trainer.data import SyntheticTokens

    # init_std 0.1: at tiny.yaml's 0.02 attention is near-uniform and the RoPE would hardly matter to the loss.
    run = ["--config", str(REPO / "configs" / "tiny.yaml"), "model.init_std=0.1", "optim.warmup_steps=2",
           "train.log_interval_steps=1",
           "train.eval_interval_steps=0", "checkpoint.save_interval_steps=4", f"logging.run_dir={tmp_path / 'run'}"]
    longer = ["train.seq_len=128", "model.max_seq_len=256",
              "model.rope_scaling={type: llama3, factor: 8.0, original_max_seq_len: 64}"]
    pretrain("train", *run, "train.max_steps=4")
    out = pretrain("train", *run, "train.max_steps=8", *longer, "checkpoint.allow_data_change=true")
    assert "the new data stream starts at its first sample" in out.stderr and "model.rope_scaling.type" in out.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step_5 = next(r["loss"] for r in records if r["kind"] == "train" and r["step"] == 5)

    step_4 = tmp_path / "run" / "checkpoints" / "step_4"
    for name, overrides in (("scaled", longer), ("unscaled", longer[:2])):
        pretrain("convert", "to-hf", "--checkpoint", str(step_4), "--no-tokenizer", "--output",
                 str(tmp_path / name), *overrides)
    tokens, labels = SyntheticTokens(vocab_size=256, seq_len=128, micro_batch_size=16, seed=1234).microbatch(0)
    assert step_5 == pytest.approx(_loss_under_hf(tmp_path / "scaled", tokens, labels), rel=1e-5)
    unscaled = _loss_under_hf(tmp_path / "unscaled", tokens, labels)
    assert abs(step_5 - unscaled) > 1e-3 * step_5  # measured 1.1e-2
