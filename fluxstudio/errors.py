"""One exception hierarchy for everything a user can cause.

Each error carries a message (what went wrong, one sentence), a hint (what to do next), the local paths the
message mentions and an owner-only detail (what this machine has, such as the cached repos), as separate fields:
the edges decide how to show them (a shared session hides exactly those paths and the detail, and nothing else).
Exit codes are the CLI's business (cli.EXIT_CODES); the core never prints.
"""

from __future__ import annotations

import os
import re


class FluxStudioError(Exception):
    """Base class: a problem the user can act on."""

    def __init__(
        self, message: str, hint: str = "", paths: tuple[str | os.PathLike, ...] = (), detail: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.paths = tuple(str(p) for p in paths)
        self.detail = detail

    def __str__(self) -> str:
        return " ".join(t for t in (self.message, self.hint, self.detail) if t)

    def without_paths(self) -> str:
        """What a shared session sees: no detail, and each local path cut to its last part (Windows paths too)."""
        text = f"{self.message} {self.hint}".strip()
        for p in sorted(self.paths, key=len, reverse=True):
            text = text.replace(p, re.split(r"[\\/]", p.rstrip("\\/"))[-1] or p)
        return text


class BadInputError(FluxStudioError):
    """A file or folder given as input cannot be used (missing, corrupt, pickle, wrong model)."""


class LoraMismatchError(BadInputError):
    """A LoRA does not fit the base model (other family, unknown modules, incompatible shapes)."""


class NumericError(BadInputError):
    """NaN or Inf values in a LoRA or in a fused weight."""


class OutputError(FluxStudioError):
    """The output folder cannot be used (exists, overlaps the input)."""


class OutputExistsError(OutputError):
    """The output's name is taken, and replacing it was not asked for (each edge says how to ask)."""


class DiskSpaceError(FluxStudioError):
    """Not enough free disk for the job."""


class HubError(FluxStudioError):
    """The Hugging Face Hub refused or failed a request."""


class CancelledError(FluxStudioError):
    """The user cancelled the job; nothing was kept."""
