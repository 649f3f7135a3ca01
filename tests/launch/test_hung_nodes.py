"""Which nodes a hang leaves out of the next job (launch/hung_nodes.py); the real resubmission runs against the
localhost Slurm in test_slurm_faults.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.hung_nodes import (NOT_RESUBMITTED, TaskRecord, exclusion, main, straggler_nodes, suspect_nodes,
                                usable_nodes)
from launch.slurm import SbatchRequest, render_sbatch
from trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_a_node_is_suspect_when_one_of_its_ranks_did_not_fire_its_watchdog_with_its_peers() -> None:
    poll_s, grace_s = 0.5, 2.5  # faults.hang_timeout_s=5: late means more than 1.5 s after the first

    def fired(node: str, at_s: float, code: int | None = 76) -> TaskRecord:
        return TaskRecord(node, code, 1000.0 + at_s, poll_s, grace_s)

    records = [fired("n1", 0.0), fired("n1", 0.4, code=143),  # a victim the step's end reached first: still one
               fired("n2", 0.2), fired("n2", 2.6, code=1),  # stopped, woken by SIGCONT a grace period later
               fired("n3", 0.1), TaskRecord("n3", code=1),  # never fired: exited on its own, without its peers
               fired("n4", 0.3), fired("n4", 0.3, code=None)]  # killed with its wrapper after firing: a victim
    assert suspect_nodes(records, ["n1", "n2", "n3", "n4", "n5"], tasks_per_node=2) == ["n2", "n3", "n5"]
    everyone = [fired("n1", 0.0), fired("n2", 0.4)]
    assert suspect_nodes(everyone, ["n1", "n2"], tasks_per_node=1) == []
    # No watchdog records (an older script): the exit codes say it, 76 for the ranks that waited.
    assert suspect_nodes([TaskRecord("n1", 76), TaskRecord("n2", 1)], ["n1", "n2"], tasks_per_node=1) == ["n2"]


def test_the_records_are_read_as_run_task_and_the_watchdog_write_them(tmp_path: Path) -> None:
    from launch.hung_nodes import _task_records

    (tmp_path / "task0.rc").write_text("76 n1\n")
    (tmp_path / "task0.hang").write_text("1000.000 0.5 2.5 n1\n")
    (tmp_path / "task1.rc").write_text("1 n2\n")
    (tmp_path / "task2.hang").write_text("1000.100 0.5 2.5 n2\n")  # killed with its wrapper: no .rc
    assert _task_records(tmp_path) == [TaskRecord("n1", 76, 1000.0, 0.5, 2.5), TaskRecord("n2", 1),
                                       TaskRecord("n2", None, 1000.1, 0.5, 2.5)]


def test_down_drained_and_failing_nodes_are_not_counted_as_usable() -> None:
    rows = ["n1 idle", "n2 mix", "n3 alloc*", "n4 down*", "n5 drain", "n6 drng", "n7 comp", "n8 fail", "n9 maint"]
    assert usable_nodes(rows) == {"n1", "n2", "n3", "n7"}


def test_the_exclusion_adds_the_suspects_to_what_the_job_excluded_already() -> None:
    assert exclusion(["n3"], ["n1"], {"n1", "n2", "n3", "n4", "n5"}, 2, "-") == ["n1", "n3"]


def test_no_exclusion_without_a_suspect_or_when_the_job_could_never_start() -> None:
    with pytest.raises(ValueError, match="no node can be told apart"):
        exclusion([], [], {"n1", "n2"}, 1, "no node can be told apart")
    with pytest.raises(ValueError, match=r"without n1,n2 the partition keeps 1 usable node\(s\) for a 2-node job"):
        exclusion(["n2"], ["n1"], {"n1", "n2", "n3"}, 2, "-")


def test_the_straggler_nodes_are_what_the_trainer_recorded(tmp_path: Path) -> None:
    assert straggler_nodes(tmp_path) == []
    (tmp_path / "stragglers").write_text("n3\nn7\n")
    assert straggler_nodes(tmp_path) == ["n3", "n7"]


def test_outside_a_job_it_says_why_and_asks_for_a_requeue_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["--script", str(tmp_path / "sbatch.sh"), "--outcomes", str(tmp_path), "--hangs", "1"]) \
        == NOT_RESUBMITTED
    assert "not excluding any node: 'SLURM_JOB_ID' is not set" in capsys.readouterr().err


@pytest.mark.parametrize("exclude", [True, False])
def test_the_batch_script_resubmits_only_when_asked(tmp_path: Path, exclude: bool) -> None:
    cfg = load_config(REPO / "configs/tiny.yaml", [f"launch.exclude_hung_nodes={str(exclude).lower()}"])
    request = SbatchRequest(config_path=tmp_path / "run" / "config.yaml", run_dir=tmp_path / "run", workdir=tmp_path,
                            python="/opt/venv/bin/python", requeue_exit_code=75)
    script = render_sbatch(cfg, request)
    resubmit = f"/opt/venv/bin/python -m launch.hung_nodes --script {tmp_path}/run/sbatch.sh"
    assert (f'{resubmit} --outcomes {tmp_path}/run/logs/outcomes --hangs "$hangs"' in script) is exclude
    # A straggler stop (exit 79) was asked for by faults.straggler_action=leave_node: always without its node.
    assert f"{resubmit} --outcomes {tmp_path}/run/logs/outcomes --stragglers" in script
    assert script.count('scontrol requeue "$SLURM_JOB_ID"') == 2  # after a signal's checkpoint; a hang in place
