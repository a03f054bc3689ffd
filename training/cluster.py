"""Where the curation's datatrove jobs run: this machine, a Ray cluster, or a Slurm cluster.

``./inv data`` runs the plan (training/data.py) with datatrove's local executor on every core by
default. ``--executor ray --address HOST:PORT`` hands each job to datatrove's
``RayPipelineExecutor`` on a running Ray cluster; ``--executor slurm --partition P`` submits the
whole chain to Slurm (``SlurmPipelineExecutor``: a job array per job, each depending on the one
before) and waits for it. Either way the stage then checks datatrove's completion marks: both
executors only log a task that raised, so a missing mark is the one sign of a failed task, and
the stage stops in one line naming the task and its log. A rerun submits only the tasks without
a mark (datatrove's ``skip_completed``).

What every node must share: the working folder (``build/<release>/.checkpoints/data-*``, the
build folder's) and the corpora, at the same paths; the same checkout and Python environment at
the same path (Slurm jobs ``source`` this environment's ``bin/activate``; Ray's workers run the
Python that ``ray start`` ran).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from release.errors import CurationError

KINDS = ("local", "ray", "slurm")
SLURM_TIME = "24:00:00"  # each job's time limit: a 10 GB corpus's slowest job takes well under an hour
POLL = 1.0  # seconds between looks at Slurm's queue
RAY_TASK_GB = 0.5  # Ray's memory resource a task asks for: a curation task peaks at ~0.2 GB (benchmarks/data.py)


@dataclass(frozen=True)
class Executor:
    """Which datatrove executor runs the curation, and where."""

    kind: str = "local"
    address: str | None = None  # ray: HOST:PORT of the cluster's head (its GCS port, 6379 by default)
    partition: str | None = None  # slurm
    time: str = SLURM_TIME  # slurm: each job's time limit

    def where(self) -> str:
        return {"local": "this machine", "ray": f"the Ray cluster at {self.address}",
                "slurm": f"Slurm partition {self.partition}"}[self.kind]


LOCAL = Executor()


def executor(kind: str | None = None, address: str | None = None, partition: str | None = None,
             time_limit: str | None = None) -> Executor:
    """The executor options as given on the command line, checked."""
    kind = kind or "local"
    if kind not in KINDS:
        raise CurationError(f"--executor {kind}: expected one of {', '.join(KINDS)}")
    if kind == "ray" and not address:
        raise CurationError("--executor ray: give the cluster's head with --address HOST:PORT (what `ray start "
                            "--head` printed, e.g. 10.0.0.1:6379)")
    if address and (kind != "ray" or ":" not in address or not address.rpartition(":")[2].isdigit()):
        raise CurationError(f"--address {address}: expected HOST:PORT with --executor ray")
    if kind == "slurm" and not partition:
        raise CurationError("--executor slurm: give the partition with --partition P (`sinfo` lists them)")
    if partition and kind != "slurm":
        raise CurationError(f"--partition {partition}: only with --executor slurm")
    return Executor(kind, address, partition, time_limit or SLURM_TIME)


def incomplete(logs: Path, tasks: int) -> list[int]:
    """The ranks of a job without datatrove's completion mark (``logs/completions/<rank>``)."""
    marks = logs / "completions"
    done = {p.name for p in marks.iterdir()} if marks.is_dir() else set()
    return [r for r in range(tasks) if f"{r:05d}" not in done]


def check_done(job, logs: Path, ex: Executor) -> None:
    """Stop in one line when a task of ``job`` has no completion mark."""
    missing = incomplete(logs, job.tasks)
    if not missing:
        return
    rank = missing[0]
    log = logs / "logs" / f"task_{rank:05d}.log"
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise CurationError(f"data: task {rank} of job {job.name!r}{more} did not complete on {ex.where()}; its log: "
                        f"{log if log.exists() else logs}; fix what it says and run the same command again "
                        "(finished tasks are kept)")


# --- Ray --------------------------------------------------------------------------------------


def _reachable(address: str, seconds: float = 5.0) -> None:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=seconds):
            return
    except OSError as e:
        raise CurationError(f"--address {address}: no Ray cluster answers there ({e.strerror or e}); start one "
                            "with `ray start --head`, or give the address it printed") from None


def ray_worker_setup() -> None:
    """Run by each Ray worker of a curation job before its first task. datatrove's ``RankWorker``
    runs its ranks in a ``multiprocess`` pool, which forks by default; a fork of a Ray worker
    (gRPC's and Ray's own threads running) can leave the child waiting forever on a lock one of
    those threads held. A spawned child starts from a clean interpreter instead."""
    import multiprocess

    multiprocess.set_start_method("spawn", force=True)


def ray_jobs(jobs: list, work, ex: Executor, run_job) -> None:
    """Each job on the Ray cluster at ``ex.address``, in order, its completions checked before
    the next starts (datatrove's own dependency wait polls every two minutes, forever when a
    task failed)."""
    try:
        import ray
        from datatrove.executor import RayPipelineExecutor
    except ImportError:
        raise CurationError("--executor ray: Ray is not installed here; pip install -e '.[cluster]' (ray "
                            "2.58.0, about 80 MB), the same on every node") from None
    _reachable(ex.address)
    ray.init(address=ex.address, logging_level="ERROR", log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "training.cluster.ray_worker_setup"})
    try:
        for job in jobs:
            logs = Path(work.logs(job.name))
            with run_job(job):
                if incomplete(logs, job.tasks):
                    RayPipelineExecutor(pipeline=job.pipeline, tasks=job.tasks, logging_dir=str(logs),
                                        cpus_per_task=1, mem_per_cpu_gb=RAY_TASK_GB, workers=-1).run()
            check_done(job, logs, ex)
    finally:
        ray.shutdown()


# --- Slurm ------------------------------------------------------------------------------------


def _slurm(cmd: list[str]) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise CurationError(f"--executor slurm: {cmd[0]} is not on PATH; run on a host with Slurm's client "
                            "commands (sbatch, squeue) and its configuration")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def slurm_ready(ex: Executor) -> None:
    """One line when the controller does not answer or the partition does not exist."""
    ping = _slurm(["scontrol", "ping"])
    if ping.returncode != 0 or "is UP" not in ping.stdout:
        said = ((ping.stdout.strip() or ping.stderr.strip()).splitlines() or ["no reply"])[0]
        raise CurationError(f"--executor slurm: the Slurm controller does not answer ({said}); check that "
                            "slurmctld runs and SLURM_CONF names its configuration")
    parts = _slurm(["sinfo", "-h", "-o", "%R"]).stdout.split()
    if ex.partition not in parts:
        raise CurationError(f"--partition {ex.partition}: no such Slurm partition (there are: "
                            f"{', '.join(parts) or 'none'})")


def _queued(ids: set[str]) -> set[str]:
    """The job ids among ``ids`` still in Slurm's queue (pending or running)."""
    out = _slurm(["squeue", "-h", "-o", "%F"])
    if out.returncode != 0:
        raise CurationError(f"--executor slurm: squeue failed ({out.stderr.strip()}); the jobs may still run, "
                            "`squeue` shows them")
    return ids & set(out.stdout.split())


def slurm_jobs(jobs: list, work, ex: Executor, run_job, executors) -> None:
    """Submit the whole chain (a job array per job, each after the one before), then follow it
    job by job: wait while it is queued, check its completions; a failed job cancels the rest."""
    slurm_ready(ex)
    activate = Path(sys.prefix) / "bin" / "activate"
    chain = executors(jobs, work, "slurm", partition=ex.partition, time=ex.time, cpus_per_task=1,
                      venv_path=str(activate), mail_type="NONE")
    try:
        chain[-1].run()  # datatrove submits the dependencies first
    except subprocess.CalledProcessError as e:
        raise CurationError(f"--executor slurm: sbatch failed (exit status {e.returncode}; its message is in "
                            f"{Path(work.root) / 'console.log'})") from None
    ids = [str(x.job_id) for x in chain]
    try:
        for job, job_id in zip(jobs, ids, strict=True):
            logs = Path(work.logs(job.name))
            with run_job(job):
                while job_id not in ("-1", "None") and _queued({job_id}):
                    time.sleep(POLL)
            check_done(job, logs, ex)
    except BaseException:
        left = [i for i in ids if i not in ("-1", "None")]
        if left:
            _slurm(["scancel", *left])  # the jobs of this run only (finished ids are ignored)
        raise

