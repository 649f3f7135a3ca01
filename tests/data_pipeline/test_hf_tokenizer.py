"""`pretrain prepare --tokenizer <HF model dir>`: data for continued pretraining, tokenized by the model's own
tokenizer.json. The references are the `tokenizers` library and transformers' AutoTokenizer loading the same folder
(what a user of the released model runs), on a Llama-3-like tokenizer built here: byte-level BPE, its special tokens
added after the learned vocabulary, a post-processor that prepends <|begin_of_text|>."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from test_prepare import SAMPLES_PER_SHARD, SEQ_LEN, Corpus, _documents, _read_webdataset, _tree_bytes
from test_prepare import corpus  # noqa: F401 (a fixture)

from data_pipeline.errors import DataPipelineError
from data_pipeline.hf_tokenizer import HFTokenizer
from data_pipeline.inspect import EOS_MARKER, decode_tokens
from data_pipeline.manifest import Manifest
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.tokenizer import load_tokenizer
from llama3_tokenizer import BOS, EOS, write_llama3_like_tokenizer

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama3_like_tokenizer(tmp_path_factory.mktemp("hf_tok") / "llama3ish", _documents(300, 7))


TEXTS = ["hello world", "  two leading spaces\n\tand a tab", "café naïve 中文 😀", "", f"a literal {EOS} in text",
         *_documents(20, 3)]


def test_encodes_like_transformers_autotokenizer(hf_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = load_tokenizer(hf_dir)
    assert isinstance(tokenizer, HFTokenizer)
    reference = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    assert tokenizer.vocab_size == len(reference) == 402
    assert (tokenizer.bos_id, tokenizer.eos_id) == (reference.bos_token_id, reference.eos_token_id) == (400, 401)
    assert (tokenizer.unk_id, tokenizer.pad_id) == (-1, -1)
    assert tokenizer.model_type == "hf-bpe"
    for text, ids in zip(TEXTS, tokenizer.encode(TEXTS), strict=True):
        assert ids.tolist() == reference(text, add_special_tokens=False).input_ids, text
        assert tokenizer.decode(ids) == text  # byte-level BPE round-trips every text
    assert reference("hi").input_ids[0] == 400  # the post-processor's BOS, which prepare leaves out
    assert [a.tolist() for a in tokenizer.encode(TEXTS, num_threads=2)] == [a.tolist() for a in tokenizer.encode(TEXTS)]
    clone = pickle.loads(pickle.dumps(tokenizer))  # as prepare's spawned workers receive it
    assert clone.fingerprint == tokenizer.fingerprint and clone.encode(TEXTS[:3])[2].tolist() == tokenizer.encode(
        TEXTS[:3])[2].tolist()


def test_prepends_bos_is_what_autotokenizer_does_by_default(hf_dir: Path, tmp_path: Path) -> None:
    """Downstream tasks put the bos first exactly where AutoTokenizer (and so lm-eval) does: a Llama 3 folder's
    post-processor adds it; without a post-processor (GPT-2 style) nothing is added, though a bos is named."""
    from transformers import AutoTokenizer

    bare = tmp_path / "no_post_processor"
    bare.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        content = json.loads((hf_dir / name).read_text())
        content.pop("post_processor", None)
        (bare / name).write_text(json.dumps(content))
    for folder, prepends in ((hf_dir, True), (bare, False)):
        reference = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        assert (reference("hi").input_ids[0] == reference.bos_token_id) is prepends
        assert load_tokenizer(folder).prepends_bos is prepends


def test_the_fingerprint_follows_the_encoding_not_the_formatting(hf_dir: Path, tmp_path: Path) -> None:
    content = json.loads((hf_dir / "tokenizer.json").read_text())
    (tmp_path / "reformatted").mkdir()
    (tmp_path / "reformatted" / "tokenizer.json").write_text(json.dumps(content, indent=4))
    assert HFTokenizer.load(tmp_path / "reformatted").fingerprint == HFTokenizer.load(hf_dir).fingerprint
    content["model"]["merges"] = content["model"]["merges"][:-1]
    (tmp_path / "fewer_merges").mkdir()
    (tmp_path / "fewer_merges" / "tokenizer.json").write_text(json.dumps(content))
    assert HFTokenizer.load(tmp_path / "fewer_merges").fingerprint != HFTokenizer.load(hf_dir).fingerprint


def _prepare(corpus: Corpus, tokenizer: Path, out: Path, num_proc: int = 1) -> Manifest:
    prepare(PrepareConfig(inputs=corpus.inputs, tokenizer=str(tokenizer), output_dir=str(out), seq_len=SEQ_LEN,
                          samples_per_shard=SAMPLES_PER_SHARD, num_proc=num_proc, progress=False))
    return Manifest.load(out)


def test_prepare_packs_documents_with_the_hf_tokenizer(corpus: Corpus, hf_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    manifest = _prepare(corpus, hf_dir, tmp_path / "one")
    reference = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    stream = np.concatenate([np.append(reference(doc, add_special_tokens=False).input_ids, 401)
                             for doc in corpus.docs])  # the definition: each document, then eos
    _, samples = _read_webdataset(tmp_path / "one", "train", manifest)
    assert np.array_equal(samples.reshape(-1), stream[: samples.size])
    info = manifest.tokenizer
    assert (info.model_type, info.vocab_size, info.eos_id, info.bos_id, info.model_file) == (
        "hf-bpe", 402, 401, 400, "tokenizer/tokenizer.json")
    assert info.fingerprint == HFTokenizer.load(hf_dir).fingerprint
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the dataset carries its tokenizer, unchanged
        assert (tmp_path / "one" / "tokenizer" / name).read_bytes() == (hf_dir / name).read_bytes()
    # `pretrain inspect` decodes with it: a document whole inside a sample comes back as written.
    sample = next(row for row in samples if (row == 401).sum() >= 2)
    whole = decode_tokens(manifest, sample).split(EOS_MARKER)[1]  # type: ignore[union-attr]
    assert whole in corpus.docs
    # The dataset's tokenizer/ is itself a tokenizer for the next prepare; worker processes give the same bytes.
    again = _prepare(corpus, tmp_path / "one" / "tokenizer", tmp_path / "two", num_proc=2)
    assert again.tokenizer == manifest.tokenizer
    assert {k: v for k, v in _tree_bytes(tmp_path / "two").items() if k != "manifest.json"} == {
        k: v for k, v in _tree_bytes(tmp_path / "one").items() if k != "manifest.json"}


def test_hf_tokenizers_without_a_usable_eos_are_refused(corpus: Corpus, hf_dir: Path, tmp_path: Path) -> None:
    import shutil

    no_eos = tmp_path / "no_eos"
    shutil.copytree(hf_dir, no_eos)
    (no_eos / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS}))
    with pytest.raises(DataPipelineError, match="names no eos_token .*add \"eos_token\""):
        _prepare(corpus, no_eos, tmp_path / "out")
    (no_eos / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(DataPipelineError, match="the eos token '</s>' .* is not in the vocabulary"):
        load_tokenizer(no_eos)
    with pytest.raises(DataPipelineError, match="pass an HF model directory with tokenizer.json"):
        load_tokenizer(tmp_path / "nothing_here")


def test_add_bos_frames_each_document_as_llama3_did(corpus: Corpus, hf_dir: Path, tmp_path: Path) -> None:
    """--add-bos: <|begin_of_text|> tokens <|end_of_text|> per document, recorded in the manifest; a tokenizer
    without a bos is refused."""
    from transformers import AutoTokenizer

    prepare(PrepareConfig(inputs=corpus.inputs, tokenizer=str(hf_dir), output_dir=str(tmp_path / "bos"),
                          seq_len=SEQ_LEN, samples_per_shard=SAMPLES_PER_SHARD, num_proc=2, progress=False,
                          add_bos=True))
    manifest = Manifest.load(tmp_path / "bos")
    reference = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    stream = np.concatenate([[400, *reference(doc, add_special_tokens=False).input_ids, 401] for doc in corpus.docs])
    _, samples = _read_webdataset(tmp_path / "bos", "train", manifest)
    assert np.array_equal(samples.reshape(-1), stream[: samples.size])
    assert manifest.prepare_args["add_bos"] is True
    (hf_dir.parent / "no_bos").mkdir()
    (hf_dir.parent / "no_bos" / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    (hf_dir.parent / "no_bos" / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    with pytest.raises(DataPipelineError, match="--add-bos puts the tokenizer's bos before each document"):
        prepare(PrepareConfig(inputs=corpus.inputs, tokenizer=str(hf_dir.parent / "no_bos"),
                              output_dir=str(tmp_path / "refused"), add_bos=True, progress=False))
