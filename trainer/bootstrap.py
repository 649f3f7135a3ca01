"""Process groups, built once, handed out explicitly.

This is the only module that calls into `megatron.core.parallel_state`. Everything else receives a `ParallelContext`
and reads its groups and coordinates from it, never from module globals (Megatron's own tracking issue documents the
wrong group being used silently when layers read globals).

Rank layout: megatron-core's default order `tp-cp-ep-dp-pp` makes TP the fastest-varying axis, then DP, then PP.
DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model) lays ranks out identically, so the pipeline
engine and the megatron TP layers agree on every group; `deepspeed_topology()` builds that object and a test asserts
the two layouts rank by rank.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the (pp, dp, tp) grid, and the groups it talks to."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    model_parallel_group: Any  # tp × pp: every rank that holds a different part of one model replica
    device: torch.device
    # The first and last pipeline stage of this rank's pipeline (megatron's embedding group), which all-reduce the
    # gradients of tied embeddings split over them; None on middle stages and where pp is 1.
    embedding_group: Any = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """The one rank that owns a model's final loss: DP rank 0, TP rank 0 of the last pipeline stage."""
        return self.dp_rank == 0 and self.tp_rank == 0 and self.is_last_stage


def node_name() -> str:
    """This process's node as Slurm names it (what --exclude takes), else the host name. Task records of hangs and
    stragglers carry it, so launch/hung_nodes.py can leave that node out."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _quiet_imports() -> None:
    # megatron-core warns at import that Transformer Engine / Apex are absent (expected on CPU and optional on GPU);
    # torch 2.13 warns on every ZeRO collective that the *_tensor variants are deprecated. Both are noise here.
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex.*")
    warnings.filterwarnings("ignore", message=".*is deprecated.*", module="torch.distributed")
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)


def apply_cpu_shims() -> None:
    """Let megatron-core's TP layers and DeepSpeed run on a CPU-only torch (measured in notes/megatron-core-cpu.md).

    - megatron allocates buffers on `torch.cuda.current_device()` (sequence-parallel all-gather, rotary): map to CPU.
    - megatron's RNG tracker stores CUDA generator states: back it with the CPU generator, so activation recompute
      and TP-distinct streams still work.
    - DeepSpeed JIT-compiles a shared-memory all-reduce op (22-75 s) in every `initialize` that training never uses.
    - megatron's TP linear layers recommend CUDA_DEVICE_MAX_CONNECTIONS=1 once per rank: a CUDA launch-queue setting
      that means nothing on CPU, so the warning is only noise in a newcomer's first `launch local` (GPU runs keep it).
    """
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    import megatron.core.tensor_parallel.random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    import deepspeed.comm  # noqa: F401  (registers deepspeed.comm.torch in sys.modules)

    # Patch through sys.modules: `import deepspeed.comm.torch as m` would bind the real torch package, because
    # deepspeed.comm re-exports torch under that name.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def single_process_defaults() -> None:
    """Without a launcher (no WORLD_SIZE), describe a world of one process on a free localhost port. With a
    launcher nothing is changed: a variable it failed to set is reported by `init_parallel`."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


def use_deepspeed_accelerator(device_type: str) -> None:
    """Make DeepSpeed's accelerator the device this run trains on ("cpu" or "cuda").

    DeepSpeed picks its accelerator once per process (from $DS_ACCELERATOR, else by probing) and puts its buffers,
    streams and collectives there. A CPU run on a GPU host (the test suite, a debug run) would otherwise get CUDA
    streams, and a CUDA run started under DS_ACCELERATOR=cpu (tests/conftest.py sets it) a CPU optimizer path.
    """
    os.environ["DS_ACCELERATOR"] = device_type  # for child processes and later imports
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator()._name == device_type:
        return
    if device_type == "cuda":
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
    else:
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
    set_accelerator(Accelerator())


def _init_default_group(backend: str, timeout_s: float, device: torch.device) -> None:
    if dist.is_initialized():
        return
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(
                f"environment variable {var} is not set: start training through `pretrain launch local --nproc N`, "
                "torchrun, or srun from `pretrain submit`, which set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT"
            )
    timeout = datetime.timedelta(seconds=timeout_s)
    # Groups created later without a timeout (DeepSpeed's pipeline and ZeRO groups) take torch's module default
    # (30 min for gloo, 10 min for NCCL), not the default group's: make that default ours too.
    distributed_c10d = sys.modules["torch.distributed.distributed_c10d"]
    distributed_c10d.default_pg_timeout = timeout
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout
    # device_id binds an NCCL group to this rank's GPU; without it every barrier (e.g. at each checkpoint save) warns
    # that it guesses "the device under current context".
    dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)


def init_parallel(tp: int, pp: int, *, backend: str | None = None, timeout_s: float = 600.0) -> ParallelContext:
    """Initialise the default group (if a launcher has not) and the tp × pp × dp grid; return this rank's view.

    `timeout_s` bounds every collective: a rank whose peer died fails after it instead of hanging the allocation.
    """
    _quiet_imports()
    use_cuda = backend != "gloo" and torch.cuda.is_available()  # never ask CUDA on a CPU run: see trainer/testing.py
    backend = backend or ("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    use_deepspeed_accelerator(device.type)
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        apply_cpu_shims()
    _init_default_group(backend, timeout_s, device)
    import deepspeed

    # deepspeed.comm wraps the default group just created (no second rendezvous). deepspeed.initialize would do this
    # itself, but DeepSpeed's PipelineModule is built before it and already talks through deepspeed.comm.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    world_size = dist.get_world_size()
    if world_size % (tp * pp) != 0:
        raise ValueError(f"world size {world_size} is not divisible by parallel.tp ({tp}) × parallel.pp ({pp})")

    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
        create_gloo_process_groups=False,  # gloo groups would only duplicate ours on CPU; NCCL runs never use them
    )
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        tp=tp,
        pp=pp,
        dp=world_size // (tp * pp),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        model_parallel_group=ps.get_model_parallel_group(),
        device=device,
        embedding_group=ps.get_embedding_group(check_initialized=False) if pp > 1 else None,
    )


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def deepspeed_topology(ctx: ParallelContext) -> Any:
    """DeepSpeed's grid object with the same rank layout as megatron-core's groups (see the module docstring)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=ctx.pp, num_mp=ctx.tp, num_dp=ctx.dp)


class DeepSpeedMPU:
    """The `mpu` object DeepSpeed asks for (ZeRO partitions over DP, grad norm reduced over model parallel ranks).

    DeepSpeed calls megatron's old names; this adapter answers them from an explicit `ParallelContext` rather than
    handing DeepSpeed megatron's module-level state.
    """

    def __init__(self, ctx: ParallelContext) -> None:
        self._ctx = ctx

    def get_data_parallel_group(self) -> Any:
        return self._ctx.dp_group

    def get_data_parallel_rank(self) -> int:
        return self._ctx.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._ctx.dp

    def get_model_parallel_group(self) -> Any:
        return self._ctx.model_parallel_group

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self._ctx.model_parallel_group)

    def get_model_parallel_world_size(self) -> int:
        return self._ctx.tp * self._ctx.pp

    def get_tensor_model_parallel_group(self) -> Any:
        return self._ctx.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ctx.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ctx.tp

    def get_pipeline_model_parallel_group(self) -> Any:
        return self._ctx.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ctx.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ctx.pp
