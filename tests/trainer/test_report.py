"""`pretrain report`: summary numbers from hand-made metrics.jsonl files (the keys trainer.hooks.MetricsHook writes),
the PNG, several runs, resumed runs, malformed lines, the errors, and --help staying light. One test reports on a
real short training run."""

from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from launch.cli import main
from trainer.report import (
    ReportError,
    format_summary_table,
    drawn_panels,
    load_run,
    load_runs,
    summarize,
    validation_datasets,
    write_report,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_line(step: int, time_s: float, loss: float, tokens_per_s: float, step_time_s: float,
               **overrides: Any) -> dict[str, Any]:
    """A train line with every key MetricsHook writes (CPU run: no MFU, no loss scale)."""
    line = {
        "step": step, "time_s": time_s, "kind": "train", "loss": loss, "lr": 1e-3, "grad_norm": 1.0,
        "loss_scale": None, "tokens_per_s": tokens_per_s, "tflops_per_gpu": tokens_per_s / 1e3, "mfu": None,
        "step_time_s": step_time_s, "data_wait_s": 0.001, "max_rss_gib": 0.4,
    }
    return {**line, **overrides}


def eval_line(step: int, time_s: float, val_loss: float) -> dict[str, Any]:
    return {"step": step, "time_s": time_s, "kind": "eval", "val_loss": val_loss, "val_ppl": math.exp(val_loss)}


def write_run(run_dir: Path, lines: list[dict[str, Any] | str], name: str | None = "tiny") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    (run_dir / "metrics.jsonl").write_text(text, encoding="utf-8")
    if name is not None:
        (run_dir / "config.yaml").write_text(f"name: {name}\ntrain:\n  global_batch_size: 16\n  seq_len: 64\n")
    return run_dir


def gpu_fp16_lines() -> list[dict[str, Any]]:
    """Training started at t=1000 s; 1024 tokens per step (tokens_per_s × step_time_s); a NaN at step 30; the loss
    scale drops twice; MFU missing on the last line."""
    return [
        train_line(10, 1010.24, 5.0, 1000.0, 1.024, mfu=0.1, tflops_per_gpu=10.0, loss_scale=65536.0),
        train_line(20, 1015.36, 4.0, 2000.0, 0.512, mfu=0.2, tflops_per_gpu=20.0, loss_scale=32768.0),
        eval_line(20, 1015.5, 3.9),
        train_line(30, 1017.92, math.nan, 4000.0, 0.256, mfu=0.4, tflops_per_gpu=40.0, loss_scale=32768.0),
        train_line(40, 1022.92, 3.5, 3000.0, 0.5, mfu=None, tflops_per_gpu=30.0, loss_scale=16384.0),
        eval_line(40, 1023.0, 3.25),
    ]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_summary_numbers_exact(tmp_path: Path) -> None:
    run = load_runs([write_run(tmp_path / "gpu_run", gpu_fp16_lines())])[0]
    summary = summarize(run)
    assert run.label == "tiny (gpu_run)"
    assert run.tokens_per_step == 1024
    assert summary.steps == 40
    assert summary.tokens_seen == 40 * 1024
    assert summary.first_loss == (10, 5.0)
    assert summary.last_loss == (40, 3.5)
    assert summary.min_loss == (40, 3.5)  # the NaN at step 30 is not a minimum
    assert summary.last_val_loss == (40, 3.25)
    assert summary.last_val_ppl == math.exp(3.25)
    assert summary.mean_tokens_per_s == (2000.0 + 4000.0 + 3000.0) / 3  # step 10 (warm-up) left out
    assert summary.mean_tflops_per_gpu == (20.0 + 40.0 + 30.0) / 3
    assert summary.mean_mfu == (0.2 + 0.4) / 2  # null MFU lines do not count
    assert summary.wall_time_s == pytest.approx(23.0, abs=1e-9)  # from the first step's start (t=1000) to t=1023
    assert summary.nonfinite_loss_steps == (30,)
    assert summary.loss_scale_drops == 2
    assert (summary.restarts, summary.malformed_lines) == (0, 0)
    assert summary.last_val_loss_per_dataset == {}
    assert "val loss:" not in format_summary_table([summary])


def test_summary_has_each_validation_dataset(tmp_path: Path) -> None:
    lines = [train_line(10, 1010.0, 5.0, 1000.0, 1.0),
             {**eval_line(10, 1011.0, 4.0), "val_loss//data/web": 4.5, "val_loss//data/code": 3.0}]
    summaries = [summarize(run) for run in load_runs([write_run(tmp_path / "a", lines),
                                                      write_run(tmp_path / "b", gpu_fp16_lines())])]
    assert summaries[0].last_val_loss_per_dataset == {"/data/web": 4.5, "/data/code": 3.0}
    table = format_summary_table(summaries).splitlines()
    assert [line.split()[:4] for line in table if "val loss:" in line] == [
        ["val", "loss:", "code", "3.0000"], ["val", "loss:", "web", "4.5000"]]
    # Drawn in the loss panel, one marker per dataset across runs (the run without them draws as before).
    runs = load_runs([tmp_path / "a", tmp_path / "b"])
    assert validation_datasets(runs) == ["val_loss//data/code", "val_loss//data/web"]
    png = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "r.png", out=io.StringIO())
    assert png_size(png)[0] > 0


def test_the_summary_names_the_stragglers_the_checks_named(tmp_path: Path) -> None:
    plain = write_run(tmp_path / "plain", gpu_fp16_lines())
    slowed = write_run(tmp_path / "slowed", gpu_fp16_lines())
    records = [{"step": 100, "kind": "device", "rank": 3, "node": "gpu-041", "slowdown": 1.9},
               {"step": 200, "kind": "device", "rank": 3, "node": "gpu-041", "slowdown": 1.8},
               {"step": 200, "kind": "data", "rank": 5, "node": "gpu-007", "data_wait_share": 0.4},
               {"step": 300, "kind": "device", "rank": 9, "node": "gpu-099", "slowdown": 1.3}]
    (slowed / "stragglers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4', "utf-8")
    summaries = [summarize(run) for run in load_runs([plain, slowed])]
    assert summaries[0].stragglers == {}
    assert summaries[1].stragglers == {"rank 3 on gpu-041 (device)": 2, "rank 5 on gpu-007 (data)": 1,
                                       "rank 9 on gpu-099 (device)": 1}  # the torn last line passed over
    [row] = [line for line in format_summary_table(summaries).splitlines() if line.startswith("stragglers")]
    assert row.split("  ")[-1].strip() == "rank 3 on gpu-041 (device) ×2, rank 5 on gpu-007 (data) ×1, +1 more"
    assert "stragglers" not in format_summary_table(summaries[:1])


def test_cli_prints_table_and_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_run(tmp_path / "gpu_run", gpu_fp16_lines())
    assert main(["report", str(run_dir), "--smooth", "2"]) == 0
    out = capsys.readouterr().out
    png = run_dir / "report.png"
    assert f"wrote {png}" in out
    for row in ("steps", "40,960 (41K)", "3.5000 @ step 40", "3.2500 @ step 40", "25.79", "3,000", "30.0%",
                "0:00:23", "1 (at 30)", "fp16 loss-scale drops"):
        assert row in out, f"{row!r} missing from:\n{out}"
    width, height = png_size(png)
    assert width >= 1200 and height >= 600
    assert png.stat().st_size > 30_000  # seven panels of curves, not a blank canvas


def test_cpu_run_table_leaves_out_mfu(tmp_path: Path) -> None:
    lines = [train_line(5, 10.0, 3.0, 512.0, 2.0), train_line(10, 20.0, 2.0, 512.0, 2.0)]
    out = io.StringIO()
    write_report([write_run(tmp_path / "cpu", lines)], out=out)
    assert "MFU" not in out.getvalue() and "loss-scale" not in out.getvalue()
    assert "mean tokens/s" in out.getvalue()


@pytest.mark.parametrize("x_axis", ["step", "tokens", "time"])
def test_several_runs_overlaid(tmp_path: Path, x_axis: str) -> None:
    run_a = write_run(tmp_path / "a", gpu_fp16_lines())
    run_b = write_run(tmp_path / "b", [train_line(s, 1000.0 + s, 6.0 - s / 10, 2048.0, 0.5) for s in (10, 20, 30)])
    output = tmp_path / "plots" / "compare.png"  # parent created on demand
    out = io.StringIO()
    png = write_report([run_a, run_b], output, smooth_points=3, x_axis=x_axis, out=out)  # type: ignore[arg-type]
    assert png == output
    header = out.getvalue().splitlines()[0]
    assert "tiny (a)" in header and "tiny (b)" in header
    assert png_size(output)[0] >= 1200


def test_default_png_of_several_runs_goes_to_first_run(tmp_path: Path) -> None:
    run_a = write_run(tmp_path / "a", gpu_fp16_lines())
    run_b = write_run(tmp_path / "b", gpu_fp16_lines())
    assert write_report([run_a, run_b], out=io.StringIO()) == run_a / "report.png"
    assert (run_a / "report.png").is_file() and not (run_b / "report.png").exists()


def test_runs_with_the_same_dir_name_get_distinct_labels(tmp_path: Path) -> None:
    runs = load_runs([write_run(tmp_path / "x" / "run", gpu_fp16_lines()),
                      write_run(tmp_path / "y" / "run", gpu_fp16_lines())])
    assert runs[0].label != runs[1].label
    assert runs[0].label == str(tmp_path / "x" / "run")


def test_resumed_run_later_lines_win_and_downtime_is_not_wall_time(tmp_path: Path) -> None:
    lines = [
        train_line(10, 10.0, 5.0, 100.0, 1.0), train_line(20, 20.0, 4.0, 200.0, 1.0),
        train_line(30, 30.0, 9.9, 999.0, 1.0),  # crashed after this; resumed from the step-20 checkpoint at t=100
        train_line(30, 110.0, 3.0, 50.0, 1.0), train_line(40, 120.0, 2.0, 400.0, 1.0),
    ]
    run = load_run(write_run(tmp_path / "resumed", lines))
    summary = summarize(run)
    assert [r["step"] for r in run.train] == [10, 20, 30, 40]
    assert run.train[2]["loss"] == 3.0
    assert summary.restarts == 1
    assert summary.wall_time_s == pytest.approx(30.0 + 20.0)  # 0→30 s, then 100→120 s
    assert summary.mean_tokens_per_s == (200.0 + 400.0) / 2  # each segment's first line is warm-up


def test_resume_points_are_marked_on_every_curve(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from trainer.report import Resume, XScale, _mark_resumes

    lines = [train_line(10, 10.0, 5.0, 100.0, 1.0), train_line(20, 20.0, 4.0, 200.0, 1.0),
             train_line(30, 30.0, 9.9, 999.0, 1.0),  # crashed after this; resumed from the step-20 checkpoint
             train_line(30, 110.0, 3.0, 50.0, 1.0), train_line(40, 120.0, 2.0, 400.0, 1.0)]
    run = load_run(write_run(tmp_path / "resumed", lines))
    assert run.resumes == [Resume(step=20, elapsed_s=30.0)]  # 30 s of training before the crash
    ax = Figure().subplots()
    _mark_resumes(ax, run, "C0", "step", XScale("optimizer step", 1.0))
    _mark_resumes(ax, run, "C0", "time", XScale("wall time (s)", 1.0))
    assert [list(line.get_xdata()) for line in ax.lines] == [[20.0, 20.0], [30.0, 30.0]]
    write_report([run.run_dir], out=io.StringIO())  # draws with the marks and their legend entry


def test_legend_of_one_run_says_what_the_run_was(tmp_path: Path) -> None:
    from trainer.report import legend_label

    run_dir = write_run(tmp_path / "qs", [train_line(10, 10.0, 5.0, 100.0, 1.0), train_line(300, 20.0, 4.0, 200.0,
                                                                                            1.0)], name="quickstart")
    (run_dir / "config.yaml").write_text("name: quickstart\nmodel: {num_layers: 4, hidden_size: 128}\n"
                                         "train: {global_batch_size: 16, seq_len: 128}\noptim: {lr: 3.0e-3}\n")
    label = legend_label(load_runs([run_dir])[0])
    assert label == "quickstart (qs): 4 layers × 128 hidden, batch 16 × 128 tokens, lr 0.003, 300 steps"


def test_malformed_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    good = [train_line(5, 10.0, 3.0, 512.0, 2.0), train_line(10, 20.0, 2.0, 512.0, 2.0)]
    lines = [good[0], "not json", '{"step": "x", "kind": "train", "loss": 1.0}', "[1, 2]",
             '{"step": 7, "kind": "train", "loss": "high"}', good[1], '{"step": 15, "kind": "tra']  # torn last line
    warn, out = io.StringIO(), io.StringIO()
    run_dir = write_run(tmp_path / "torn", lines)
    write_report([run_dir], out=out, warn=warn)
    run = load_run(run_dir, warn=io.StringIO())
    assert run.malformed_lines == [2, 3, 4, 5, 7]
    assert [r["step"] for r in run.train] == [5, 10]
    assert f"{run_dir / 'metrics.jsonl'}:2: skipped malformed line" in warn.getvalue()
    assert "more malformed lines skipped" not in warn.getvalue()
    table = out.getvalue().splitlines()
    assert any(line.startswith("malformed lines skipped") and line.endswith(" 5") for line in table)


def test_missing_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "logging.run_dir" in err and "Traceback" not in err


def test_missing_metrics(tmp_path: Path) -> None:
    (tmp_path / "fresh").mkdir()
    with pytest.raises(ReportError, match="has this run logged a step yet.*train.log_interval_steps"):
        load_run(tmp_path / "fresh")


def test_empty_metrics(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="is empty"):
        load_run(write_run(tmp_path / "empty", []))


def test_only_malformed_lines(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="none of its 2 lines"):
        load_run(write_run(tmp_path / "junk", ["junk", "{}"]), warn=io.StringIO())


def test_metrics_file_path_is_accepted(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "r", gpu_fp16_lines(), name=None)
    run = load_runs([run_dir / "metrics.jsonl"])[0]
    assert run.run_dir == run_dir and run.label == "r" and run.tokens_per_step == 1024


def write_profile(run_dir: Path, window: str, rank: int, gemm_us: float, step_us: float) -> None:
    """A summary JSON as trainer/profiling.py writes it (ProfileSummary.as_dict) for a window of two GPU steps."""
    from trainer.profile_summary import TimedOp, summarize

    first, last = (int(step) for step in window.split("-"))
    ops = [TimedOp("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN", 0, gemm_us), TimedOp("triton_poi_fused_mul_0",
                                                                                       gemm_us, 100)]
    summary = summarize(ops, wall_s=2 * step_us / 1e6, on_gpu=True, first_step=first, last_step=last, rank=rank)
    path = run_dir / "profile" / f"steps_{window}" / f"rank{rank}_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary.as_dict()))


def test_profiled_runs_are_compared_per_step_and_the_others_named(tmp_path: Path) -> None:
    """The newest window of each run, its lowest rank; a run without profile says how to get one; an unreadable
    summary is a warning, not a failed report."""
    import os
    import time

    lines = [train_line(10, 1.0, 3.0, 1000.0, 0.1), train_line(20, 2.0, 2.5, 1000.0, 0.1)]
    fast, slow, plain, broken = (write_run(tmp_path / name, lines, name) for name in ("fast", "slow", "plain", "broken"))
    write_profile(fast, "3-4", 0, gemm_us=1000, step_us=5000)  # older window: not the one shown
    os.utime(fast / "profile" / "steps_3-4" / "rank0_summary.json", (time.time() - 60, time.time() - 60))
    write_profile(fast, "10-11", 1, gemm_us=1200, step_us=1000)
    write_profile(fast, "10-11", 0, gemm_us=1600, step_us=1000)
    write_profile(slow, "10-11", 0, gemm_us=1800, step_us=1500)
    (broken / "profile" / "steps_2-3").mkdir(parents=True)
    (broken / "profile" / "steps_2-3" / "rank0_summary.json").write_text('{"first_step": 2, "las')
    out, warn = io.StringIO(), io.StringIO()
    write_report([fast, slow, plain, broken], tmp_path / "r.png", out=out, warn=warn)
    text = out.getvalue()
    assert ("where the step time goes (profiling.*; fast: steps 10-11, rank 0, kernel time; "
            "slow: steps 10-11, rank 0, kernel time)") in text
    table = text.split("kernel time)\n")[1].splitlines()
    assert table[1].split() == ["wall", "1.0", "1.5"] and table[4].split() == ["gemm", "0.8", "0.9"]
    assert "not profiled: plain, broken (profiling.start_step=N profiles steps N and N+1)" in text
    assert f"warning: {broken / 'profile'}: profile summary unreadable" in warn.getvalue()
    plain_out = io.StringIO()
    write_report([plain], tmp_path / "p.png", out=plain_out, warn=io.StringIO())
    assert "where the step time goes" not in plain_out.getvalue()  # nothing profiled: no table at all


def test_help_and_import_stay_light() -> None:
    """Registering the command and importing trainer.report (and the profile summaries it reads) import neither
    matplotlib nor torch."""
    code = (
        "import sys\n"
        "from launch.cli import build_parser\n"
        "parser = build_parser()\n"
        "try:\n"
        "    parser.parse_args(['report', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "import trainer.report, trainer.profile_summary\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'torch'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert "pretrain report" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_report_of_a_real_training_run(tmp_path: Path) -> None:
    """10 steps of configs/tiny.yaml in one process (~10-25 s on 2 shared cores), then the report of it."""
    run_dir = tmp_path / "tiny"
    subprocess.run(
        [sys.executable, "-m", "launch", "train", "--config", "configs/tiny.yaml", "train.max_steps=10",
         "train.eval_steps=1", f"logging.run_dir={run_dir}"],
        cwd=REPO_ROOT, check=True, capture_output=True, timeout=120,
    )
    out = io.StringIO()
    png = write_report([run_dir], out=out, smooth_points=2, x_axis="tokens")
    summary = summarize(load_run(run_dir))
    assert summary.steps == 10
    assert summary.tokens_seen == 10 * 16 * 64  # train.global_batch_size × train.seq_len of configs/tiny.yaml
    assert summary.last_val_loss is not None and summary.last_val_loss[0] == 10
    assert summary.last_loss is not None and summary.first_loss is not None
    assert summary.last_loss[1] < summary.first_loss[1]
    assert summary.mean_mfu is None and summary.malformed_lines == 0
    assert "tiny" in out.getvalue().splitlines()[0]
    assert png_size(png)[0] >= 1200


def test_tokens_come_from_the_logged_count_through_a_batch_size_rampup(tmp_path: Path) -> None:
    """Lines with consumed_tokens (a rampup: 4, 4, 8, 12, then 16 samples of 64 tokens): tokens seen and the tokens
    axis are those counts, not step × the final batch."""
    lines = [train_line(step, 1000.0 + step, 5.0, 1000.0, 1.0, consumed_tokens=tokens, global_batch_size=batch)
             for step, tokens, batch in ((2, 512, 4), (4, 1792, 12), (6, 3840, 16))]
    run = load_runs([write_run(tmp_path / "ramp", lines)])[0]
    assert summarize(run).tokens_seen == 3840  # step 6 × 16 × 64 would say 6144
    png = write_report([tmp_path / "ramp"], tmp_path / "r.png", x_axis="tokens", out=io.StringIO())
    assert png_size(png)[0] > 0


@pytest.mark.parametrize("x_axis", ["step", "time"])
def test_task_accuracy_gets_a_panel_and_summary_rows(tmp_path: Path, x_axis: str) -> None:
    """train.eval_tasks: an accuracy panel per task (from the eval lines) and the last eval's acc / acc_norm rows."""
    lines = [train_line(10, 10.0, 3.0, 1000.0, 0.5),
             {**eval_line(10, 11.0, 3.1), "acc/arc": 0.25, "acc_norm/arc": 0.3},
             train_line(20, 20.0, 2.5, 1000.0, 0.5),
             {**eval_line(20, 21.0, 2.9), "acc/arc": 0.4, "acc_norm/arc": 0.45}]
    run = load_run(write_run(tmp_path / "run", lines))
    assert [panel.key for panel in drawn_panels([run])][-1] == "acc/arc"
    output = write_report([tmp_path / "run"], tmp_path / "report.png", x_axis=x_axis)
    assert png_size(output)[1] > 0
    summary = summarize(run)
    assert summary.last_task_accuracy == {"acc/arc": 0.4, "acc_norm/arc": 0.45}
    table = format_summary_table([summary])
    assert "  acc/arc" in table and "0.4000" in table and "0.4500" in table

