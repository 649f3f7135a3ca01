"""tokenizer.py: BPE + unigram training with pinned settings, exact round trips, reproducible pieces, special ids,
long lines split (counted) instead of dropped, fingerprint semantics."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.errors import DataPipelineError
from data_pipeline.tokenizer import (
    SPECIAL_IDS,
    Tokenizer,
    TokenizerTrainConfig,
    TrainResult,
    parse_model_spec,
    reservoir_sample,
    split_utf8,
    train_tokenizer,
)


def _pseudo_words(count: int, rng: random.Random) -> list[str]:
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "de", "an", "el", "or", "um", "ix", "qu", "zo",
                 "be", "fa"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(count)]


def make_documents(num_docs: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text and pseudo-code with indentation, digits and a few non-ASCII characters."""
    rng = random.Random(seed)
    words = _pseudo_words(400, random.Random(1234)) + ["def", "return", "class", "import", "self", "value", "index"]
    docs = []
    for _ in range(num_docs):
        lines = []
        for _ in range(rng.randint(3, 12)):
            indent = " " * rng.choice((0, 0, 4, 8))
            text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 10)))
            lines.append(f"{indent}{text} {rng.randint(0, 99999)}{rng.choice(('', ':', ' é', ' café', '  # x'))}")
        docs.append("\n".join(lines) + "\n")
    return docs


def write_jsonl(path: Path, docs: list[str], extra_lines: tuple[bytes, ...] = ()) -> Path:
    with open(path, "wb") as fh:
        fh.writelines(json.dumps({"text": doc}).encode() + b"\n" for doc in docs)
        fh.writelines(raw + b"\n" for raw in extra_lines)
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok_corpus")
    write_jsonl(root / "docs.jsonl", make_documents(300), extra_lines=(b'{"text": "unterminated', b'{"body": "x"}'))
    return root / "docs.jsonl"


def _train(corpus: Path, out: Path, **overrides: object) -> TrainResult:
    settings = {"vocab_size": 400, "model_type": "bpe", "input_sentence_size": 0, "num_threads": 2}
    settings.update(overrides)
    return train_tokenizer(TokenizerTrainConfig(inputs=(str(corpus),), output_dir=str(out), **settings))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def bpe(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return _train(corpus, tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def unigram(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return _train(corpus, tmp_path_factory.mktemp("unigram"), model_type="unigram")


ROUND_TRIP_TEXTS = [
    "    x  =  1\n\tdef f():  # two  spaces\n",  # indentation, runs of spaces and tabs survive (identity normalizer)
    "ﬁ ① Ω café 中文 \U0001F600 ok",  # NFKC would rewrite ﬁ and ①; unseen characters go through byte fallback
    "line one\r\nline two\r\n\n\n",
    " leading space and trailing  ",
    "digits 1234567890 split",
]


@pytest.mark.parametrize("which", ["bpe", "unigram"])
def test_round_trip_is_exact(which: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(which).tokenizer
    encoded = tok.encode(ROUND_TRIP_TEXTS)
    assert all(isinstance(ids, np.ndarray) and ids.dtype == np.int32 for ids in encoded)
    assert [tok.decode(ids) for ids in encoded] == ROUND_TRIP_TEXTS
    assert tok.unk_id not in np.concatenate(encoded)  # byte fallback: nothing becomes <unk>
    assert tok.model_type == which


def test_special_ids_settings_and_metadata(bpe: TrainResult) -> None:
    tok = bpe.tokenizer
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tok.id_to_piece(4) == "<0x00>"  # then the 256 byte pieces
    assert tok.vocab_size == 400
    meta = json.loads(bpe.metadata_path.read_text())
    assert meta == bpe.metadata
    assert {k: meta[k] for k in SPECIAL_IDS} == SPECIAL_IDS
    assert meta["model_type"] == "bpe" and meta["vocab_size"] == 400 and meta["fingerprint"] == tok.fingerprint
    assert meta["sources"] == ["docs.jsonl"]
    assert meta["num_documents"] == 300 and meta["num_sentences"] == meta["num_lines"]  # no cap: every line
    assert meta["settings"]["normalization_rule_name"] == "identity"
    assert meta["settings"]["remove_extra_whitespaces"] is False and meta["settings"]["byte_fallback"] is True
    spec = parse_model_spec(tok.model_proto)
    assert spec.normalizer["name"] == "identity" and spec.normalizer["remove_extra_whitespaces"] is False
    assert spec.encode_settings["byte_fallback"] == 1
    # Bad records met during training are counted and reported, not dropped silently.
    assert meta["bad_input"]["by_reason"] == {"malformed_json": 1, "missing_text_key": 1}
    report_rows = bpe.report_path.read_text().splitlines()
    assert report_rows[1].startswith("docs.jsonl\t301\tmalformed_json\t")
    assert report_rows[2].startswith("docs.jsonl\t302\tmissing_text_key\t")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_retraining_gives_identical_pieces_and_files(model_type: str, corpus: Path, tmp_path: Path,
                                                     request: pytest.FixtureRequest) -> None:
    first: TrainResult = request.getfixturevalue("bpe" if model_type == "bpe" else "unigram")
    again = _train(corpus, tmp_path / "again", model_type=model_type)
    assert parse_model_spec(again.tokenizer.model_proto).pieces == parse_model_spec(first.tokenizer.model_proto).pieces
    assert again.tokenizer.fingerprint == first.tokenizer.fingerprint
    # No temp paths inside the .model (trained from an iterator into a buffer), so even the bytes are equal.
    assert again.model_path.read_bytes() == first.model_path.read_bytes()
    assert again.metadata_path.read_bytes() == first.metadata_path.read_bytes()
    # BPE does not depend on the thread count; unigram's EM scores do (float sums per thread), which is why
    # num_threads is part of the recorded settings with a fixed default.
    one_thread = _train(corpus, tmp_path / "one_thread", model_type=model_type, num_threads=1)
    if model_type == "bpe":
        assert one_thread.tokenizer.fingerprint == first.tokenizer.fingerprint
    assert one_thread.metadata["settings"]["num_threads"] == 1 and first.metadata["settings"]["num_threads"] == 2


def test_sampling_is_seeded_and_capped(corpus: Path, tmp_path: Path) -> None:
    a = _train(corpus, tmp_path / "a", input_sentence_size=500, seed=7)
    b = _train(corpus, tmp_path / "b", input_sentence_size=500, seed=7)
    assert a.metadata["num_sentences"] == 500 < a.metadata["num_lines"]
    assert a.tokenizer.fingerprint == b.tokenizer.fingerprint


def test_fingerprint_is_about_encoding_not_files(bpe: TrainResult, unigram: TrainResult, tmp_path: Path) -> None:
    reloaded_from_dir = Tokenizer.load(bpe.model_path.parent)
    reloaded_from_file = Tokenizer.load(bpe.model_path)
    assert reloaded_from_dir.fingerprint == reloaded_from_file.fingerprint == bpe.tokenizer.fingerprint
    assert pickle.loads(pickle.dumps(bpe.tokenizer)).fingerprint == bpe.tokenizer.fingerprint
    assert bpe.tokenizer.fingerprint != unigram.tokenizer.fingerprint
    assert len(bpe.tokenizer.fingerprint) == 64


def test_recorded_fingerprint_is_used_only_for_the_same_model_bytes(bpe: TrainResult, unigram: TrainResult,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from data_pipeline import tokenizer as tokenizer_module

    def no_parsing(proto: bytes) -> None:
        raise AssertionError("the model proto was parsed although tokenizer.json vouches for these bytes")

    assert bpe.metadata["model_sha256"] == hashlib.sha256(bpe.model_path.read_bytes()).hexdigest()
    with monkeypatch.context() as patch:
        patch.setattr(tokenizer_module, "parse_model_spec", no_parsing)
        loaded = Tokenizer.load(bpe.model_path.parent)
        assert (loaded.fingerprint, loaded.model_type) == (bpe.tokenizer.fingerprint, "bpe")
    # A model replaced next to an old tokenizer.json: the record is stale, so the model itself decides.
    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copyfile(bpe.metadata_path, stale / "tokenizer.json")
    shutil.copyfile(unigram.model_path, stale / "tokenizer.model")
    reloaded = Tokenizer.load(stale)
    assert (reloaded.fingerprint, reloaded.model_type) == (unigram.tokenizer.fingerprint, "unigram")
    # Someone else's tokenizer.json (e.g. Hugging Face's), an unreadable one, or another format version: ignored.
    shutil.copyfile(bpe.model_path, stale / "tokenizer.model")
    other_version = dict(bpe.metadata, format_version=bpe.metadata["format_version"] + 1, fingerprint="0" * 64)
    for text in ('{"version": "1.0", "model": {"type": "BPE"}}', "{not json", json.dumps(other_version)):
        (stale / "tokenizer.json").write_text(text)
        assert Tokenizer.load(stale).fingerprint == bpe.tokenizer.fingerprint


def test_long_lines_are_split_and_counted_not_dropped(tmp_path: Path) -> None:
    docs = make_documents(60, seed=3)
    long_line = "ü" * 1500 + " tail"  # 3005 bytes: multibyte characters force boundary-aware cuts
    docs += [long_line + "\n", "short\n" + "x" * 2500 + "\nafter\n"]
    corpus = write_jsonl(tmp_path / "long.jsonl", docs)
    result = _train(corpus, tmp_path / "tok", max_sentence_length_bytes=1000, vocab_size=300)
    meta = result.metadata
    assert meta["num_long_lines_split"] == 2
    assert meta["num_chunks_from_long_lines"] == 4 + 3  # 3005 bytes → 4 chunks (no cut inside 'ü'); 2500 → 3
    assert meta["num_sentences"] == meta["num_lines"] - 2 + 7


def test_split_utf8_never_cuts_a_character() -> None:
    data = ("a€" * 100 + "\U0001F600" * 50).encode("utf-8")
    for limit in (16, 17, 18, 19, 100):
        chunks = list(split_utf8(data, limit))
        assert b"".join(chunks) == data
        assert all(0 < len(c) <= limit for c in chunks)
        assert all(c.decode("utf-8") for c in chunks)  # each chunk is valid UTF-8 on its own


def test_reservoir_sample_is_seeded_uniform_and_in_stream_order() -> None:
    items = [str(i).encode() for i in range(1000)]
    assert reservoir_sample(iter(items), 2000, random.Random(1)) == items  # k >= n: everything, in order
    a = reservoir_sample(iter(items), 100, random.Random(1))
    assert a == reservoir_sample(iter(items), 100, random.Random(1))
    assert a != reservoir_sample(iter(items), 100, random.Random(2))
    assert len(a) == 100 and [int(x) for x in a] == sorted(int(x) for x in a)
    assert int(a[-1]) > 500  # the sample reaches the end of the stream, not just its head


def test_errors_say_what_to_do(corpus: Path, bpe: TrainResult, tmp_path: Path) -> None:
    with pytest.raises(DataPipelineError, match="already exists; pass --overwrite"):
        _train(corpus, bpe.model_path.parent)
    with pytest.raises(DataPipelineError, match="(?s)Vocabulary size too high.*hint: lower --vocab-size"):
        _train(corpus, tmp_path / "big", model_type="unigram", vocab_size=20000)
    with pytest.raises(DataPipelineError, match="--vocab-size 100 is too small"):
        _train(corpus, tmp_path / "small", vocab_size=100)
    with pytest.raises(DataPipelineError, match="(?s)Vocabulary size too high.*last log lines:\n.*unigram"):
        _train(corpus, tmp_path / "big2", model_type="unigram", vocab_size=20000)  # spm's log is kept for errors
    with pytest.raises(DataPipelineError, match="no tokenizer model at"):
        Tokenizer.load(tmp_path / "nowhere")
    empty = write_jsonl(tmp_path / "empty.jsonl", [], extra_lines=(b'{"text": "  "}',))
    with pytest.raises(DataPipelineError, match="no usable text in the inputs .*empty_document=1"):
        _train(empty, tmp_path / "none")
