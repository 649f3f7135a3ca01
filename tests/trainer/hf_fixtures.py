"""Shared pieces of the HF tests: a varied corpus, tiny configs, an HF twin loader, KL and greedy decode, and the HF
reference training loop (`LlamaForCausalLM` + `torch.optim.AdamW`) that our training is compared with."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from trainer.config import Config, ModelConfig, load_config
from trainer.data import SyntheticTokens

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"

VOCAB = 500  # tokenizer pieces; padded to 512 rows at tp=1 (padding is in every test on purpose)
# 0.1, not the usual 0.02: at 0.02 attention is near-uniform, and a wrong rotary layout moved logits by only 0.005.
# At 0.1 every pitfall below moves them by > 3 (measured), so "it matches" means something.
INIT_STD = 0.1

_SNIPPETS = (
    "def {w}(x, y=1):\n    if x < y and y > 0:\n        return x ** 2  # {w}\n    return None\n",
    "class {W}:\n\tdef __init__(self):\n\t\tself.{w} = [1, 2, 3]\n",
    "<div class=\"{w}\">{w} &amp; more</div>\n",
    "for i in range(10):\n    print(f\"{{i}}: {w}\")\n",
    "{w} = {{'a': 0x1F, 'b': 3.14159, 'c': -42}}\n",
    "The {w} costs 12,345.67 EUR; café naïve Ω ß 中文 日本語 😀\n",
    "if (a != b || c >= d) {{ return a / b; }} // {w}\n",
    "SELECT {w}, count(*) FROM t WHERE x <> 'y' GROUP BY 1;\n",
    "    # indented comment with  two  spaces   and tabs\t{w}\n",
    "~`!@#$%^&*()_+-=[]{{}}|\\:;\"',.<>/? {w}\n",
)


def corpus_documents(num_docs: int, seed: int) -> list[str]:
    """Code and prose with every printable ASCII character, indentation, digits and some non-ASCII text."""
    rng = random.Random(seed)
    syllables = "ka lo mi ne ru ta shi po de an el or um ix qu zo".split()
    docs = []
    for _ in range(num_docs):
        parts = []
        for _ in range(rng.randint(3, 8)):
            word = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
            parts.append(rng.choice(_SNIPPETS).format(w=word, W=word.capitalize()))
        docs.append("".join(parts))
    return docs


def write_corpus(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    return path


def tiny_config(**changes: object) -> ModelConfig:
    fields: dict[str, object] = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2,
        rope_theta=500000.0, rms_norm_eps=1e-5, max_seq_len=128, init_std=INIT_STD,
    )
    fields.update(changes)
    return ModelConfig(**fields)


def per_token_kl(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p_other) per position, summed over the vocabulary, in fp64. (B, T, V) → (B, T)."""
    log_p = reference.double().log_softmax(-1)
    log_q = other.double().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@torch.no_grad()
def greedy_ours(model: torch.nn.Module, prompt: torch.Tensor, num_new_tokens: int, vocab_size: int) -> list[int]:
    """Our own greedy loop: full forward each step, argmax over the real vocabulary (padding rows sliced off)."""
    ids = prompt.clone()  # (1, T)
    for _ in range(num_new_tokens):
        next_id = model(ids)[0, -1, :vocab_size].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, prompt.shape[1] :].tolist()


def load_hf(path: Path) -> torch.nn.Module:
    """transformers' own loader, with its loading report checked: nothing missing, nothing invented."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def hf_llama(vocab_size: int, tie: bool, seed: int) -> Any:
    """A random HF Llama of configs/tiny.yaml's shape (fp32), the reference nobody on this project wrote."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = load_config(TINY).model
    hf_cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta,
                         rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_seq_len,
                         tie_word_embeddings=tie, initializer_range=0.1)
    torch.manual_seed(seed)
    return LlamaForCausalLM(hf_cfg).float()


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warmup to the peak at step warmup-1, then cosine from the peak to lr * min_lr_ratio at max_steps."""
    warmup, floor = cfg.optim.warmup_steps, cfg.optim.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / (cfg.train.max_steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train_hf_reference(model: Any, cfg: Config, z_losses: list[float] | None = None) -> list[float]:
    """The textbook loop on HF's model: one forward over each whole global batch (the mean over the batch does not
    depend on how our run splits it over DP ranks and micro-steps; with train.batch_size_rampup the global batches
    grow as the config says). With train.z_loss_weight, PaLM's z-loss is added
    to the objective as its paper writes it (weight · log²Z per token, averaged); the returned losses stay the cross
    entropy, and each step's weighted z term goes to `z_losses`. With model.attention_mask=document or
    model.reset_position_ids, HF's model gets the mask and positions of `packed_document_inputs`; with
    train.mask_eos_loss the positions whose input is the eos are left out of both terms (one mean over the global
    batch's kept tokens)."""
    from trainer.data_check import SYNTHETIC_EOS_ID

    no_decay = [p for name, p in model.named_parameters() if name.endswith("norm.weight")]
    decay = [p for name, p in model.named_parameters() if not name.endswith("norm.weight")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    ramp_sizes = cfg.train.ramp_batch_sizes()  # train.batch_size_rampup: smaller global batches first
    consumed_samples, losses = 0, []
    for step in range(cfg.train.max_steps):
        batch = cfg.train.batch_size_at(step, ramp_sizes)
        stream = SyntheticTokens(vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len,
                                 micro_batch_size=batch, seed=cfg.train.seed)
        tokens, labels = stream.microbatch(consumed_samples)  # the next `batch` samples of the one global order
        consumed_samples += batch
        logits = model(tokens, **packed_document_inputs(tokens, cfg)).logits  # (B, T, vocab): no padding columns
        if cfg.train.mask_eos_loss:  # Megatron's --eod-mask-loss: no loss where the input is a document's end
            labels = torch.where(tokens == SYNTHETIC_EOS_ID, -100, labels)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        kept = labels != -100  # the z term averages over the tokens the cross entropy averages over
        z_loss = cfg.train.z_loss_weight * (logits.logsumexp(dim=-1).square() * kept).sum() / kept.sum()
        (loss + z_loss).backward()
        if z_losses is not None:
            z_losses.append(z_loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def packed_document_inputs(tokens: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """HF's `attention_mask` (B, 1, T, T) and `position_ids` (B, T) for packed samples, written out token by token
    from the packing rule (an eos ends its document; trainer.data_check.SYNTHETIC_EOS_ID for synthetic data): a token
    sees the earlier tokens of its own document (model.attention_mask=document) or of the whole sample, at its
    position in its document (model.reset_position_ids) or in the sample. Empty for a plain causal model."""
    from trainer.data_check import SYNTHETIC_EOS_ID

    if not cfg.model.uses_documents:
        return {}
    batch, seq = tokens.shape
    mask = torch.zeros(batch, 1, seq, seq, dtype=torch.bool)
    positions = torch.zeros(batch, seq, dtype=torch.long)
    for row in range(batch):
        start = 0  # where the current document began
        for t in range(seq):
            mask[row, 0, t, start if cfg.model.attention_mask == "document" else 0:t + 1] = True
            positions[row, t] = t - start if cfg.model.reset_position_ids else t
            if tokens[row, t] == SYNTHETIC_EOS_ID:
                start = t + 1
    return {"attention_mask": mask, "position_ids": positions}
