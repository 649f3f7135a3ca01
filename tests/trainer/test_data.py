"""Training data for the trainer: the synthetic source honours the loader contract, and real datasets are wired to
data_pipeline's TokenLoader / EvalLoader with the run's DP slice."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.data import SyntheticEval, SyntheticTokens, build_eval_loader, build_train_loader, synthetic_samples
from trainer.parallelize import ParallelContext

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def stream(dp_rank: int = 0, dp_size: int = 1, micro: int = 2, seed: int = 3) -> SyntheticTokens:
    return SyntheticTokens(vocab_size=256, seq_len=16, micro_batch_size=micro, seed=seed, dp_rank=dp_rank,
                           dp_size=dp_size)


def sample_rows(positions: range) -> torch.Tensor:
    return torch.from_numpy(synthetic_samples(np.asarray(positions), 3, "train", 256, 17))


def test_microbatches_follow_the_global_position_formula() -> None:
    # micro-step j on DP rank r holds positions j·(mb·dp) + r·mb + [0, mb)
    mb, dp = 2, 3
    for rank in range(dp):
        for j, (tokens, labels) in enumerate(islice(iter(stream(rank, dp, mb)), 4)):
            first = j * mb * dp + rank * mb
            rows = sample_rows(range(first, first + mb))
            assert torch.equal(tokens, rows[:, :-1]) and torch.equal(labels, rows[:, 1:])
            assert tokens.dtype == labels.dtype == torch.int64 and tokens.shape == (mb, 16)


def test_dp2_and_dp1_with_double_accumulation_see_the_same_samples_per_step() -> None:
    one_rank = [t for t, _ in islice(iter(stream(0, 1, 2)), 4)]  # one optimizer step = 4 micro-steps (mb 2)
    two_ranks = [[t for t, _ in islice(iter(stream(r, 2, 2)), 2)] for r in (0, 1)]  # 2 micro-steps per rank
    assert torch.equal(torch.cat(one_rank), torch.cat([torch.cat(two_ranks[0]), torch.cat(two_ranks[1])])
                       [[0, 1, 4, 5, 2, 3, 6, 7]])


def test_state_resumes_the_stream_and_rejects_other_settings() -> None:
    first = stream(1, 2)
    it = iter(first)
    for _ in range(3):
        next(it)
    assert first.consumed_samples == 3 * 2 * 2
    resumed = stream(1, 2)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(next(iter(resumed))[0], next(it)[0])
    with pytest.raises(ValueError, match="seed"):
        stream(seed=4).load_state_dict(first.state_dict())


def test_samples_are_learnable_sequences_and_val_differs_from_train() -> None:
    rows = synthetic_samples(np.arange(100), 0, "train", 256, 33)
    stride = (rows[:, 1] - rows[:, 0]) % 256
    assert np.all((rows[:, 2:] - rows[:, 1:-1]) % 256 == stride[:, None])  # next = last + stride (mod V)
    assert 1 <= stride.min() and stride.max() <= 15 and len(np.unique(rows[:, 0])) > 50
    val = synthetic_samples(np.arange(100), 0, "val", 256, 33)
    assert not np.array_equal(rows, val)
    evaluation = SyntheticEval(num_microbatches=3, vocab_size=256, seq_len=16, micro_batch_size=2, seed=0)
    passes = [torch.cat([t for t, _ in evaluation]) for _ in range(2)]
    assert len(evaluation) == 3 and torch.equal(passes[0], passes[1])  # a fixed validation set


def rank_context(dp_rank: int, dp: int) -> ParallelContext:
    return ParallelContext(rank=dp_rank, world_size=dp, local_rank=dp_rank, tp=1, pp=1, dp=dp, tp_rank=0, pp_rank=0,
                           dp_rank=dp_rank, tp_group=None, pp_group=None, dp_group=None, model_parallel_group=None,
                           device=torch.device("cpu"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_pipeline.manifest import write_dataset_from_arrays

    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    write_dataset_from_arrays(root, {"train": rng.integers(0, 256, (96, 65)), "val": rng.integers(0, 256, (24, 65))},
                              samples_per_shard=16)
    return root


def test_real_dataset_loaders_take_this_dp_rank_slice(dataset: Path) -> None:
    from data_pipeline.loader import TokenLoader

    cfg = load_config(TINY, ["data.synthetic=false", f"data.datasets=[{{path: {dataset}}}]", "data.num_workers=0"])
    loader = build_train_loader(cfg, rank_context(1, 2))
    direct = TokenLoader(str(dataset), micro_batch_size=4, seed=cfg.train.seed, dp_rank=1, dp_size=2)
    for (tokens, labels), (want_tokens, want_labels) in zip(islice(iter(loader), 3), islice(iter(direct), 3),
                                                          strict=True):
        assert tokens.shape == (4, 64) and torch.equal(tokens, want_tokens) and torch.equal(labels, want_labels)
    evaluation = build_eval_loader(cfg, cfg.validate_for_world(2), rank_context(0, 2))
    # eval_steps=2 global batches = 4 micro-batches per rank, but 24 val samples fill only 3 (mb 4 × dp 2 each)
    assert len(evaluation) == 3
    assert all(t.shape == (4, 64) for t, _ in evaluation)


def test_dataset_that_does_not_fit_the_config_says_what_to_set(dataset: Path) -> None:
    base = ["data.synthetic=false", f"data.datasets=[{{path: {dataset}}}]"]
    with pytest.raises(ConfigError, match="set train.seq_len=64"):
        build_train_loader(load_config(TINY, [*base, "train.seq_len=32"]), rank_context(0, 1))
    with pytest.raises(ConfigError, match="set model.vocab_size=256"):
        build_train_loader(load_config(TINY, [*base, "model.vocab_size=200"]), rank_context(0, 1))


def test_a_validation_split_smaller_than_one_micro_step_names_the_options_that_fix_it() -> None:
    from types import SimpleNamespace

    from trainer.data import _check_eval_split_fits

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
    with pytest.raises(ConfigError) as err:
        _check_eval_split_fits(cfg, SimpleNamespace(dp=1), "runs/x/data", num_samples=6)  # type: ignore[arg-type]
    for option in ("train.micro_batch_size_per_gpu to at most 6", "train.eval_interval_steps=0", "--val-fraction"):
        assert option in str(err.value)
    _check_eval_split_fits(cfg, SimpleNamespace(dp=1), "runs/x/data", num_samples=16)  # type: ignore[arg-type]
