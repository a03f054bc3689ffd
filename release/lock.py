"""One writer per build folder.

Every task that writes into ``build/<release>/`` runs inside ``hold(build_dir)``: an exclusive
``flock`` on ``build/<release>/.lock`` (filelock's ``UnixFileLock``), held for the whole run. The
kernel drops the lock with the last descriptor of its process, so a run killed by anything,
SIGKILL included, leaves no stale lock. Beside it, ``.lock.json`` names the holder (pid, host,
command, since when) so that a second writer can refuse in one line that says who to wait for;
``wait=True`` waits for the holder instead.

Processes started by the holder (torchrun's workers, the docker runner's containers, which run
``release --only STAGE`` against the same folder) inherit the right to write through
``QALB_BUILD_LOCK`` in their environment and do not take the lock again.

Several hosts: the lock is an ``flock`` on the shared build folder, which NFSv4 (and NFSv3 with
its lock manager), CephFS and Lustre mounted with ``flock`` carry between hosts; a filesystem
that refuses locks is reported in one line rather than silently unlocked. The launchers of one
multi-host training run (``--nodes N --rdzv HOST:PORT``) all run the same command: the first to
arrive holds the lock with its rendezvous in the holder record, and a launcher that finds the
same rendezvous and stage joins instead of refusing (only rank 0 writes; the others train and
write nothing). Any other writer is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from release.errors import BuildLocked

LOCK = ".lock"
HOLDER = ".lock.json"
ENV = "QALB_BUILD_LOCK"  # set for the holder's children: the build folder they may write


@dataclass(frozen=True)
class Holder:
    """Who holds a build folder's lock."""

    pid: int
    host: str
    command: str
    since: str  # local time, ISO 8601
    group: str | None = None  # a multi-host training run: "<stage>@<rdzv>", which its launchers share

    def line(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}: {self.command}"


def _me(group: str | None) -> Holder:
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    name = program.parent.name if program.name == "__main__.py" else program.name  # python -m invoke: invoke
    argv = [name, *sys.argv[1:]]
    return Holder(os.getpid(), socket.gethostname(), shlex.join(argv), time.strftime("%Y-%m-%dT%H:%M:%S%z"), group)


def holder(build_dir: Path) -> Holder | None:
    """The recorded holder of ``build_dir``'s lock (it may have ended: the lock, not this, decides)."""
    try:
        return Holder(**json.loads((Path(build_dir) / HOLDER).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _write_holder(build_dir: Path, me: Holder) -> None:
    tmp = Path(build_dir) / f".{HOLDER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(asdict(me)) + "\n", encoding="utf-8")
    os.replace(tmp, Path(build_dir) / HOLDER)


@contextlib.contextmanager
def hold(build_dir: Path, *, wait: bool = False, group: str | None = None,
         notice=None) -> Iterator[Holder | None]:
    """Hold ``build_dir``'s writer lock for the ``with`` block; yields the holder record, or None
    when this process writes under its parent's lock (``QALB_BUILD_LOCK``) or joins the training
    run ``group`` that another launcher holds. Refuses (``BuildLocked``) at once when another
    process holds it, unless ``wait``; ``notice(text)`` is told once that this run waits."""
    from filelock import FileLock, Timeout

    build_dir = Path(build_dir)
    if os.environ.get(ENV) == str(build_dir.resolve()):
        yield None
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(build_dir / LOCK, fallback_to_soft=False, preserve_lock_file=True, thread_local=False)
    joined = False
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            other = _settled_holder(build_dir)
            who = other.line() if other else "another process"
            if group is not None and other is not None and other.group == group:
                joined = True  # a launcher of the same multi-host training run: rank 0's writes
            elif not wait:
                raise BuildLocked(f"{build_dir}: another run is writing this build folder ({who}); wait for it "
                                  "to finish, or run the same command with --wait") from None
            else:
                if notice is not None:
                    notice(f"waiting for {build_dir}: another run is writing it ({who})")
                lock.acquire()
    except OSError as e:  # not the with-block's errors: only taking the lock is guarded here
        raise BuildLocked(f"{build_dir / LOCK}: cannot lock the build folder ({e.strerror or e}); its filesystem "
                          "must support flock (for NFS: the lock manager, for Lustre: mount with -o flock)") from None
    if joined:
        yield None
        return
    me = _me(group)
    previous = os.environ.get(ENV)
    try:
        with contextlib.suppress(OSError):  # the record only informs others (a full disk must not stop the run here)
            _write_holder(build_dir, me)
        os.environ[ENV] = str(build_dir.resolve())  # children write under this lock
        yield me
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
        with contextlib.suppress(OSError):
            if holder(build_dir) == me:
                (build_dir / HOLDER).unlink()
        lock.release()


def _settled_holder(build_dir: Path, tries: int = 20) -> Holder | None:
    """The holder record, read again for a moment while it still names a process that has ended
    (the new holder writes its record just after taking the lock)."""
    for _ in range(tries):
        h = holder(build_dir)
        if h is not None and (h.host != socket.gethostname() or _alive(h.pid)):
            return h
        time.sleep(0.05)
    return holder(build_dir)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
