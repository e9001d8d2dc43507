"""Typed progress events, a cancel token, and the `Run` that carries both (and notes) through a job.

Core functions take `run: Run` (or None: nobody watching, nothing to cancel). A bug in a progress callback is logged
and never kills the job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from fluxstudio.errors import CancelledError

log = logging.getLogger(__name__)


class Stage(str, Enum):
    """The stages of a job, in order (a str, so that events read as plain text in logs and JSON)."""

    PREPARE = "prepare"
    DOWNLOAD = "download"
    INSPECT = "inspect"
    FUSE = "fuse"
    FINALIZE = "finalize"
    PREVIEW = "preview"  # a Try-it render (its own job)


@dataclass(frozen=True)
class ProgressEvent:
    stage: Stage
    done: int = 0
    total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    bytes_start: int = 0  # bytes there already when the stage began (a resumed download): rates count the rest
    item: str = ""  # the tensor or file being worked on
    message: str = ""


ProgressCallback = Callable[[ProgressEvent], None]


class CancelToken:
    """Set from any thread; the job checks it between units of work and stops cleanly."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise CancelledError("Cancelled.", "Nothing was saved.")


def report(progress: ProgressCallback | None, event: ProgressEvent) -> None:
    """Send an event to the callback; a failing callback is logged, never raised."""
    if progress is None:
        return
    try:
        progress(event)
    except Exception:
        log.exception("progress callback failed")


def check(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.check()


@dataclass
class Run:
    """One job as its stages see it: where progress goes, whether it was cancelled, and what the person should know."""

    progress: ProgressCallback | None = None
    cancel: CancelToken | None = None
    notes: list[str] = field(default_factory=list)

    def report(self, event: ProgressEvent) -> None:
        report(self.progress, event)

    def check(self) -> None:
        check(self.cancel)

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.cancelled


def running(run: Run | None) -> Run:
    """The run to report to: the given one, or a silent one."""
    return run if run is not None else Run()
