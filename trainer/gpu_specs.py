"""GPU kinds for `pretrain plan`: memory, dense bf16 peak, link bandwidths. Pure data, no imports, so that building the
CLI parser (which lists the kinds) stays instant. Sources per row: docs/planning.md ("GPU kinds")."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """One GPU kind. Bandwidths are nominal, per GPU and per direction (GB/s = 1e9 B/s). Latencies are per hop of a
    collective (a ring step; a tree level), assumptions of NCCL's order of magnitude (docs/planning.md)."""

    name: str
    memory_gib: float  # what nvidia-smi reports as memory.total (MiB / 1024)
    peak_tflops: float  # dense bf16 tensor-core peak: the MFU denominator (same figures as trainer.hooks)
    intra_node_gbps: float  # NVLink
    inter_node_gbps: float  # the GPU's own network port (rail-optimised: one NIC per GPU)
    intra_latency_s: float = 2.5e-6
    inter_latency_s: float = 7e-6
    source: str = ""


# Sources in docs/planning.md ("GPU kinds"). Keep the peaks equal to trainer.hooks.GPU_PEAK_BF16_TFLOPS.
GPUS: dict[str, GpuSpec] = {
    "h100-80gb": GpuSpec("h100-80gb", 79.6, 989.0, 450.0, 50.0,
                         source="H100 SXM5 datasheet; DGX H100: NVLink4 900 GB/s bidir, 8x ConnectX-7 400 Gb/s"),
    "h200": GpuSpec("h200", 140.4, 989.0, 450.0, 50.0,
                    source="H200 SXM datasheet (141 GB HBM3e); HGX H200: NVLink4, 400 Gb/s per GPU"),
    "a100-80gb": GpuSpec("a100-80gb", 80.0, 312.0, 300.0, 25.0,
                         source="A100 SXM4 datasheet; DGX A100: NVLink3 600 GB/s bidir, 8x HDR 200 Gb/s"),
    "a100-40gb": GpuSpec("a100-40gb", 40.0, 312.0, 300.0, 25.0,
                         source="A100 SXM4 40GB datasheet; DGX A100 network"),
    "b200": GpuSpec("b200", 167.6, 2250.0, 900.0, 50.0,
                    source="DGX B200 datasheet (180 GB per GPU taken as 180e9 B); NVLink5 1.8 TB/s bidir"),
}
