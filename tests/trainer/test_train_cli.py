"""Training the way a user starts it: `pretrain train` (one process) and `pretrain launch local --nproc 2` (torchrun),
as subprocesses, checking the run directory they leave behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def pretrain(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}  # as from a fresh shell
    return subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout_s)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_train_single_process_writes_the_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = ["train.max_steps=4", "optim.warmup_steps=1", "train.log_interval_steps=2",
                 "train.eval_interval_steps=2", f"logging.run_dir={run_dir}", "logging.tensorboard=true"]
    out = pretrain("train", "--config", "configs/tiny.yaml", *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    records = metrics(run_dir)
    assert [(r["step"], r["kind"]) for r in records] == [(2, "train"), (2, "eval"), (4, "train"), (4, "eval")]
    train_record = records[2]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "step_time_s", "data_wait_s",
                "max_rss_gib"):
        assert isinstance(train_record[key], float) and train_record[key] >= 0, key
    assert train_record["mfu"] is None and train_record["loss_scale"] is None  # CPU: no MFU; fp32: no loss scale
    assert train_record["skipped_steps"] is None  # only fp16 skips steps
    assert records[3]["val_ppl"] > 1.0
    resolved = load_config(run_dir / "config.yaml")  # the resolved config reproduces the run
    assert resolved == load_config(REPO / "configs" / "tiny.yaml", overrides)
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "step 4/4 | loss" in log and "val_loss" in log
    assert "step 4/4 | loss" in out.stderr  # the logging rank prints the same lines


def test_launch_local_two_processes_on_two_prepared_datasets(tmp_path: Path) -> None:
    import numpy as np

    from data_pipeline.manifest import write_dataset_from_arrays

    rng = np.random.default_rng(0)
    write_dataset_from_arrays(tmp_path / "data", {"train": rng.integers(0, 256, (128, 65)),
                                                  "val": rng.integers(0, 256, (32, 65))}, samples_per_shard=32)
    # One token repeated: learnt from the first steps, so its validation loss is well below the random data's (3.45 vs
    # 5.59 after 3 steps, measured).
    write_dataset_from_arrays(tmp_path / "more", {"train": np.full((64, 65), 255), "val": np.full((16, 65), 255)},
                              samples_per_shard=32)
    run_dir = tmp_path / "run"
    mixture = f"data.datasets=[{{path: {tmp_path / 'data'}, weight: 3}}, {{path: {tmp_path / 'more'}, weight: 1}}]"
    out = pretrain("launch", "local", "--nproc", "2", "--config", "configs/tiny.yaml", "train.max_steps=3",
                   "optim.warmup_steps=1", "train.log_interval_steps=1", f"logging.run_dir={run_dir}",
                   "data.synthetic=false", mixture, "data.num_workers=1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "launch.torchrun_agent --standalone --nproc_per_node=2 -m launch train" in out.stderr
    records = metrics(run_dir)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert [r["kind"] for r in records][-1] == "eval"  # the final validation pass
    # Each dataset's own validation loss, named as tokens/<name>; val_loss is the mean over all micro-batches: 4 per
    # rank of "data" (32 samples / (micro 4 x dp 2)), 2 of "more" (16 samples).
    val = records[-1]
    data_loss, more_loss = val[f"val_loss/{tmp_path / 'data'}"], val[f"val_loss/{tmp_path / 'more'}"]
    assert more_loss < data_loss - 1.0, (more_loss, data_loss)
    assert val["val_loss"] == pytest.approx((4 * data_loss + 2 * more_loss) / 6, rel=1e-6)
    assert f"val_loss/{tmp_path / 'more'} {more_loss:.4f}" in out.stderr
    last = [r for r in records if r["kind"] == "train"][-1]
    per_source = {key: value for key, value in last.items() if key.startswith("tokens/")}
    assert len(per_source) == 2 and sum(per_source.values()) == 3 * 16 * 64  # steps × global batch × seq_len
    assert len([key for key in last if key.startswith("epochs/")]) == 2
    for rank in (0, 1):
        assert "rank %d/2: tp 0/1 pp 0/1 dp %d/2" % (rank, rank) in (run_dir / "logs" / f"rank{rank}.log").read_text()

    # Under pipeline parallelism each dataset's pass is its own DeepSpeed eval_batch: the same samples, the same losses.
    pp_dir = tmp_path / "pp"
    out = pretrain("launch", "local", "--nproc", "2", "--config", "configs/tiny.yaml", "train.max_steps=3",
                   "optim.warmup_steps=1", "train.log_interval_steps=1", f"logging.run_dir={pp_dir}",
                   "data.synthetic=false", mixture, "data.num_workers=1", "parallel.pp=2")
    assert out.returncode == 0, out.stderr[-3000:]
    pp_val = metrics(pp_dir)[-1]
    for key in ("val_loss", f"val_loss/{tmp_path / 'data'}", f"val_loss/{tmp_path / 'more'}"):
        assert pp_val[key] == pytest.approx(val[key], rel=1e-5), key


def test_launch_local_refuses_gpus_it_does_not_have() -> None:
    if "cuda" in subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available() and 'cuda')"],
                                capture_output=True, text=True).stdout:
        pytest.skip("this machine has a GPU")
    out = pretrain("launch", "local", "--nproc", "8", "--config", "configs/125m.yaml", timeout_s=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "add launch.device=cpu" in out.stderr


def test_document_masking_reads_the_eos_id_from_the_prepared_data(tmp_path: Path) -> None:
    """model.attention_mask=document on prepared data: the eos id comes from the manifest's tokenizer; data written
    without one is refused before the model is built, with what to do."""
    import numpy as np

    from data_pipeline.manifest import TokenizerInfo, write_dataset_from_arrays

    rng = np.random.default_rng(0)
    splits = {"train": rng.integers(0, 256, (64, 65)), "val": rng.integers(0, 256, (16, 65))}
    for samples in splits.values():
        samples[:, ::9] = 7  # documents of 9 tokens, ended by the tokenizer's eos
    eos_seven = TokenizerInfo(fingerprint="eos7", vocab_size=256, model_type="bpe", unk_id=0, bos_id=1, eos_id=7,
                              pad_id=3, model_file=None)
    write_dataset_from_arrays(tmp_path / "data", splits, samples_per_shard=16, tokenizer=eos_seven)
    write_dataset_from_arrays(tmp_path / "no_eos", splits, samples_per_shard=16)
    base = ["train.max_steps=2", "optim.warmup_steps=1", "train.log_interval_steps=1", "train.eval_interval_steps=2",
            "data.synthetic=false", "data.num_workers=0", "model.attention_mask=document",
            "model.reset_position_ids=true"]
    dry = pretrain("train", "--config", "configs/tiny.yaml", "--dry-run", *base,
                   f"data.datasets=[{{path: {tmp_path / 'data'}}}]")
    assert "a document ends at eos id 7" in dry.stdout, dry.stdout + dry.stderr
    losses = {}
    for mask in ("document", "causal"):
        run_dir = tmp_path / mask
        out = pretrain("train", "--config", "configs/tiny.yaml", *base, f"model.attention_mask={mask}",
                       f"data.datasets=[{{path: {tmp_path / 'data'}}}]", f"logging.run_dir={run_dir}")
        assert out.returncode == 0, out.stderr[-3000:]
        losses[mask] = [r["val_loss"] for r in metrics(run_dir) if r["kind"] == "eval"]
    # Eight documents per sample: the mask changes what every token after the first eos sees.
    assert abs(losses["document"][0] - losses["causal"][0]) > 1e-3, losses
    refused = pretrain("train", "--config", "configs/tiny.yaml", *base,
                       f"data.datasets=[{{path: {tmp_path / 'no_eos'}}}]", f"logging.run_dir={tmp_path / 'refused'}")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "records no eos id" in refused.stderr and "model.attention_mask=causal" in refused.stderr
