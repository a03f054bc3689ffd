"""Ctrl-C and SIGTERM, raised in the main thread and remembered.

SIGTERM raises ``Interrupted`` as Ctrl-C raises ``KeyboardInterrupt``, so the same cleanup runs
(partial folders removed, children stopped). Both are also recorded, because Python may deliver
a signal's exception where it cannot propagate (inside a ``__del__``, a weakref or GC callback:
"Exception ignored in ...") and a library may swallow it; the pipeline checks the record between
stages (``check``), so an interrupt is never lost: at worst the stage it arrived in finishes.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from release.errors import Interrupted

received: list[int] = []  # the signals received while ``handled`` was active


def _handler(signum: int, _frame) -> None:
    received.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Raise on SIGINT and SIGTERM, and record them, for the ``with`` block (main thread only)."""
    before = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    received.clear()
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def check(stage: str | None) -> None:
    """Raise ``Interrupted`` if a signal arrived whose exception did not reach us."""
    if received:
        raise Interrupted(received[0], stage)
