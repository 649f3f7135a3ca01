"""`pretrain plan` as a user runs it: table, --json, --write → train --dry-run → submit --dry-run, errors, no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HEAVY_MODULES = ("torch", "deepspeed", "megatron", "transformers")


def pretrain(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def test_70b_on_32_h100_nodes_prints_the_table_and_why() -> None:
    out = pretrain("plan", "--config", "configs/70b.yaml", "--nodes", "32", "--gpus-per-node", "8",
                   "--gpu", "h100-80gb", "--top", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("#  tp"))
    for column in ("weights", "grads", "optim", "activ", "compute s", "comm s", "bubble s", "tokens/s", "MFU"):
        assert column in header
    rows = lines[lines.index(header) + 1: lines.index(header) + 4]
    assert [row.split()[0] for row in rows] == ["1", "2", "3"]
    assert any(line.startswith("why ") and " wins: " in line for line in lines)
    given = next(line for line in lines if line.startswith("config's "))
    assert "tp8+sp pp4 dp8 zero1 micro1 ac=selective: #" in given and "vs #1" in given


def test_plan_imports_no_torch() -> None:
    code = (
        "import sys; from launch.cli import main\n"
        "rc = main(['plan', '--config', 'configs/7b.yaml', '--nodes', '2', '--json'])\n"
        f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY_MODULES!r}]\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY=\n" in out.stderr, f"plan imported heavy modules: {out.stderr}"


def test_json_output(tmp_path: Path) -> None:
    out = pretrain("plan", "--config", "configs/7b.yaml", "--nodes", "2", "--gpu", "h200", "--top", "4", "--json",
                   "--global-batch-tokens", "2097152", "--seq-len", "2048")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["cluster"]["gpu"]["name"] == "h200" and len(doc["candidates"]) == 4
    assert doc["enumerated"] == doc["invalid"] + doc["too_big"] + doc["fits"] - doc["fewer_checkpointed"]
    best = doc["candidates"][0]
    assert set(best["memory_gib"]) == {"weights", "grads", "optimizer", "activations", "buffers", "total"}
    assert best["step_time_s"]["total"] <= doc["candidates"][-1]["step_time_s"]["total"]
    assert best["memory_gib"]["total"] <= doc["usable_memory_gib"]
    lay = best["layout"]
    assert lay["tp"] * lay["pp"] * lay["dp"] == 16
    assert doc["config_layout"]["layout"]["tp"] == 2 and doc["config_layout_problem"] is None  # configs/7b.yaml: tp 2


def test_written_config_passes_dry_run_and_submit_dry_run(tmp_path: Path) -> None:
    written = tmp_path / "plan-7b.yaml"
    out = pretrain("plan", "--config", "configs/7b.yaml", "--nodes", "4", "--gpu", "a100-80gb", "--write",
                   str(written), "logging.run_dir=" + str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(written.read_text())
    assert cfg["launch"]["nodes"] == 4 and cfg["launch"]["gpus_per_node"] == 8
    winner = next(line for line in out.stdout.splitlines() if line.startswith("why ")).split()[1:3]
    assert winner[0].startswith(f"tp{cfg['parallel']['tp']}") and winner[1] == f"pp{cfg['parallel']['pp']}"
    dry = pretrain("train", "--config", str(written), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"tp {cfg['parallel']['tp']} × pp {cfg['parallel']['pp']}" in dry.stdout
    submit = pretrain("submit", "--config", str(written), "--dry-run", cwd=tmp_path)
    assert submit.returncode == 0, submit.stderr
    assert "#SBATCH --nodes=4" in submit.stdout


def test_uneven_pipeline_winner_is_written_and_runs(tmp_path: Path) -> None:
    """A slow network (0.5 GB/s per GPU) pushes 7B on 3 × 8 GPUs to pipelines whose pp does not divide 32 layers:
    the winner's stage list is in the table, in the written config, and `train` / `submit --dry-run` accept it."""
    written = tmp_path / "plan-uneven.yaml"
    out = pretrain("plan", "--config", "configs/7b.yaml", "--nodes", "3", "--gpus-per-node", "8",
                   "--inter-node-gbps", "0.5", "--write", str(written), "logging.run_dir=" + str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    stages = yaml.safe_load(written.read_text())["parallel"]["pipeline_stage_layers"]
    assert stages is not None and sum(stages) == 32 and max(stages) - min(stages) == 1
    assert stages[0] == stages[-1] == min(stages)  # the end stages are the light ones
    pp = len(stages)
    assert any(line.split()[2:3] == [str(pp)] and "[" in line for line in out.stdout.splitlines()[:8])  # table
    dry = pretrain("train", "--config", str(written), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"× pp {pp} ×" in dry.stdout and f"decoder layers per stage {stages}" in dry.stdout
    submit = pretrain("submit", "--config", str(written), "--dry-run", cwd=tmp_path)
    assert submit.returncode == 0, submit.stderr


def test_hf_config_json_is_accepted(tmp_path: Path) -> None:
    raw = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
           "max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    out = pretrain("plan", "--config", str(tmp_path / "config.json"), "--nodes", "1", "--gpu", "h100-80gb",
                   "--seq-len", "8192", "--global-batch-tokens", str(2**21), "--write", str(tmp_path / "w.yaml"))
    assert out.returncode == 0, out.stderr
    assert "seq 8192, 2,097,152 tokens/step" in out.stdout
    assert pretrain("train", "--config", str(tmp_path / "w.yaml"), "--dry-run").returncode == 0


def test_errors_exit_2_and_say_what_to_do() -> None:
    nothing = pretrain("plan", "--config", "configs/70b.yaml", "--nodes", "1", "--gpu", "a100-40gb")
    assert nothing.returncode == 2
    assert "no layout fits" in nothing.stderr and "add nodes (--nodes)" in nothing.stderr
    batch = pretrain("plan", "--config", "configs/7b.yaml", "--global-batch-tokens", "1000")
    assert batch.returncode == 2 and "must be a multiple of the sequence length" in batch.stderr
    field = pretrain("plan", "--config", "configs/7b.yaml", "parallel.tpp=2")
    assert field.returncode == 2 and "did you mean parallel.tp" in field.stderr
    headroom = pretrain("plan", "--config", "configs/7b.yaml", "--headroom", "1.5")
    assert headroom.returncode == 2 and "--headroom (1.5) must be in [0, 1)" in headroom.stderr
    to_dir = pretrain("plan", "--config", "configs/7b.yaml", "--write", str(REPO / "configs"))
    assert to_dir.returncode == 2 and "is a directory: pass a file path" in to_dir.stderr


def test_gemm_efficiency_curve_from_a_file(tmp_path: Path) -> None:
    """A measured curve is read from JSON, named in the report and priced in; a bad one exits 2 naming the flag."""
    curve = tmp_path / "curve.json"
    curve.write_text(json.dumps({"width": {"512": 0.5, "2048": 1.0}, "source": "my microbenchmark"}))
    args = ("plan", "--config", "configs/7b.yaml", "--nodes", "1", "--gpu", "h200", "--json", "--top", "1",
            "parallel.tp=8", "--global-batch-tokens", "1048576", "--seq-len", "2048")
    flat, measured = pretrain(*args), pretrain(*args, "--gemm-efficiency", str(curve))
    assert flat.returncode == 0 and measured.returncode == 0, measured.stderr
    flat_doc, curve_doc = json.loads(flat.stdout), json.loads(measured.stdout)
    assert curve_doc["calibration"]["gemm"]["source"] == "my microbenchmark"
    # The config's own layout, 7B at tp 8: q, k, v, o shards are 512 wide (factor 0.5), gate/up/down 1376 (0.86):
    # (4·4096² / 0.5 + 3·4096·11008 / 0.86) / (4·4096² + 3·4096·11008) = 1.45 on the layers' matmuls; the attention
    # core and lm_head (4000 wide) stay at 1.0.
    flat_s, curve_s = (doc["config_layout"]["step_time_s"]["compute"] for doc in (flat_doc, curve_doc))
    assert 1.3 < curve_s / flat_s < 1.45
    curve.write_text(json.dumps({"width": {"512": -1}}))
    bad = pretrain(*args, "--gemm-efficiency", str(curve))
    assert bad.returncode == 2 and f"--gemm-efficiency {curve}: width: '512': -1" in bad.stderr


def test_fp8_plans_are_priced_as_bf16_and_rowwise_keeps_tp1() -> None:
    """precision.fp8 has no GPU speed to calibrate on: the plan says it prices the FP8 linears at the bf16 rate.
    Tensorwise runs under TP where each rank's shards are multiples of 16; rowwise only without TP (config
    validation refuses the rest, and the plan offers what validation accepts)."""
    out = pretrain("plan", "--config", "configs/1b.yaml", "--nodes", "1", "--gpus-per-node", "8", "--json",
                   "--top", "200", "precision.fp8=tensorwise")
    assert out.returncode == 0, out.stderr
    assert {c["layout"]["tp"] for c in json.loads(out.stdout)["candidates"]} > {1}
    rowwise = pretrain("plan", "--config", "configs/1b.yaml", "--nodes", "1", "--gpus-per-node", "8", "--json",
                       "--top", "200", "precision.fp8=rowwise")
    assert rowwise.returncode == 0, rowwise.stderr
    doc = json.loads(rowwise.stdout)
    assert doc["candidates"] and all(c["layout"]["tp"] == 1 for c in doc["candidates"])
    table = pretrain("plan", "--config", "configs/1b.yaml", "--nodes", "1", "--gpus-per-node", "8",
                     "precision.fp8=tensorwise")
    assert "bf16 + fp8 tensorwise, priced as bf16: FP8 speed unmeasured" in table.stdout
