"""The localhost Slurm cluster from cluster/ runs real multi-node jobs: two "nodes", one torch gloo group."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch.slurm import wait_for_job

pytestmark = pytest.mark.slurm

ALL_REDUCE_PY = """
import os, torch, torch.distributed as dist
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                        rank=rank, world_size=world)
value = torch.tensor([rank + 1.0]); dist.all_reduce(value)
print(f"rank={rank}/{world} node={os.environ['SLURMD_NODENAME']} sum={value.item()}", flush=True)
dist.destroy_process_group()
"""


def test_two_node_gloo_all_reduce(tmp_path: Path) -> None:
    (tmp_path / "all_reduce.py").write_text(ALL_REDUCE_PY)
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --time=5\n"
        f"#SBATCH --output={tmp_path}/job-%j.out\n"
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)\n'
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))\n"
        f"srun --output={tmp_path}/task-%t.out {sys.executable} {tmp_path}/all_reduce.py\n"
    )
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True)
    job_id = submitted.stdout.strip().split(";")[0]
    assert wait_for_job(job_id, timeout_s=120) == "COMPLETED", (tmp_path / f"job-{job_id}.out").read_text()
    outputs = sorted((tmp_path / f"task-{t}.out").read_text().strip() for t in range(2))
    assert outputs == ["rank=0/2 node=n1 sum=3.0", "rank=1/2 node=n2 sum=3.0"]
