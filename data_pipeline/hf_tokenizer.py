"""A Hugging Face tokenizer (tokenizer.json, the `tokenizers` format) for `pretrain prepare`, with the interface of
our sentencepiece `Tokenizer`: for continued pretraining of a released model (Llama 3, Mistral, ...), whose data
must be tokenized by that model's own tokenizer.

    tokenizer = load_tokenizer("models/Llama-3.2-1B")   # a directory with tokenizer.json → HFTokenizer

What decides the tokens:
- tokenizer.json alone (normalizer, pre-tokenizer, model, added tokens). Documents are encoded without the special
  tokens its post-processor would add (`add_special_tokens=False`); prepare appends the eos after each document as
  for our own tokenizers, so packed data looks the same whichever tokenizer made it.
- the special tokens' names come from tokenizer_config.json (`bos_token`, `eos_token`, `pad_token`, `unk_token`: a
  string or an AddedToken object), else special_tokens_map.json; their ids from tokenizer.json's vocabulary.
  Prepare needs an eos.
- `fingerprint` is the sha256 of tokenizer.json's canonical JSON: the same encoding gives the same fingerprint
  whatever the file's formatting.

Uses `tokenizers`, which transformers (HF export) already brings: no new dependency.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.errors import DataPipelineError
from data_pipeline.tokenizer import MODEL_FILENAME

HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # first one naming a role wins
SPECIAL_ROLES = ("unk", "bos", "eos", "pad")
FINGERPRINT_PREFIX = "hf-tokenizers/1:"


def hf_tokenizer_file(path: str | os.PathLike[str]) -> Path | None:
    """The HF tokenizer.json that `path` (a directory, or the file itself) names, or None when it names none: a
    directory with a sentencepiece tokenizer.model is sentencepiece's (Llama 2's HF folders hold both, and our own
    tokenizer folders keep their metadata in a file also called tokenizer.json)."""
    candidate = Path(path)
    if candidate.is_dir():
        if (candidate / MODEL_FILENAME).is_file():
            return None
        candidate = candidate / HF_TOKENIZER_FILE
    if candidate.suffix != ".json" or not candidate.is_file():
        return None
    try:
        content = json.loads(candidate.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return candidate if isinstance(content, dict) and isinstance(content.get("model"), dict) else None


class HFTokenizer:
    """A loaded tokenizer.json with the config files that name its special tokens. Picklable (it ships the files'
    text), for worker processes; `files` writes them out again unchanged (a dataset's tokenizer/, an HF export)."""

    def __init__(self, tokenizer_json: str, config_files: dict[str, str] | None = None, source: str = "") -> None:
        """config_files: file name (HF_CONFIG_FILES) → its text; none: no special tokens are known."""
        from tokenizers import Tokenizer as RustTokenizer

        self._json = tokenizer_json
        self._config_files = dict(config_files or {})
        self._source = source or "(tokenizer.json given as text)"
        try:
            self._tok = RustTokenizer.from_str(tokenizer_json)
        except Exception as err:  # the Rust side raises a bare Exception for a malformed file
            raise DataPipelineError(f"cannot load the HF tokenizer {self._source}: {err}") from err
        self._special_tokens = special_token_names(self._config_files, self._source)
        self._ids = {role: self._id_of(role, name) for role, name in self._special_tokens.items()}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HFTokenizer:
        """A directory holding tokenizer.json (and tokenizer_config.json), or the tokenizer.json file."""
        file = hf_tokenizer_file(path)
        if file is None:
            raise DataPipelineError(f"no HF tokenizer.json at {path}: pass a model directory with tokenizer.json "
                                    f"(the `tokenizers` format), or our sentencepiece tokenizer directory")
        configs = {name: (file.parent / name).read_text(encoding="utf-8") for name in HF_CONFIG_FILES
                   if (file.parent / name).is_file()}
        return cls(file.read_text(encoding="utf-8"), configs, str(file))

    @property
    def files(self) -> dict[str, str]:
        """File name → text of tokenizer.json and the config files it was loaded with."""
        return {HF_TOKENIZER_FILE: self._json, **self._config_files}

    def _id_of(self, role: str, name: str | None) -> int:
        if name is None:
            return -1
        token_id = self._tok.token_to_id(name)
        if token_id is None:
            raise DataPipelineError(f"{self._source}: the {role} token {name!r} that tokenizer_config.json names is "
                                    f"not in the vocabulary of tokenizer.json; the files do not belong together")
        return int(token_id)

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer_json": self._json, "config_files": self._config_files, "source": self._source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tokenizer_json"], state["config_files"], state["source"])  # type: ignore[misc]

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can emit, its added (special) tokens included: HF config.json's vocab_size."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def unk_id(self) -> int:
        return self._ids["unk"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @functools.cached_property
    def prepends_bos(self) -> bool:
        """Whether encoding with the special tokens (AutoTokenizer's default, and so lm-evaluation-harness's) puts
        the bos first: what tokenizer.json's post-processor does (Llama 2 and 3 folders do; GPT-2 and Qwen do not).
        Asked once per task pair, so encoded once."""
        with_special, plain = (self._tok.encode("a", add_special_tokens=add).ids for add in (True, False))
        return self.bos_id >= 0 and with_special[:1] == [self.bos_id] and plain[:1] != [self.bos_id]

    @property
    def model_type(self) -> str:
        return "hf-" + str(json.loads(self._json)["model"].get("type", "unknown")).lower()

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(json.loads(self._json), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256((FINGERPRINT_PREFIX + canonical).encode("ascii")).hexdigest()

    def encode(self, texts: Sequence[str], num_threads: int = 1) -> list[np.ndarray]:
        """Token ids (int64) of each text, without the special tokens the post-processor adds. num_threads=1: one
        text at a time in this thread (prepare's workers are processes already); more: the library's own
        parallel batch encoder."""
        if num_threads == 1:
            encodings = [self._tok.encode(text, add_special_tokens=False) for text in texts]
        else:
            encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""


def special_token_names(config_files: dict[str, str], source: str) -> dict[str, str | None]:
    """Each role's token name from tokenizer_config.json, else special_tokens_map.json (None: the role is unset)."""
    names: dict[str, str | None] = dict.fromkeys(SPECIAL_ROLES)
    for filename in reversed(HF_CONFIG_FILES):  # the first file's entries are applied last and win
        if filename not in config_files:
            continue
        try:
            config = json.loads(config_files[filename])
        except ValueError as err:
            raise DataPipelineError(f"{filename} beside {source} is not valid JSON: {err}") from err
        for role in SPECIAL_ROLES:
            value = config.get(f"{role}_token") if isinstance(config, dict) else None
            if isinstance(value, dict):  # an AddedToken written out
                value = value.get("content")
            if isinstance(value, str):
                names[role] = value
    return names
