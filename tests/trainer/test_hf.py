"""HF conversion proven by numbers: ours → HF logits/KL/greedy parity, exact tokenizer, bit-exact HF → ours → HF,
and one test per known pitfall that shows the check can fail. CPU, fp32 unless stated, offline, real transformers."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from hf_fixtures import VOCAB, corpus_documents, greedy_ours, load_hf, per_token_kl, tiny_config, write_corpus

from data_pipeline.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
from trainer.config import ModelConfig, RopeScalingConfig, padded_vocab_size
from trainer.hf import (
    HFConversionError,
    export_hf,
    hf_state_dict,
    import_hf,
    key_map,
    load_into,
    state_dict_of,
)
from trainer.hf.weights_io import new_file_mode
from trainer.model import Llama, to_hf_key

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; a hub lookup would be a bug

MAX_ABS_LOGIT_DELTA = 1e-4
MAX_KL = 1e-6
NUM_GREEDY_TOKENS = 40


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tokenizer]:
    """A BPE and a unigram model with VOCAB pieces, trained with our own trainer on a small varied corpus (< 1 s)."""
    root = tmp_path_factory.mktemp("hf_tokenizers")
    corpus = write_corpus(root / "corpus.jsonl", corpus_documents(200, seed=0))
    out = {}
    for kind in ("bpe", "unigram"):
        config = TokenizerTrainConfig(inputs=(str(corpus),), output_dir=str(root / kind), vocab_size=VOCAB,
                                      model_type=kind, input_sentence_size=0, num_threads=2)
        out[kind] = train_tokenizer(config).tokenizer
    return out


def make_model(cfg: ModelConfig, tp: int = 1, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(cfg, padded_vocab_size(cfg.vocab_size, tp)).eval()


def export_and_load(model: Llama, out_dir: Path, **export_kwargs: object) -> torch.nn.Module:
    export_hf(state_dict_of(model), model.cfg, out_dir, **export_kwargs)  # type: ignore[arg-type]
    return load_hf(out_dir)


def logits_pair(ours: Llama, hf: torch.nn.Module, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, ours.cfg.vocab_size, (3, 48), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return ours(ids)[..., : ours.cfg.vocab_size].float(), hf(ids).logits.float()


# ---------------------------------------------------------------------------------------------------------------------
# Ours → HF: logits, KL, greedy decode


PARITY_CASES = {
    "gqa-untied": {},
    "gqa-tied": {"tie_embeddings": True},
    "mha": {"num_kv_heads": 4},
    "mqa-tied": {"num_kv_heads": 1, "tie_embeddings": True},
    "head-dim-48-hidden-6-heads": {"hidden_size": 48, "num_heads": 6, "num_kv_heads": 3, "head_dim": 12},
    "rope-llama3": {"rope_scaling": RopeScalingConfig(type="llama3", factor=8.0, original_max_seq_len=128)},
    "rope-linear": {"rope_scaling": RopeScalingConfig(type="linear", factor=4.0)},
}


@pytest.mark.parametrize("changes", PARITY_CASES.values(), ids=PARITY_CASES.keys())
def test_exported_model_matches_ours(changes: dict[str, object], tmp_path: Path,
                                     tokenizers: dict[str, Tokenizer]) -> None:
    ours = make_model(tiny_config(**changes))
    hf = export_and_load(ours, tmp_path / "hf", tokenizer_model=tokenizers["bpe"])
    a, b = logits_pair(ours, hf)
    delta, kl = (a - b).abs().max().item(), per_token_kl(a, b).max().item()
    print(f"\n[parity {changes}] max|Δlogits|={delta:.3e} max KL={kl:.3e}")
    assert a.shape == b.shape == (3, 48, VOCAB)
    assert delta < MAX_ABS_LOGIT_DELTA and kl < MAX_KL

    prompt = torch.tensor([[1, 17, 260, 300, 42, 99]])  # BOS + arbitrary ids
    expected = greedy_ours(ours, prompt, NUM_GREEDY_TOKENS, VOCAB)
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=NUM_GREEDY_TOKENS, min_new_tokens=NUM_GREEDY_TOKENS, pad_token_id=3)
    assert out[0, prompt.shape[1]:].tolist() == expected
    assert 2 not in expected  # min_new_tokens only masks EOS, so it must not have changed any argmax


def test_config_generation_config_and_tokenizer_files(tmp_path: Path, tokenizers: dict[str, Tokenizer]) -> None:
    from transformers import AutoTokenizer

    cfg = tiny_config(rope_theta=123456.0, rms_norm_eps=1e-6, max_seq_len=96, tie_embeddings=True)
    result = export_hf(state_dict_of(make_model(cfg)), cfg, tmp_path / "hf", tokenizer_model=tokenizers["bpe"])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("transformers_version")
    assert config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64,
        "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 123456.0}, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "max_position_embeddings": 96, "initializer_range": 0.1, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 3, "dtype": "float32", "pretraining_tp": 1, "use_cache": True,
    }
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 3)
    assert result.files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                            "tokenizer.model", "tokenizer_config.json"]
    assert result.tokenizer_mismatches == []
    # Weights readable by whoever can read the configs (safetensors alone writes 0600): 0644 under umask 022.
    modes = {name: oct((tmp_path / "hf" / name).stat().st_mode & 0o777) for name in result.files}
    assert set(modes.values()) == {oct(new_file_mode(tmp_path))}, modes
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert tok.model_max_length == 96  # model.max_seq_len, not transformers' 1e30 default
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 3, 0)
    assert tok("x = 1").input_ids == [1] + tokenizers["bpe"].encode(["x = 1"])[0].tolist()  # BOS, as in training
    assert tokenizers["bpe"].prepends_bos  # what downstream tasks encode with, as lm-eval does with this folder
    assert Tokenizer.load(tmp_path / "hf").fingerprint == tokenizers["bpe"].fingerprint  # tokenizer.model copied


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer: HF encodes and decodes exactly like sentencepiece


TOKENIZER_TEXTS = [
    "", " ", "   ", "\t", "\n", "\n\n\n", "hello world", "  two leading spaces", "trailing spaces   ",
    "a  b   c    d     e", "def f(x):\n    if x < 10 and x > 2:\n        return x ** 2  # square\n    return None\n",
    "\tone tab\n\t\ttwo tabs\n \t mixed", "<s>", "</s>", "<s> literal </s> specials <pad> <unk> in text",
    "<0x41><0x0A> byte-piece lookalikes", "0123456789 3.14159 -42 1e-5 0x1F 1,000,000",
    "café naïve Ω ß 中文 日本語 한국어 😀 🚀 👩‍💻", "ﬁ ① ² ½ Ⅻ (NFKC would rewrite these)",
    "windows\r\nline\r\nendings\r",
    "▁ a literal metaspace ▁▁", "x" * 300, "    " * 10 + "deep", "if (a != b || c >= d) { return a / b; }",
    "~`!@#$%^&*()_+-=[]{}|\\:;\"',.<>/?", "zero\u200bwidth and\u00a0nbsp",
]


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_exported_tokenizer_encodes_and_decodes_like_sentencepiece(
    kind: str, tmp_path: Path, tokenizers: dict[str, Tokenizer]
) -> None:
    from transformers import AutoTokenizer

    spm = tokenizers[kind]
    cfg = tiny_config(num_layers=1)
    result = export_hf(state_dict_of(make_model(cfg)), cfg, tmp_path / "hf", tokenizer_model=spm)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    held_out = [line for doc in corpus_documents(40, seed=99) for line in doc.split("\n")]  # not trained on
    texts = TOKENIZER_TEXTS + corpus_documents(40, seed=98) + held_out
    encode_mismatches = decode_mismatches = 0
    for text, ids in zip(texts, spm.encode(texts), strict=True):
        expected = ids.tolist()
        encode_mismatches += hf(text, add_special_tokens=False).input_ids != expected
        decode_mismatches += hf.decode(expected) != spm.decode(expected)
    print(f"\n[tokenizer {kind}] {len(texts)} texts: {encode_mismatches} encode / {decode_mismatches} decode "
          f"mismatches")
    assert (encode_mismatches, decode_mismatches) == (0, 0)
    assert result.tokenizer_mismatches == []


def test_known_difference_decoding_invalid_utf8_byte_runs(tmp_path: Path, tokenizers: dict[str, Tokenizer]) -> None:
    """Pinned, documented difference (docs/hf_conversion.md): a run of byte pieces that is not valid UTF-8, which
    sentencepiece never produces from text but a sampler can, decodes to U+FFFD for *every* byte in HF's ByteFallback
    and only for the invalid bytes in spm. Valid runs and everything encode produces decode identically."""
    from transformers import AutoTokenizer

    spm = tokenizers["bpe"]
    cfg = tiny_config(num_layers=1)
    export_hf(state_dict_of(make_model(cfg)), cfg, tmp_path / "hf", tokenizer_model=spm)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    byte_ids = {piece: spm._sp.piece_to_id(piece) for piece in ("<0xC3>", "<0xA9>", "<0x6F>")}
    valid, invalid = [byte_ids["<0xC3>"], byte_ids["<0xA9>"]], [byte_ids["<0xC3>"], byte_ids["<0x6F>"]]
    assert hf.decode(valid) == spm.decode(valid) == "é"
    assert (spm.decode(invalid), hf.decode(invalid)) == ("\ufffdo", "\ufffd\ufffd")


def test_tokenizer_vocab_must_match_the_model(tmp_path: Path, tokenizers: dict[str, Tokenizer]) -> None:
    for vocab, words in ((VOCAB - 10, "emit ids the model has no row for"), (VOCAB + 10, "larger than the tokenizer")):
        cfg = tiny_config(vocab_size=vocab, num_layers=1)
        with pytest.raises(HFConversionError, match=words):
            export_hf(state_dict_of(make_model(cfg)), cfg, tmp_path / "hf", tokenizer_model=tokenizers["bpe"])
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------------------------------------
# HF → ours → HF: every tensor and every config field bit-identical


def save_hf_origin(path: Path, tie: bool, dtype: torch.dtype, max_shard_size: str | None = None,
                   rope: dict[str, object] | None = None) -> None:
    """A model that never saw our code: transformers' own init and save_pretrained, non-default fields throughout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, rope_parameters=rope or {"rope_type": "default", "rope_theta": 250000.0},
        rms_norm_eps=1e-6, tie_word_embeddings=tie, max_position_embeddings=96, initializer_range=0.05,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)


ROUND_TRIPS = {"fp32-untied": (False, torch.float32, None), "bf16-tied": (True, torch.bfloat16, None),
               "fp16-untied-sharded": (False, torch.float16, "60KB")}


@pytest.mark.parametrize(("tie", "dtype", "shard"), ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_hf_to_ours_to_hf_is_bit_identical(tie: bool, dtype: torch.dtype, shard: str | None, tmp_path: Path,
                                           tokenizers: dict[str, Tokenizer]) -> None:
    from safetensors.torch import load_file

    from trainer.hf.weights_io import read_hf_weights

    save_hf_origin(tmp_path / "origin", tie, dtype, shard)
    model_cfg, state = import_hf(tmp_path / "origin", tp=2)
    assert state["embed_tokens.weight"].shape[0] == padded_vocab_size(VOCAB, 2) == 512
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    export_hf(state, model_cfg, tmp_path / "back", tokenizer_model=tokenizers["bpe"], dtype=name,  # type: ignore[arg-type]
              max_shard_bytes=60_000 if shard else 5_000_000_000)
    before, after = read_hf_weights(tmp_path / "origin"), read_hf_weights(tmp_path / "back")
    assert sorted(before) == sorted(after) and len(before) == 3 * 9 + 2 + (0 if tie else 1)
    for key in before:
        assert before[key].dtype == after[key].dtype == dtype, key
        assert torch.equal(before[key].view(torch.uint8), after[key].view(torch.uint8)), key  # bits, not values
    origin_config = json.loads((tmp_path / "origin" / "config.json").read_text())
    back_config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert origin_config == back_config
    if shard:
        assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
        assert len(list((tmp_path / "back").glob("model-*-of-*.safetensors"))) > 1
    else:
        assert set(load_file(str(tmp_path / "back" / "model.safetensors"))) == set(before)


def test_imported_model_matches_hf(tmp_path: Path) -> None:
    """HF → ours: our Llama holding the imported (tp=2-padded) weights computes HF's logits."""
    save_hf_origin(tmp_path / "origin", tie=False, dtype=torch.float32)
    model_cfg, state = import_hf(tmp_path / "origin", tp=2)
    ours = Llama(model_cfg, padded_vocab_size(model_cfg.vocab_size, 2)).eval()
    load_into(ours, state)
    a, b = logits_pair(ours, load_hf(tmp_path / "origin"))
    print(f"\n[import] max|Δlogits|={(a - b).abs().max().item():.3e} max KL={per_token_kl(a, b).max().item():.3e}")
    assert (a - b).abs().max().item() < MAX_ABS_LOGIT_DELTA and per_token_kl(a, b).max().item() < MAX_KL


# Llama 3.1's RoPE (its config.json: factor 8, low 1, high 4, original 8192) with a short original context, so that
# the 8-wide heads' 4 frequencies fall in all three of its regions: kept, blended and slowed by the factor.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 250000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def test_llama3_rope_scaling_imports_computes_hf_logits_and_exports_back(tmp_path: Path) -> None:
    """Continued pretraining from Llama 3.1 / 3.2: their RoPE scaling is imported (also from the legacy
    `rope_scaling` key their config.json files use), computed as HF does, and written back unchanged."""
    from trainer.config import RopeScalingConfig

    save_hf_origin(tmp_path / "origin", tie=True, dtype=torch.float32, rope=LLAMA3_ROPE)
    model_cfg, state = import_hf(tmp_path / "origin", tp=1)
    assert model_cfg.rope_theta == 250000.0 and model_cfg.rope_scaling == RopeScalingConfig(
        type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)
    ours = Llama(model_cfg, padded_vocab_size(model_cfg.vocab_size, 1)).eval()
    load_into(ours, state)
    hf = load_hf(tmp_path / "origin")
    a, b = logits_pair(ours, hf)
    assert (a - b).abs().max().item() < MAX_ABS_LOGIT_DELTA and per_token_kl(a, b).max().item() < MAX_KL
    unscaled = Llama(model_cfg.model_copy(update={"rope_scaling": None}), ours.embed_tokens.num_embeddings).eval()
    load_into(unscaled, state)
    assert (logits_pair(unscaled, hf)[0] - b).abs().max().item() > 100 * MAX_ABS_LOGIT_DELTA  # it can fail

    export_hf(state, model_cfg, tmp_path / "back")
    origin_config = json.loads((tmp_path / "origin" / "config.json").read_text())
    back_config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back_config["rope_parameters"] == origin_config["rope_parameters"] == LLAMA3_ROPE

    legacy = {key: value for key, value in LLAMA3_ROPE.items() if key != "rope_theta"}
    _edit_config(tmp_path / "origin", rope_parameters=None, rope_theta=250000.0, rope_scaling=legacy)
    assert import_hf(tmp_path / "origin", tp=1)[0] == model_cfg


def test_from_hf_copies_the_tokenizer_export_can_write_back(tmp_path: Path, tokenizers: dict[str, Tokenizer]) -> None:
    """tokenizer/ for the data pipeline: the sentencepiece model when export reproduces it exactly, else (Llama 2's
    nmt_nfkc normalizer) the folder's tokenizer.json; a folder with only a tokenizer.json gives that."""
    import io

    import sentencepiece as spm
    from llama3_tokenizer import write_llama3_like_tokenizer

    from trainer.hf import import_hf_to_dir

    save_hf_origin(tmp_path / "origin", tie=False, dtype=torch.float32)
    write_llama3_like_tokenizer(tmp_path / "origin", corpus_documents(50, seed=4))
    assert import_hf_to_dir(tmp_path / "origin", tmp_path / "json_only").tokenizer_copied == "hf"
    assert sorted(p.name for p in (tmp_path / "json_only" / "tokenizer").iterdir()) == [
        "tokenizer.json", "tokenizer_config.json"]

    (tmp_path / "origin" / "tokenizer.model").write_bytes(tokenizers["bpe"].model_proto)  # ours: identity
    assert import_hf_to_dir(tmp_path / "origin", tmp_path / "ours").tokenizer_copied == "sentencepiece"

    nfkc = io.BytesIO()  # a Llama-2-style model: NFKC normalization, which export's recipe does not reproduce
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_documents(200, seed=5)), model_writer=nfkc,
                                   vocab_size=300, normalization_rule_name="nmt_nfkc", minloglevel=2)
    (tmp_path / "origin" / "tokenizer.model").write_bytes(nfkc.getvalue())
    assert import_hf_to_dir(tmp_path / "origin", tmp_path / "llama2").tokenizer_copied == "hf"
    assert not (tmp_path / "llama2" / "tokenizer" / "tokenizer.model").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Known pitfalls, each shown to be caught


@pytest.fixture(scope="module")
def gqa_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Llama, torch.nn.Module]:
    ours = make_model(tiny_config())
    return ours, export_and_load(ours, tmp_path_factory.mktemp("gqa") / "hf")


def delta_after(pair: tuple[Llama, torch.nn.Module], corrupt: object) -> tuple[float, float]:
    ours, hf = pair
    broken = copy.deepcopy(hf)
    with torch.no_grad():
        for layer in broken.model.layers:
            corrupt(layer)  # type: ignore[operator]
    a, b = logits_pair(ours, broken)
    return (a - b).abs().max().item(), per_token_kl(a, b).max().item()


def _interleave_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Half-split (HF, ours) rows → Meta's interleaved-pair layout, what a converter that forgets the permute emits."""
    heads = weight.shape[0] // head_dim
    return weight.view(heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(weight.shape).contiguous()


def test_pitfall_rotary_layout(gqa_pair: tuple[Llama, torch.nn.Module]) -> None:
    def interleave(layer: torch.nn.Module) -> None:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.weight.copy_(_interleave_rows(proj.weight, 16))

    delta, kl = delta_after(gqa_pair, interleave)
    print(f"\n[pitfall rotary interleaved] max|Δlogits|={delta:.3f} KL={kl:.3f}")
    assert delta > 1.0 and kl > 1e-2  # > 10,000× the tolerance: the parity test would fail loudly


def test_pitfall_qkv_split_under_gqa(gqa_pair: tuple[Llama, torch.nn.Module], tmp_path: Path) -> None:
    def swap_k_v(layer: torch.nn.Module) -> None:  # same shape under GQA: only the numbers can tell
        k, v = layer.self_attn.k_proj.weight.clone(), layer.self_attn.v_proj.weight.clone()
        layer.self_attn.k_proj.weight.copy_(v)
        layer.self_attn.v_proj.weight.copy_(k)

    def tile_grouping(layer: torch.nn.Module) -> None:
        # HF's repeat_kv (and ours) give query head i kv head i // (nh/nkv); a converter assuming i % nkv would
        # reorder the query heads (and o_proj's columns with them) like this.
        order, hd = [0, 2, 1, 3], 16
        q, o = layer.self_attn.q_proj.weight, layer.self_attn.o_proj.weight
        q.copy_(q.view(4, hd, -1)[order].reshape(q.shape))
        o.copy_(o.view(-1, 4, hd)[:, order].reshape(o.shape))

    for name, corrupt in (("k/v swapped", swap_k_v), ("kv groups tiled", tile_grouping)):
        delta, kl = delta_after(gqa_pair, corrupt)
        print(f"\n[pitfall {name}] max|Δlogits|={delta:.3f} KL={kl:.3f}")
        assert delta > 1.0 and kl > 1e-2
    ours = gqa_pair[0]
    state = state_dict_of(ours)
    state["layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # MHA-shaped k in a GQA config
    with pytest.raises(HFConversionError, match=r"layers\.1\.self_attn\.k_proj\.weight has shape \(64, 64\) but "
                                                r"the model config expects \(32, 64\)"):
        export_hf(state, ours.cfg, tmp_path / "hf")


def test_pitfall_gate_up_order(gqa_pair: tuple[Llama, torch.nn.Module]) -> None:
    def swap_gate_up(layer: torch.nn.Module) -> None:
        gate, up = layer.mlp.gate_proj.weight.clone(), layer.mlp.up_proj.weight.clone()
        layer.mlp.gate_proj.weight.copy_(up)
        layer.mlp.up_proj.weight.copy_(gate)

    delta, kl = delta_after(gqa_pair, swap_gate_up)
    print(f"\n[pitfall gate/up swapped] max|Δlogits|={delta:.3f} KL={kl:.3f}")
    assert delta > 1.0 and kl > 1e-2


def test_pitfall_padded_vocab_trimmed_then_repadded_for_tp2(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = tiny_config(vocab_size=300)
    ours = make_model(cfg)  # 384 rows at tp=1
    assert ours.embed_tokens.weight.shape[0] == 384
    hf = export_and_load(ours, tmp_path / "hf")
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert exported["model.embed_tokens.weight"].shape == exported["lm_head.weight"].shape == (300, 64)
    assert hf.config.vocab_size == 300
    _, state = import_hf(tmp_path / "hf", tp=2)
    for key in ("embed_tokens.weight", "lm_head.weight"):
        assert state[key].shape == (512, 64)
        assert torch.equal(state[key][:300], exported[to_hf_key(key)])
        assert not state[key][300:].any()  # padding rows: zeros
    repadded = Llama(cfg, 512).eval()
    load_into(repadded, state)
    a, b = logits_pair(repadded, hf)
    assert (a - b).abs().max().item() < MAX_ABS_LOGIT_DELTA


def test_export_warns_when_padding_rows_were_trained(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Padding rows are zero in every run of this version; non-zero ones mean a checkpoint trained with them in the
    softmax, whose export (which drops them) is not exactly the trained model: say so."""
    ours = make_model(tiny_config(vocab_size=300))  # 384 rows, rows 300.. zero
    export_hf(state_dict_of(ours), ours.cfg, tmp_path / "clean")
    assert "padding rows" not in caplog.text
    with torch.no_grad():
        ours.lm_head.weight[300:] = 0.01
    export_hf(state_dict_of(ours), ours.cfg, tmp_path / "trained")
    assert "lm_head.weight: the vocabulary padding rows (300..383) are not zero" in caplog.text


def test_pitfall_tied_and_untied_embeddings(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    for tie in (True, False):
        ours = make_model(tiny_config(tie_embeddings=tie))
        hf = export_and_load(ours, tmp_path / f"tie-{tie}")
        written = load_file(str(tmp_path / f"tie-{tie}" / "model.safetensors"))
        assert ("lm_head.weight" in written) is (not tie)
        assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) is tie
        a, b = logits_pair(ours, hf)
        assert (a - b).abs().max().item() < MAX_ABS_LOGIT_DELTA
    # A tied model's full state_dict() also lists lm_head (the same tensor): accepted; a different one is not.
    tied = make_model(tiny_config(tie_embeddings=True))
    from_aliased = hf_state_dict(dict(tied.state_dict()), tied.cfg, "fp32")
    assert "lm_head.weight" not in from_aliased and from_aliased.keys() == hf_state_dict(
        state_dict_of(tied), tied.cfg, "fp32").keys()
    state = dict(tied.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(HFConversionError, match="lm_head.weight differs from embed_tokens.weight"):
        export_hf(state, tied.cfg, tmp_path / "refused")


def test_pitfall_silent_random_lm_head_is_caught(tmp_path: Path) -> None:
    """Untied config, lm_head missing from the file: transformers loads it anyway (random lm_head, a log line);
    our loader, importer and generate all refuse."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from trainer.hf import load_hf_model

    ours = make_model(tiny_config())
    export_hf(state_dict_of(ours), ours.cfg, tmp_path / "hf")
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    _, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert "lm_head.weight" in info["missing_keys"]  # the pitfall: no exception from transformers
    with pytest.raises(HFConversionError, match="lm_head.weight is missing and config.json has tie_word_embeddings"):
        import_hf(tmp_path / "hf")
    with pytest.raises(HFConversionError, match="missing keys: lm_head.weight"):
        load_hf_model(tmp_path / "hf")


# ---------------------------------------------------------------------------------------------------------------------
# Dtypes and sharding


@pytest.mark.parametrize(("name", "torch_dtype", "hf_name"),
                         [("bf16", torch.bfloat16, "bfloat16"), ("fp16", torch.float16, "float16")])
def test_half_precision_export_loads_in_that_dtype(name: str, torch_dtype: torch.dtype, hf_name: str,
                                                   tmp_path: Path) -> None:
    ours = make_model(tiny_config())
    hf = export_and_load(ours, tmp_path / "hf", dtype=name)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == hf_name
    assert {p.dtype for p in hf.parameters()} == {torch_dtype}
    reference, _ = logits_pair(ours, hf)
    low_ours = copy.deepcopy(ours).to(torch_dtype)
    a, b = logits_pair(low_ours, hf)
    print(f"\n[{name}] max|Δlogits| vs our {name} model={(a - b).abs().max().item():.3e}, "
          f"vs our fp32 model={(reference - b).abs().max().item():.3e}")
    assert (a - b).abs().max().item() < 0.05  # same weights, same dtype; the op order differs slightly
    assert (reference - b).abs().max().item() < 0.5


def test_fp16_overflow_is_refused(tmp_path: Path) -> None:
    ours = make_model(tiny_config(num_layers=1))
    state = state_dict_of(ours)
    state["layers.0.mlp.up_proj.weight"] = state["layers.0.mlp.up_proj.weight"].clone()
    state["layers.0.mlp.up_proj.weight"][0, 0] = 1e6
    with pytest.raises(HFConversionError, match=r"up_proj.weight: values up to 1e\+06 overflow fp16"):
        export_hf(state, ours.cfg, tmp_path / "hf", dtype="fp16")


def test_sharded_export_with_index_loads(tmp_path: Path) -> None:
    ours = make_model(tiny_config())
    result = export_hf(state_dict_of(ours), ours.cfg, tmp_path / "hf", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards == sorted(f for f in result.files if f.startswith("model-"))
    assert sorted(index["weight_map"]) == sorted(key_map(ours.cfg).values())
    assert index["metadata"]["total_size"] == result.weights_bytes
    hf = load_hf(tmp_path / "hf")
    a, b = logits_pair(ours, hf)
    assert (a - b).abs().max().item() < MAX_ABS_LOGIT_DELTA
    _, state = import_hf(tmp_path / "hf")
    for key, value in state_dict_of(ours).items():  # padding rows come back as zeros: compare the vocabulary rows
        assert torch.equal(state[key][:VOCAB], value[:VOCAB]), key


# ---------------------------------------------------------------------------------------------------------------------
# The key map and refusals


def test_key_map_covers_our_model_and_transformers() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    for tie in (False, True):
        cfg = tiny_config(tie_embeddings=tie)
        mapping = key_map(cfg)
        assert list(mapping) == [name for name, _ in make_model(cfg).named_parameters()]
        assert all(mapping[key] == to_hf_key(key) for key in mapping)
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie))
        assert set(mapping.values()) == {name for name, _ in hf.named_parameters()}


def test_export_refuses_inconsistent_state_dicts(tmp_path: Path) -> None:
    ours = make_model(tiny_config())
    good = state_dict_of(ours)
    missing = {k: v for k, v in good.items() if k != "layers.1.mlp.down_proj.weight"}
    with pytest.raises(HFConversionError, match=r"missing 1 key\(s\): layers\.1\.mlp\.down_proj\.weight"):
        export_hf(missing, ours.cfg, tmp_path / "hf")
    with pytest.raises(HFConversionError, match=r"unexpected 1 key\(s\): layers\.2\.input_layernorm\.weight"):
        export_hf({**good, "layers.2.input_layernorm.weight": torch.ones(64)}, ours.cfg, tmp_path / "hf")
    short = {**good, "embed_tokens.weight": good["embed_tokens.weight"][:400]}
    with pytest.raises(HFConversionError, match="embed_tokens.weight has 400 rows but model.vocab_size is 500"):
        export_hf(short, ours.cfg, tmp_path / "hf")
    with pytest.raises(HFConversionError, match=r"lm_head\.weight has shape \(500, 64\) but the model config "
                                                r"expects \(512, 64\)"):
        export_hf({**good, "lm_head.weight": good["lm_head.weight"][:500]}, ours.cfg, tmp_path / "hf")
    nan = {**good, "norm.weight": torch.full((64,), float("nan"))}
    with pytest.raises(HFConversionError, match="norm.weight holds NaN or inf"):
        export_hf(nan, ours.cfg, tmp_path / "hf")
    with pytest.raises(HFConversionError, match="dtype 'fp8' is not supported"):
        export_hf(good, ours.cfg, tmp_path / "hf", dtype="fp8")  # type: ignore[arg-type]
    assert not (tmp_path / "hf").exists()  # nothing written by any refused export


def test_export_refuses_a_shape_transformers_rejects(tmp_path: Path) -> None:
    cfg = tiny_config(num_heads=6, num_kv_heads=3, head_dim=12)  # our model runs it; LlamaConfig wants 64 % 6 == 0
    with pytest.raises(HFConversionError, match="hidden_size to be a multiple of num_attention_heads"):
        export_hf(state_dict_of(make_model(cfg)), cfg, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_to_clobber(tmp_path: Path) -> None:
    ours = make_model(tiny_config(num_layers=1))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(HFConversionError, match="is not empty"):
        export_hf(state_dict_of(ours), ours.cfg, tmp_path / "notes")
    with pytest.raises(HFConversionError, match="not an earlier output of this command; refusing to replace it"):
        export_hf(state_dict_of(ours), ours.cfg, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    export_hf(state_dict_of(ours), ours.cfg, tmp_path / "hf")
    export_hf(state_dict_of(ours), ours.cfg, tmp_path / "hf", overwrite=True, dtype="bf16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert not list(tmp_path.glob(".hf.tmp*"))  # the staging directory was renamed away


def _edit_config(hf_dir: Path, **changes: object) -> None:
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


UNSUPPORTED = {
    "mistral": ({"model_type": "mistral"}, r"model_type \('mistral'\) must be 'llama'"),
    "architectures": ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    "attention_bias": ({"attention_bias": True}, r"attention_bias \(true\): our projections have no bias"),
    "mlp_bias": ({"mlp_bias": True}, r"mlp_bias \(true\)"),
    "rope-yarn": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}},
                  r"rope_parameters\.rope_type \('yarn'\): our model implements plain RoPE and linear or llama3"),
    "rope-llama3-incomplete": ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
                               r"rope_parameters \(llama3\) lacks low_freq_factor, high_freq_factor"),
    "rope-extra-field": ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "factor": 2.0}},
                         "rope_parameters has factor"),
    "legacy-rope-scaling": ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_scaling\.rope_type"),
    "hidden_act": ({"hidden_act": "gelu"}, r"hidden_act \('gelu'\) must be 'silu'"),
    "attention_dropout": ({"attention_dropout": 0.1}, r"attention_dropout \(0\.1\) must be 0"),
    "quantized": ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    "missing-width": ({"hidden_size": None}, "hidden_size: required, missing from config.json"),
}


@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "hf"
    ours = make_model(tiny_config())
    export_hf(state_dict_of(ours), ours.cfg, out)
    return out


@pytest.mark.parametrize(("changes", "message"), UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_import_refuses_unsupported_configs(changes: dict[str, object], message: str, exported_dir: Path,
                                            tmp_path: Path) -> None:
    import shutil

    hf_dir = tmp_path / "hf"
    shutil.copytree(exported_dir, hf_dir)
    _edit_config(hf_dir, **changes)
    with pytest.raises(HFConversionError, match=message):
        import_hf(hf_dir)


def test_import_refuses_bad_directories(exported_dir: Path, tmp_path: Path) -> None:
    import shutil

    with pytest.raises(HFConversionError, match="not found"):
        import_hf(tmp_path / "nowhere")
    with pytest.raises(HFConversionError, match="tp \\(3\\) must divide model.num_heads \\(4\\)"):
        import_hf(exported_dir, tp=3)
    bin_only = tmp_path / "bin"
    shutil.copytree(exported_dir, bin_only)
    (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
    with pytest.raises(HFConversionError, match="pytorch_model\\*.bin weights only: re-save them as safetensors"):
        import_hf(bin_only)
    wrong_shape = tmp_path / "shape"
    shutil.copytree(exported_dir, wrong_shape)
    _edit_config(wrong_shape, intermediate_size=128)
    with pytest.raises(HFConversionError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \(176, 64\) "
                                                r"but the model config expects \(128, 64\)"):
        import_hf(wrong_shape)
