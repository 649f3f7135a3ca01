"""Checkpointing as users and schedulers meet it: real `pretrain train` / `launch local` processes stopped by
SIGUSR1/SIGTERM (exit 75, then resume) or losing a rank to SIGKILL (no hang, then resume), and `convert to-hf` /
`generate` reading a checkpoint directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# Imported once here so the forked ranks start in ~0.3 s instead of re-importing (notes/megatron-core-cpu.md).
import deepspeed  # noqa: F401
import megatron.core.parallel_state  # noqa: F401
import megatron.core.tensor_parallel  # noqa: F401
import pytest
import torch
import torch._dynamo  # noqa: F401

from trainer import exit_codes
from trainer.checkpoint.layout import LATEST, read_metadata
from trainer.config import load_config
from trainer.testing import free_port, rank_env, run_distributed

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Constant LR after warmup: the schedule does not depend on max_steps, so a run may be continued to any length.
BASE = ["train.log_interval_steps=1", "train.eval_interval_steps=0", "optim.warmup_steps=2", "optim.decay=constant",
        "logging.tensorboard=false", "checkpoint.save_interval_steps=2", "checkpoint.keep_last=10"]


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}  # as from a fresh shell
    with log.open("w") as out:  # a file, not a pipe: nobody has to drain it while we wait
        return subprocess.Popen([sys.executable, "-m", "launch", *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env={**base, **(env or {})})


def train_losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


def _reference(rank: int, world_size: int, overrides: list[str]) -> None:
    from trainer.train import train

    train(load_config(TINY, overrides))


def test_sigusr1_checkpoints_exits_75_and_the_restart_is_bit_exact(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", "--config", str(TINY), *BASE, f"logging.run_dir={run_dir}", "checkpoint.save_interval_steps=0"]
    proc = start([*args, "train.max_steps=100000"], tmp_path / "first.log")
    wait_until(lambda: len(train_losses(run_dir)) >= 3, 120, "three logged steps")
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == exit_codes.REQUEUE == 75, (tmp_path / "first.log").read_text()[-3000:]
    stopped = max(train_losses(run_dir))
    ckpts = run_dir / "checkpoints"
    assert (ckpts / LATEST).read_text().strip() == f"step_{stopped}"  # the step it was in when the signal came
    assert read_metadata(ckpts / f"step_{stopped}")["save_reason"] == "signal"
    assert "stop signal received: saving a checkpoint" in (run_dir / "logs" / "rank0.log").read_text()

    resumed = start([*args, f"train.max_steps={stopped + 3}"], tmp_path / "second.log")
    assert resumed.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert f"resumed from {ckpts / f'step_{stopped}'}" in (run_dir / "logs" / "rank0.log").read_text()
    got = train_losses(run_dir)  # metrics.jsonl is appended to: steps 1..stopped, then stopped+1..stopped+3
    assert sorted(got) == list(range(1, stopped + 4))
    reference_dir = tmp_path / "reference"
    run_distributed(_reference, 1, [*BASE, f"logging.run_dir={reference_dir}", f"train.max_steps={stopped + 3}"])
    assert got == train_losses(reference_dir)  # bit-exact: same samples, same weights, same optimizer state


def test_launch_local_forwards_sigterm_to_the_ranks_and_exits_75(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start(["launch", "local", "--nproc", "2", "--config", str(TINY), *BASE, f"logging.run_dir={run_dir}",
                  "train.max_steps=100000"], tmp_path / "launch.log")
    wait_until(lambda: len(train_losses(run_dir)) >= 2, 180, "two logged steps")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == exit_codes.REQUEUE, (tmp_path / "launch.log").read_text()[-3000:]
    latest = (run_dir / "checkpoints" / LATEST).read_text().strip()
    assert read_metadata(run_dir / "checkpoints" / latest)["save_reason"] == "signal"
    for rank in (0, 1):
        assert "stop signal received" in (run_dir / "logs" / f"rank{rank}.log").read_text()


def test_pipeline_on_prepared_data_with_loader_workers_stops_on_sigusr1_and_resumes_bit_exact(tmp_path: Path) -> None:
    """The path a user runs (prepared data, the default loader workers), not the synthetic stream of the other tests:
    under PP it once hung at exit, in the join of loader workers that DeepSpeed's engine kept alive."""
    import numpy as np

    from data_pipeline.manifest import write_dataset_from_arrays

    rng = np.random.default_rng(0)
    write_dataset_from_arrays(tmp_path / "data", {"train": rng.integers(0, 256, (512, 65)),
                                                  "val": rng.integers(0, 256, (32, 65))}, samples_per_shard=32)
    args = ["launch", "local", "--nproc", "2", "--config", str(TINY), *BASE, "parallel.pp=2", "data.synthetic=false",
            f"data.datasets=[{{path: {tmp_path / 'data'}}}]", "data.num_workers=2", "checkpoint.save_interval_steps=0",
            "train.max_steps=8", "train.eval_interval_steps=4"]
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    whole = start([*args, f"logging.run_dir={reference_dir}"], tmp_path / "whole.log")
    assert whole.wait(timeout=120) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    first = start([*args, f"logging.run_dir={run_dir}"], tmp_path / "first.log")
    wait_until(lambda: len(train_losses(run_dir)) >= 2, 120, "two logged steps")
    first.send_signal(signal.SIGUSR1)
    assert first.wait(timeout=60) == exit_codes.REQUEUE, (tmp_path / "first.log").read_text()[-3000:]
    stopped = max(train_losses(run_dir))
    assert stopped < 8, "the signal came too late to test a resume"
    second = start([*args, f"logging.run_dir={run_dir}"], tmp_path / "second.log")
    assert second.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert train_losses(run_dir) == train_losses(reference_dir)  # bit-exact: the same samples in the same order
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"][-1] == 8


def test_sigkill_of_one_rank_ends_the_job_without_a_hang_and_a_restart_resumes(tmp_path: Path) -> None:
    """Two ranks started the way `srun` starts them (one `pretrain train` per rank, env from the scheduler)."""
    run_dir = tmp_path / "run"
    args = ["train", "--config", str(TINY), *BASE, f"logging.run_dir={run_dir}", "faults.collective_timeout_s=30",
            "faults.hang_timeout_s=30"]

    def start_ranks(extra: list[str], tag: str) -> list[subprocess.Popen]:
        port = free_port()
        return [start([*args, *extra], tmp_path / f"{tag}{rank}.log", env=rank_env(rank, 2, port))
                for rank in range(2)]

    ranks = start_ranks(["train.max_steps=100000"], "first")
    ckpts = run_dir / "checkpoints"
    wait_until(lambda: (ckpts / LATEST).is_file() and len(train_losses(run_dir)) >= 3, 180, "a checkpoint")
    ranks[1].send_signal(signal.SIGKILL)
    killed_s = time.monotonic()
    survivor_rc = ranks[0].wait(timeout=60)
    assert survivor_rc not in (0, exit_codes.REQUEUE), (tmp_path / "first0.log").read_text()[-3000:]
    survivor_exit_s = time.monotonic() - killed_s
    print(f"survivor exited {survivor_exit_s:.1f} s after its peer was killed (rc {survivor_rc})")
    assert survivor_exit_s < 40  # failed fast (peer gone), well within the collective timeout
    ranks[1].wait(timeout=10)
    latest = (ckpts / LATEST).read_text().strip()
    last = int(latest.split("_")[1])

    restarted = start_ranks([f"train.max_steps={last + 2}"], "second")
    for rank, proc in enumerate(restarted):
        assert proc.wait(timeout=180) == 0, (tmp_path / f"second{rank}.log").read_text()[-3000:]
    assert f"resumed from {ckpts / latest}: step {last}" in (run_dir / "logs" / "rank0.log").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# convert to-hf / generate from a checkpoint directory


def _train_tp2(rank: int, world_size: int, overrides: list[str]) -> None:
    from trainer.train import train

    train(load_config(TINY, overrides))


def test_convert_and_generate_read_a_tensor_parallel_checkpoint(tmp_path: Path) -> None:
    from hf_fixtures import VOCAB, corpus_documents, load_hf, write_corpus

    from data_pipeline.tokenizer import TokenizerTrainConfig, train_tokenizer
    from launch.cli import main
    from trainer.checkpoint import read_full_state_dict
    from trainer.config import padded_vocab_size
    from trainer.model import Llama

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    corpus = write_corpus(tmp_path / "corpus.jsonl", corpus_documents(120, seed=0))
    train_tokenizer(TokenizerTrainConfig(inputs=(str(corpus),), output_dir=str(tmp_path / "tokenizer"),
                                         vocab_size=VOCAB, input_sentence_size=0, num_threads=2))
    run_dir = tmp_path / "run"
    run_distributed(_train_tp2, 2, [*BASE, f"logging.run_dir={run_dir}", f"model.vocab_size={VOCAB}",
                                    "parallel.tp=2", "train.max_steps=3"])
    ckpts = run_dir / "checkpoints"
    assert main(["convert", "to-hf", "--checkpoint", str(ckpts), "--tokenizer", str(tmp_path / "tokenizer"),
                 "--output", str(tmp_path / "hf")]) == 0
    state, ckpt = read_full_state_dict(ckpts)
    assert ckpt.name == "step_3"
    cfg = load_config(ckpt / "config.yaml").model
    ours = Llama(cfg, padded_vocab_size(VOCAB, 2)).eval()
    ours.load_state_dict(state)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits = ours(ids)[..., :VOCAB]
        hf_logits = load_hf(tmp_path / "hf")(ids).logits
    assert (ours_logits - hf_logits).abs().max().item() < 1e-4
    assert main(["generate", "--checkpoint", str(ckpts), "--tokenizer", str(tmp_path / "tokenizer"),
                 "--prompt", "def main():", "--greedy", "--max-new-tokens", "5"]) == 0
    assert main(["convert", "to-hf", "--state-dict", str(ckpt / "index.json"), "--no-tokenizer",
                 "--output", str(tmp_path / "x")]) == 2  # --state-dict without --config: a clear error
