"""One owner per run directory: `<run_dir>/.owner` names the job that trains there (job id, host, pid).

Two jobs training into one run directory would log every step twice and write the same `step_N` directories, so a
second job refuses before it builds anything. The owner is a *job*, not a process: every rank of one launch and a
requeued job (same Slurm job id) are the same owner, so a requeue or a restart of the same job goes on.

The holder is gone (and the lock stale) when:
- it ran on this host and its process no longer exists (pid and process start time, so a reused pid does not count);
- it was a Slurm job that squeue no longer shows running;
- otherwise, when its lease has not been renewed for LEASE_S (the holder touches the file every LEASE_RENEW_S).
A process killed with SIGKILL or a watchdog exit (os._exit) leaves the file behind; these rules make it stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

OWNER_FILE = ".owner"
LEASE_S = 300.0  # a holder on another host without Slurm is presumed gone after this long without a renewal
LEASE_RENEW_S = 60.0
# squeue states in which a job may still be writing into its run directory.
_LIVE_JOB_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


class RunDirBusy(RuntimeError):
    """Another live job owns the run directory; the message names it and says what to do."""

    user_error = True


@dataclass(frozen=True)
class Owner:
    # "slurm job 123", "torchrun <rdzv id>", "launch <master addr:port>" or "process <pid>": the same for every rank
    # of one launch
    owner_id: str
    host: str
    pid: int
    pid_start_s: float  # the process start time: a pid reused by another process is not the holder
    slurm_job_id: str | None
    since_unix_s: float

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since_unix_s))
        return f"{self.owner_id} (host {self.host}, pid {self.pid}, since {since})"


def this_owner() -> Owner:
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id:
        owner_id = f"slurm job {job_id}"
    elif os.environ.get("TORCHELASTIC_RUN_ID"):
        owner_id = f"torchrun {os.environ['TORCHELASTIC_RUN_ID']}"  # one id per `launch local`, shared by its ranks
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:  # another launcher: its ranks share only the rendezvous
        owner_id = f"launch {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    else:
        owner_id = f"process {os.getpid()}"
    return Owner(owner_id, socket.gethostname(), os.getpid(), _start_time_s(os.getpid()) or 0.0, job_id, time.time())


def read_owner(run_dir: Path) -> Owner | None:
    """The recorded owner, or None when there is none (or the file is unreadable: a crash mid-write)."""
    try:
        return Owner(**json.loads((run_dir / OWNER_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def holder_alive(owner: Owner, lock_path: Path) -> bool:
    """Whether the recorded holder may still be running (see the module docstring for the rules)."""
    if owner.host == socket.gethostname():
        started_s = _start_time_s(owner.pid)
        return started_s is not None and abs(started_s - owner.pid_start_s) < 1.0
    if owner.slurm_job_id:
        state = _slurm_job_state(owner.slurm_job_id)
        if state is not None:
            return state in _LIVE_JOB_STATES
    with contextlib.suppress(OSError):
        return time.time() - lock_path.stat().st_mtime < LEASE_S
    return False


def live_holder(run_dir: Path) -> Owner | None:
    """The owner of `run_dir` if it is still alive (for `pretrain submit`, which must not overwrite its config)."""
    owner = read_owner(run_dir)
    return owner if owner is not None and holder_alive(owner, run_dir / OWNER_FILE) else None


def foreign_live_holder(run_dir: Path) -> Owner | None:
    """The live owner of `run_dir` if it is another job than this process's (read only: any rank may ask, before
    the heavy imports, so a second job refuses in about a second instead of after start-up)."""
    holder = live_holder(run_dir)
    return holder if holder is not None and holder.owner_id != this_owner().owner_id else None


def busy_message(run_dir: Path, holder: Owner) -> str:
    cancel = f"cancel it (scancel {holder.slurm_job_id})" if holder.slurm_job_id else f"stop it (kill {holder.pid})"
    return (f"run directory {run_dir} is in use by {holder.describe()}: a second job would log every step twice and "
            f"overwrite its checkpoints. Wait for it to finish, {cancel}, or train into another directory with "
            f"logging.run_dir=<dir>. If that job is really gone, delete {run_dir / OWNER_FILE}")


class RunDirLock:
    """Held by rank 0 of a job for as long as it trains; a thread renews the lease."""

    def __init__(self, run_dir: Path, owner: Owner) -> None:
        self.path = run_dir / OWNER_FILE
        self.owner = owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, run_dir: Path) -> RunDirLock:
        """Take the run directory or raise RunDirBusy naming the live holder."""
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = cls(run_dir, this_owner())
        for _ in range(3):  # a stale file removed by someone else between our read and our create: try again
            if lock._create():
                lock._start_renewing()
                return lock
            holder = read_owner(run_dir)
            if holder is not None and holder.owner_id == lock.owner.owner_id:
                lock._replace()  # the same job again (a requeue, or a restart of its rank 0): it is ours
                lock._start_renewing()
                return lock
            if holder is not None and holder_alive(holder, lock.path):
                raise RunDirBusy(busy_message(run_dir, holder))
            with contextlib.suppress(FileNotFoundError):
                lock.path.unlink()  # stale: the holder is gone
        raise RunDirBusy(f"could not take {lock.path}: it keeps reappearing; another job is starting in {run_dir}")

    def _create(self) -> bool:
        """Atomically create the file with our record (write a temp file, then link: never a half-written lock)."""
        tmp = self.path.with_name(f"{OWNER_FILE}.{self.owner.pid}.tmp")
        tmp.write_text(json.dumps(asdict(self.owner)), encoding="utf-8")
        try:
            os.link(tmp, self.path)  # fails if the lock exists: the exclusive step
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _replace(self) -> None:
        tmp = self.path.with_name(f"{OWNER_FILE}.{self.owner.pid}.tmp")
        tmp.write_text(json.dumps(asdict(self.owner)), encoding="utf-8")
        os.replace(tmp, self.path)

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="run-dir-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the file if it still names us (never someone else's)."""
        self._stop.set()
        holder = read_owner(self.path.parent)
        if holder is not None and holder.owner_id == self.owner.owner_id and holder.pid == self.owner.pid:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _start_time_s(pid: int) -> float | None:
    import psutil  # a dependency (megatron-core needs it); imported here to keep `pretrain submit` light

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _slurm_job_state(job_id: str) -> str | None:
    """squeue's state of the job (e.g. RUNNING), "" when squeue no longer knows it, None without squeue."""
    try:
        result = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else ""

