"""Child processes that never outlive the run that started them.

llama.cpp's tools, torchrun and the docker CLI run as children. Ctrl-C in a terminal reaches
them with their parent (one process group), but SIGTERM sent to the parent's pid, or SIGKILL,
does not. So every child is started with ``PR_SET_PDEATHSIG`` (the kernel kills it when its
parent dies, SIGKILL included), and one whose parent is interrupted while waiting for it is
killed and reaped before the interrupt goes on (``subprocess.run`` does this itself; ``popen``
does it for a child whose output is read line by line).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Iterator


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, even by SIGKILL. For ``preexec_fn`` (and
    torchrun's workers, which call it first thing). The parent is the thread that forked: call
    ``run``/``popen`` from a thread that outlives the child (they wait for it)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` whose child dies with this process (it kills the child on an interrupt)."""
    return subprocess.run(cmd, preexec_fn=die_with_parent, **kwargs)


@contextlib.contextmanager
def popen(cmd: list[str], **kwargs) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen`` as a context whose child dies with this process and is killed and
    reaped when the block is left by an exception or an interrupt (``Popen.__exit__`` alone
    would wait for it)."""
    with subprocess.Popen(cmd, preexec_fn=die_with_parent, **kwargs) as proc:
        try:
            yield proc
        except BaseException:
            proc.kill()
            proc.wait()
            raise
