"""Sample text from an HF directory through transformers: a quick sanity check of an export (or of any HF Llama).

Loading checks transformers' loading report: a missing or mismatched weight makes transformers initialise it at
random and only log a table (notes/data-and-hf.md §4, the untied lm_head case), which would make every sample
garbage for a reason nobody sees. Here it is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.hf.errors import HFConversionError


@dataclass(frozen=True)
class Generation:
    prompt_ids: list[int]  # with BOS when the tokenizer adds one (as our training data does)
    new_ids: list[int]
    text: str  # the continuation only, special tokens dropped


def load_hf_model(hf_dir: str | os.PathLike[str], dtype: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a local directory, offline; refuses any weight HF had to invent."""
    path = Path(hf_dir)
    if not path.exists():
        raise HFConversionError(f"{path} does not exist: pass the directory `pretrain convert to-hf --output` wrote "
                                f"(the quickstart's is runs/quickstart/hf), or --checkpoint DIR")
    if not (path / "config.json").is_file():
        raise HFConversionError(f"{path} is not an HF model directory (no config.json): pass the directory "
                                f"written by `pretrain convert to-hf`")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local path never needs the hub; never wait on a network
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar for a local file would only clutter the sample
    kwargs = {"dtype": dtype} if dtype else {}
    model, info = AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, output_loading_info=True, **kwargs
    )
    check_loading_info(info, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise HFConversionError(f"{path} has no loadable tokenizer ({err}); export it with "
                                f"`pretrain convert to-hf --tokenizer DIR`") from None
    return model.eval(), tokenizer


def check_loading_info(info: dict[str, Any], hf_dir: Path) -> None:
    problems = []
    for kind in ("missing_keys", "mismatched_keys", "unexpected_keys", "error_msgs"):
        entries = sorted(str(entry) for entry in info.get(kind) or ())
        if entries:
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(entries[:6])}")
    if problems:
        raise HFConversionError(
            f"transformers could not load every weight of {hf_dir} as saved ({'; '.join(problems)}); it would "
            f"run with randomly initialised weights. Re-export the directory (pretrain convert to-hf)"
        )


def generate_text(
    hf_dir: str | os.PathLike[str],
    prompt: str,
    *,
    max_new_tokens: int = 64,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Generation:
    """Continue `prompt`; greedy ignores temperature/top_p. Stops at EOS or after max_new_tokens."""
    if max_new_tokens < 1:
        raise HFConversionError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
    if not greedy and (temperature <= 0 or not 0 < top_p <= 1):
        raise HFConversionError(f"temperature ({temperature}) must be > 0 and top_p ({top_p}) in (0, 1]; "
                                f"for deterministic output use greedy decoding")
    import torch

    model, tokenizer = load_hf_model(hf_dir)
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids  # (1, T), BOS first when add_bos_token
    if prompt_ids.shape[1] == 0:
        raise HFConversionError("the prompt is empty and the tokenizer adds no BOS: give a non-empty --prompt")
    torch.manual_seed(seed)
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    with torch.no_grad():
        out = model.generate(
            prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=max_new_tokens,
            do_sample=not greedy, pad_token_id=_pad_id(tokenizer), **sampling,
        )
    new_ids = out[0, prompt_ids.shape[1]:].tolist()
    return Generation(prompt_ids[0].tolist(), new_ids, continuation_text(tokenizer, prompt_ids[0].tolist(), new_ids))


def continuation_text(tokenizer: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add to the prompt. Not decode(new_ids): the decoder strips the leading space of
    whatever it decodes (spm's dummy prefix), so "Hello" + "▁world" would print as "Helloworld"."""
    whole = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    return whole[len(prompt):] if whole.startswith(prompt) else tokenizer.decode(new_ids, skip_special_tokens=True)


def _pad_id(tokenizer: Any) -> int | None:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
