"""checkpoint.init_from: a fresh run starts from imported HF weights in any layout, and resume beats it.

A random tiny HF LlamaForCausalLM (fp32, the tiny config's shapes, vocab 256 = no padding at tp 1 or 2, so the HF loss
and ours see the same softmax) is saved with save_pretrained and converted with import_hf_to_dir. Then:
  - TP=1 from OUT/model.safetensors: the first logged loss (weights before any update) equals the HF model's loss on
    the same 16 synthetic samples within 1e-5 relative;
  - TP=2 straight from the HF directory, and PP=2 from model.safetensors: per-step losses equal TP=1's within 1e-5
    over 3 steps;
  - a run with both a checkpoint to resume and init_from resumes (and says so);
  - a source of another hidden size is refused naming the tensor and both shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# Imported once here so the forked ranks start fast (notes/megatron-core-cpu.md).
import deepspeed  # noqa: F401
import megatron.core.parallel_state  # noqa: F401
import megatron.core.tensor_parallel  # noqa: F401
import pytest
import torch
import torch._dynamo  # noqa: F401

from trainer.checkpoint import CheckpointCompatibilityError
from trainer.checkpoint.init_from import init_weights_from
from trainer.config import load_config
from trainer.data import SyntheticTokens
from trainer.hf import import_hf_to_dir, save_full_state_dict
from trainer.model import Llama
from trainer.parallelize import ParallelModel
from trainer.testing import run_distributed

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
STEPS = 3
BASE = [f"train.max_steps={STEPS}", "optim.warmup_steps=1", "train.log_interval_steps=1", "train.eval_interval_steps=0",
        "logging.tensorboard=false", "checkpoint.save_interval_steps=2", "checkpoint.save_at_end=false"]
REL_TOL = 1e-5


def _train(rank: int, world_size: int, overrides: list[str], run_dir: str) -> None:
    from trainer.train import train

    train(load_config(TINY, [*BASE, f"logging.run_dir={run_dir}", *overrides]))


def run(world_size: int, overrides: list[str], run_dir: Path) -> dict[int, float]:
    run_distributed(_train, world_size, overrides, str(run_dir), timeout_s=120)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("init_from")
    cfg = load_config(TINY).model
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                         max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False,
                         initializer_range=0.1)  # not near-uniform attention: a wrong load moves the loss a lot
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg).float().eval()
    hf_dir = root / "hf"
    hf.save_pretrained(hf_dir)
    out = import_hf_to_dir(hf_dir, root / "converted", tp=1)
    # The first global batch of the tiny config (16 samples = positions 0..15), its mean loss under HF.
    stream = SyntheticTokens(vocab_size=cfg.vocab_size, seq_len=64, micro_batch_size=16, seed=1234)
    tokens, labels = stream.microbatch(0)
    with torch.no_grad():
        logits = hf(tokens).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                                labels.reshape(-1)).item()
    return {"root": root, "hf_dir": hf_dir, "state": out.out_dir / "model.safetensors", "hf_loss": hf_loss}


@pytest.fixture(scope="module")
def tp1(imported: dict[str, Any]) -> dict[str, Any]:
    run_dir = imported["root"] / "tp1"
    losses = run(1, ["parallel.tp=1", f"checkpoint.init_from={imported['state']}"], run_dir)
    return {"losses": losses, "run_dir": run_dir}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * abs(b)


def test_first_loss_equals_hf_loss(imported: dict[str, Any], tp1: dict[str, Any]) -> None:
    assert sorted(tp1["losses"]) == [1, 2, 3]
    assert _close(tp1["losses"][1], imported["hf_loss"]), (tp1["losses"][1], imported["hf_loss"])
    log_text = (tp1["run_dir"] / "logs" / "rank0.log").read_text()
    assert "weights initialised from full state dict" in log_text


@pytest.mark.parametrize("layout", ["tp2-from-hf-dir", "pp2-from-safetensors"])
def test_other_layouts_match_tp1(imported: dict[str, Any], tp1: dict[str, Any], layout: str) -> None:
    overrides = (["parallel.tp=2", f"checkpoint.init_from={imported['hf_dir']}"] if layout.startswith("tp2")
                 else ["parallel.pp=2", f"checkpoint.init_from={imported['state']}"])
    losses = run(2, overrides, imported["root"] / layout)
    assert sorted(losses) == [1, 2, 3]
    for step in (1, 2, 3):
        assert _close(losses[step], tp1["losses"][step]), (layout, step, losses[step], tp1["losses"][step])


def test_resume_beats_init_from(imported: dict[str, Any], tp1: dict[str, Any]) -> None:
    run_dir = imported["root"] / "resume"
    step_2 = tp1["run_dir"] / "checkpoints" / "step_2"
    losses = run(1, [f"checkpoint.resume={step_2}", f"checkpoint.init_from={imported['state']}"], run_dir)
    assert sorted(losses) == [3]
    assert losses[3] == tp1["losses"][3]  # same layout: a resume is bit-exact
    log_text = (run_dir / "logs" / "rank0.log").read_text()
    assert "ignored: resuming from checkpoint" in log_text and "weights initialised from" not in log_text


def test_shape_mismatch_is_refused(imported: dict[str, Any], tmp_path: Path) -> None:
    cfg = load_config(TINY, ["model.hidden_size=32", "model.intermediate_size=96"])
    model = ParallelModel(Llama(cfg.model, 256), loss_fn=None, num_layers=2, is_pipeline=False)  # type: ignore[arg-type]
    ctx = SimpleNamespace(tp=1, tp_rank=0)
    source = tmp_path / "bare" / "model.safetensors"  # no model.yaml beside it: only the tensor shapes can tell
    from safetensors.torch import load_file

    save_full_state_dict(load_file(str(imported["state"])), source)
    with pytest.raises(CheckpointCompatibilityError, match=r"embed_tokens\.weight: .*\[256, 64\].*\[256, 32\]"):
        init_weights_from(model, cfg, ctx, source)
    # With the model.yaml `convert from-hf` wrote, the message names the config field.
    with pytest.raises(CheckpointCompatibilityError, match=r"model\.hidden_size=64 .* model\.hidden_size=32"):
        init_weights_from(model, cfg, ctx, imported["state"])


def test_other_rope_than_the_source_is_warned_about(imported: dict[str, Any],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The weights fit, but with another rope_theta or RoPE scaling they compute something else: said, not silent
    (legitimate when extending the context)."""
    cfg = load_config(TINY, ["model.rope_scaling={type: llama3, factor: 8.0, original_max_seq_len: 64}"])
    model = ParallelModel(Llama(cfg.model, 256), loss_fn=None, num_layers=2, is_pipeline=False)  # type: ignore[arg-type]
    ctx = SimpleNamespace(tp=1, tp_rank=0, rank=0)
    with caplog.at_level("WARNING", logger="trainer.checkpoint.init_from"):
        init_weights_from(model, cfg, ctx, imported["state"])
    assert "was trained with model.rope_scaling=None, this run uses RopeScalingConfig(type='llama3'" in caplog.text
    caplog.clear()
    same = load_config(TINY)
    init_weights_from(ParallelModel(Llama(same.model, 256), loss_fn=None, num_layers=2,  # type: ignore[arg-type]
                                    is_pipeline=False), same, ctx, imported["state"])
    assert "was trained with" not in caplog.text


def _hf_with_mean_rows(hf_dir: Path, vocab_size: int) -> Any:
    """transformers' own resize, its new rows then set to the mean of the old ones (embedding and lm_head)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(hf_dir)).float().eval()
    old = hf.get_input_embeddings().weight.shape[0]
    hf.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for weight in (hf.get_input_embeddings().weight, hf.get_output_embeddings().weight):
            weight[old:] = weight[:old].double().mean(dim=0).float()
    return hf


@pytest.mark.parametrize("tp", [1, 2])
def test_added_tokens_start_at_the_mean_row(imported: dict[str, Any], tmp_path: Path, tp: int) -> None:
    """model.vocab_size 300 from a 256-token source (44 tokens added to its tokenizer), init_from_new_vocab_rows=mean:
    the first loss (before any update) equals HF's resized model with mean rows, on a batch that uses the new ids.
    Under TP 2 the mean is summed over the vocabulary shards. (Zero rows instead: 3.6e-3 away, measured.)"""
    added = ["model.vocab_size=300", "checkpoint.init_from_new_vocab_rows=mean"]
    losses = run(tp, [*added, f"parallel.tp={tp}", f"checkpoint.init_from={imported['hf_dir']}"], tmp_path / "run")
    tokens, labels = SyntheticTokens(vocab_size=300, seq_len=64, micro_batch_size=16, seed=1234).microbatch(0)
    assert (tokens >= 256).any()
    with torch.no_grad():
        logits = _hf_with_mean_rows(imported["hf_dir"], 300)(tokens).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 300).double(), labels.reshape(-1)).item()
    assert _close(losses[1], want), (losses[1], want)


def test_added_tokens_are_refused_unless_asked_for(imported: dict[str, Any], tmp_path: Path) -> None:
    cfg = load_config(TINY, ["model.vocab_size=300"])
    model = ParallelModel(Llama(cfg.model, 384), loss_fn=None, num_layers=2, is_pipeline=False)  # type: ignore[arg-type]
    ctx = SimpleNamespace(tp=1, tp_rank=0, rank=0)
    with pytest.raises(CheckpointCompatibilityError, match="model.vocab_size=256 but this config has "
                                                           "model.vocab_size=300.*init_from_new_vocab_rows=mean"):
        init_weights_from(model, cfg, ctx, imported["hf_dir"])
    bare = tmp_path / "bare" / "model.safetensors"  # no model.yaml: the source's vocabulary size is unknown
    from safetensors.torch import load_file

    save_full_state_dict(load_file(str(imported["state"])), bare)
    asked = load_config(TINY, ["model.vocab_size=300", "checkpoint.init_from_new_vocab_rows=mean"])
    with pytest.raises(CheckpointCompatibilityError, match="does not say its vocabulary size"):
        init_weights_from(model, asked, ctx, bare)
