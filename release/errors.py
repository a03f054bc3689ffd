"""Every error a user can cause, in one family.

Anything raised from these classes is the user's to fix (a spec value, a missing file, a failed
gate, a Hub refusal), so tasks print ``str(e)`` as ``error: <line>`` lines and exit 2, never a
traceback. Each message names the file or key and says what to do. Anything else is a bug in the
toolchain and keeps its traceback. This module imports nothing, so every module may import it.
"""

from __future__ import annotations

__all__ = [
    "ReleaseError", "UsageError", "SpecError", "TemplateError", "ModelfileError", "StageError", "CurationError",
    "MergeError", "Bnb4Error", "GGUFError", "VerifyError", "PublishError", "DockerError", "LocalHubError",
    "BuildLocked", "DiskFull", "Interrupted",
]


class ReleaseError(Exception):
    """The base of everything a user can cause; ``str()`` is one line per problem."""


class UsageError(ReleaseError):
    """A command line that cannot be carried out: a missing or malformed option, or options that
    do not go together."""


class SpecError(ReleaseError):
    """A spec that cannot be used; ``problems`` holds one line each (file, key, what is expected)."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class TemplateError(ReleaseError):
    """A spec value that cannot be placed in a Jinja or Go template safely."""


class ModelfileError(ReleaseError):
    """A Modelfile Ollama would reject; ``str()`` is ``file:line: message``."""


class StageError(ReleaseError):
    """A stage that cannot run, or whose recorded state is inconsistent."""


class CurationError(StageError):
    """A corpus that cannot be read or curated as the spec says."""


class MergeError(StageError):
    """An adapter that does not fit its base (shapes, names, base model, PEFT type)."""


class Bnb4Error(StageError):
    """A model the bitsandbytes 4-bit stage cannot quantize."""


class GGUFError(StageError):
    """A model or quant type the GGUF stage cannot convert or quantize."""


class VerifyError(StageError):
    """A variant that cannot be loaded or run for verification."""


class PublishError(StageError):
    """A Hub plan or push that was refused (unverified files, the server's answer, the token)."""


class DockerError(StageError):
    """A container engine or image that is missing or failed."""


class BuildLocked(StageError):
    """Another process is writing the build folder (release/lock.py)."""


class DiskFull(StageError):
    """The disk filled while a stage was writing; its unfinished folder was removed."""


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM, with the stage it stopped. Not an ``Exception``, as
    ``KeyboardInterrupt`` is not, so that no handler of errors swallows it: every ``finally`` and
    cleanup runs, and tasks print one line and exit ``128 + signum`` (130, 143)."""

    def __init__(self, signum: int, stage: str | None = None):
        self.signum, self.stage = signum, stage
        super().__init__(signum, stage)

    def __str__(self) -> str:
        where = f" in stage {self.stage}" if self.stage else ""
        return f"interrupted{where}; run the same command to resume"


class LocalHubError(ReleaseError):
    """A local Hub that cannot start: its folder cannot be made or its port is taken."""
