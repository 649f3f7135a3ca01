"""Process groups: megatron-core's and DeepSpeed's rank layouts agree, and every group holds the right ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

import megatron.core.parallel_state  # noqa: F401  - import once in the parent so forked ranks start in ~0.3 s
from trainer.testing import run_distributed

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _grid_coords(rank: int, world_size: int, tp: int, pp: int) -> dict:
    import torch.distributed as dist

    from trainer.bootstrap import DeepSpeedMPU, deepspeed_topology, init_parallel

    ctx = init_parallel(tp, pp)
    ds_coord = deepspeed_topology(ctx).get_coord(rank)
    mpu = DeepSpeedMPU(ctx)
    return {
        "ours": (ctx.pp_rank, ctx.dp_rank, ctx.tp_rank),
        "deepspeed": (ds_coord.pipe, ds_coord.data, ds_coord.model),
        "tp_members": dist.get_process_group_ranks(ctx.tp_group),
        "dp_members": dist.get_process_group_ranks(ctx.dp_group),
        "pp_members": dist.get_process_group_ranks(ctx.pp_group),
        "embedding_members": (None if ctx.embedding_group is None
                              else dist.get_process_group_ranks(ctx.embedding_group)),
        "mp_size": mpu.get_model_parallel_world_size(),
        "dp": ctx.dp,
    }


@pytest.mark.parametrize("tp,pp", [(2, 2), (2, 1), (1, 2), (1, 1)])
def test_megatron_and_deepspeed_layouts_agree(tp: int, pp: int) -> None:
    results = run_distributed(_grid_coords, 4, tp, pp, timeout_s=180)
    dp = 4 // (tp * pp)
    for rank, got in enumerate(results):
        # TP varies fastest, then DP, then PP: rank = pp_rank·(dp·tp) + dp_rank·tp + tp_rank.
        expected = (rank // (dp * tp), (rank // tp) % dp, rank % tp)
        assert got["ours"] == expected == got["deepspeed"], f"rank {rank}: {got}"
        assert rank in got["tp_members"] and len(got["tp_members"]) == tp
        assert rank in got["dp_members"] and len(got["dp_members"]) == dp
        assert rank in got["pp_members"] and len(got["pp_members"]) == pp
        assert got["mp_size"] == tp * pp and got["dp"] == dp
        # Tied embeddings over stages: the first and last stage of this rank's pipeline (same tp and dp ranks).
        assert got["embedding_members"] == (None if pp == 1 else [got["pp_members"][0], got["pp_members"][-1]])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA device")
def test_a_cuda_run_without_a_cuda_device_is_refused_before_anything_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.config import ConfigError, load_config
    from trainer.train import plan_this_world

    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():  # restored after the test
        monkeypatch.setenv(name, value)
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["launch.device=cuda"])
    with pytest.raises(ConfigError, match="launch.device is cuda but this process sees no CUDA device"):
        plan_this_world(cfg)
