"""`pretrain convert to-hf / from-hf` and `pretrain generate`, run in-process through launch.cli.main."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hf_fixtures import VOCAB, corpus_documents, greedy_ours, write_corpus

from data_pipeline.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
from launch.cli import main
from trainer.config import load_config, padded_vocab_size
from trainer.hf import save_full_state_dict, state_dict_of
from trainer.hf.weights_io import read_hf_weights
from trainer.model import Llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
OVERRIDES = [f"model.vocab_size={VOCAB}", "model.init_std=0.1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained-looking run: tokenizer dir, our full state dict for configs/tiny.yaml (+ overrides), an export."""
    root = tmp_path_factory.mktemp("hf_cli")
    corpus = write_corpus(root / "corpus.jsonl", corpus_documents(120, seed=0))
    train_tokenizer(TokenizerTrainConfig(inputs=(str(corpus),), output_dir=str(root / "tokenizer"), vocab_size=VOCAB,
                                         input_sentence_size=0, num_threads=2))
    cfg = load_config(TINY, OVERRIDES).model
    torch.manual_seed(0)
    model = Llama(cfg, padded_vocab_size(cfg.vocab_size, 1)).eval()
    save_full_state_dict(state_dict_of(model), root / "weights.safetensors")
    assert main(["convert", "to-hf", "--state-dict", str(root / "weights.safetensors"), "--config", TINY, *OVERRIDES,
                 "--tokenizer", str(root / "tokenizer"), "--output", str(root / "hf")]) == 0
    return {"root": root, "tokenizer": root / "tokenizer", "weights": root / "weights.safetensors",
            "hf": root / "hf"}


def test_to_hf_then_generate_greedy_matches_our_model(run: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoTokenizer

    capsys.readouterr()
    prompt = "def f(x):\n    return"
    assert main(["generate", "--hf", str(run["hf"]), "--prompt", prompt, "--greedy", "--max-new-tokens", "24"]) == 0
    printed = capsys.readouterr().out
    cfg = load_config(TINY, OVERRIDES).model
    model = Llama(cfg, padded_vocab_size(cfg.vocab_size, 1)).eval()
    from trainer.hf import load_full_state_dict, load_into

    load_into(model, load_full_state_dict(run["weights"]))
    spm = Tokenizer.load(run["tokenizer"])
    prompt_ids = torch.tensor([[spm.bos_id, *spm.encode([prompt])[0].tolist()]])
    new_ids = greedy_ours(model, prompt_ids, 24, VOCAB)
    if spm.eos_id in new_ids:  # generate stops at EOS
        new_ids = new_ids[: new_ids.index(spm.eos_id) + 1]
    # HF decodes (not spm): for an invalid UTF-8 run of byte pieces, which a random model emits, HF's ByteFallback
    # writes U+FFFD for every byte of the run and spm only for the invalid ones (test_hf.py pins that difference).
    hf = AutoTokenizer.from_pretrained(str(run["hf"]), local_files_only=True)
    whole = hf.decode([*prompt_ids[0].tolist(), *new_ids], skip_special_tokens=True)
    assert whole.startswith(prompt) and printed == whole + "\n"


def test_continuation_keeps_its_leading_space(run: dict[str, Path]) -> None:
    """Decoding only the new ids would drop the space of a continuation that starts with '▁' (decoder Strip)."""
    from transformers import AutoTokenizer

    from trainer.hf.generate import continuation_text

    spm = Tokenizer.load(run["tokenizer"])
    text = "return value + 1"
    ids = spm.encode([text])[0].tolist()
    split = next(i for i in range(1, len(ids)) if spm.id_to_piece(ids[i]).startswith("▁"))
    hf = AutoTokenizer.from_pretrained(str(run["hf"]), local_files_only=True)
    continuation = continuation_text(hf, [spm.bos_id, *ids[:split]], ids[split:])
    assert continuation.startswith(" ") and spm.decode(ids[:split]) + continuation == text
    assert not hf.decode(ids[split:]).startswith(" ")  # the naive way loses it


def test_generate_sampling_is_seeded(run: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    outputs = []
    for seed in (7, 7, 8):
        args = ["generate", "--hf", str(run["hf"]), "--prompt", "x", "--temperature", "1.5", "--top-p", "0.9",
                "--seed", str(seed), "--max-new-tokens", "16"]
        assert main(args) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_from_hf_then_to_hf_from_the_fragment_is_bit_identical(run: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "from-hf", "--hf", str(run["hf"]), "--output", str(tmp_path / "ours"), "--tp", "2"]) == 0
    assert "padded to 512 rows (tp=2)" in capsys.readouterr().out
    again = ["convert", "from-hf", "--hf", str(run["hf"]), "--output", str(tmp_path / "ours"), "--tp", "2"]
    assert main([*again, "--overwrite"]) == 0  # an earlier import is replaced whole
    fragment = (tmp_path / "ours" / "model.yaml").read_text()
    assert fragment.startswith("#") and "\nmodel:\n" in fragment and f"vocab_size: {VOCAB}" in fragment
    assert Tokenizer.load(tmp_path / "ours" / "tokenizer").fingerprint == Tokenizer.load(run["tokenizer"]).fingerprint
    assert main(["convert", "to-hf", "--state-dict", str(tmp_path / "ours" / "model.safetensors"),
                 "--config", str(tmp_path / "ours" / "model.yaml"), "--tokenizer", str(tmp_path / "ours" / "tokenizer"),
                 "--output", str(tmp_path / "back")]) == 0
    before, after = read_hf_weights(run["hf"]), read_hf_weights(tmp_path / "back")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)  # bits
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        assert (run["hf"] / name).read_bytes() == (tmp_path / "back" / name).read_bytes(), name


def test_to_hf_dtype_and_shards(run: dict[str, Path], tmp_path: Path) -> None:
    assert main(["convert", "to-hf", "--state-dict", str(run["weights"]), "--config", TINY, *OVERRIDES,
                 "--no-tokenizer", "--output", str(tmp_path / "hf"), "--dtype", "bf16",
                 "--max-shard-size", "40KB"]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert {t.dtype for t in read_hf_weights(tmp_path / "hf").values()} == {torch.bfloat16}
    assert not (tmp_path / "hf" / "tokenizer.json").exists()


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def test_user_errors_exit_2_with_a_fix(run: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    def to_hf(state_dict: Path, *overrides: str) -> list[str]:  # overrides are one run of positionals (argparse)
        return ["convert", "to-hf", "--config", TINY, "--no-tokenizer", "--output", str(tmp_path / "o"),
                "--state-dict", str(state_dict), *OVERRIDES, *overrides]

    assert "state dict " in _error(to_hf(tmp_path / "nope.safetensors"), capsys)
    # A directory is read as a checkpoint (trainer.checkpoint); one that holds none says what to pass.
    assert "is neither a checkpoint (a step_N directory" in _error(to_hf(tmp_path), capsys)
    torch.save({}, tmp_path / "w.pt")
    assert "must be a *.safetensors file" in _error(to_hf(tmp_path / "w.pt"), capsys)
    bad_heads = to_hf(run["weights"], "model.num_kv_heads=3")
    assert "model.num_heads (4) must be divisible by model.num_kv_heads (3)" in _error(bad_heads, capsys)
    wrong_width = to_hf(run["weights"], "model.intermediate_size=128")
    assert "layers.0.mlp.gate_proj.weight has shape (176, 64)" in _error(wrong_width, capsys)
    assert "is not an HF model directory" in _error(["generate", "--hf", str(tmp_path), "--prompt", "x"], capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    from_hf = ["convert", "from-hf", "--hf", str(run["hf"]), "--output", str(tmp_path / "full")]
    assert "is not empty: pass overwrite (--overwrite)" in _error(from_hf, capsys)
    assert "holds no model.yaml" in _error([*from_hf, "--overwrite"], capsys)
    assert "tp (3) must divide" in _error(["convert", "from-hf", "--hf", str(run["hf"]), "--output",
                                           str(tmp_path / "tp3"), "--tp", "3"], capsys)


def test_bad_size_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "to-hf", "--state-dict", "w.safetensors", "--config", TINY, "--no-tokenizer",
              "--output", "o", "--max-shard-size", "5XB"])
    assert exit_info.value.code == 2
    assert "'5XB' is not a size: write e.g. 5GB" in capsys.readouterr().err
