"""model.attention_mask=document and model.reset_position_ids: a packed sample behaves as its documents alone.

The reference is transformers' LlamaForCausalLM run on each document *by itself* (no mask at all: nothing packed),
holding our weights: with the document mask and positions reset, every token's logits in the packed row equal
HF's for that token in its lone document; with the mask and positions running over the sample, they equal HF's
given the document's positions in the sample. The training objective over many steps and every layout is in
test_hf_reference.py (the "-documents" cases).
"""

from __future__ import annotations

from pathlib import Path

import deepspeed  # noqa: F401  (imported once in the parent: forked ranks start in ~0.3 s)
import megatron.core.tensor_parallel  # noqa: F401
import pytest
import torch

from test_model import hf_twin, tiny_model_config
from test_parallelize import _CountMatmuls, computing_ops_added, single_rank_context
from trainer.config import ConfigError, load_config
from trainer.data_check import SYNTHETIC_EOS_ID, document_eos_id
from trainer.model import Llama, document_ids, document_mask, document_positions, lm_loss
from trainer.parallelize import build_model_on_meta, parallelize
from trainer.testing import run_distributed

EOS = 2
DOCUMENT_OVERRIDES = ["model.attention_mask=document", "model.reset_position_ids=true"]
VOCAB = 250  # padded to 256: the padding columns are in every comparison
# fp32 on both sides, different kernels (SDPA with a mask vs causal SDPA on the short row): measured <= 1.2e-6.
ATOL = 1e-5


def test_document_ids_and_positions_of_a_packed_row() -> None:
    ids = torch.tensor([[5, 6, 2, 7, 2, 2, 8, 9], [2, 3, 3, 3, 3, 3, 3, 2]])
    docs = document_ids(ids, EOS)
    assert docs.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]
    mask = document_mask(docs)[0, 0]
    assert mask[3].tolist() == [False, False, False, True, False, False, False, False]  # starts document 1
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False]  # its eos
    assert mask[7].tolist() == [False] * 6 + [True, True]


def _documents(lengths: list[int], seed: int) -> list[torch.Tensor]:
    """Random documents, each ending with eos except possibly the last (cut by the sample's end, as packing does)."""
    generator = torch.Generator().manual_seed(seed)
    docs = [torch.randint(EOS + 1, VOCAB, (n,), generator=generator) for n in lengths]
    for doc in docs[:-1]:
        doc[-1] = EOS
    return docs


@pytest.mark.parametrize("reset_positions", [True, False], ids=["positions-reset", "positions-global"])
def test_a_packed_row_equals_each_document_alone_in_hf(reset_positions: bool) -> None:
    torch.manual_seed(0)
    cfg = tiny_model_config(vocab_size=VOCAB, attention_mask="document", reset_position_ids=reset_positions)
    ours = Llama(cfg, 256, eos_token_id=EOS).eval()
    hf = hf_twin(cfg, ours)
    rows = [_documents([9, 1, 14, 7], seed=1), _documents([31], seed=2), _documents([3, 28], seed=3)]
    packed = torch.stack([torch.cat(docs) for docs in rows])  # (3, 31)
    with torch.no_grad():
        logits = ours(packed)[..., :VOCAB]
        causal = Llama(tiny_model_config(vocab_size=VOCAB), 256).eval()
        causal.load_state_dict(ours.state_dict())
        causal_logits = causal(packed)[..., :VOCAB]
        for row, docs in enumerate(rows):
            start = 0
            for doc in docs:
                span = slice(start, start + len(doc))
                positions = torch.arange(len(doc)) + (0 if reset_positions else start)
                alone = hf(doc[None], position_ids=positions[None]).logits[0]
                assert (logits[row, span] - alone).abs().max().item() < ATOL, (row, start)
                if start > 0:  # the plain causal model reads the earlier documents: a test that can fail
                    assert (causal_logits[row, span] - alone).abs().max().item() > 100 * ATOL
                start += len(doc)


def _parallel_model(mode: str, compile_mode: str = "off") -> tuple[torch.nn.Module, object]:
    cfg = load_config("configs/tiny.yaml", ["model.attention_mask=document", "model.reset_position_ids=true",
                                            f"parallel.activation_checkpointing={mode}",
                                            f"parallel.compile={compile_mode}"])
    derived = cfg.validate_for_world(1)
    model = build_model_on_meta(cfg.model, derived.padded_vocab_size, document_eos_id(cfg))
    return parallelize(model, cfg, derived, single_rank_context()).module, cfg


def _loss_and_grads(mode: str, compile_mode: str = "off",
                    ops: dict | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    module, cfg = _parallel_model(mode, compile_mode)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    tokens[0, [5, 6, 20]] = SYNTHETIC_EOS_ID
    tokens[1, 11] = SYNTHETIC_EOS_ID
    loss = lm_loss(module(tokens[:, :-1]), tokens[:, 1:])
    with _CountMatmuls() as counter:
        loss.backward()
    if ops is not None:
        ops.update(counter.ops)
    return loss.item(), {name: p.grad.clone() for name, p in module.named_parameters()}


def test_activation_checkpointing_and_compile_keep_the_document_numbers() -> None:
    """Every checkpointing mode recomputes through the mask and positions to the same bits; core_attention still
    re-runs only the attention core (with a mask: SDPA's bool → additive mask op is kept, not recomputed);
    compile (aot_eager: graph capture and AOTAutograd) equals eager within fp32 rounding."""
    none_ops: dict = {}
    core_ops: dict = {}
    loss_none, grads_none = _loss_and_grads("none", ops=none_ops)
    for mode in ("selective", "core_attention", "full"):
        loss, grads = _loss_and_grads(mode, ops=core_ops if mode == "core_attention" else None)
        assert loss == loss_none, mode
        for name, grad in grads_none.items():
            assert torch.equal(grad, grads[name]), (mode, name)
    assert computing_ops_added(none_ops, core_ops) == {"_scaled_dot_product_flash_attention_for_cpu.default",
                                                       "detach.default"}
    loss_compiled, grads_compiled = _loss_and_grads("selective", "aot_eager")
    assert loss_compiled == pytest.approx(loss_none, rel=1e-6)
    for name, grad in grads_none.items():
        torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-5, atol=1e-7)


def test_the_eos_id_comes_from_the_data(tmp_path) -> None:  # noqa: ANN001
    from data_pipeline.manifest import TokenizerInfo, write_dataset_from_arrays
    import numpy as np

    samples = {"train": np.arange(4 * 65).reshape(4, 65) % 200}

    def dataset(name: str, eos_id: int | None) -> str:
        tokenizer = None if eos_id is None else TokenizerInfo(
            fingerprint=f"tok{eos_id}", vocab_size=256, model_type="bpe", unk_id=0, bos_id=1, eos_id=eos_id,
            pad_id=3, model_file=None)
        write_dataset_from_arrays(tmp_path / name, samples, samples_per_shard=2, tokenizer=tokenizer)
        return str(tmp_path / name)

    def config(*paths: str, mask: str = "document") -> object:
        entries = ", ".join(f"{{path: {path}}}" for path in paths)
        return load_config("configs/tiny.yaml", ["data.synthetic=false", f"data.datasets=[{entries}]",
                                                 f"model.attention_mask={mask}"])

    assert document_eos_id(load_config("configs/tiny.yaml", ["model.attention_mask=document"])) == SYNTHETIC_EOS_ID
    assert document_eos_id(load_config("configs/tiny.yaml", [])) is None
    two, also_two, zero, none = dataset("a", 2), dataset("b", 2), dataset("c", 0), dataset("d", None)
    assert document_eos_id(config(two, also_two)) == 2
    assert document_eos_id(config(two, none, mask="causal")) is None  # a causal model never reads it
    with pytest.raises(ConfigError, match="different eos ids .*: 2, .*: 0"):
        document_eos_id(config(two, zero))
    with pytest.raises(ConfigError, match="records no eos id .*model.attention_mask=causal"):
        document_eos_id(config(none))
    unknown = Llama(tiny_model_config(attention_mask="document"), 256)  # built for its names: fine
    with pytest.raises(ValueError, match="without the data's eos id"):
        unknown(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="not a token"):
        Llama(tiny_model_config(attention_mask="document"), 256, eos_token_id=256)


def _evaluate_weights(rank: int, world_size: int, hf_dir: str, overrides: list[str]) -> float:
    from trainer.eval_checkpoint import evaluate_weights

    (evaluated,) = evaluate_weights(load_config("configs/tiny.yaml", overrides), [Path(hf_dir)])
    return evaluated.result.loss


@pytest.mark.slow
def test_validation_with_eos_masked_loss_is_one_mean_over_the_kept_tokens(tmp_path: Path) -> None:
    """train.mask_eos_loss in validation: HF's own mean over every kept token of the validation set (the positions
    whose input is the eos left out), in 1 process and when DP 2 or PP 2 split the micro-batches otherwise."""
    from hf_fixtures import hf_llama, packed_document_inputs

    from trainer.data import SyntheticTokens

    overrides = ["model.vocab_size=64", "model.init_std=0.1", *DOCUMENT_OVERRIDES, "train.mask_eos_loss=true",
                 "train.eval_steps=2"]
    model = hf_llama(64, tie=False, seed=64).eval()
    model.save_pretrained(tmp_path / "hf")
    cfg = load_config("configs/tiny.yaml", overrides)
    tokens, labels = SyntheticTokens(vocab_size=64, seq_len=64, micro_batch_size=32, seed=1234,
                                     split="val").microbatch(0)  # eval_steps 2 × global batch 16
    labels = torch.where(tokens == SYNTHETIC_EOS_ID, -100, labels)
    with torch.no_grad():
        logits = model(tokens, **packed_document_inputs(tokens, cfg)).logits
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), reduction="none")
    want = per_token.sum().item() / (labels != -100).sum().item()
    mean_of_microbatch_means = per_token.view(8, -1).sum(1).div((labels != -100).view(8, -1).sum(1)).mean().item()
    # The weighting matters, so the test can fail: a mean of micro-batch means is 1.2e-5 away (measured); ours 7.4e-8.
    assert abs(mean_of_microbatch_means - want) > 10 * 1e-6 * want
    for world_size, layout in ((1, []), (2, ["zero.stage=3"]), (2, ["parallel.pp=2"])):
        for loss in run_distributed(_evaluate_weights, world_size, str(tmp_path / "hf"), [*overrides, *layout],
                                    timeout_s=180):
            assert loss == pytest.approx(want, rel=1e-6), (layout, loss, want)
