"""A Llama-3-like HF tokenizer folder, built offline for the tests that need one (tests/ is on sys.path: its
conftest.py lives there): byte-level BPE, special tokens after the learned vocabulary, a post-processor that
prepends <|begin_of_text|>, and a tokenizer_config.json naming bos and eos."""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def write_llama3_like_tokenizer(out: Path, docs: list[str], vocab_size: int = 400) -> Path:
    """tokenizer.json + tokenizer_config.json as a Llama 3 folder has them (trained on `docs`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([BOS, EOS])  # after the learned vocabulary, like Llama 3's 128000+
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        # eos as an AddedToken written out, as older transformers saved them
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": {
            "__type": "AddedToken", "content": EOS, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True},
        "model_max_length": 131072, "clean_up_tokenization_spaces": False}))
    return out
