"""bench/bench_gpu.py runs end to end on CPU with the tiny shape and writes its JSON: the GPU session then needs one
command, not a debugging round (GPU time is scarce). Speed is not checked here (benchmarks are never timed tests)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.slow
def test_bench_gpu_runs_every_loop_on_cpu_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    # aot_eager for the compiled HF loop: the graph capture runs, inductor's C++ build (~1 min here) does not.
    done = subprocess.run([sys.executable, "bench/bench_gpu.py", "--device", "cpu", "--tiny", "--steps", "1",
                           "--warmup-steps", "1", "--hf-compile-backend", "aot_eager", "--out", str(out), "--profile",
                           "--then-variant", "zero1_core=zero.stage=1,parallel.activation_checkpointing=core_attention"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = {row["label"]: row for row in report["rows"]}
    # --then-variant loops come after the HF loops, so a tight budget drops them first.
    assert list(rows)[:5] == ["trainer[no_ac]", "trainer[config_ac]", "hf_eager", "hf_compile", "trainer[zero1_core]"]
    for label in ("trainer[no_ac]", "trainer[config_ac]", "hf_eager", "hf_compile", "trainer[zero1_core]"):
        assert rows[label]["tokens_per_s"] > 0 and rows[label]["peak_memory_gib"] > 0, label
        assert rows[label]["model_freed_after_loop"], f"{label} leaks its model into the next loop"
    assert rows["trainer[no_ac]"]["activation_checkpointing"] == "none"
    assert rows["trainer[no_ac]"]["engine"] == "DeepSpeedEngine"
    assert (rows["trainer[no_ac]"]["attention_mask"], rows["trainer[no_ac]"]["attention_kernel"]) == ("causal", "sdpa")
    assert rows["trainer[zero1_core]"]["zero_stage"] == 1
    assert rows["trainer[zero1_core]"]["activation_checkpointing"] == "core_attention"
    # Each trainer loop carries the dry-run's memory estimate of its own config (issue 16's GPU check reads it).
    estimates = [rows[label]["estimate_gib"] for label in ("trainer[no_ac]", "trainer[config_ac]", "trainer[zero1_core]")]
    assert all(e > 0 for e in estimates) and estimates[0] != estimates[2]  # tiny.yaml: no AC, ZeRO-0 (= no_ac)
    assert "estimate_gib" not in rows["hf_eager"] and "est/peak" in done.stdout
    for label in ("trainer[no_ac]", "trainer[zero1_core]"):  # the split the GPU run measures against (CPU: no split)
        assert sum(rows[label]["estimate_parts_gib"].values()) == pytest.approx(rows[label]["estimate_gib"])
        assert rows[label]["after_step_gib"] is None and "  memory: after a step" not in done.stdout
    # ... and `pretrain plan`'s step time for it on an H200 (the default --plan-gpu): recompute costs time there.
    planned = {label: rows[label]["plan_s_per_step"] for label in ("trainer[no_ac]", "trainer[zero1_core]")}
    assert 0 < planned["trainer[no_ac]"] < planned["trainer[zero1_core]"] and "plan/meas" in done.stdout
    assert rows["hf_compile"]["compile_backend"] == "aot_eager"
    assert report["tokens_per_step"] == 8 * 64 and report["peak_tflops"] is None  # no MFU on CPU
    # --profile: every loop says where its time went (the trainer through its own profiling.* hook, in the warm-up call)
    for label, trace in (("trainer[no_ac]", "trainer_no_ac/steps_1-1/rank0_trace.json.gz"),
                         ("hf_compile", "hf_compile/rank0_trace.json.gz")):
        assert rows[label]["profile"]["category_s"]["gemm"] > 0, label
        assert (out.parent / "bench_traces" / trace).is_file(), label
    assert done.stdout.count("  profile step") == 5
    # ... and at the end the loops side by side, per step and category (HF's step range counts as host time too).
    table = done.stdout.split("where the time goes (CPU op time by category):\n")[1].splitlines()
    assert table[0].split()[3:] == ["trainer[no_ac]", "trainer[config_ac]", "hf_eager", "hf_compile",
                                    "trainer[zero1_core]"]
    assert any(line.startswith("gemm ") for line in table)
    assert any(line.startswith("host (outside ops)") for line in table)
    assert rows["hf_eager"]["profile"]["category_s"]["host (outside ops)"] > 0
    assert "hf_eager" in done.stdout and "wrote" in done.stdout and report["complete"] is True
    # Each loop's numbers are printed as soon as it ends (a run cut off by a time limit keeps them): 5 loops, the
    # final table, each under the column names.
    assert done.stdout.count("plan/meas") == 6


@pytest.mark.slow
def test_bench_gpu_fp8_stage_runs_on_cpu_and_a_failing_loop_costs_only_itself(tmp_path: Path) -> None:
    """The loops of `gpu_session.sh fp8` (trainer only, bf16 vs FP8), on the tiny shape: FP8 really is on in its loop.
    A loop that fails in between (here a layout one process cannot run) becomes an error row, the loops after it still
    run, the JSON is complete and the exit status says so: one device call must bring back every number it can."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    done = subprocess.run([sys.executable, "bench/bench_gpu.py", "--device", "cpu", "--tiny", "--steps", "1",
                           "--warmup-steps", "1", "--skip", "hf_eager", "hf_compile", "--out", str(out),
                           "--variant", "no_ac=parallel.activation_checkpointing=none",
                           "--variant", "broken=parallel.tp=2",
                           "--variant", "fp8=parallel.activation_checkpointing=none,precision.fp8=tensorwise"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-4000:]
    assert "1 loop(s) failed: trainer[broken]" in done.stderr and "Traceback" in done.stderr
    report = json.loads(out.read_text())
    assert report["complete"] is True
    rows = {row["label"]: row for row in report["rows"] if "skipped" not in row}
    assert list(rows)[:3] == ["trainer[no_ac]", "trainer[broken]", "trainer[fp8]"]
    assert "tp" in rows["trainer[broken]"]["error"] and "tokens_per_s" not in rows["trainer[broken]"]
    assert re.search(r"trainer\[broken\] +FAILED: ConfigError: config does not fit world size 1", done.stdout)
    assert (rows["trainer[no_ac]"]["fp8"], rows["trainer[no_ac]"]["fp8_linears"]) == ("off", 0)
    assert (rows["trainer[fp8]"]["fp8"], rows["trainer[fp8]"]["fp8_linears"]) == ("tensorwise", 14)
    assert rows["trainer[fp8]"]["tokens_per_s"] > 0 and rows["trainer[fp8]"]["model_freed_after_loop"]


def test_memory_split_line_reads_a_gpu_row() -> None:
    """The line a CUDA row gets (after_step_gib is measured only there); printed between loops, outside the guard that
    turns a loop's exception into an error row, so it must not fail on the GPU."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "bench_gpu.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = {"peak_memory_gib": 36.0, "after_step_gib": 16.5,
           "estimate_parts_gib": {"weights": 2.5, "grads": 2.5, "optimizer": 15.0, "activations": 14.0, "buffers": 1.0}}
    assert bench.memory_split_line(row) == ("  memory: after a step 16.50 GiB (estimate: weights + optimizer 17.50); "
                                            "peak - that 19.50 GiB (estimate: grads + activations + buffers 17.50)")
    assert bench.memory_split_line({**row, "after_step_gib": None}) is None  # CPU rows
    assert bench.memory_split_line({"label": "hf_eager", "peak_memory_gib": 3.0}) is None
