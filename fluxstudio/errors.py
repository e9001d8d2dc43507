"""One exception hierarchy for everything a user can cause.

Each error carries a message (what went wrong, one sentence) and a hint (what to do next). The edges
(CLI, UI) turn them into text through one mapping; the core never prints.
"""

from __future__ import annotations


class FluxStudioError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


class BadInputError(FluxStudioError):
    """A file or folder given as input cannot be used (missing, corrupt, pickle, wrong model)."""

    exit_code = 2


class LoraMismatchError(BadInputError):
    """A LoRA does not fit the base model (other family, unknown modules, incompatible shapes)."""


class NumericError(BadInputError):
    """NaN or Inf values in a LoRA or in a fused weight."""


class OutputError(FluxStudioError):
    """The output folder cannot be used (exists, overlaps the input)."""

    exit_code = 3


class DiskSpaceError(FluxStudioError):
    """Not enough free disk for the job."""

    exit_code = 4


class HubError(FluxStudioError):
    """The Hugging Face Hub refused or failed a request."""

    exit_code = 5


class CancelledError(FluxStudioError):
    """The user cancelled the job; nothing was kept."""

    exit_code = 130
