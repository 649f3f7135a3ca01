"""profiling.*: torch.profiler over a window of steps, a trace per profiled rank and the time-by-category line
(trainer/profiling.py). The CUDA side (kernel names, GPU busy fraction) runs in the gpu tier (test_gpu.py)."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import pytest

from trainer.config import ConfigError, load_config
from trainer.profile_summary import TimedOp, busy_s, category, comparison_table, summarize
from trainer.profiling import StepProfiler, timed_ops
from trainer.testing import run_distributed

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"

# Kernel names as CUDA profiles of torch 2.x training show them (H100/H200: cuBLAS sm90 and nvjet GEMMs, flash
# attention, inductor's triton kernels, the fused AdamW's multi-tensor kernel, NCCL), and CPU op names.
NAMES = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel__5x"
    "_cublas": "gemm",
    "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN": "gemm",
    "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(Params)": "gemm",
    "void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4, false, false>(...)": "gemm",
    "triton_tem_fused_mm_0": "gemm",
    "void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t>>(...)":
        "attention",
    "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>(...)": "attention",
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>::Params)":
        "attention",
    "cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0": "attention",
    "triton_poi_fused_add_mul_silu_0": "fused (inductor)",
    "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1": "fused (inductor)",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4>>(...)": "optimizer",
    "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<8, float, float, float, LogSoftMaxForwardEpilogue>"
    "(...)": "loss",
    "Memcpy HtoD (Pageable -> Device)": "copies",
    "Memset (Device)": "copies",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>(...)": "other",
    "aten::mm": "gemm",
    "aten::addmm": "gemm",
    "aten::mm_backward": "other",  # a composite: its own time is bookkeeping, the GEMMs are its aten::mm children
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "attention",
    "aten::_fused_adamw_": "optimizer",
    "aten::_foreach_mul_": "optimizer",
    "aten::nll_loss_forward": "loss",
    "aten::copy_": "copies",
    "gloo:all_reduce": "communication",
    "aten::mul": "other",
    "train_step_12": "host (outside ops)",
}


@pytest.mark.parametrize("name", NAMES)
def test_kernels_and_ops_fall_in_their_category(name: str) -> None:
    assert category(name) == NAMES[name]


def test_busy_time_counts_overlapping_kernels_once() -> None:
    ops = [TimedOp("a", 0, 10), TimedOp("b", 5, 10), TimedOp("c", 6, 2), TimedOp("d", 20, 5), TimedOp("e", 30, 0)]
    assert busy_s(ops) == pytest.approx(20e-6)  # [0, 15) and [20, 25)
    assert busy_s([]) == 0.0


def test_comparison_puts_loops_side_by_side_per_step() -> None:
    """Two profiles over different window lengths compare per step; a category one loop lacks reads 0."""
    ours = summarize([TimedOp("aten::mm", 0, 600), TimedOp("aten::mm", 1000, 600), TimedOp("aten::add_", 1600, 400)],
                     wall_s=2e-3, on_gpu=True, first_step=3, last_step=4, rank=0)
    theirs = summarize([TimedOp("triton_tem_fused_mm_0", 0, 500), TimedOp("triton_poi_fused_add_0", 500, 100)],
                       wall_s=8e-4, on_gpu=True, first_step=1, last_step=1, rank=0)
    lines = comparison_table({"trainer[no_ac]": ours, "hf_compile": theirs}).splitlines()
    assert lines[0].split() == ["ms", "per", "step", "trainer[no_ac]", "hf_compile"]
    assert lines[1].split() == ["wall", "1.0", "0.8"] and lines[2].split() == ["GPU", "busy", "%", "80.0", "75.0"]
    assert lines[3].split() == ["kernels", "/", "ops", "(count)", "2", "2"]  # 3 in 2 steps (rounded), 2 in 1
    assert [line.split() for line in lines[4:]] == [["gemm", "0.6", "0.5"], ["other", "0.2", "0.0"],
                                                    ["fused", "(inductor)", "0.0", "0.1"]]


def test_gpu_summary_counts_kernels_not_the_gpu_mirror_of_a_step_range() -> None:
    """On a GPU, kineto mirrors each record_function range that launched kernels as a `gpu_user_annotation` event on
    the device: counted, a step-long range would make every window 100 % busy. Real profiler events, built directly
    (no GPU here); the CUDA run in the gpu tier checks the same on real kernels."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(name: str, start_us: int, end_us: int, device: DeviceType, **kwargs: Any) -> FunctionEvent:
        return FunctionEvent(id=start_us, name=name, thread=0, start_us=start_us, end_us=end_us, device_type=device,
                             **kwargs)

    events = [event("train_step_3", 0, 1000, DeviceType.CPU, is_user_annotation=True),
              event("aten::mm", 10, 60, DeviceType.CPU),
              event("train_step_3", 40, 900, DeviceType.CUDA, is_user_annotation=True),
              event("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN", 40, 340, DeviceType.CUDA),
              event("Memcpy DtoD (Device -> Device)", 400, 500, DeviceType.CUDA)]
    events[0].append_cpu_child(events[1])  # the profiler builds this tree from the ranges' nesting
    gpu_ops = timed_ops(events, on_gpu=True)
    assert [op.name for op in gpu_ops] == [events[3].name, events[4].name]
    gpu = summarize(gpu_ops, wall_s=1e-3, on_gpu=True, first_step=3, last_step=3, rank=0)
    assert gpu.busy_fraction == pytest.approx(0.4) and gpu.category_s == pytest.approx({"gemm": 3e-4, "copies": 1e-4})
    # CPU: each op's own time; the step range's own time (950 of its 1000 µs are outside aten::mm) is host work.
    cpu = summarize(timed_ops(events, on_gpu=False), wall_s=1e-3, on_gpu=False, first_step=3, last_step=3, rank=0)
    assert cpu.category_s == pytest.approx({"host (outside ops)": 9.5e-4, "gemm": 5e-5})


def test_summary_splits_device_time_by_category_and_names_the_largest_kernels() -> None:
    ops = [TimedOp("aten::mm", 0, 600), TimedOp("aten::mm", 700, 300), TimedOp("flash_fwd_kernel", 1000, 500),
           TimedOp("triton_poi_fused_mul_0", 1500, 100)]
    gpu = summarize(ops, wall_s=2e-3, on_gpu=True, first_step=3, last_step=4, rank=1)
    assert gpu.busy_fraction == pytest.approx(0.75)  # 1.5 ms of kernels in a 2 ms window
    assert list(gpu.category_s) == ["gemm", "attention", "fused (inductor)"]  # largest first
    assert gpu.category_s["gemm"] == pytest.approx(9e-4)
    assert gpu.top[0] == {"name": "aten::mm", "category": "gemm", "calls": 2, "time_s": pytest.approx(9e-4)}
    assert gpu.line() == ("profile steps 3-4 rank 1: 0.002 s, GPU busy 75.0 % | gemm 60.0 %, attention 33.3 %, "
                          "fused (inductor) 6.7 %")
    cpu = summarize(ops, wall_s=2e-3, on_gpu=False, first_step=5, last_step=5, rank=0)
    assert cpu.busy_fraction is None and cpu.line().startswith("profile step 5 rank 0: 0.002 s, CPU op time | ")


def test_a_trace_that_cannot_be_written_is_logged_and_the_summary_still_returned(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The directory is checked before the build (preflight); a disk that fills up later must not end the run."""
    import torch

    (tmp_path / "a_file").write_text("")
    profiler = StepProfiler(torch.device("cpu"))
    profiler.start()
    torch.randn(64, 64) @ torch.randn(64, 64)
    summary = profiler.stop(1, 1, 0, tmp_path / "a_file" / "steps_1-1" / "rank0_trace.json.gz")
    assert summary.trace is None and summary.category_s["gemm"] > 0
    assert "profile trace not written to" in caplog.text and "the run goes on" in caplog.text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CUDA path runs in the gpu tier")
def test_memory_snapshot_that_cannot_record_says_so_and_lets_the_run_go_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The allocation history API is private to torch: where it is missing (here, a CPU build) a profiled rank logs
    why and trains on, with nothing to save."""
    from trainer.profiling import MemorySnapshot

    snapshot = MemorySnapshot(tmp_path / "oom.pickle")
    snapshot.start()
    assert not snapshot.recording
    assert "cannot record CUDA allocations" in caplog.text and "the run goes on" in caplog.text


def test_a_window_outside_the_run_or_the_world_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"profiling steps 9-10 end after train.max_steps \(8\): lower"):
        load_config(TINY, ["train.max_steps=8", "profiling.start_step=9"])
    with pytest.raises(ValueError, match=r"profiling.ranks is empty while profiling.start_step is set"):
        load_config(TINY, ["profiling.start_step=2", "profiling.ranks=[]"])
    cfg = load_config(TINY, ["profiling.start_step=2", "profiling.ranks=[0,3]"])
    with pytest.raises(ConfigError, match=r"profiling.ranks \[3\] are not in a world of 2: choose ranks in 0..1"):
        cfg.validate_for_world(2)
    assert load_config(TINY, ["profiling.ranks=[]"]).profiling.enabled is False  # off: nothing to check
    with pytest.raises(ValueError, match=r"profiling.memory_snapshot is on but profiling.start_step is 0: set"):
        load_config(TINY, ["profiling.memory_snapshot=true"])
    on_cpu = load_config(TINY, ["profiling.start_step=2", "profiling.memory_snapshot=true"])  # tiny.yaml: cpu
    with pytest.raises(ConfigError, match=r"memory_snapshot records CUDA allocations, and this run is on cpu"):
        on_cpu.validate_for_world(1)
    on_cpu.validate_for_world(1, "cuda")  # the same config on a GPU node is fine


def _train(rank: int, world_size: int, overrides: list[str]) -> None:
    from trainer.train import train

    train(load_config(TINY, ["train.max_steps=4", "optim.warmup_steps=1", "train.log_interval_steps=1",
                             "train.eval_interval_steps=0", "logging.tensorboard=false", *overrides]))


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def trace_events(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt") as f:
        return json.load(f)["traceEvents"]


@pytest.mark.slow
def test_profiled_window_traces_only_its_steps_on_its_ranks_and_changes_no_loss(tmp_path: Path) -> None:
    plain, profiled = tmp_path / "plain", tmp_path / "profiled"
    run_distributed(_train, 2, [f"logging.run_dir={plain}"], timeout_s=180)
    run_distributed(_train, 2, [f"logging.run_dir={profiled}", "profiling.start_step=2", "profiling.ranks=[1]"],
                    timeout_s=180)
    assert losses(profiled) == losses(plain)  # the profiler observes; it changes nothing (to the bit)
    window = profiled / "profile" / "steps_2-3"
    assert sorted(p.name for p in window.iterdir()) == ["rank1_summary.json", "rank1_trace.json.gz"]  # rank 0: none
    names = {event.get("name") for event in trace_events(window / "rank1_trace.json.gz")}
    assert {"train_step_2", "train_step_3", "aten::mm"} <= names
    assert not {"train_step_1", "train_step_4"} & names
    summary = json.loads((window / "rank1_summary.json").read_text())
    assert (summary["first_step"], summary["last_step"], summary["rank"], summary["device"]) == (2, 3, 1, "cpu")
    assert summary["category_s"]["gemm"] > 0 and summary["category_s"]["communication"] > 0  # DP2: gloo all-reduce
    assert summary["top"][0]["time_s"] >= summary["top"][-1]["time_s"] > 0
    line = "profile steps 2-3 rank 1: "
    assert line in (profiled / "logs" / "rank1.log").read_text()
    assert "trainer.profiling" not in (profiled / "logs" / "rank0.log").read_text()

    # `pretrain report` puts the profiled window beside the run that has none.
    from trainer.report import write_report

    report = io.StringIO()
    write_report([profiled, plain], tmp_path / "report.png", out=report, warn=io.StringIO())
    windows = "where the step time goes (profiling.*; tiny (profiled): steps 2-3, rank 1, CPU op time)"
    assert windows in report.getvalue()
    assert "not profiled: tiny (plain)" in report.getvalue()

    # Resumed at step 4 with the same window: it already passed, and the run says so instead of skipping silently.
    run_distributed(_train, 1, [f"logging.run_dir={profiled}", "profiling.start_step=2", "train.max_steps=5"],
                    timeout_s=180)
    log = (profiled / "logs" / "rank0.log").read_text()
    assert "profiling.start_step 2 is not after the resumed step 4: nothing is profiled" in log
    assert sorted(p.name for p in (profiled / "profile").iterdir()) == ["steps_2-3"]
