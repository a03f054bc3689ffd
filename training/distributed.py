"""Training on many processes: DDP launched with torchrun (``torch.distributed.run``).

``./inv train --stage cpt --processes 8`` runs ``torchrun --standalone --nproc-per-node 8 -m
training.worker ...``; with ``--nodes 2 --rdzv HOST:PORT`` every host runs the same command
and torchrun's c10d rendezvous at HOST:PORT joins them. Each worker runs the stage exactly as one
process does (training/worker.py, training/stages.py), with these differences, all in stages.py behind ``world()``:

- the Trainer wraps the model in DDP (NCCL on GPUs, gloo on CPUs); each rank trains on its own
  share of every global batch, and the per-device batch and gradient accumulation are derived so
  that the global batch stays the spec's ``effective_batch_size`` (``batch``);
- rank 0 prepares the shared inputs (the tokenized data, SFT's merged base) while the others
  wait, then they read them; rank 0 alone writes checkpoints, the adapter, the log and the
  manifest. The build folder must be one filesystem for every host (checkpoints are resumed from
  it);
- a worker dies with its launcher (``PR_SET_PDEATHSIG``): a SIGKILLed torchrun leaves no process
  holding GPUs, and the rerun resumes from the last complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from release import children
from release.errors import StageError

JOIN_TIMEOUT = 600  # torchrun's own default: hosts that start minutes apart (a queue, a slow pull) still meet


@dataclass(frozen=True)
class Launch:
    """How many training processes, on how many hosts, meeting where."""

    processes: int = 1  # per host
    nodes: int = 1
    rdzv: str | None = None  # HOST:PORT of the c10d rendezvous (required with nodes > 1)
    join_timeout: int = JOIN_TIMEOUT  # seconds the hosts have to meet at the rendezvous

    @property
    def world(self) -> int:
        return self.processes * self.nodes


def launch(processes: int | str = 1, nodes: int | str = 1, rdzv: str | None = None,
           join_timeout: int | str = JOIN_TIMEOUT) -> Launch:
    """The launch options as given on the command line, checked."""
    try:
        p, n, t = int(processes), int(nodes), int(join_timeout)
    except ValueError:
        raise StageError(f"--processes {processes} --nodes {nodes} --join-timeout {join_timeout}: expected whole "
                         "numbers") from None
    if p < 1 or n < 1 or t < 1:
        raise StageError(f"--processes {p} --nodes {n} --join-timeout {t}: each must be at least 1")
    if n > 1 and not rdzv:
        raise StageError(f"--nodes {n}: give the rendezvous with --rdzv HOST:PORT (a host every node reaches; "
                         "the same on every node)")
    if rdzv and (":" not in rdzv or not rdzv.rpartition(":")[2].isdigit()):
        raise StageError(f"--rdzv {rdzv}: expected HOST:PORT, e.g. node0.example:29500")
    return Launch(p, n, rdzv or None, t)


def world() -> tuple[int, int, int]:
    """``(rank, local rank, world size)`` of this process as torchrun set them (``(0, 0, 1)`` alone)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def batch(effective: int, per_device: int, world_size: int) -> tuple[int, int]:
    """``(per-device batch, accumulation)`` with ``per_device * accumulation * world_size ==
    effective``: the largest per-device batch up to the spec's that divides the global batch."""
    if effective % world_size:
        raise StageError(f"effective_batch_size {effective} is not a multiple of the {world_size} training "
                         "processes; choose a process count that divides it (the global batch is the spec's)")
    share = effective // world_size
    device = max(d for d in range(1, min(per_device, share) + 1) if share % d == 0)
    return device, share // device


def init() -> None:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs), once, before the
    Trainer: the stage's own coordination (``share``, ``barrier``) needs it first; the Trainer
    then uses it as it is."""
    import torch
    import torch.distributed as dist

    if world()[2] == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(world()[1])
    else:
        # accelerate names a CPU rank's device cpu:<rank>, a location torch.load cannot restore
        # to, and the Trainer loads a checkpoint's optimizer state there on resume
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def share(flag: bool) -> bool:
    """Rank 0's ``flag``, on every rank."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.broadcast(t, 0)
    return bool(t.item())


class rank0_first:
    """``with rank0_first(): ...``: rank 0 runs the block (preparing a shared file) while the
    other ranks wait; then they run it (and find the file ready)."""

    def __enter__(self):
        if world()[0] != 0:
            barrier()

    def __exit__(self, kind, value, tb):
        if world()[0] == 0 and kind is None:
            barrier()
        return False


def command(spec: Path, stage: str, inputs: Mapping[str, Path], how: Launch, *, force: bool = False) -> list[str]:
    """The command line that trains ``stage`` of ``spec`` from ``inputs`` as ``how`` says: torchrun,
    or for one process on one host the worker alone (nothing to rendezvous with)."""
    worker = ["-m", "training.worker", "--spec", str(spec), "--stage", stage,
              "--inputs", json.dumps({k: str(v) for k, v in inputs.items()}, sort_keys=True)]
    if how.world == 1 and not how.rdzv:
        return [sys.executable, *worker] + (["--force"] if force else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(how.processes),
           "--nnodes", str(how.nodes), "--max-restarts", "0"]
    if how.nodes == 1 and not how.rdzv:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(how.rdzv), "--rdzv-id", f"qalb-{stage}",
                "--rdzv-conf", f"join_timeout={how.join_timeout}"]
    return cmd + worker + (["--force"] if force else [])


def run(spec, stage: str, inputs: Mapping[str, Path], how: Launch, *, force: bool = False, progress: bool = True):
    """Train ``stage`` in child processes (this host's share of the workers, training/worker.py:
    through torchrun, or one worker alone) and return its manifest, which rank 0 wrote.

    One process trains in a child too, not in the pipeline's process: a process that has trained
    keeps a heap that made the stages after it slow (verification ran 2.5x slower in the process
    that had just run SFT, torch and llama.cpp alike; measured on the demo), and the child's
    memory is returned when it ends."""
    from release.artifacts import built_elsewhere, read_manifest, stage_dir

    folder = stage_dir(spec.build_dir, stage)
    before = read_manifest(folder)
    env = dict(os.environ, QALB_PROGRESS="1" if progress else "0")
    cmd = command(spec.path, stage, inputs, how, force=force)
    if progress and how.world > 1:
        print(f"torchrun: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    tail: deque[str] = deque(maxlen=400)
    with children.popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        for line in proc.stderr:  # passed on as it comes; the tail names the cause of a failure
            if how.world > 1 or not line.startswith("error: [rank "):  # one worker's error is our one line
                sys.stderr.write(line)
            tail.append(line)
        rc = proc.wait()
    if rc != 0:
        raise StageError(failure(stage, rc, list(tail), how))
    after = read_manifest(folder)
    if after is None:
        raise StageError(f"{folder}: no manifest after training; on several hosts the build folder must be one "
                         "shared filesystem (rank 0 writes it)")
    return built_elsewhere(before, after)


def failure(stage: str, rc: int, lines: list[str], how: Launch) -> str:
    """The one line that says why torchrun ended with ``rc``, from the end of its output: a
    worker's own error, a rendezvous that did not complete, or another host that went away."""
    ours = [line.split("] ", 1)[-1].strip() for line in lines if line.startswith("error: [rank ")]
    if ours:
        return f"{stage}: {ours[0]}"
    text = "".join(lines)
    if "RendezvousTimeoutError" in text:
        return (f"{stage}: the {how.nodes} hosts did not all join the rendezvous at {how.rdzv} within "
                f"{how.join_timeout} s (--join-timeout); start the same command on every host, each reaching "
                f"{how.rdzv}")
    if "Connection closed by peer" in text or "Connection reset by peer" in text:
        return (f"{stage}: a training process on another host stopped (its launcher's output says why); run the "
                "same command again on every host to resume from the last checkpoint")
    if "RendezvousConnectionError" in text and ("num_nodes_waiting" in text or "[train] step " in text):
        # the store was lost while the workers ran: the host that served it went away
        return (f"{stage}: the host serving the rendezvous at {how.rdzv} stopped (its launcher's output says why); "
                "run the same command again on every host to resume from the last checkpoint")
    if "RendezvousConnectionError" in text:
        return (f"{stage}: cannot reach the rendezvous at {how.rdzv}; start the first host's command there, "
                "and open the port to every host")
    who = "torchrun" if how.world > 1 or how.rdzv else "the training process"
    return (f"{stage}: {who} ended with exit status {rc} (the workers' errors are above); run the same command "
            "again to resume from the last checkpoint")


def checkout(root: Path | None = None) -> str:
    """sha256 of this checkout's code (the Python of ``release/``, ``training/``, ``tasks.py``) and
    ``pyproject.toml``: what every host of one training run must share."""
    root = root or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    files = sorted([*root.glob("release/*.py"), *root.glob("training/*.py"), root / "tasks.py",
                    root / "pyproject.toml"])
    for f in files:
        if f.is_file():
            h.update(f"{f.relative_to(root)}\0".encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def agree(facts: Mapping[str, str]) -> None:
    """Stop every rank, with the same one line, when a rank's ``facts`` (its checkout, spec,
    environment, inputs) differ from rank 0's: hosts that run different code or settings would
    average the gradients of different trainings, or wait for each other forever."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, (socket.gethostname(), dict(facts)))
    host0, first = every[0]
    for rank, (host, theirs) in enumerate(every):
        differ = [k for k in first if theirs.get(k) != first[k]]
        if differ:
            raise StageError(f"rank {rank} on {host} differs from rank 0 on {host0} in its {', '.join(differ)}; "
                             "every host must run the same checkout, environment and spec "
                             "file (and see the same build folder), then the same command")
